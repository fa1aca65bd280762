#!/usr/bin/env python3
"""encode-bags on Ray (1 and 2 workers) against one encode-bag process, over the same bags, in the same run.

    python benchmarks/bench_encode_bags.py [--bags 4] [--frames 32] [--batch 8] [--repeats 3]
        [--source random:theia-tiny-patch16-224-cddsv]

Builds --bags bags (bench_encode_bag.make_bag: 640x480 frames at 15 Hz, half raw rgb8, half JPEG,
joint states at 100 Hz), starts one local Ray in this process, then in each repeat (order rotated so
that a noisy shared machine drifts equally over all):
  * encode-bag: theia_ros.bags.encode.encode_bag over the bags one after the other in this process,
    1 torch thread, the encoder loaded once beforehand (model loading excluded);
  * Ray, 1 worker and 2 workers: theia_ros.bags.fleet.encode_bags, 1 thread and 1 CPU per worker.
    "encoding" frames/s counts from the moment the workers had loaded the model (as for encode-bag);
    "wall" includes starting the workers and loading the model in each.
Per-worker efficiency = frames/s / (workers x encode-bag frames/s). Then the per-frame costs a capacity
plan needs: deserialise + decode one frame (raw, JPEG), preprocess + inference per frame (batch of
--batch, 1 thread), serialise + write one features message; and the figures of the plan for 10,000 bags
of 10 minutes at 15 Hz (one camera) from them. Prints markdown tables with medians.
"""
import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_encode_bag import make_bag  # noqa: E402 (after the path set-up above: the sibling benchmark's bag)

PLAN_BAGS, PLAN_MINUTES, PLAN_HZ = 10_000, 10, 15


def _median_ms(fn, n):
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def frame_costs(src, encoder, batch):
    """ms per frame: decode of a raw and a JPEG frame, inference, serialise + write of one features message."""
    from theia_ros.bags.io import FEATURES_TYPE, decode_camera_message, make_writer, open_bag, typestore
    from theia_ros.features import to_features_msg

    raw, jpg = None, None
    with open_bag(src) as reader:
        for conn, _, data in reader.messages():
            if conn.msgtype.endswith("/Image") and raw is None:
                raw = (bytes(data), conn.msgtype)
            elif conn.msgtype.endswith("/CompressedImage") and jpg is None:
                jpg = (bytes(data), conn.msgtype)
    costs = {"decode raw 640x480": _median_ms(lambda: decode_camera_message(*raw), 30),
             "decode JPEG 640x480": _median_ms(lambda: decode_camera_message(*jpg), 30)}
    frames = [decode_camera_message(*jpg)[1]] * batch
    encoder.encode(frames)
    costs["preprocess + inference (per frame)"] = _median_ms(lambda: encoder.encode(frames), 5) / batch
    features = encoder.encode(frames[:1])[0][0]
    store = typestore()
    cls = store.types[FEATURES_TYPE]
    tmp = Path(tempfile.mkdtemp(prefix="bench_write_"))
    try:
        writer = make_writer(tmp / "w", "mcap", 9)
        writer.open()
        conn = writer.add_connection("/f", FEATURES_TYPE, typestore=store)
        header = decode_camera_message(*jpg)[0]
        ts = [0]

        class Fields:
            pass

        def write():
            f = Fields()
            to_features_msg(features, msg=f, header=header, camera="front", model_id="m", weights_id="w",
                            preprocessing="theia", pos_interpolation="scale_factor", input_size=(224, 224))
            fields = vars(f)
            for name in ("shape", "input_size", "patch_grid"):
                fields[name] = np.asarray(fields[name], dtype=np.uint32)
            fields["data"] = np.frombuffer(fields["data"], dtype=np.uint8)
            ts[0] += 1
            writer.write(conn, ts[0], store.serialize_cdr(cls(**fields), FEATURES_TYPE))

        costs["serialise + write one tokens message"] = _median_ms(write, 50)
        writer.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    costs["_feature_bytes"] = int(features.numel() * 4)
    costs["_channels"] = int(features.shape[-1])
    return costs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default="random:theia-tiny-patch16-224-cddsv")
    ap.add_argument("--bags", type=int, default=4)
    ap.add_argument("--frames", type=int, default=32, help="camera frames per bag")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    import ray
    import torch

    from theia_ros.bags.encode import encode_bag, load_encoder
    from theia_ros.bags.fleet import encode_bags

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench_encode_bags_"))
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             object_store_memory=128 * 1024**2)
    try:
        inputs = [tmp / "in" / f"bag{i}" for i in range(args.bags)]
        for p in inputs:
            make_bag(p, args.frames, "mcap")
        options = dict(model=args.source, seed=0, backend="torch", device="cpu", batch=args.batch)
        encoder = load_encoder(args.source, seed=0, backend="torch", device="cpu", max_batch=args.batch)
        total = args.bags * args.frames

        def plain():
            out = tmp / "plain"
            shutil.rmtree(out, ignore_errors=True)
            t, seconds = time.perf_counter(), 0.0
            for p in inputs:
                seconds += encode_bag(p, out / p.name, encoder=encoder, threads=1, progress=False, **options).seconds
            return total / seconds, total / (time.perf_counter() - t)

        def fleet(workers):
            def run():
                out = tmp / f"ray{workers}"
                shutil.rmtree(out, ignore_errors=True)
                t = time.perf_counter()
                report = encode_bags([tmp / "in"], out, options, workers=workers, threads=1, progress=False)
                wall = time.perf_counter() - t
                assert report.ok and report.frames == total, report
                return total / report.encoding_seconds, total / wall
            return run

        modes = {"encode-bag, 1 process": plain, "Ray, 1 worker": fleet(1), "Ray, 2 workers": fleet(2)}
        got = {name: [] for name in modes}
        plain()  # warm-up
        names = list(modes)
        for r in range(args.repeats):
            for name in names[r % len(names):] + names[:r % len(names)]:
                got[name].append(modes[name]())
        costs = frame_costs(inputs[0], encoder, args.batch)
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

    base = float(np.median([g[0] for g in got["encode-bag, 1 process"]]))
    print("# encode-bags scaling benchmark\n")
    print(f"model {args.source}, backend torch on the CPU, 1 thread per process/worker, batch {args.batch}; "
          f"{args.bags} bags x {args.frames} frames 640x480 (half raw rgb8, half JPEG) + joint states; "
          f"{args.repeats} repeats, medians; cpu count {os.cpu_count()}\n")
    print("| mode | encoding frames/s | wall frames/s (with start-up) | vs encode-bag | per-worker efficiency |")
    print("|---|---:|---:|---:|---:|")
    for name, vals in got.items():
        enc = float(np.median([v[0] for v in vals]))
        wall = float(np.median([v[1] for v in vals]))
        n = 1 if name.startswith("encode-bag") else int(name.split()[1])
        print(f"| {name} | {enc:.1f} | {wall:.1f} | {enc / base:.2f}x | {enc / (n * base):.0%} |")

    feature_bytes, channels = costs.pop("_feature_bytes"), costs.pop("_channels")
    print("\n| per-frame cost (1 thread) | ms |")
    print("|---|---:|")
    for name, ms in costs.items():
        print(f"| {name} | {ms:.2f} |")
    frames = PLAN_BAGS * PLAN_MINUTES * 60 * PLAN_HZ
    decode_ms = costs["decode JPEG 640x480"]
    write_ms = costs["serialise + write one tokens message"]
    cpu_ms = decode_ms + write_ms
    print(f"\nCapacity plan, {PLAN_BAGS} bags x {PLAN_MINUTES} min x {PLAN_HZ} Hz = {frames / 1e6:.0f} M frames "
          "(one JPEG camera):")
    print(f"- decode + serialise/write: {cpu_ms:.2f} ms/frame -> {frames * cpu_ms / 3.6e6:,.0f} core-hours; one "
          f"worker's reader thread caps it at ~{1e3 / decode_ms:.0f} frames/s of decode")
    print(f"- inference here (CPU, 1 thread): {costs['preprocess + inference (per frame)']:.1f} ms/frame -> "
          f"{frames * costs['preprocess + inference (per frame)'] / 3.6e6:,.0f} core-hours")
    print(f"- output, tokens float32: {feature_bytes / 1e3:.0f} kB/frame -> {frames * feature_bytes / 1e12:.1f} TB "
          f"(float16 half; cls/mean {frames * channels * 4 / 1e9:.0f} GB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
