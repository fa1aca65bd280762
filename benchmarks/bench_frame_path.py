#!/usr/bin/env python3
"""The encoder node's per-frame path, each step done once: what that saves, measured in one run.

    python benchmarks/bench_frame_path.py [--rounds 15]

1. A batch of 4 camera frames (640x480 RGB) into the model input: the way before (each frame
   through preprocess.to_model_input, then torch.cat copies the batch again) against
   FeatureEncoder's (each frame preprocessed straight into one preallocated [max_batch, 3, 224, 224]
   buffer). Interleaved rounds; the ratio is what to read.
2. A compressed frame that declares 12000x9000 pixels (a small JPEG whose frame header says so):
   the way before (decode, then check the size) against images.decode_compressed with
   max_pixels (the size read from the JPEG header, nothing decoded). Time and the growth of the
   process's peak RSS; the header check runs first, so the full decode's growth is not hidden by it.
3. A good 640x480 camera frame as JPEG (quality 90) and as PNG: the way before (OpenCV's imdecode
   alone, which hands back a guessed picture when libjpeg only warns) against
   images.decode_compressed (jpeg: simplejpeg strict, any libjpeg warning refuses the frame;
   png: every chunk's CRC checked, then OpenCV). Interleaved rounds; the ratio is what to read.
4. The theia profile's resize of that frame to 224x224 (uint8): resize.resize_like_pil (Pillow's
   bytes, exactly) against Pillow's own BILINEAR resize (what the reference preprocessing runs)
   and torch's antialiased bilinear on uint8 (F.interpolate: off by one level on some pixels).
   Interleaved rounds; the bytes are checked against Pillow's first.
Budgets: the batch path at most 1.0x the old one (one copy fewer); the oversized frame rejected
at least 100x faster and with < 5 MB peak RSS growth; good frames decoded at most 1.25x the old
time (jpeg and png); the exact resize byte-identical to Pillow's and faster than it (its 0.5 ms
target is printed, not part of the exit status).
"""
import argparse
import resource
import sys
import time

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from theia_ros.images import ImageDecodeError, decode_compressed
from theia_ros.preprocess import IMAGE_SIZE, to_model_input
from theia_ros.resize import resize_like_pil

MAX_PIXELS = 3840 * 2160


def oversized_jpeg(width=12000, height=9000):
    """A real 160x120 JPEG whose SOF0 header is patched to declare width x height."""
    data = bytearray(cv2.imencode(".jpg", np.full((120, 160, 3), 128, np.uint8))[1].tobytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def decode_then_check(data):
    """The path before: decode in full, then compare the size with the limit."""
    rgb = decode_compressed(data, "jpeg")
    if rgb.shape[0] * rgb.shape[1] > MAX_PIXELS:
        raise ImageDecodeError("too large")


def check_then_decode(data):
    decode_compressed(data, "jpeg", max_pixels=MAX_PIXELS)


def camera_frame(height=480, width=640, seed=0):
    """Something like a camera picture: smooth gradients, flat blocks with hard edges, sensor noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([128 + 100 * np.sin(xx / (60 + 20 * c) + yy / (90 - 10 * c)) for c in range(3)], axis=-1)
    for _ in range(12):
        y0, x0 = rng.integers(0, height - 80), rng.integers(0, width - 80)
        img[y0:y0 + 80, x0:x0 + 80] = rng.uniform(0, 255, size=3)
    img += rng.normal(0, 6, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def opencv_decode(data):
    """The decode before: OpenCV's imdecode alone."""
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB)


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, reps):
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        try:
            fn()
        except ImageDecodeError:
            pass
        out.append(time.perf_counter() - t0)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (480, 640, 3), dtype=np.uint8) for _ in range(4)]
    buffer = torch.empty(4, 3, IMAGE_SIZE, IMAGE_SIZE)

    def per_frame_then_cat():
        return torch.cat([to_model_input(f) for f in frames])

    def into_one_batch():
        for i, f in enumerate(frames):
            to_model_input(f, out=buffer[i:i + 1])
        return buffer

    assert torch.equal(per_frame_then_cat(), into_one_batch())  # same numbers, fewer copies
    old, new = [], []
    for _ in range(args.rounds):
        old += timed(per_frame_then_cat, 10)
        new += timed(into_one_batch, 10)
    old_ms, new_ms = np.median(old) * 1e3, np.median(new) * 1e3

    data = oversized_jpeg()
    rss0 = peak_rss_mb()
    header = timed(lambda: check_then_decode(data), 5)
    rss1 = peak_rss_mb()
    full = timed(lambda: decode_then_check(data), 3)
    rss2 = peak_rss_mb()
    header_ms, full_ms = np.median(header) * 1e3, np.median(full) * 1e3

    picture = camera_frame()
    encoded = {"jpeg": cv2.imencode(".jpg", picture, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes(),
               "png": cv2.imencode(".png", picture)[1].tobytes()}
    decode_rows = {}
    for kind, blob in encoded.items():
        assert np.array_equal(opencv_decode(blob), decode_compressed(blob, kind))  # same pixels
        before, now = [], []
        for _ in range(args.rounds):
            before += timed(lambda: opencv_decode(blob), 10)
            now += timed(lambda: decode_compressed(blob, kind), 10)
        decode_rows[kind] = (len(blob), np.median(before) * 1e3, np.median(now) * 1e3)
    decode_ok = all(now_ms / before_ms <= 1.25 for _, before_ms, now_ms in decode_rows.values())

    size = (IMAGE_SIZE, IMAGE_SIZE)
    resizes = {
        "Pillow BILINEAR": lambda: np.asarray(Image.fromarray(picture).resize(size[::-1], Image.BILINEAR)),
        "torch antialiased bilinear": lambda: F.interpolate(torch.from_numpy(picture).permute(2, 0, 1)[None],
                                                            size=size, mode="bilinear", antialias=True),
        "resize_like_pil": lambda: resize_like_pil(picture, size),
    }
    pil_bytes = resizes["Pillow BILINEAR"]()
    exact = np.array_equal(resizes["resize_like_pil"]()[0].numpy(), pil_bytes)
    torch_bytes = resizes["torch antialiased bilinear"]()[0].permute(1, 2, 0).numpy()
    torch_off = float(np.mean(torch_bytes != pil_bytes))
    resize_times = {name: [] for name in resizes}
    for _ in range(args.rounds):
        for name, fn in resizes.items():
            resize_times[name] += timed(fn, 20)
    resize_ms = {name: np.median(t) * 1e3 for name, t in resize_times.items()}
    ours_ms = resize_ms["resize_like_pil"]
    resize_ok = exact and ours_ms < resize_ms["Pillow BILINEAR"]

    batch_ok = new_ms <= old_ms
    reject_ok = full_ms / header_ms >= 100 and rss1 - rss0 < 5
    print("# Per-frame path: each step once\n")
    print(f"torch {torch.__version__}, {args.threads} threads, {args.rounds} interleaved rounds; "
          f"JPEG of {len(data)} bytes declaring 12000x9000\n")
    print("| measurement | before | now | ratio now/before | budget | result |")
    print("|---|---|---|---|---|---|")
    print(f"| 4 frames 640x480 -> model input (median) | {old_ms:.2f} ms | {new_ms:.2f} ms | {new_ms / old_ms:.2f} "
          f"| <= 1.00 | {'PASS' if batch_ok else 'FAIL'} |")
    print(f"| oversized JPEG rejected (median) | {full_ms:.1f} ms | {header_ms:.3f} ms | "
          f"{header_ms / full_ms:.1e} | <= 0.01 | {'PASS' if reject_ok else 'FAIL'} |")
    print(f"| peak RSS growth while rejecting it | {rss2 - rss1:.0f} MB | {rss1 - rss0:.1f} MB | | < 5 MB now | "
          f"{'PASS' if rss1 - rss0 < 5 else 'FAIL'} |")
    for kind, (size, before_ms, now_ms) in decode_rows.items():
        print(f"| good 640x480 {kind} ({size // 1024} KB) decoded (median) | {before_ms:.2f} ms | {now_ms:.2f} ms | "
              f"{now_ms / before_ms:.2f} | <= 1.25 | {'PASS' if now_ms / before_ms <= 1.25 else 'FAIL'} |")
    print(f"\nResize 640x480 -> 224x224 uint8 (median of {args.rounds} x 20, interleaved); resize_like_pil "
          f"{'byte-identical to' if exact else 'DIFFERS from'} Pillow; torch's bytes differ on {torch_off:.2%}\n")
    print("| resize | median | resize_like_pil / this | exact | budget | result |")
    print("|---|---|---|---|---|---|")
    for name, ms in resize_ms.items():
        if name == "resize_like_pil":
            print(f"| {name} | {ms:.3f} ms | 1.00 | {'yes' if exact else 'NO'} | exact; <= 0.5 ms (target) | "
                  f"{'PASS' if exact else 'FAIL'}; {'PASS' if ms <= 0.5 else 'FAIL'} (target) |")
        else:
            exact_other = "yes" if name.startswith("Pillow") else f"no ({torch_off:.2%} of bytes off)"
            print(f"| {name} | {ms:.3f} ms | {ours_ms / ms:.2f} | {exact_other} | "
                  f"{'resize_like_pil faster' if name.startswith('Pillow') else ''} | "
                  f"{('PASS' if ours_ms < ms else 'FAIL') if name.startswith('Pillow') else 'info'} |")
    return 0 if batch_ok and reject_ok and decode_ok and resize_ok else 1


if __name__ == "__main__":
    sys.exit(main())
