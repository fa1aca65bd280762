"""Pillow's BILINEAR resize, bit for bit, at a fraction of its cost (plain Python: numpy, torch; no ROS).

:func:`resize_like_pil` gives the bytes of ``np.asarray(PIL.Image.fromarray(img).resize((width, height),
PIL.Image.BILINEAR))`` for every image of an RGB uint8 batch: the resize of the reference Theia
preprocessing. It is built from Pillow's documented algorithm, not from its code:

* separable: one pass along each axis that changes size (a pass is skipped when its size does not
  change), each pass rounding its result to uint8 before the next one starts;
* per output pixel, a window of input pixels weighted by the triangle filter (support 1, scaled by
  the reduction factor when shrinking), centred on ``(i + 0.5) * in / out``; the weights are
  normalised to sum to 1 in double precision, then turned into integers with 22 fractional bits
  (``PRECISION_BITS = 32 - 8 - 2``, rounded half away from zero); a pass computes
  ``(sum(pixel * weight) + 2**21) >> 22`` in integers and clips to 0..255;
* the order of the passes: horizontal first, except that Pillow 13 resamples vertically first
  when the height shrinks, and by more than twice as many pixels as the width shrinks
  (``h < H and H - h > 2 * (W - w)``). Pillow 12 and older always go horizontal first:
  ``order="pillow12"`` reproduces them. The two orders give different bytes only in that case
  (a 640x480 frame to 224x224 is the same in both).

Two routes give these bytes, chosen once per process (logged at INFO):

* the numba route (extra ``fast-resize``; numba is pinned in requirements.txt): the integer formula
  itself, compiled. The image goes through in strips of 32 rows: a pass along the vertical axis is
  a weighted sum of whole rows in int32 (a long unit-stride loop that LLVM vectorises); a pass along
  the horizontal axis is the same on a strip's pixels as transposed 32-bit words (R, G, B, a zero
  byte), its rows going straight to a small ring that the vertical pass reads (or, when
  the vertical pass comes first, it runs on the image's RGB byte rows and feeds the strips).
  Serial (``nogil``, no ``parallel=True``: no thread pool beside torch's). It can also write the
  theia model input directly (:func:`resize_normalized_like_pil`: ``v / 127.5 - 1`` in float32,
  channels first, the bits of resize-then-normalise). Compiled on first use for one signature:
  ~10-15 s without numba's on-disk cache (``__pycache__`` beside this file, else numba's user-wide
  cache directory or ``NUMBA_CACHE_DIR``), ~1-1.5 s from it, numba's import included; where no cache
  directory is writable it compiles without one (logged), and where it cannot compile, the torch
  route runs (logged). :func:`prepare` does that up front (FeatureEncoder.warm_up calls it). Work
  memory: two strips of the input's width, a ring of (longest vertical window + 32) output-width
  rows and a strip of the output, kept per thread (~0.3 MB for a 640x480 frame; 3.7 MB before the
  strips).
* the torch route (no numba): a pass is a weighted sum of *rows* of a table whose rows run along
  the axis being resampled: torch's embedding-bag kernel for uint8 rows
  (``quantized::embedding_bag_byte_rowwise_offsets``; float32 rows and ``F.embedding_bag`` where a
  torch lacks it, same sums) computes all of them in one call. A table holds 4 bytes per pixel, so
  that a pixel moves as one 32-bit word when the image is transposed. The integer weights are split
  into a high and a low part small enough that every product and partial sum is an integer below
  2**24 (times a power of two), which float32 represents exactly in any summation order; the two
  parts are recombined with the same carry and rounding as the integer formula. Tables are kept per
  image shape and thread.

Coefficients are computed once per (input, output) size. A 640x480 frame to 224x224 on one thread
(benchmarks/bench_frame_path.py measures all of these in one run; ratios from one run on a shared
2-core machine): numba route ~0.35 ms for the uint8 resize and ~0.37 ms for the whole theia
preprocessing to float32 (the 0.5 ms budget), torch route ~0.86 ms and ~1.1 ms, Pillow ~1.7 ms,
torch's antialiased bilinear ~0.29 ms (off by one level on ~0.2% of the bytes). Those are warm calls,
back to back; with the caches evicted first, as in the encoder node after an inference, the whole
preprocessing into a preallocated batch takes ~0.65-0.75 ms (the whole-frame kernel before the
strips: ~0.7-0.8 ms in the same run; torch route ~2.1 ms; the kernel called directly ~0.45-0.55 ms
cold against ~0.65-0.8 ms): reading the frame and writing the output from and to main memory alone
take ~0.12 ms cold, the rest is the kernel's ~0.35 ms and the interpreter's, torch's and numba's own
state coming back; the work memory (~0.3 MB) is no longer what costs.
"""
from __future__ import annotations

import functools
import logging
import threading
import time
from typing import NamedTuple, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from theia_ros.images import as_rgb_batch

__all__ = [
    "PRECISION_BITS",
    "ORDERS",
    "pil_coefficients",
    "vertical_first",
    "resize_like_pil",
    "resize_normalized_like_pil",
    "prepare",
]

PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed-point precision for 8-bit images
ORDERS = ("pillow13", "pillow12")
_FLOAT_EXACT = 1 << 24  # float32 holds every integer below this
_log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=256)
def pil_coefficients(in_size: int, out_size: int) -> Tuple[Tuple[int, Tuple[int, ...]], ...]:
    """Pillow's bilinear windows for resampling ``in_size`` pixels to ``out_size``: per output pixel
    ``(first input pixel, integer weights with PRECISION_BITS fractional bits)``, in double
    precision exactly as the algorithm is specified (so that the integer weights are the same)."""
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be >= 1, got {in_size} -> {out_size}")
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale  # bilinear: triangle of support 1, widened when shrinking
    inv = 1.0 / filterscale
    one = float(1 << PRECISION_BITS)
    windows = []
    for i in range(out_size):
        center = (i + 0.5) * scale
        first = max(int(center - support + 0.5), 0)  # int() truncates toward zero, as a C cast does
        stop = min(int(center + support + 0.5), in_size)
        weights = []
        for x in range(stop - first):
            t = abs((x + first - center + 0.5) * inv)
            weights.append(1.0 - t if t < 1.0 else 0.0)
        total = 0.0
        for v in weights:  # summed in order, like the reference
            total += v
        if total != 0.0:
            weights = [v / total for v in weights]
        windows.append((first, tuple(int(0.5 + v * one) if v >= 0 else int(-0.5 + v * one) for v in weights)))
    return tuple(windows)


def vertical_first(in_hw: Tuple[int, int], out_hw: Tuple[int, int], order: str = "pillow13") -> bool:
    """Whether Pillow resamples the vertical axis first for this resize (see the module docstring)."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    (H, W), (h, w) = in_hw, out_hw
    return order == "pillow13" and h < H and (H - h) > 2 * (W - w)


class _Pass(NamedTuple):
    """One resampling pass as weighted sums ("bags") over the rows of a table of ``n_in`` rows."""
    n_in: int
    n_out: int
    indices: torch.Tensor  # int64, the taps with a non-zero part: high-part bags first, then low-part bags
    offsets: torch.Tensor  # int64 [2 * n_out] (float64 route: [n_out])
    weights: torch.Tensor  # per tap: float32 (float64 route: float64)
    alpha: float  # 2 ** -(PRECISION_BITS - split): what one unit of the low part's carry weighs
    wide: bool  # float64 route, for windows too long for the split (shrinking by more than ~450x)


@functools.lru_cache(maxsize=128)
def _pass(in_size: int, out_size: int) -> _Pass:
    """The bags of one pass. With a split s, weight c = (c >> s) * 2**s + (c & (2**s - 1)):

    * high bag: ``hi = sum(p * (c >> s)) * 2**-m + 0.5`` (m = 22 - s; the 0.5 from the table's
      last row, all ones),
    * low bag: ``lo = sum(p * (c & (2**s - 1))) * 2**-s``,

    each an integer below 2**24 times a power of two, so float32 sums them exactly whatever the
    order; then ``floor(hi + floor(lo) * 2**-m)`` is ``(sum(p * c) + 2**21) >> 22`` (the low
    part's carry is floored first, and 2**21 is a multiple of 2**s). Taps whose part is 0 are left
    out of that bag."""
    windows = pil_coefficients(in_size, out_size)
    if any(c < 0 for _, ks in windows for c in ks) or \
            255 * max(sum(ks) for _, ks in windows) + (1 << (PRECISION_BITS - 1)) >= 1 << 30:
        raise AssertionError("bilinear weights are non-negative and sum to ~1: no clipping is ever needed")
    split = None
    for s in range(6, PRECISION_BITS):
        hi = max(sum(c >> s for c in ks) for _, ks in windows)
        lo = max(sum(c & ((1 << s) - 1) for c in ks) for _, ks in windows)
        if 255 * hi + (1 << (PRECISION_BITS - 1 - s)) < _FLOAT_EXACT and 255 * lo < _FLOAT_EXACT:
            split = s
            break
    idx, off, wts = [], [], []
    ones = in_size  # the table's row of ones
    if split is None:  # float64 holds sum(p * c) + 2**21 < 2**30 exactly
        for first, ks in windows:
            off.append(len(idx))
            idx += [first + t for t, c in enumerate(ks) if c] + [ones]
            wts += [c / float(1 << PRECISION_BITS) for c in ks if c] + [0.5]
        return _Pass(in_size, out_size, torch.tensor(idx, dtype=torch.int64), torch.tensor(off, dtype=torch.int64),
                     torch.tensor(wts, dtype=torch.float64), 0.0, True)
    m = PRECISION_BITS - split
    low = (1 << split) - 1
    for first, ks in windows:
        off.append(len(idx))
        idx += [first + t for t, c in enumerate(ks) if c >> split] + [ones]
        wts += [(c >> split) * 2.0 ** -m for c in ks if c >> split] + [0.5]
    for first, ks in windows:
        off.append(len(idx))
        idx += [first + t for t, c in enumerate(ks) if c & low]
        wts += [(c & low) * 2.0 ** -split for c in ks if c & low]
    return _Pass(in_size, out_size, torch.tensor(idx, dtype=torch.int64), torch.tensor(off, dtype=torch.int64),
                 torch.tensor(wts, dtype=torch.float32), 2.0 ** -m, False)


# ---- the bag kernels ---------------------------------------------------------------------------------

_TAIL = 8  # each table row ends with its float32 scale (1.0) and offset (0.0), as the uint8-table kernel wants
_ROW_TAIL = np.array([1.0, 0.0], dtype="<f4").view(np.uint8)


def _quantized_bags(table: torch.Tensor, plan: _Pass) -> torch.Tensor:
    """Weighted sums of the uint8 table rows, in float32 (the uint8-row embedding-bag kernel)."""
    return torch.ops.quantized.embedding_bag_byte_rowwise_offsets(
        table, plan.indices, plan.offsets, False, 0, False, plan.weights, None, False)


def _float_bags(table: torch.Tensor, plan: _Pass) -> torch.Tensor:
    """The same sums from float32 rows (any torch), for when the uint8-row kernel is missing."""
    rows = table[:, :-_TAIL].to(plan.weights.dtype)
    return F.embedding_bag(plan.indices, rows, plan.offsets, per_sample_weights=plan.weights, mode="sum")


@functools.lru_cache(maxsize=1)
def _bag_kernel():
    """The uint8-row kernel if this torch has it and it gives the float32 sums bit for bit, else float32 rows."""
    try:
        table = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (9, 64 + _TAIL), dtype=np.uint8))
        table[:, -_TAIL:] = torch.from_numpy(_ROW_TAIL)
        table[8, :-_TAIL] = 1
        plan = _pass(8, 3)
        if torch.equal(_quantized_bags(table, plan), _float_bags(table, plan)):
            return _quantized_bags
    except (AttributeError, RuntimeError, NotImplementedError):
        pass
    return _float_bags


def _run_pass(table: torch.Tensor, plan: _Pass, out: np.ndarray) -> np.ndarray:
    """One pass: uint8 table [n_in + 1, dim + 8] -> ``out`` uint8 [n_out, dim], Pillow's integers."""
    if plan.wide:
        y = _float_bags(table, plan)  # (sum(p * c) + 2**21) / 2**22 in float64, exact
    else:
        y = _bag_kernel()(table, plan)
        lo = y[plan.n_out:]
        lo.floor_()  # the low part's carry
        y = y[:plan.n_out].add_(lo, alpha=plan.alpha)  # ((sum(p * c) + 2**21) >> s) * 2**-m, exact
    np.copyto(out, y.numpy(), casting="unsafe")  # truncation of values >= 0: the floor
    return out


# ---- work buffers --------------------------------------------------------------------------------

class _Workspace:
    """What one image shape needs, allocated once per thread: for each pass in Pillow's order, its
    axis ("v" or "h"), its plan, its table, the table's pixel words and, for the first of two
    passes, the buffer of its result. A table has one row per pixel along the axis resampled, then
    a row of ones; a row holds the pixels along the other axis (4 bytes each: R, G, B and one
    unused byte, so that a pixel moves as one 32-bit word), then the 8-byte tail."""

    def __init__(self, H, W, h, w, vfirst):
        self.shape = (H, W)
        self.src = None  # padded copy of the input, made when the input is not one C-contiguous block
        self.passes = []
        cur = {"v": H, "h": W}
        for axis in (("v", "h") if vfirst else ("h", "v")):
            n_in, n_out = (H, h) if axis == "v" else (W, w)
            if n_in == n_out:
                continue
            other = cur["h" if axis == "v" else "v"]
            table = np.empty((n_in + 1, other * 4 + _TAIL), np.uint8)
            table[:, -_TAIL:] = _ROW_TAIL
            table[n_in, :-_TAIL] = 1
            words = table[:n_in, :-_TAIL].view(np.int32)  # [n_in, other]
            self.passes.append((axis, _pass(n_in, n_out), torch.from_numpy(table), words))
            cur[axis] = n_out
        self.mid = np.empty((self.passes[0][1].n_out, self.passes[0][3].shape[1] * 4), np.uint8) \
            if len(self.passes) == 2 else None

    def padded(self) -> np.ndarray:
        if self.src is None:
            H, W = self.shape
            self.src = np.empty(H * W * 3 + 1, np.uint8)  # + 1: the 32-bit read of the last pixel
        return self.src


_local = threading.local()


def _workspace(key) -> _Workspace:
    cache = getattr(_local, "workspaces", None)
    if cache is None:
        cache = _local.workspaces = {}
    ws = cache.get(key)
    if ws is None:
        if len(cache) >= 8:
            cache.clear()
        ws = cache[key] = _Workspace(*key)
    return ws


_BLOCK_ROWS = 128  # a transposing copy goes this many source rows at a time: ~1.7x faster than in one go


def _copy(dst: np.ndarray, src: np.ndarray, transposed: bool) -> None:
    """``dst[...] = src`` for [rows, cols] views; in blocks of rows when ``dst`` is a transposed view."""
    if not transposed:
        np.copyto(dst, src)
        return
    for r in range(0, src.shape[0], _BLOCK_ROWS):
        np.copyto(dst[r:r + _BLOCK_ROWS], src[r:r + _BLOCK_ROWS])


def _load(words: np.ndarray, transpose: bool, img: np.ndarray, ws: _Workspace) -> None:
    """Write the pixels of ``img`` [H, W, 3] into a table's words: [W, H] when ``transpose``, else [H, W].

    Every pixel is read as the 32-bit word starting at its first byte: its three bytes and one
    byte of the next pixel, which nothing uses. The last pixel's word would end one byte past the
    image, so it is read from a 4-byte copy; an image that is not one C-contiguous block is first
    copied into a padded buffer."""
    H, W, _ = img.shape
    dst = words.T if transpose else words  # [y, x]
    if not img.flags.c_contiguous:
        src = ws.padded()
        np.copyto(src[:-1].reshape(H, W, 3), img)
        _copy(dst, np.ndarray((H, W), np.int32, src, 0, (W * 3, 3)), transpose)
        return
    _copy(dst[:H - 1], np.ndarray((H - 1, W), np.int32, img, 0, (W * 3, 3)), transpose)
    if W > 1:
        np.copyto(dst[H - 1, :W - 1], np.ndarray((W - 1,), np.int32, img, (H - 1) * W * 3, (3,)))
    tail = np.zeros(4, np.uint8)
    tail[:3] = img[H - 1, W - 1]
    dst[H - 1, W - 1] = tail.view(np.int32)[0]


def _resize_one(img: np.ndarray, out: np.ndarray, ws: _Workspace) -> None:
    """One image [H, W, 3] -> ``out`` [h, w, 4] (RGB and an unused byte), through the workspace's passes."""
    px = None  # the current pixel words [y, x], in whatever memory layout
    last = len(ws.passes) - 1
    for i, (axis, plan, table, words) in enumerate(ws.passes):
        # the resampled axis becomes the table's rows; each row holds the pixels along the other axis
        if i == 0:
            _load(words, axis == "h", img, ws)
        else:
            np.copyto(words, px if axis == "v" else px.T)
        if i < last:
            res = _run_pass(table, plan, ws.mid)
        elif axis == "v":  # rows are the output's rows: straight into place
            res = _run_pass(table, plan, out.reshape(plan.n_out, -1))
        else:
            res = _run_pass(table, plan, np.empty((plan.n_out, table.shape[1] - _TAIL), np.uint8))
        res = res.view(np.int32)  # [n_out, other]
        px = res if axis == "v" else res.T
    if ws.passes[-1][0] == "h":
        np.copyto(out.view(np.int32).reshape(px.shape), px)


# ---- the numba route (extra "fast-resize") ---------------------------------------------------------
#
# The same integers as Pillow, computed directly: pixels travel as 32-bit words (R, G, B and a zero
# byte), a pass along the vertical axis is a weighted sum of whole rows (a long unit-stride loop that
# LLVM vectorises), and a pass along the horizontal axis is the same thing on the transposed words.
# Serial code (no parallel=True): no thread pool beside torch's. The functions below are plain Python
# until _numba_kernel() compiles them; the torch route above stays for where numba is not installed.

_STRIP = 32  # rows a horizontal pass handles at once (a compile-time constant of the numba kernel)


def _nb_layout(H, W, h, w, kv) -> np.ndarray:
    """Where the numba kernel's buffers start in its work memory (uint32 words) for [H, W] -> [h, w],
    ``kv`` the longest vertical window; the last entry is the words needed. In order: T and P (a strip
    of the input as words, transposed and not), the ring of horizontal-pass rows, a strip of RGB bytes,
    a strip of the output; each rounded up to 64 bytes."""
    S = _STRIP
    sizes = (W * S, W * S, min(H, kv + S) * w, S * ((W * 3 + 3) // 4), S * w)
    offsets = np.zeros(len(sizes) + 1, np.intp)
    offsets[1:] = np.cumsum([(n + 15) // 16 * 16 for n in sizes])
    offsets.flags.writeable = False
    return offsets


def _nb_resize(img8, img32, use_words, hs, hn, hk, vs, vn, vk, vfirst, out32, outf, fused,  # pragma: no cover
               scratch, off):
    """One RGB image ``img8`` [H, W * 3] (``img32``: the same bytes as uint32 [H, W * 3 // 4] when
    ``use_words``) -> Pillow's bytes as RGBX words in ``out32`` [h, w], or (``fused``) the theia model
    input ``outf`` [3, h, w] float32: ``v / 127.5 - 1``. ``hs, hn, hk`` / ``vs, vn, vk``: first tap,
    tap count and 22-bit weights per output column / row (empty: that axis keeps its size).
    ``scratch``: uint32 work memory (kept by the caller) holding the buffers at ``off`` (:func:`_nb_layout`).

    The image goes through in strips of _STRIP rows, so that the work memory stays small (tens of
    kilobytes for a camera frame: in the L1/L2 caches even right after an inference evicted them):

    * horizontal pass of a strip: its pixels are loaded as words transposed, ``T[x, row]``, so that
      the pass is a weighted sum of whole rows of T (_STRIP * 4 byte lanes, unit stride); each
      output column's words go straight to their rows;
    * vertical pass: one output row at a time, a weighted sum of whole input rows (byte lanes): of
      the image's rows when it comes first (RGB bytes, no words needed), else of a ring of the
      horizontal pass's rows, each output row computed as soon as its window's rows are there;
    * each final row is written out at once (RGBX words, or the model input's three planes)."""
    S = _STRIP

    def vrow(src, R, s, n, coefs, lanes, acc, dst):
        # dst[:lanes] = (sum_t coefs[t] * src[(s + t) % R, k] + 2**21) >> 22 per byte lane, in int32
        for k in range(lanes):
            acc[k] = 1 << 21
        for t in range(0, n - 1, 2):
            r0 = src[(s + t) % R]
            r1 = src[(s + t + 1) % R]
            c0 = coefs[t]
            c1 = coefs[t + 1]
            for k in range(lanes):
                acc[k] += c0 * np.int32(r0[k]) + c1 * np.int32(r1[k])
        if n % 2:
            r0 = src[(s + n - 1) % R]
            c0 = coefs[n - 1]
            for k in range(lanes):
                acc[k] += c0 * np.int32(r0[k])
        for k in range(lanes):
            dst[k] = min(acc[k] >> 22, 255)  # weights >= 0: never below 0

    def hstrip(src8, src32, words, r0, cnt, P, T, acc, tmp, dst32, d0, dR):
        # rows r0 .. r0 + cnt of src8 (RGB bytes) -> their horizontal pass, as RGBX words in the rows
        # (d0 + j) % dR of dst32; rows past cnt repeat the last one (computed, never written)
        W = T.shape[0]
        for j in range(S):  # row-major words first (P [S, W]), then transposed
            r = r0 + min(j, cnt - 1)
            if words:  # 4 pixels from 3 words
                for g in range(W // 4):
                    w0 = src32[r, 3 * g]
                    w1 = src32[r, 3 * g + 1]
                    w2 = src32[r, 3 * g + 2]
                    P[j, 4 * g] = w0 & 0xFFFFFF
                    P[j, 4 * g + 1] = (w0 >> 24) | ((w1 << 8) & 0xFFFF00)
                    P[j, 4 * g + 2] = (w1 >> 16) | ((w2 & 0xFF) << 16)
                    P[j, 4 * g + 3] = w2 >> 8
            else:
                for x in range(W):
                    P[j, x] = np.uint32(src8[r, 3 * x]) | (np.uint32(src8[r, 3 * x + 1]) << 8) | \
                        (np.uint32(src8[r, 3 * x + 2]) << 16)
        for x in range(W):  # each row of T is one 128-byte block, written whole
            for j in range(S):
                T[x, j] = P[j, x]
        tb = T.view(np.uint8)  # [W, S * 4]
        for i in range(hs.shape[0]):
            s = hs[i]
            n = hn[i]
            for k in range(S * 4):
                acc[k] = 1 << 21
            for t in range(0, n - 1, 2):
                c0 = hk[i, t]
                c1 = hk[i, t + 1]
                for k in range(S * 4):
                    acc[k] += c0 * np.int32(tb[s + t, k]) + c1 * np.int32(tb[s + t + 1, k])
            if n % 2:
                c0 = hk[i, n - 1]
                for k in range(S * 4):
                    acc[k] += c0 * np.int32(tb[s + n - 1, k])
            for k in range(S * 4):
                tmp[i, k] = min(acc[k] >> 22, 255)
        t32 = tmp.view(np.uint32)  # [w, S]: the strip's output, transposed
        for j in range(cnt):
            d = dst32[(d0 + j) % dR]
            for i in range(hs.shape[0]):
                d[i] = t32[i, j]

    def emit(row, ps, y, w, out32, outf, fused):
        # one final row of bytes (pixel stride ps: 3 or 4) -> out32[y] words or the three planes outf[:, y]
        if fused:
            for c in range(3):
                for x in range(w):
                    outf[c, y, x] = np.float32(row[ps * x + c]) / np.float32(127.5) - np.float32(1.0)
        else:
            for x in range(w):
                out32[y, x] = np.uint32(row[ps * x]) | (np.uint32(row[ps * x + 1]) << 8) | \
                    (np.uint32(row[ps * x + 2]) << 16)

    H = img8.shape[0]
    W = img8.shape[1] // 3
    do_h = hs.shape[0] > 0
    do_v = vs.shape[0] > 0
    h = vs.shape[0] if do_v else H
    w = hs.shape[0] if do_h else W
    R = min(H, vk.shape[1] + S)  # the ring of horizontal-pass rows the vertical pass reads
    if off[off.shape[0] - 1] > scratch.shape[0]:
        raise ValueError("resize: work memory too small")
    T = scratch[off[0]:off[0] + W * S].reshape((W, S))
    P = scratch[off[1]:off[1] + W * S].reshape((S, W))
    ring32 = scratch[off[2]:off[2] + R * w].reshape((R, w))
    ring8 = ring32.view(np.uint8)  # [R, w * 4]
    wq = (W * 3 + 3) // 4
    sb8 = scratch[off[3]:off[3] + S * wq].view(np.uint8)[:S * W * 3].reshape((S, W * 3))
    sb_words = (W * 3) % 4 == 0
    sb32 = scratch[off[3]:off[3] + S * wq].reshape((S, wq))
    f32 = scratch[off[4]:off[4] + S * w].reshape((S, w))
    f8 = f32.view(np.uint8)  # [S, w * 4]
    # small and fresh (not carved from the scratch): the compiler then knows they alias nothing else
    row = np.empty(max(w * 4, W * 3), np.uint8)
    acc = np.empty(max(w * 4, W * 3, S * 4), np.int32)
    tmp = np.empty((w, S * 4), np.uint8)

    if do_h and do_v and not vfirst:  # horizontal first: strips of the image -> ring -> output rows
        done = 0
        for y0 in range(0, H, S):
            cnt = min(S, H - y0)
            hstrip(img8, img32, use_words, y0, cnt, P, T, acc, tmp, ring32, y0, R)
            top = y0 + cnt
            while done < h and vs[done] + vn[done] <= top:
                vrow(ring8, R, vs[done], vn[done], vk[done], w * 4, acc, row)
                emit(row, 4, done, w, out32, outf, fused)
                done += 1
    elif do_h:  # vertical first (strips of its rows), or no vertical pass (strips of the image)
        for y0 in range(0, h, S):
            cnt = min(S, h - y0)
            if do_v:
                for j in range(cnt):
                    vrow(img8, H, vs[y0 + j], vn[y0 + j], vk[y0 + j], W * 3, acc, sb8[j])
                hstrip(sb8, sb32, sb_words, 0, cnt, P, T, acc, tmp, f32, 0, S)
            else:
                hstrip(img8, img32, use_words, y0, cnt, P, T, acc, tmp, f32, 0, S)
            for j in range(cnt):
                emit(f8[j], 4, y0 + j, w, out32, outf, fused)
    elif do_v:  # vertical only: RGB byte rows
        for y in range(h):
            vrow(img8, H, vs[y], vn[y], vk[y], W * 3, acc, row)
            emit(row, 3, y, w, out32, outf, fused)
    else:
        for y in range(h):
            emit(img8[y], 3, y, w, out32, outf, fused)


_ROUTE_LOCK = threading.Lock()


def _nb_signature(numba):
    t = numba.types
    u8 = t.Array(t.uint8, 2, "C", readonly=True)
    u32 = t.Array(t.uint32, 2, "C", readonly=True)
    ip = t.Array(t.intp, 1, "C", readonly=True)
    i32 = t.Array(t.int32, 2, "C", readonly=True)
    return t.void(u8, u32, t.boolean, ip, ip, i32, ip, ip, i32, t.boolean, t.Array(t.uint32, 2, "C"),
                  t.Array(t.float32, 3, "C"), t.boolean, t.Array(t.uint32, 1, "C"), ip)


@functools.lru_cache(maxsize=1)
def _numba_kernel():
    """The compiled kernel, or None where numba is not installed (or cannot compile): then the torch
    route runs. Compiled once per process, eagerly for its one signature; numba keeps the machine
    code in its on-disk cache (``__pycache__`` beside this file, else numba's user-wide cache
    directory, ``NUMBA_CACHE_DIR`` if set); where no cache directory is writable it compiles without
    one."""
    with _ROUTE_LOCK:
        try:
            import numba
        except ImportError:
            _log.info("resize: numba is not installed (extra 'fast-resize'): exact resize on the torch route")
            return None
        start = time.perf_counter()
        try:
            kernel = numba.njit(cache=True, nogil=True)(_nb_resize)
        except RuntimeError as exc:  # "cannot cache function ...: no locator available"
            _log.info("resize: numba has no writable cache directory here (%s); compiling without one", exc)
            kernel = numba.njit(nogil=True)(_nb_resize)
        try:
            kernel.compile(_nb_signature(numba).args)
            kernel.disable_compile()  # one signature: an argument of another type is a bug, never a silent compile
        except Exception as exc:  # noqa: BLE001 (any compile failure: the exact torch route remains)
            _log.warning("resize: numba could not compile the resize kernel (%s: %s); using the torch route",
                         type(exc).__name__, exc)
            return None
        _log.info("resize: numba route (%.2f s to compile or load from numba's cache)", time.perf_counter() - start)
        return kernel


def prepare() -> str:
    """Compile (or load from numba's cache) the numba route now rather than on the first frame that
    needs a resize; returns the route that runs: ``"numba"`` or ``"torch"``. Cost: ~10-15 s on a cold
    cache, ~1-1.5 s from numba's on-disk cache, nothing after the first call in a process."""
    return "torch" if _numba_kernel() is None else "numba"


@functools.lru_cache(maxsize=128)
def _nb_plan(in_size: int, out_size: int):
    """Per output pixel: first tap, tap count, weights (int32, zero-padded); empty when the size stays."""
    if in_size == out_size:
        return np.zeros(0, np.intp), np.zeros(0, np.intp), np.zeros((0, 1), np.int32)
    windows = pil_coefficients(in_size, out_size)
    K = max(len(ks) for _, ks in windows)
    coefs = np.zeros((out_size, K), np.int32)
    for i, (_, ks) in enumerate(windows):
        coefs[i, :len(ks)] = ks
    starts = np.array([first for first, _ in windows], np.intp)
    counts = np.array([len(ks) for _, ks in windows], np.intp)
    for a in (starts, counts, coefs):
        a.flags.writeable = False
    return starts, counts, coefs


_NO_WORDS = np.zeros((1, 1), np.uint32)
_NO_WORDS.flags.writeable = False
_NO_U32 = np.zeros((1, 1), np.uint32)
_NO_F32 = np.zeros((1, 1, 1), np.float32)


@functools.lru_cache(maxsize=128)
def _nb_sizes(H: int, W: int, h: int, w: int):
    """Both axes' plans and the work memory's layout for [H, W] -> [h, w], looked up once per frame."""
    vplan = _nb_plan(H, h)
    return _nb_plan(W, w) + vplan + (_nb_layout(H, W, h, w, vplan[2].shape[1]),)


def _nb_run(kernel, img: np.ndarray, size, vfirst: bool, out32: Optional[np.ndarray], outf: Optional[np.ndarray]):
    """One image [H, W, 3] through the numba kernel into ``out32`` [h, w] words or ``outf`` [3, h, w]."""
    H, W, _ = img.shape
    img8 = np.ascontiguousarray(img).reshape(H, W * 3).view()
    img8.flags.writeable = False  # the compiled signature's type (the kernel never writes it)
    img32 = _NO_WORDS
    if W % 4 == 0:
        img32 = img8.view(np.uint32)
        if not img32.flags.aligned:  # not on a 4-byte boundary: the byte path
            img32 = _NO_WORDS
    hs, hn, hk, vs, vn, vk, layout = _nb_sizes(H, W, size[0], size[1])
    need = layout[-1]
    fused = outf is not None
    scratch = getattr(_local, "nb_scratch", None)
    if scratch is None or scratch.shape[0] < need:
        scratch = _local.nb_scratch = np.empty(need, np.uint32)
    kernel(img8, img32, img32 is not _NO_WORDS, hs, hn, hk, vs, vn, vk, vfirst, _NO_U32 if fused else out32,
           outf if fused else _NO_F32, fused, scratch, layout)


# ---- the public function ---------------------------------------------------------------------------

def _as_numpy(images) -> Tuple[np.ndarray, Optional[torch.device]]:
    if isinstance(images, torch.Tensor):
        if images.dtype != torch.uint8:
            raise TypeError(f"images must be uint8 RGB, got torch dtype {images.dtype}")
        device = images.device
        return images.detach().cpu().numpy(), (None if device.type == "cpu" else device)
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise TypeError(f"images must be uint8 RGB, got numpy dtype {images.dtype}")
        return images, None
    raise TypeError(f"images must be a uint8 numpy array or torch tensor [B,H,W,3] or [H,W,3], "
                    f"got {type(images).__name__}")


def resize_like_pil(images, size: Tuple[int, int], *, order: str = "pillow13") -> torch.Tensor:
    """RGB uint8 images -> uint8 ``[B, height, width, 3]``, byte for byte Pillow's BILINEAR resize.

    ``images``: numpy array or torch tensor, uint8, ``[B, H, W, 3]`` or ``[H, W, 3]`` (any strides,
    read-only views included; never modified). ``size``: ``(height, width)``, each >= 1. Every image
    comes out as ``np.asarray(PIL.Image.fromarray(img).resize((width, height), PIL.Image.BILINEAR))``
    (Pillow's defaults: the whole image, no reducing_gap), shrinking or enlarging, any sizes down
    to 1 pixel. ``order``: ``"pillow13"`` (default) or ``"pillow12"``, the pass order of those
    Pillow versions (they differ only when the height shrinks by more than twice as many pixels as
    the width). The result is a new CPU tensor (moved to the input tensor's device if that is not
    the CPU); its channel stride is 1 and its pixel stride 4 (a view of RGB plus an unused byte),
    which torch handles like any strided tensor; ``.contiguous()`` packs it.

    Raises TypeError for a non-uint8 dtype or a non-array, ValueError for a wrong rank, channel count,
    empty images or a size that is not two positive integers.
    """
    arr, device = _as_numpy(images)
    arr = as_rgb_batch(arr)
    B, H, W, _ = arr.shape
    try:
        h, w = (int(v) for v in size)
        valid = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in size) and h >= 1 and w >= 1
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise ValueError(f"size must be (height, width), two integers >= 1, got {size!r}")
    vfirst = vertical_first((H, W), (h, w), order)
    if (h, w) == (H, W):
        out = torch.from_numpy(np.array(arr, order="C"))
        return out if device is None else out.to(device)

    rgbx = np.empty((B, h, w, 4), np.uint8)
    kernel = _numba_kernel()
    if kernel is not None:
        for b in range(B):
            _nb_run(kernel, arr[b], (h, w), vfirst, rgbx[b].view(np.uint32)[..., 0], None)
    else:
        ws = _workspace((H, W, h, w, vfirst))
        for b in range(B):
            _resize_one(arr[b], rgbx[b], ws)
    out = torch.from_numpy(rgbx)[..., :3]
    return out if device is None else out.to(device)


def resize_normalized_like_pil(images: np.ndarray, size: Tuple[int, int], out: np.ndarray, *,
                               order: str = "pillow13") -> bool:
    """The theia profile's model input in one go: ``out[b] = resize_like_pil(images[b]) / 127.5 - 1``
    as float32 ``[3, height, width]`` (the reference's ``(x / 255 - 0.5) / 0.5``, the same bits).

    ``images``: uint8 numpy ``[B, H, W, 3]``; ``out``: a C-contiguous float32 numpy ``[B, 3, height,
    width]``, written in place. Returns False, writing nothing, where the numba route is not
    available (the caller then resizes with :func:`resize_like_pil` and normalises itself)."""
    kernel = _numba_kernel()
    if kernel is None:
        return False
    B, H, W, _ = images.shape
    h, w = (int(v) for v in size)
    if out.shape != (B, 3, h, w) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous float32 array of shape {(B, 3, h, w)}, got {out.dtype} "
                         f"{out.shape}")
    vfirst = vertical_first((H, W), (h, w), order)
    for b in range(B):
        _nb_run(kernel, images[b], (h, w), vfirst, None, out[b])
    return True
