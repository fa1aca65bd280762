"""Does the main job still work with a bf16 or int8 encoder? Success on the same seeds, as a markdown table.

    .venv/bin/python benchmarks/bench_precision_downstream.py [--seeds 1000-1009] [--variants torch:fp32 ...]
        [--parts 1 2] [--train-episodes 30] [--train-steps 800] [--control-seeds 1] [--ros] [--json out.json]
        [--workdir DIR [--reuse]]

Takes ~20-30 min on 2 busy cores with 1 thread (parts 1 and 2 can run as two processes: --parts 1 / --parts 2).

1. The shipped policy (config/demo_policy, a theia_head trained on fp32 torch features of
   random:theia-tiny-patch16-224-cddsv seed 0) in the main job's closed loop (theia_ros.sim.closed_loop:
   camera 15 Hz 224x224, policy 10 Hz, 6 s episodes, in lock step on simulated time, so every encoder sees
   the same episodes), once per encoder variant (backend:precision) on the same seeds. Per seed: success
   and final distance; at every tick the fp32 reference encoder's features of the same frame go through
   the policy too (a shadow that never moves the robot), giving the action difference on identical
   inputs and the cosine of the features.
2. Policies trained on each variant's features of the same expert episodes (collected once with
   `theia-ros collect` over ROS, as the shipped policy's were; encoded per variant with encode_bag;
   train_policy with identical seed and steps), each evaluated with its own encoder on the same seeds;
   the shadow is the fp32-trained policy on fp32 features of the same frames (action agreement). A
   control: fp32 policies trained with other training seeds (--control-seeds), the yardstick of how
   far training alone moves the actions.
3. With --ros: the real main job (`theia-ros bringup config/sim_demo.yaml --duration ...`) once per
   variant, its summary's episode successes (wall-clock timing: not the same episodes, for reference).

PASS criterion with the shipped policy: the same success as fp32 on every seed (identical per-seed
outcomes). The lock-step loop is deterministic, so a variant whose features were as good as fp32's for
the policy gives exactly the same outcomes; one episode of n lost is a real (if small) loss, not noise.
For policies trained on each variant's features: a success count within one episode of n of the fp32-
trained policy's (two trainings differ even on equal features; the control shows by how much).
Uses 1 torch thread; the random-weights encoder needs no download.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
os.environ.setdefault("ROS_DOMAIN_ID", str(os.getpid() % 100 + 101))

import torch  # noqa: E402 (after the sys.path and environment set-up above)

from theia_ros.sim.closed_loop import Agent, ClosedLoopConfig, run_episode  # noqa: E402 (after the set-up above)

ROOT = Path(__file__).resolve().parent.parent
MODEL = "random:theia-tiny-patch16-224-cddsv"
SHIPPED = ROOT / "config" / "demo_policy"
ARM = [f"panda_joint{i}" for i in range(1, 8)]
REFERENCE = "torch:fp32"


def seeds_arg(text):
    """'1000-1009' or '1000,1003' -> list of ints."""
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi) + 1) if hi else [int(lo)])
    return out


def available_variants():
    from theia_ros.backends.factory import backend_classes

    variants = ["torch:fp32", "torch:bf16"]
    if "openvino" in backend_classes():
        variants += ["openvino:fp32", "openvino:bf16", "openvino:int8"]
    return variants


def make_encoder(variant):
    from theia_ros.backends.factory import create_encoder

    backend, _, precision = variant.partition(":")
    return create_encoder(MODEL, seed=0, representation="tokens", backend=backend, precision=precision or "fp32",
                          max_batch=1, threads=1)


def load_policy(path):
    from theia_ros.policies import make_policy

    return make_policy(None, checkpoint=str(path))  # the policy node's way: the class the checkpoint names


def evaluate(sim, encoders, policies, variants, seeds, config, reference=REFERENCE, printer=print):
    """Per variant: the episodes of `seeds` driven by (its encoder, its policy), with the reference's
    (encoder, policy) as the shadow. Returns {variant: [episode result]}."""
    ref = Agent(encoders[reference], policies[reference], lower=sim.lower, upper=sim.upper, name=reference)
    out = {}
    for variant in variants:
        agent = Agent(encoders[variant], policies[variant], lower=sim.lower, upper=sim.upper, name=variant)
        rows = []
        for seed in seeds:
            t0 = time.perf_counter()
            r = run_episode(sim, seed, agent, shadow=None if variant == reference else ref, config=config)
            if variant == reference:
                r.update(action_abs_diff_max=0.0, action_abs_diff_mean=0.0, feature_cosine_min=1.0,
                         feature_cosine_mean=1.0)
            r["seconds"] = round(time.perf_counter() - t0, 1)
            rows.append(r)
            printer(f"  {variant:22s} seed {seed}: {'success' if r['success'] else 'FAIL   '} final distance "
                    f"{r['distance']:.4f} m, action |diff| max {r['action_abs_diff_max']:.2e} mean "
                    f"{r['action_abs_diff_mean']:.2e}, feature cosine min {r['feature_cosine_min']:.6f} "
                    f"({r['seconds']} s)", flush=True)
        out[variant] = rows
    return out


def table(results, reference=REFERENCE, extra=None, count_tolerance=None):
    """Markdown rows: variant, success k/n, mean final distance, action diff, cosine, PASS/FAIL: the same
    success as the reference on every seed, or (`count_tolerance` k) a success count within k of its."""
    ref = {r["seed"]: r["success"] for r in results[reference]}
    ref_wins = sum(ref.values())
    lines = ["| encoder | success | mean final distance (m) | action abs diff vs fp32: max / mean (rad) "
             "| feature cosine vs fp32: min / mean | per-seed success = fp32's |" + (" val NMSE |" if extra else ""),
             "|---|---:|---:|---:|---:|---|" + ("---:|" if extra else "")]
    for variant, rows in results.items():
        wins = sum(r["success"] for r in rows)
        differ = [r["seed"] for r in rows if r["success"] != ref.get(r["seed"])]
        verdict = "reference" if variant == reference else ("PASS" if not differ else f"FAIL (seeds {differ})")
        if count_tolerance is not None and variant != reference:
            verdict = (f"{'PASS' if abs(wins - ref_wins) <= count_tolerance else 'FAIL'} (count; per seed: "
                       f"{'same' if not differ else f'differs on {differ}'})")
        lines.append(
            f"| {variant} | {wins}/{len(rows)} | {np.mean([r['distance'] for r in rows]):.4f} "
            f"| {max(r['action_abs_diff_max'] for r in rows):.2e} / "
            f"{np.mean([r['action_abs_diff_mean'] for r in rows]):.2e} "
            f"| {min(r['feature_cosine_min'] for r in rows):.6f} / "
            f"{np.mean([r['feature_cosine_mean'] for r in rows]):.6f} | {verdict} |"
            + (f" {extra[variant]:.4f} |" if extra else ""))
    return "\n".join(lines)


def cli(*args, timeout=1800):
    from theia_ros.nodes.environment import child_environment

    result = subprocess.run([sys.executable, "-m", "theia_ros.cli", *map(str, args)], capture_output=True, text=True,
                            timeout=timeout, env=child_environment(), cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"theia-ros {args[0]} failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    return result.stdout + result.stderr


def collect(workdir, episodes, printer):
    """Expert episodes as bags, the way the shipped policy's were made (seeds 0.., 3 s, front camera 5 Hz)."""
    demos = workdir / "demos"
    if (demos / "summary.json").exists():
        summary = json.loads((demos / "summary.json").read_text())
        if len(summary["episodes"]) == episodes:
            printer(f"reusing {episodes} expert episodes in {demos}")
            return summary
    cli("collect", demos, "--episodes", episodes, "--seed", 0, "--duration", 3.0, "--cameras", "front", "--width",
        224, "--height", 224, "--camera-rate", 5.0, "--real-time-factor", 3.0, "--overwrite")
    return json.loads((demos / "summary.json").read_text())


def train_on(workdir, label, variant, encoder, bags, steps, seed, printer, reuse=False):
    """encode_bag every bag with `encoder` (once per variant), then train_policy a theia_head as the shipped
    one was made (`seed`: the training seed). `reuse`: keep a checkpoint of `label` trained with the same
    steps and seed."""
    from theia_ros.bags.encode import encode_bag
    from theia_ros.bags.train_policy import train_policy

    features = workdir / f"features_{variant.replace(':', '_')}"
    features.mkdir(exist_ok=True)
    for bag in bags:
        if not (features / bag.name).exists():
            encode_bag(bag, features / bag.name, model=MODEL, encoder=encoder, cameras=["/front/image_raw"],
                       progress=False)
    checkpoint = workdir / f"policy_{label.replace(':', '_').replace(' ', '_')}"
    report = checkpoint / "training_report.json"
    if reuse and report.exists():
        done = json.loads(report.read_text())
        if done["steps"] == steps and done["args"]["seed"] == seed:
            printer(f"  reusing {checkpoint} (val NMSE {done['val_nmse']:.4f})", flush=True)
            return checkpoint, done["val_nmse"]
    result = train_policy(sorted(features.iterdir()), policy="theia_head", out=checkpoint, action_topic="/commands",
                          action_joints=ARM, epochs=100, max_steps=steps, batch_size=32, val_fraction=0.1,
                          threads=1, plot=False, seed=seed, overwrite=True, printer=lambda *a, **k: None)
    printer(f"  {label}: trained on {variant} features, seed {seed}: val NMSE {result.val_nmse:.4f} (constant "
            f"{result.const_nmse:.4f}), {result.steps} steps, {result.seconds:.0f} s -> {checkpoint}", flush=True)
    return checkpoint, result.val_nmse


def ros_main_job(variant, duration, workdir):
    backend, _, precision = variant.partition(":")
    out = workdir / f"bringup_{variant.replace(':', '_')}.json"
    cli("bringup", ROOT / "config" / "sim_demo.yaml", "--duration", duration, "--set",
        f"theia_encoder.backend={backend}", "--set", f"theia_encoder.precision={precision}", "--summary-json", out,
        timeout=duration + 300)
    data = json.loads(out.read_text())
    return data.get("episodes") or {"ended": 0, "succeeded": 0}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=seeds_arg, default=list(range(1000, 1010)),
                    help="evaluation seeds, e.g. 1000-1009 (the main job's first ten)")
    ap.add_argument("--variants", nargs="+", default=None,
                    help="backend:precision encoders (default: torch fp32/bf16; openvino fp32/bf16/int8 if present)")
    ap.add_argument("--train-variants", nargs="+", default=None,
                    help="variants to train a policy on (default: torch:fp32, torch:bf16; openvino:int8 if present)")
    ap.add_argument("--parts", nargs="+", type=int, choices=(1, 2), default=[1, 2],
                    help="1: the shipped policy per encoder; 2: policies trained per encoder (e.g. one per process)")
    ap.add_argument("--train-episodes", type=int, default=30, help="expert episodes to train on")
    ap.add_argument("--train-steps", type=int, default=800)
    ap.add_argument("--control-seeds", nargs="*", type=int, default=[1],
                    help="also fp32 policies trained with these training seeds: how far training alone moves the "
                         "actions (the yardstick for the other features' policies)")
    ap.add_argument("--reuse", action="store_true", help="reuse checkpoints in --workdir of the same steps and seed")
    ap.add_argument("--duration", type=float, default=6.0, help="episode length (s), as the main job's")
    ap.add_argument("--latency", type=float, default=0.05, help="frame -> features at the policy (s of sim time)")
    ap.add_argument("--ros", action="store_true", help="also run the real main job over ROS once per variant")
    ap.add_argument("--ros-duration", type=float, default=60.0)
    ap.add_argument("--workdir", type=Path, default=None, help="keep bags and checkpoints here (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=None, help="write every result here")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    variants = args.variants or available_variants()
    if REFERENCE not in variants:
        variants = [REFERENCE] + variants
    train_variants = args.train_variants or [v for v in (REFERENCE, "torch:bf16", "openvino:int8") if v in variants]
    if REFERENCE not in train_variants:
        train_variants = [REFERENCE] + train_variants
    if 1 not in args.parts:  # only the encoders part 2 needs
        variants = train_variants
    variants += [v for v in train_variants if v not in variants and 2 in args.parts]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="theia_precision_"))
    workdir.mkdir(parents=True, exist_ok=True)
    config = ClosedLoopConfig(duration=args.duration, latency=args.latency)
    report = {"seeds": args.seeds, "variants": variants, "config": vars(config), "reference": REFERENCE}
    t_start = time.perf_counter()

    from theia_ros.sim import Simulation

    sim = Simulation()
    encoders = {}
    for v in variants:
        t0 = time.perf_counter()
        encoders[v] = make_encoder(v)
        encoders[v].warm_up()
        print(f"encoder {v}: built in {time.perf_counter() - t0:.1f} s ({encoders[v].backend.name} "
              f"{encoders[v].backend.precision})", flush=True)

    part1 = part2 = None
    if 1 in args.parts:
        print(f"\n## 1. The shipped policy ({SHIPPED.relative_to(ROOT)}) with each encoder, seeds {args.seeds}",
              flush=True)
        shipped = load_policy(SHIPPED)
        part1 = evaluate(sim, encoders, {v: shipped for v in variants}, variants, args.seeds, config)
        report["shipped"] = part1
        if args.json:
            args.json.write_text(json.dumps(report, indent=1, default=str))

    if 2 in args.parts:
        print(f"\n## 2. Policies trained on each encoder's features ({args.train_episodes} expert episodes, "
              f"{args.train_steps} steps), evaluated with their own encoder, seeds {args.seeds}", flush=True)
        t0 = time.perf_counter()
        summary = collect(workdir, args.train_episodes, print)
        bags = sorted(Path(e["bag"]) for e in summary["episodes"])
        print(f"  collected {len(bags)} episodes ({summary['successes']} expert successes) in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        runs = [(v, v, 0) for v in train_variants] + [(f"{REFERENCE} seed {s}", REFERENCE, s)
                                                      for s in args.control_seeds if s != 0]
        checkpoints, nmse = {}, {}
        for label, v, seed in runs:
            encoders[label] = encoders[v]
            checkpoints[label], nmse[label] = train_on(workdir, label, v, encoders[v], bags, args.train_steps, seed,
                                                       print, reuse=args.reuse)
        policies = {label: load_policy(checkpoints[label]) for label, _, _ in runs}
        part2 = evaluate(sim, encoders, policies, [label for label, _, _ in runs], args.seeds, config)
        report["trained"] = {"results": part2, "val_nmse": nmse, "checkpoints": {k: str(p) for k, p in
                                                                               checkpoints.items()}}

    ros = {}
    if args.ros:
        print("\n## 3. The real main job over ROS (bringup), once per variant", flush=True)
        for v in variants:
            ros[v] = ros_main_job(v, args.ros_duration, workdir)
            print(f"  {v}: {ros[v]}", flush=True)
        report["ros"] = ros

    print(f"\n# Downstream check of encoder precisions (theia-tiny random weights seed 0, seeds "
          f"{args.seeds[0]}-{args.seeds[-1]}, lock-step closed loop: camera {config.camera_rate:g} Hz, policy "
          f"{config.policy_rate:g} Hz, {config.duration:g} s episodes, latency {config.latency * 1e3:.0f} ms)\n")
    if part1 is not None:
        print("Shipped policy (trained on torch fp32 features):\n")
        print(table(part1))
    if part2 is not None:
        print("\nPolicies trained on each encoder's features (same expert episodes, same seed and steps), each "
              "with its own encoder; action diff and cosine against the fp32-trained policy on fp32 features:\n")
        print(table(part2, extra=report["trained"]["val_nmse"], count_tolerance=1))
        print("\nPASS for trained policies: a success count within one episode of the fp32-trained policy's (two "
              "trainings are two different policies, even on equal features: the fp32 control with another "
              "training seed shows how far training alone moves actions and outcomes).")
    if ros:
        print("\nReal main job over ROS (wall-clock timing, not the same episodes):\n")
        print("| encoder | episodes ended | succeeded |\n|---|---:|---:|")
        for v, e in ros.items():
            print(f"| {v} | {e['ended']} | {e['succeeded']} |")
    if part1 is not None:
        print("\nPASS for the shipped policy: the same success as fp32 on every seed (the loop is deterministic, so "
              "equal features-for-the-policy give equal outcomes; no tolerance is needed to absorb noise).")
    print(f"total {time.perf_counter() - t_start:.0f} s; workdir {workdir}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str))
    failed = [v for v in part1 or {} if any(r["success"] != a["success"] for r, a in zip(part1[v], part1[REFERENCE]))]
    failed += [v for v in part2 or {} if abs(sum(r["success"] for r in part2[v])
                                            - sum(r["success"] for r in part2[REFERENCE])) > 1]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
