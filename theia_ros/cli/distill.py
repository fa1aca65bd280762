"""`theia-ros distill`: distil or fine-tune the Theia encoder from teacher models (no ROS needed).

    theia-ros distill --images data/imgs --bags run1_bag --teachers clip dinov2 vit \
        --from-scratch theia-tiny-patch16-224-cdiv --out runs/tiny --steps 20000 --batch 64
    theia-ros distill --images data/imgs --teachers clip dinov2 --init theaiinstitute/theia-tiny-patch16-224-cdiv \
        --out runs/ft --epochs 5 --batch 64 --lr 1e-4
    torchrun --nproc-per-node 8 -m theia_ros.cli distill ...      # several GPUs (DDP)

See docs/distill.md.
"""
from __future__ import annotations

import argparse
import sys

# the registered teachers (theia_ros.distill.teachers.TEACHERS), named here so --help needs no torch
TEACHER_NAMES = ("clip", "dinov2", "vit", "sam", "depth_anything")


def add_parser(subparsers):
    from theia_ros.cli.options import add_encoder_options

    p = subparsers.add_parser(
        "distill", help="distil / fine-tune the encoder from teacher models (CLIP, DINOv2, ViT, SAM, Depth-Anything)",
        description="Cache teacher features of images / bag frames, train a Theia student on them and write it in "
                    "the published checkpoint layout (config.json + model.safetensors).")
    data = p.add_argument_group("images")
    data.add_argument("--images", nargs="+", default=[], metavar="DIR", help="folders of png / jpg images (recursive)")
    data.add_argument("--bags", nargs="+", default=[], metavar="BAG", help="rosbag2 bags (camera topics)")
    data.add_argument("--bag-topics", nargs="+", default=None, metavar="TOPIC",
                      help="camera topics to use (default: every Image / CompressedImage topic)")
    data.add_argument("--bag-stride", type=int, default=1, help="use every N-th frame of each topic (default 1)")
    data.add_argument("--bag-block", type=float, default=10.0, metavar="S",
                      help="bag frames are split train / held-out in blocks of S seconds (default 10)")
    data.add_argument("--holdout", type=float, default=0.05, help="held-out fraction (default 0.05)")

    teachers = p.add_argument_group("teachers")
    teachers.add_argument("--teachers", nargs="+", default=["clip", "dinov2", "vit"],
                          help=f"teachers by short name or hub id: {', '.join(TEACHER_NAMES)} (default clip dinov2 "
                               "vit)")
    mode = teachers.add_mutually_exclusive_group()
    mode.add_argument("--small-teachers", action="store_true",
                      help="tiny random teachers from small configs (offline; tests and dry runs)")
    mode.add_argument("--random-teachers", action="store_true",
                      help="full-size teacher architectures with random weights (offline; benchmarks)")
    teachers.add_argument("--teacher-revision", default=None, help="hub revision of the teachers' weights")
    teachers.add_argument("--teacher-batch", type=int, default=16, help="teacher batch size (default 16)")
    teachers.add_argument("--teacher-precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                          help="teacher compute precision (autocast; default fp32)")
    teachers.add_argument("--cache", default=None, metavar="DIR",
                          help="feature cache folder (default OUT/cache); reused across runs")
    teachers.add_argument("--shard-size", type=int, default=1000, help="images per cache shard (default 1000)")
    teachers.add_argument("--cache-dtype", choices=("bf16", "fp16", "fp32"), default="bf16",
                          help="dtype of cached teacher features (default bf16)")
    teachers.add_argument("--extract-only", action="store_true", help="fill the cache and stop (no training)")

    student = p.add_argument_group("student")
    init = student.add_mutually_exclusive_group()
    init.add_argument("--init", metavar="SOURCE",
                      help="fine-tune this checkpoint: directory, hub id or random:<variant>")
    init.add_argument("--from-scratch", metavar="VARIANT",
                      help="train from scratch: a variant (theia-tiny-patch16-224-cdiv), backbone id or size")
    student.add_argument("--out", required=True, metavar="DIR", help="output folder (checkpoint, logs, plot)")
    student.add_argument("--steps", type=int, default=None, help="optimizer steps")
    student.add_argument("--epochs", type=float, default=None,
                         help="epochs over the training images (instead of --steps)")
    student.add_argument("--batch", type=int, default=64, help="batch size per process (default 64)")
    student.add_argument("--lr", type=float, default=None, help="learning rate (default 2e-3 x global batch / 512)")
    student.add_argument("--weight-decay", type=float, default=0.01)
    student.add_argument("--warmup", type=float, default=0.1, help="warm-up fraction of the steps (default 0.1)")
    student.add_argument("--seed", type=int, default=0)
    student.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if there is a GPU), cpu, cuda:N")
    student.add_argument("--amp", choices=("auto", "bf16", "off"), default="auto",
                         help="mixed precision (auto: bf16 autocast on GPUs, off on CPU)")
    student.add_argument("--num-workers", type=int, default=0, help="data-loading worker processes")
    add_encoder_options(student, "threads")

    run = p.add_argument_group("run")
    run.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                     help="continue from OUT/checkpoints (latest) or the given checkpoint")
    run.add_argument("--overwrite", action="store_true", help="discard checkpoints of an earlier run in OUT")
    run.add_argument("--stop-after", type=int, default=None, metavar="STEP",
                     help="stop at this step (checkpoint written; the schedule still plans --steps)")
    run.add_argument("--log-every", type=int, default=10)
    run.add_argument("--eval-every", type=int, default=0, help="held-out evaluation every N steps (0: start and end)")
    run.add_argument("--eval-images", type=int, default=512, help="held-out images evaluated (0: all)")
    run.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation")
    run.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps")
    run.add_argument("--keep-checkpoints", type=int, default=2)
    run.add_argument("--no-plot", action="store_true", help="do not write losses.png")
    p.set_defaults(func=run_distill)
    return p


def run_distill(args) -> int:
    from theia_ros.distill.sources import expand_paths
    from theia_ros.distill.train import DistillConfig, distill
    from theia_ros.weights import CheckpointError

    if not args.images and not args.bags:
        print("theia-ros distill: give --images and/or --bags", file=sys.stderr)
        return 2
    if not args.extract_only:
        if not args.init and not args.from_scratch:
            print("theia-ros distill: give --init SOURCE (fine-tune) or --from-scratch VARIANT", file=sys.stderr)
            return 2
        if args.steps is None and args.epochs is None:
            print("theia-ros distill: give --steps or --epochs", file=sys.stderr)
            return 2
    mode = "small" if args.small_teachers else "random" if args.random_teachers else "pretrained"
    cfg = DistillConfig(
        out=args.out, images=expand_paths(args.images), bags=expand_paths(args.bags), bag_topics=args.bag_topics,
        bag_stride=args.bag_stride, bag_block_s=args.bag_block, holdout=args.holdout, teachers=args.teachers,
        teacher_mode=mode, teacher_revision=args.teacher_revision, teacher_batch=args.teacher_batch,
        teacher_precision=args.teacher_precision, cache=args.cache, shard_size=args.shard_size,
        cache_dtype=args.cache_dtype, extract_only=args.extract_only, init=args.init, from_scratch=args.from_scratch,
        steps=args.steps, epochs=args.epochs, batch=args.batch, lr=args.lr, weight_decay=args.weight_decay,
        warmup=args.warmup, seed=args.seed, device=args.device, amp=args.amp, num_workers=args.num_workers,
        threads=args.threads, resume=args.resume, overwrite=args.overwrite, stop_after=args.stop_after,
        log_every=args.log_every, eval_every=args.eval_every, eval_images=args.eval_images, evaluate=not args.no_eval,
        save_every=args.save_every, keep_checkpoints=args.keep_checkpoints, plot=not args.no_plot)
    try:
        result = distill(cfg)
    except (CheckpointError, OSError, ValueError, KeyError) as exc:
        print(f"theia-ros distill: {exc}", file=sys.stderr)
        return 1
    if not args.extract_only and result.evals:
        print(f"held-out cosine {result.evals[0]['cos']:.4f} -> {result.evals[-1]['cos']:.4f}; "
              f"checkpoint {result.out}")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="theia-ros")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["distill"] + list(sys.argv[1:] if argv is None else argv))
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
