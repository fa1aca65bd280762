"""`theia-ros export` and `theia-ros bench`: build engines ahead of time, compare backends (no ROS needed).

    theia-ros export SOURCE --backend tensorrt --precision fp16 --max-batch 4 [--representation tokens]
    theia-ros export SOURCE --backend openvino --precision int8 [--calibration-bag BAG]
    theia-ros bench SOURCE [--backends torch onnxruntime openvino tensorrt] [--batches 1 4] [--seconds 5]
                           [--precisions fp32 bf16 int8] [--inputs pixels frame] [--json rows.json]
"""
import json
import logging
import sys
import threading
import time


def _setup_logging(verbose):
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("theia_ros.backends").setLevel(logging.INFO)


class _Ticker:
    """Prints the time elapsed every few seconds while a long build runs."""

    def __init__(self, what, every=10.0, stream=sys.stderr):
        self.what, self.every, self.stream = what, every, stream
        self._stop = threading.Event()
        self.start = time.perf_counter()

    def _run(self):
        while not self._stop.wait(self.every):
            print(f"  ... {self.what}: {time.perf_counter() - self.start:.0f} s", file=self.stream, flush=True)

    def __enter__(self):
        threading.Thread(target=self._run, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self.seconds = time.perf_counter() - self.start


def _run_export(args) -> int:
    _setup_logging(True)
    import torch

    from theia_ros.backends.base import BackendError
    from theia_ros.backends.factory import create_backend
    from theia_ros.encoder.model import load_model
    from theia_ros.weights import CheckpointError

    if args.threads:
        torch.set_num_threads(args.threads)
    precision = args.precision or ("fp16" if args.backend == "tensorrt" else "fp32")
    # auto: the device the engine runs on (onnxruntime runs on the CPU only)
    device = args.device if args.device != "auto" else ("cuda" if args.backend == "tensorrt" else "cpu")
    try:
        model = load_model(args.source, seed=args.seed)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if model.random_weights:
        print(f"note: {args.source} has RANDOM weights (fine for speed tests, meaningless features)", file=sys.stderr)
    options = {"rebuild": args.rebuild}
    if args.backend == "tensorrt":
        options["fp32_acc"] = args.fp32_acc
    if args.backend == "openvino":
        options["threads"] = args.threads or None
        if args.calibration_bag and precision == "int8":
            from theia_ros.bags.calibration import calibration_frames

            try:
                options["calibration_frames"] = calibration_frames(args.calibration_bag)
            except BackendError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
    if args.cache_dir:
        options["cache_dir"] = args.cache_dir
    print(f"{args.backend} {precision} engine for {model.variant} ({args.representation}), batch 1..{args.max_batch}, "
          f"on {device} ...", file=sys.stderr, flush=True)
    try:
        with _Ticker("building / loading") as ticker:
            backend = create_backend(args.backend, model, representation=args.representation, precision=precision,
                                     device=device, max_batch=args.max_batch, **options)
    except BackendError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    status = backend.cache.status
    cosine = backend.validation_cosine
    print(f"{status} in {ticker.seconds:.1f} s"
          + (f"; cosine {cosine:.6f} to fp32 torch on the validation input" if cosine is not None else "")
          + ("; fp16 matmuls accumulate in fp32" if getattr(backend, "fp32_acc_used", False) else ""),
          file=sys.stderr)
    print(backend.engine_path)
    return 0


def _run_bench(args) -> int:
    _setup_logging(args.verbose)
    import torch

    from theia_ros.backends.bench import available_cases, environment_summary, markdown_table, run_bench
    from theia_ros.encoder.model import load_model
    from theia_ros.weights import CheckpointError

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model = load_model(args.source, seed=args.seed)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    devices = None if args.device == "auto" else [args.device]  # None: cuda when available, else cpu
    try:
        cases = available_cases(args.backends, args.precisions, devices)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    def progress(msg):
        print(msg, file=sys.stderr, flush=True)

    rows = run_bench(model, cases, batches=args.batches, seconds=args.seconds, representation=args.representation,
                     rounds=args.rounds, cache_dir=args.cache_dir, progress=progress, inputs=args.inputs)
    table = markdown_table(rows)
    header = f"{environment_summary(model)}; representation {args.representation}; {args.seconds:g} s per cell"
    print(header)
    print()
    print(table)
    if args.json:
        import dataclasses

        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"environment": header, "rows": [dataclasses.asdict(r) for r in rows]}, f, indent=2)
    return 0


def add_parser(subparsers):
    from theia_ros.cli.options import add_encoder_options, add_source_argument
    from theia_ros.encoder.config import PRECISION_CHOICES

    p = subparsers.add_parser(
        "export", help="build (or check) a cached TensorRT / ONNX Runtime / OpenVINO engine ahead of time",
        description="Build the engine a backend would build on first use, validate it against fp32 torch, store it "
                    "in the engine cache ($THEIA_ROS_CACHE or ~/.cache/theia_ros/engines) and print its path. "
                    "An engine already in the cache and still valid is only checked.")
    add_source_argument(p)
    p.add_argument("--backend", required=True, choices=("tensorrt", "onnxruntime", "openvino"))
    p.add_argument("--precision", choices=PRECISION_CHOICES, default=None,
                   help="default: fp16 for tensorrt, fp32 for onnxruntime and openvino (which also takes bf16 on "
                        "CPUs with native bf16, and int8)")
    p.add_argument("--calibration-bag", default=None, metavar="BAG",
                   help="openvino int8: also calibrate on camera frames of this bag (up to 32, spread over it), "
                        "next to the packaged photographs")
    add_encoder_options(p, "max_batch", "representation", "device", "seed", "threads",
                        helps={"device": "auto (cuda for tensorrt, cpu for onnxruntime), cpu or cuda[:N] "
                                         "(default auto)"})
    p.add_argument("--cache-dir", default=None, help="engine cache directory (default $THEIA_ROS_CACHE or "
                                                     "~/.cache/theia_ros/engines)")
    p.add_argument("--rebuild", action="store_true", help="rebuild even when a valid engine is cached")
    p.add_argument("--fp32-acc", choices=("auto", "on", "off"), default="auto",
                   help="tensorrt fp16: accumulate matmuls in fp32 (slower); auto: only if the fp16 engine "
                        "fails the accuracy gate (default auto)")
    p.set_defaults(func=_run_export)

    b = subparsers.add_parser(
        "bench", help="compare inference backends: latency, throughput, accuracy",
        description="For each available backend x precision x batch: median and p90 ms per image, images/s, "
                    "cosine to fp32 eager torch and speed-up over eager fp32 torch, measured in one run with "
                    "interleaved rounds. Prints a markdown table.")
    add_source_argument(b)
    b.add_argument("--backends", nargs="+", default=None,
                   help="torch, torch-compile, onnxruntime, openvino, tensorrt, torch-cudagraphs (default: all "
                        "available; eager fp32 torch is always measured as the baseline)")
    b.add_argument("--precisions", nargs="+", default=None, choices=PRECISION_CHOICES)
    b.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    b.add_argument("--inputs", nargs="+", default=["pixels", "frame"], choices=("pixels", "frame"),
                   help="pixels: 224x224 model input; frame: natural 480x640 RGB frames, preprocessing timed too "
                        "(default both)")
    b.add_argument("--seconds", type=float, default=5.0, help="timing budget per backend and batch (default 5)")
    b.add_argument("--rounds", type=int, default=10, help="interleaved rounds the budget is split into")
    add_encoder_options(b, "device", "representation", "seed", "threads",
                        helps={"device": "auto (cuda when available, else cpu), cpu or cuda[:N] (default auto)"})
    b.add_argument("--cache-dir", default=None)
    b.add_argument("--json", default=None, help="also write the rows to this JSON file")
    b.add_argument("-v", "--verbose", action="store_true", help="log backend set-up details")
    b.set_defaults(func=_run_bench)
    return p
