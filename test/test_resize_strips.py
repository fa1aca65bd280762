"""The numba route of theia_ros.resize in strips of rows (resize._STRIP): Pillow's bytes and the model
input's bits where the strips and the ring of horizontal-pass rows have their edges, for both pass
orders and every combination of passes, and its small work memory.

The oracle is Pillow (its BILINEAR, and its one-axis resizes for the order the installed Pillow does
not take); the torch route (no numba) gives the two-step model input the fused one must equal.
"""
import threading

import numpy as np
import pytest
import torch
from test_resize import pil_resize, pil_two_passes

import theia_ros.resize as resize_module
from theia_ros.resize import resize_like_pil, resize_normalized_like_pil, vertical_first

S = resize_module._STRIP


@pytest.fixture(scope="module", autouse=True)
def numba_route():
    assert resize_module.prepare() == "numba", "numba is pinned in requirements.txt: the numba route must run"


def pillow(img, size, order):
    if order == "pillow13" and vertical_first(img.shape[:2], size):
        return pil_two_passes(img, size, True)
    return pil_two_passes(img, size, False)


def check(img, size):
    """Both orders' bytes against Pillow's passes; the fused model input's bits against resize then normalise."""
    for order in ("pillow13", "pillow12"):
        got = resize_like_pil(img, size, order=order)[0].numpy()
        assert np.array_equal(got, pillow(img, size, order)), (img.shape, size, order)
        out = np.full((1, 3, *size), 7.0, np.float32)
        assert resize_normalized_like_pil(img[None], size, out, order=order)
        want = torch.from_numpy(got.copy()).permute(2, 0, 1).float().div(255.0).sub(0.5).div(0.5)
        assert torch.equal(torch.from_numpy(out[0]).view(torch.int32), want.view(torch.int32)), (img.shape, size, order)


# (H, W, h, w): heights around the strip's multiples, for each route through the kernel
HORIZONTAL_FIRST = [(S - 1, 40, 9, 13), (S, 40, 9, 13), (S + 1, 40, 9, 13), (2 * S, 64, S + 1, 20),
                    (3 * S + 5, 37, 2 * S - 1, 11), (480, 640, 224, 224), (481, 643, 224, 224)]
VERTICAL_FIRST = [(700, 100, S - 1, 90), (700, 100, S, 90), (700, 100, S + 1, 90), (900, 41, 2 * S + 3, 38),
                  (400, 30, 3 * S, 25)]
ONE_PASS = [(S + 3, 50, S + 3, 17), (2 * S, 13, 2 * S, 40), (S + 7, 22, 5, 22), (5, 22, 3 * S + 1, 22),
            (1, 50, 1, 7), (50, 1, 7, 1)]
ENLARGE = [(3, 5, 2 * S + 1, 3 * S), (7, 2, 100, 9), (S + 1, 5, 4 * S, 6), (1, 1, 9, 5)]


@pytest.mark.parametrize("case", HORIZONTAL_FIRST + VERTICAL_FIRST + ONE_PASS + ENLARGE)
def test_strip_edges_equal_pillow_both_orders(case):
    H, W, h, w = case
    img = np.random.default_rng(H * 1000 + W).integers(0, 256, (H, W, 3), dtype=np.uint8)
    check(img, (h, w))


def test_the_cases_take_the_routes_they_are_named_for():
    for H, W, h, w in HORIZONTAL_FIRST:
        assert h < H and w < W and not vertical_first((H, W), (h, w))
    for H, W, h, w in VERTICAL_FIRST:
        assert vertical_first((H, W), (h, w))
    for H, W, h, w in ONE_PASS:
        assert (H == h) != (W == w)
    assert any(H > S for H, *_ in HORIZONTAL_FIRST) and any(h > S for _, _, h, _ in VERTICAL_FIRST)


def test_ring_wraps_and_long_windows():
    """Shrinks whose vertical windows are longer than a strip (the ring holds window + strip rows),
    several times around the ring, and one window of the whole image."""
    rng = np.random.default_rng(3)
    for H, W, h, w in [(1000, 16, 3, 5), (2000, 12, 60, 11), (300, 9, 1, 1), (3 * S + 1, 8, 3, 8)]:
        check(rng.integers(0, 256, (H, W, 3), dtype=np.uint8), (h, w))


def test_widths_off_the_word_boundaries_and_strided_inputs():
    """Widths whose rows are not whole 32-bit words (the byte path of the load), an input at an odd
    address, and a BGR view (not one C-contiguous block)."""
    rng = np.random.default_rng(4)
    for W in (1, 2, 3, 5, 6, 7, 9, 63, 65):
        check(rng.integers(0, 256, (S + 9, W, 3), dtype=np.uint8), (S - 3, max(W // 2, 1)))
        check(rng.integers(0, 256, (5 * S, W, 3), dtype=np.uint8), (S + 2, W + 1))  # vertical first, then enlarge
    raw = np.zeros(2 * S * 52 * 3 + 1, np.uint8)
    shifted = raw[1:].reshape(2 * S, 52, 3)
    shifted[...] = rng.integers(0, 256, shifted.shape, dtype=np.uint8)
    check(shifted, (S - 1, 21))
    bgr = rng.integers(0, 256, (S + 4, 40, 3), dtype=np.uint8)[..., ::-1]
    assert np.array_equal(resize_like_pil(bgr, (20, 17))[0].numpy(), pil_resize(np.ascontiguousarray(bgr), (20, 17)))


def test_huge_frame_and_a_batch():
    rng = np.random.default_rng(5)
    big = rng.integers(0, 256, (2160, 3840, 3), dtype=np.uint8)
    assert np.array_equal(resize_like_pil(big, (224, 224))[0].numpy(), pil_resize(big, (224, 224)))
    batch = rng.integers(0, 256, (3, 2 * S + 1, 70, 3), dtype=np.uint8)
    got = resize_like_pil(batch, (S + 1, 30)).numpy()
    assert np.array_equal(got, np.stack([pil_resize(i, (S + 1, 30)) for i in batch]))


def test_work_memory_is_strips_not_the_frame():
    """The work memory for a 640x480 frame is a few strips and a ring of rows (kilobytes), not three
    words per pixel of the frame (3.7 MB): what a cold call has to fetch after an inference."""
    seen = {}

    def run():
        frame = np.zeros((480, 640, 3), np.uint8)
        resize_normalized_like_pil(frame[None], (224, 224), np.empty((1, 3, 224, 224), np.float32))
        seen["bytes"] = resize_module._local.nb_scratch.nbytes

    thread = threading.Thread(target=run)  # a fresh thread: its own work memory, sized for this frame
    thread.start()
    thread.join()
    assert 0 < seen["bytes"] <= 512 * 1024, seen


def test_too_little_work_memory_is_an_error_not_a_write_past_it():
    kernel = resize_module._numba_kernel()
    img = np.zeros((40, 64, 3), np.uint8)
    img8 = img.reshape(40, 64 * 3)
    img8.flags.writeable = False
    hs, hn, hk = resize_module._nb_plan(64, 20)
    vs, vn, vk = resize_module._nb_plan(40, 10)
    layout = resize_module._nb_layout(40, 64, 10, 20, vk.shape[1])
    need = layout[-1]
    out32 = np.zeros((10, 20), np.uint32)
    with pytest.raises(ValueError, match="work memory"):
        kernel(img8, img8.view(np.uint32), True, hs, hn, hk, vs, vn, vk, False, out32, resize_module._NO_F32,
               False, np.zeros(need - 1, np.uint32), layout)
    kernel(img8, img8.view(np.uint32), True, hs, hn, hk, vs, vn, vk, False, out32, resize_module._NO_F32,
           False, np.zeros(need, np.uint32), layout)
    assert not out32.any()
