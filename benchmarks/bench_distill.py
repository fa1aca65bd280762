#!/usr/bin/env python3
"""CPU benchmark of distillation: teacher feature extraction and student training steps.

    python benchmarks/bench_distill.py [--threads 2] [--reps 5] [--full clip dinov2] [--full-batch 2]

Measures, each after one warm-up, as images/s (median, min, max over ``--reps`` repetitions):
  * feature extraction of every registered teacher built from its small test config (what the
    tests run), batch ``--teacher-batch``, from 224x224 uint8 images (preprocessing included);
  * feature extraction of the full-size teacher architectures named by ``--full`` with random
    weights (speed does not depend on the weights), ``--full-batches`` batches of ``--full-batch``;
  * student training steps of theia-tiny (forward, loss, backward, AdamW step) with two small
    heads (32x16x16, the tests' teachers) and with the three published cdiv heads, batch ``--batch``.
FLOPs per image (2 x multiply-adds) are counted with torch's FlopCounterMode on the meta device
(full-size teachers) or on the real run (small ones), so the table also gives GFLOP/s achieved;
docs/distill.md turns the counts into GPU estimates. Prints a markdown table.
"""
import argparse
import os
import sys
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from theia_ros.distill import teachers as T  # noqa: E402 (after the sys.path insert)
from theia_ros.distill.student import StudentForward, build_student, distill_loss  # noqa: E402 (after the sys.path insert)
from theia_ros.encoder.config import TEACHER_FEATURE_SIZES  # noqa: E402 (after the sys.path insert)
from theia_ros.preprocess import to_model_input  # noqa: E402 (after the sys.path insert)


def images(n, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 224, 224, 3), dtype=np.uint8))


def measure(fn, reps, warmup=1):
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def teacher_flops_meta(spec, mode):
    """FLOPs of one image through the teacher (preprocessed input), counted on the meta device."""
    pre = spec.preprocess_for(mode)
    side = pre.crop or pre.size
    with torch.device("meta"):
        model = T._build_from_config(spec, mode, 0)
        x = torch.empty(1, 3, side, side)
        with FlopCounterMode(display=False) as fc:
            T.FEATURE_EXTRACTORS[spec.feature](model, x)
    return fc.get_total_flops()


def student_step_fn(targets, batch, amp):
    model, _ = build_student(targets, from_scratch="theia-tiny-patch16-224-cdiv", seed=0)
    fwd = StudentForward(model, list(targets))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    imgs = images(batch, 1)
    tgts = [torch.randn(batch, s[1] * s[2], s[0]) for s in targets.values()]

    def step():
        pixels = to_model_input(imgs)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            preds = fwd(pixels)
        loss, _ = distill_loss(preds, tgts)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    flops = 3 * model.flops_per_image(list(targets))  # forward + backward (~2x forward)
    return step, flops


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--teacher-batch", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8, help="student batch")
    ap.add_argument("--full", nargs="*", default=["clip", "dinov2"],
                    help="full-size teachers to time with random weights (sam and depth_anything take minutes)")
    ap.add_argument("--full-batch", type=int, default=2)
    ap.add_argument("--full-batches", type=int, default=2)
    ap.add_argument("--bf16", action="store_true", help="also time the student step under CPU bf16 autocast")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []

    def row(stage, name, batch, secs, gflop):
        ips = [batch / s for s in secs]
        med = float(np.median(ips))
        rows.append((stage, name, batch, med, min(ips), max(ips), gflop, gflop * med if gflop else None))
        print(f"  {stage} {name}: {med:.2f} images/s", file=sys.stderr, flush=True)

    print("small teachers ...", file=sys.stderr, flush=True)
    for name, spec in T.TEACHERS.items():
        teacher = T.build_teacher(spec, "small")
        x = images(args.teacher_batch)
        pre = teacher.preprocess(x[:1])
        with FlopCounterMode(display=False) as fc:
            with torch.no_grad():
                T.FEATURE_EXTRACTORS[spec.feature](teacher.model, pre)
        row("teacher (small config)", f"{name} -> {'x'.join(map(str, spec.small_target))}", args.teacher_batch,
            measure(lambda teacher=teacher: teacher(x), args.reps), fc.get_total_flops() / 1e9)

    for name in args.full:
        spec = T.resolve_teacher(name)
        print(f"full-size {name} (random weights) ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        teacher = T.build_teacher(spec, "random")
        build_s = time.perf_counter() - t0
        x = images(args.full_batch)
        secs = measure(lambda teacher=teacher: teacher(x), args.full_batches, warmup=0)
        row("teacher (full size, random)", f"{name} -> {'x'.join(map(str, spec.target))} "
            f"({teacher.num_parameters() / 1e6:.0f} M params, built in {build_s:.0f} s)", args.full_batch, secs,
            teacher_flops_meta(spec, "random") / 1e9)
        del teacher

    print("student steps ...", file=sys.stderr, flush=True)
    small_heads = {"a/small-1": (32, 16, 16), "b/small-2": (32, 16, 16)}
    cdiv = {t: TEACHER_FEATURE_SIZES[t] for t in ("google/vit-huge-patch14-224-in21k", "facebook/dinov2-large",
                                                 "openai/clip-vit-large-patch14")}
    configs = [("2 small heads (tests)", small_heads, False), ("cdiv heads", cdiv, False)]
    if args.bf16:
        configs += [("cdiv heads, bf16 autocast", cdiv, True)]
    for label, targets, amp in configs:
        step, flops = student_step_fn(targets, args.batch, amp)
        row("student train step", f"theia-tiny, {label}", args.batch, measure(step, args.reps), flops / 1e9)

    print(f"\nCPU: {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("| stage | model | batch | images/s (median) | min | max | GFLOP / image | GFLOP/s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for stage, name, batch, med, lo, hi, gflop, rate in rows:
        print(f"| {stage} | {name} | {batch} | {med:.2f} | {lo:.2f} | {hi:.2f} | {gflop:.3g} | {rate:.3g} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
