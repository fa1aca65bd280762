"""act() latency of the built-in policies on this CPU, as a markdown table.

Theia-tiny tokens (C=192), 1 and 2 cameras, history 1 and 2, 7 joints, default params, torch
threads 1 (override with --threads). Each policy acts on a cycle of random observations after a
warm-up; act() includes their validation (built by hand; the ObservationBuffer checks each message
as it is pushed, and act() trusts what it builds). A second table times ObservationBuffer.build()
(alignment + stacking) for the same shapes.

    .venv/bin/python benchmarks/bench_policies.py [--iters 300] [--threads 1]
"""
import argparse
import platform
import time

import numpy as np
import torch

from theia_ros.policies import ActionSpec, ObservationBuffer, ObservationSpec, make_policy, random_observation

JOINTS = [f"joint{i}" for i in range(1, 8)]
POLICIES = ["hold", "mlp", "theia_head"]


def time_calls(fn, iters, warmup):
    for _ in range(warmup):
        fn()
    out = np.empty(iters)
    for i in range(iters):
        t0 = time.perf_counter_ns()
        fn()
        out[i] = time.perf_counter_ns() - t0
    out /= 1e6
    return float(np.median(out)), float(np.percentile(out, 90))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dim", type=int, default=192, help="feature width C (192 tiny, 384 small, 768 base)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {platform.processor() or platform.machine()}, "
          f"tokens [196, {args.dim}], 7 joints, {args.iters} iterations after {args.warmup} warm-up\n")

    rows, build_rows = [], []
    for n_cams in (1, 2):
        for history in (1, 2):
            spec = ObservationSpec(["front", "wrist"][:n_cams], "tokens", (196, args.dim), JOINTS, history)
            action = ActionSpec(JOINTS, "position", [-3.0] * 7, [3.0] * 7)
            observations = [random_observation(spec, seed) for seed in range(8)]
            medians = {}
            for name in POLICIES:
                policy = make_policy(name, {"observation": spec.to_dict(), "action": action.to_dict(),
                                            "params": {} if name == "hold" else {"seed": 0}})
                policy.reset()
                k = iter(range(10 ** 9))
                med, p90 = time_calls(lambda: policy.act(observations[next(k) % 8]), args.iters, args.warmup)
                medians[name] = med
                rows.append((name, n_cams, history, med, p90, med / medians["hold"]))

            buf = ObservationBuffer(spec)
            rng = np.random.default_rng(0)
            for f in range(history + 2):
                for cam in spec.cameras:
                    buf.push_features(cam, 0.1 * f, rng.standard_normal((196, args.dim), dtype=np.float32))
                buf.push_joint_state(0.1 * f, JOINTS, rng.normal(size=7), np.zeros(7))
            build_rows.append((n_cams, history) + time_calls(buf.build, args.iters, args.warmup))

    print("| policy | cameras | history | median ms | p90 ms | median / hold |")
    print("|---|---|---|---|---|---|")
    for name, n_cams, history, med, p90, ratio in rows:
        print(f"| {name} | {n_cams} | {history} | {med:.3f} | {p90:.3f} | {ratio:.1f}x |")
    print("\n| ObservationBuffer.build | cameras | history | median ms | p90 ms |")
    print("|---|---|---|---|---|")
    for n_cams, history, med, p90 in build_rows:
        print(f"| build | {n_cams} | {history} | {med:.3f} | {p90:.3f} |")


if __name__ == "__main__":
    main()
