#!/usr/bin/env python3
"""encode-bag throughput vs. the backend's own batch throughput, measured in the same run.

    python benchmarks/bench_encode_bag.py [--source random:theia-tiny-patch16-224-cddsv] [--threads 2]
        [--frames 64] [--batch 8] [--rounds 5] [--storage mcap] [--strict]

Builds a bag (with rosbags) of two 640x480 cameras at 15 Hz each, one raw rgb8 and one JPEG, plus
joint states at 100 Hz, then, interleaved in rounds so that a noisy shared machine drifts equally
over both:
  * baseline: FeatureEncoder.encode on the same frames already decoded to RGB arrays, in batches of
    --batch (preprocessing + inference, what the backend does on its own);
  * encode-bag: theia_ros.bags.encode.encode_bag on the bag (read, deserialise, decode in a thread;
    inference; serialise and write in a thread; joint states copied), same encoder and batch size,
    timed from opening the output to closing it (model loading excluded, as for the baseline).
Ratio = encode-bag frames/s / baseline frames/s per round; the median over rounds must be >= 0.85.
Prints a markdown table with medians and PASS/FAIL.
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

RATIO_BUDGET = 0.85


def make_bag(path, frames, storage):
    import cv2
    from rosbags.rosbag2 import StoragePlugin, Writer

    from theia_ros.bags.io import COMPRESSED_IMAGE_TYPE, IMAGE_TYPE, typestore

    store = typestore()
    T = store.types
    Time, Header = T["builtin_interfaces/msg/Time"], T["std_msgs/msg/Header"]
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (480 // 8, 640 // 8, 3), dtype=np.uint8)
    decoded = []
    w = Writer(path, version=9, storage_plugin=StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3)
    w.open()
    c_raw = w.add_connection("/front/image_raw", IMAGE_TYPE, typestore=store)
    c_jpg = w.add_connection("/wrist/image_raw/compressed", COMPRESSED_IMAGE_TYPE, typestore=store)
    c_js = w.add_connection("/joint_states", "sensor_msgs/msg/JointState", typestore=store)
    period = 1 / 15
    t0 = 1_000_000_000
    n_js = int(frames / 2 * period * 100)
    events = [(t0 + int(i * period * 1e9), "raw" if i % 2 == 0 else "jpg", i) for i in range(frames)]
    events += [(t0 + int(k * 1e7) + 1, "js", k) for k in range(n_js)]
    for t, kind, i in sorted(events):
        h = Header(stamp=Time(sec=t // 10**9, nanosec=t % 10**9), frame_id=kind)
        if kind == "js":
            msg = T["sensor_msgs/msg/JointState"](header=h, name=[f"j{k}" for k in range(7)],
                                                  position=rng.standard_normal(7), velocity=np.zeros(7),
                                                  effort=np.zeros(0))
            w.write(c_js, t, store.serialize_cdr(msg, "sensor_msgs/msg/JointState"))
            continue
        # a smooth, camera-like picture (JPEG of noise would be unrealistically large)
        img = cv2.resize(np.roll(base, i, axis=1), (640, 480), interpolation=cv2.INTER_CUBIC)
        if kind == "raw":
            msg = T[IMAGE_TYPE](header=h, height=480, width=640, encoding="rgb8", is_bigendian=0, step=1920,
                                data=img.reshape(-1))
            w.write(c_raw, t, store.serialize_cdr(msg, IMAGE_TYPE))
            decoded.append(img)
        else:
            ok, buf = cv2.imencode(".jpg", img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
            msg = T[COMPRESSED_IMAGE_TYPE](header=h, format="jpeg", data=buf.reshape(-1))
            w.write(c_jpg, t, store.serialize_cdr(msg, COMPRESSED_IMAGE_TYPE))
            from theia_ros.images import decode_compressed

            decoded.append(decode_compressed(buf, "jpeg"))
    w.close()
    return decoded


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default="random:theia-tiny-patch16-224-cddsv")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--frames", type=int, default=64, help="frames in the bag (both cameras)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--storage", default="mcap", choices=("mcap", "sqlite3"), help="input and output storage")
    ap.add_argument("--strict", action="store_true", help="exit 1 when the budget fails")
    args = ap.parse_args(argv)

    import torch

    from theia_ros.bags.encode import encode_bag, load_encoder

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_encode_bag_"))
    try:
        src = tmp / "in"
        frames = make_bag(src, args.frames, args.storage)
        # eager torch on the CPU, as when the budget was set (encode-bag's own default is the auto backend)
        encoder = load_encoder(args.source, seed=0, backend="torch", device="cpu", max_batch=args.batch)
        size = sum(p.stat().st_size for p in src.iterdir())

        def baseline():
            t = time.perf_counter()
            for i in range(0, len(frames), args.batch):
                encoder.encode(frames[i:i + args.batch])
            return len(frames) / (time.perf_counter() - t)

        def bag():
            out = tmp / "out"
            shutil.rmtree(out, ignore_errors=True)
            result = encode_bag(src, out, encoder=encoder, batch=args.batch, storage=args.storage, progress=False)
            assert result.frames_total == len(frames) and result.copied > 0, result
            return result.frames_total / result.seconds

        baseline()  # warm-up (allocator, OpenMP pool, cv2)
        bag()
        base_fps, bag_fps, ratios = [], [], []
        for r in range(args.rounds):
            order = (baseline, bag) if r % 2 == 0 else (bag, baseline)
            got = {fn: fn() for fn in order}
            base_fps.append(got[baseline])
            bag_fps.append(got[bag])
            ratios.append(got[bag] / got[baseline])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    med = float(np.median(ratios))
    ok = med >= RATIO_BUDGET
    meta = encoder.metadata
    print("# encode-bag throughput benchmark\n")
    print(f"model {meta['model_id']} ({meta['weights_id']}), backend {encoder.backend.name}, torch "
          f"{torch.__version__}, threads {torch.get_num_threads()}, cpu count {os.cpu_count()}")
    print(f"bag: {args.storage}, {len(frames)} frames of 640x480 (half raw rgb8, half JPEG) + joint states at "
          f"100 Hz, {size / 1e6:.1f} MB; batch {args.batch}; {args.rounds} interleaved rounds\n")
    print("| measurement | median | min | max |")
    print("|---|---|---|---|")
    for name, vals, unit in (("baseline: FeatureEncoder.encode on decoded frames", base_fps, "frames/s"),
                             ("encode-bag (read, decode, encode, write)", bag_fps, "frames/s")):
        print(f"| {name} | {np.median(vals):.2f} {unit} | {min(vals):.2f} | {max(vals):.2f} |")
    print(f"| ratio encode-bag / baseline (budget >= {RATIO_BUDGET}) | {med:.3f} | {min(ratios):.3f} | "
          f"{max(ratios):.3f} |")
    print(f"\n**{'PASS' if ok else 'FAIL'}**: encode-bag runs at {med:.1%} of the backend's batch throughput "
          f"(budget {RATIO_BUDGET:.0%})")
    return 0 if ok or not args.strict else 1


if __name__ == "__main__":
    sys.exit(main())
