#!/usr/bin/env python3
"""CPU benchmark of the inference backends for theia-tiny (same table as `theia-ros bench`).

    python benchmarks/bench_backends.py [--source random:theia-tiny-patch16-224-cddsv] [--threads 2]
                                        [--seconds 8] [--batches 1 4] [--variants] [--compile]

Rows: eager torch fp32 (the baseline of every ratio), torch bf16 (when the CPU has native bf16),
onnxruntime fp32 (lean graph, the `auto` choice on CPUs).  --variants adds the alternatives that
were measured to pick the defaults: onnxruntime on the model's own graph, onnxruntime without
ONNX Runtime's transformer fusions, eager torch on the lean graph; --compile adds torch.compile
(inductor, weight freezing; compiles for ~1 min per batch size on 2 cores).
Backends are timed in interleaved rounds so that a noisy, shared machine slows all of them alike:
compare the ratios within one table, not absolute times across runs. Random weights run at the
speed of real ones.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from theia_ros.backends.bench import Case, environment_summary, markdown_table, run_bench  # noqa: E402 (after the sys.path and environment set-up above)
from theia_ros.backends.torch_backend import cpu_has_fast_bf16  # noqa: E402 (after the sys.path and environment set-up above)
from theia_ros.encoder.model import load_model  # noqa: E402 (after the sys.path and environment set-up above)

TARGET_SPEEDUP = 1.15  # best accurate (cosine >= 0.9999) fp32 CPU backend vs eager fp32 torch, batch 1


def cases(variants=False, compile_=False):
    out = [Case("torch", "fp32", "cpu")]
    if cpu_has_fast_bf16():
        out.append(Case("torch", "bf16", "cpu"))
    out.append(Case("onnxruntime", "fp32", "cpu"))
    if variants:
        out += [Case("onnxruntime", "fp32", "cpu", {"graph": "model"}, name="onnxruntime (model graph)"),
                Case("onnxruntime", "fp32", "cpu", {"fuse": False}, name="onnxruntime (no ORT fusions)"),
                Case("torch", "fp32", "cpu", {"lean": True}, name="torch (lean graph)")]
        if cpu_has_fast_bf16():
            out.append(Case("torch", "bf16", "cpu", {"lean": True}, name="torch (lean graph)"))
    if compile_:
        out.append(Case("torch-compile", "fp32", "cpu"))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default="random:theia-tiny-patch16-224-cddsv")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=8.0, help="timing budget per backend and batch")
    ap.add_argument("--rounds", type=int, default=16)
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    ap.add_argument("--variants", action="store_true", help="also time the alternatives behind the defaults")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile)")
    ap.add_argument("--cache-dir", default=None, help="engine cache (default $THEIA_ROS_CACHE or ~/.cache/...)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    model = load_model(args.source)
    rows = run_bench(model, cases(args.variants, args.compile), batches=args.batches, seconds=args.seconds,
                     rounds=args.rounds, cache_dir=args.cache_dir,
                     progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(f"{environment_summary(model)}; {args.seconds:g} s per cell in {args.rounds} interleaved rounds")
    print()
    print(markdown_table(rows))
    fp32 = [r for r in rows if r.batch == min(args.batches) and r.precision == "fp32" and not r.error
            and r.cosine >= 0.9999 and r.backend != "torch"]
    if fp32:
        best = max(fp32, key=lambda r: r.speedup)
        verdict = "meets" if best.speedup >= TARGET_SPEEDUP else "misses"
        print(f"\nbest accurate fp32 CPU backend at batch {best.batch}: {best.backend} {best.speedup:.2f}x eager fp32 "
              f"torch (target {TARGET_SPEEDUP}x: {verdict})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
