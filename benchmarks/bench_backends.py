#!/usr/bin/env python3
"""CPU benchmark of the inference backends for theia-tiny (same table as `theia-ros bench`).

    python benchmarks/bench_backends.py [--source random:theia-tiny-patch16-224-cddsv] [--threads 2]
                                        [--seconds 8] [--batches 1 4] [--precisions fp32 bf16 int8]
                                        [--inputs pixels frame] [--json rows.json] [--variants] [--compile]

Rows: eager torch fp32 (the baseline of every ratio), torch bf16 (when the CPU has native bf16),
onnxruntime fp32 (lean graph), openvino fp32 (the `auto` choice on CPUs), bf16 (native bf16 CPUs) and
int8 (NNCF, calibrated on photographs), each on 224x224 model input ("pixels") and on natural 480x640
camera frames with the preprocessing in the timed call ("frame": to_model_input + run_pixels, the
node's path).  The budgets of issue 17 are checked at the end (PASS / FAIL lines, theia-tiny batch 1,
frame in, features out: >= 2.5x eager fp32 torch with bf16 or int8, >= 1.75x with fp32; theia-small
and base: >= 2x with bf16 or int8).  --variants adds the alternatives that
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
from theia_ros.backends.openvino_backend import (  # noqa: E402 (after the sys.path and environment set-up above)
    cpu_has_native_bf16,
    nncf_available,
    openvino_available,
)
from theia_ros.backends.torch_backend import cpu_has_fast_bf16  # noqa: E402 (after the sys.path and environment set-up above)
from theia_ros.encoder.model import load_model  # noqa: E402 (after the sys.path and environment set-up above)

TARGET_SPEEDUP = 1.15  # best accurate (cosine >= 0.9999) fp32 CPU backend vs eager fp32 torch, batch 1
# issue 17, batch 1, 480x640 frame in, features out, vs eager fp32 torch: (fp32 budget, bf16/int8 budget)
BUDGETS = {"tiny": (1.75, 2.5), "small": (None, 2.0), "base": (None, 2.0)}
MIN_COSINE = {"fp32": 0.9999, "bf16": 0.999, "int8": 0.99}


def cases(variants=False, compile_=False, precisions=None):
    out = [Case("torch", "fp32", "cpu")]
    if cpu_has_fast_bf16():
        out.append(Case("torch", "bf16", "cpu"))
    out.append(Case("onnxruntime", "fp32", "cpu"))
    if openvino_available():
        out.append(Case("openvino", "fp32", "cpu"))
        if cpu_has_native_bf16():
            out.append(Case("openvino", "bf16", "cpu"))
        if nncf_available():
            out.append(Case("openvino", "int8", "cpu"))
    if precisions:
        out = [c for c in out if c.is_baseline or c.precision in precisions]
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
    ap.add_argument("--precisions", nargs="+", default=None, choices=("fp32", "bf16", "int8"),
                    help="precisions to time (eager fp32 torch, the baseline, always runs)")
    ap.add_argument("--inputs", nargs="+", default=["pixels", "frame"], choices=("pixels", "frame"))
    ap.add_argument("--json", default=None, help="also write every row to this JSON file")
    ap.add_argument("--variants", action="store_true", help="also time the alternatives behind the defaults")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile)")
    ap.add_argument("--cache-dir", default=None, help="engine cache (default $THEIA_ROS_CACHE or ~/.cache/...)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    model = load_model(args.source)
    rows = run_bench(model, cases(args.variants, args.compile, args.precisions), batches=args.batches,
                     seconds=args.seconds, rounds=args.rounds, cache_dir=args.cache_dir, inputs=args.inputs,
                     progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    header = f"{environment_summary(model)}; {args.seconds:g} s per cell in {args.rounds} interleaved rounds"
    print(header)
    print()
    print(markdown_table(rows))
    if args.json:
        import dataclasses
        import json

        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"environment": header, "rows": [dataclasses.asdict(r) for r in rows]}, f, indent=2)
    print()
    for line in budget_lines(rows, model.variant):
        print(line)
    fp32 = [r for r in rows if r.batch == min(args.batches) and r.precision == "fp32" and not r.error
            and r.cosine >= 0.9999 and r.backend != "torch" and r.input == "pixels"]
    if fp32:
        best = max(fp32, key=lambda r: r.speedup)
        verdict = "meets" if best.speedup >= TARGET_SPEEDUP else "misses"
        print(f"\nbest accurate fp32 CPU backend at batch {best.batch}: {best.backend} {best.speedup:.2f}x eager fp32 "
              f"torch (target {TARGET_SPEEDUP}x: {verdict})")
    return 0


def budget_lines(rows, variant):
    """PASS / FAIL of issue 17's budgets: the best accurate row at batch 1, frame in, per precision group."""
    size = variant.split("-")[1] if variant.startswith("theia-") else ""
    fp32_budget, low_budget = BUDGETS.get(size, (None, None))
    lines = []
    frame = [r for r in rows if r.batch == 1 and r.input == "frame" and not r.error
             and r.cosine >= MIN_COSINE.get(r.precision, 1.0) and not (r.backend == "torch" and r.precision == "fp32")]
    for label, budget, precisions in (("fp32", fp32_budget, ("fp32",)), ("bf16 or int8", low_budget, ("bf16", "int8"))):
        if budget is None:
            continue
        group = [r for r in frame if r.precision in precisions]
        if not group:
            lines.append(f"FAIL {label}: no accurate {label} row at batch 1 with 480x640 frames (budget {budget}x)")
            continue
        best = max(group, key=lambda r: r.speedup)
        verdict = "PASS" if best.speedup >= budget else "FAIL"
        lines.append(f"{verdict} {label}: {best.backend} {best.precision} {best.speedup:.2f}x eager fp32 torch "
                     f"(batch 1, 480x640 frame in, cosine {best.cosine:.6f}; budget {budget}x)")
    return lines


if __name__ == "__main__":
    sys.exit(main())
