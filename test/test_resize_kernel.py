"""The numba route of the reference resize (theia_ros.resize, extra "fast-resize"): Pillow's bytes, the
torch route's bytes, and the theia model input's bits, with and without numba.

The oracle is Pillow (its BILINEAR with the defaults the reference preprocessing uses); the inputs
are scikit-image's photographs (made by others) and random images of many sizes.
"""
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_resize import pil_resize, pil_two_passes

import theia_ros.resize as resize_module
from theia_ros.preprocess import to_model_input
from theia_ros.resize import resize_like_pil, resize_normalized_like_pil, vertical_first

skdata = pytest.importorskip("skimage.data")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



@pytest.fixture(scope="module")
def kernel():
    assert resize_module.prepare() == "numba"
    k = resize_module._numba_kernel()
    assert k is not None, "numba is pinned in requirements.txt: the numba route must be the one in use"
    return k


@pytest.fixture
def torch_route(monkeypatch):
    """Forces the torch route, as where numba is not installed."""
    monkeypatch.setattr(resize_module, "_numba_kernel", lambda: None)


def numba_bytes(img, size, order="pillow13"):
    assert resize_module._numba_kernel() is not None
    return resize_like_pil(img, size, order=order)[0].numpy()


PHOTOS = {name: getattr(skdata, name)() for name in ("astronaut", "coffee", "rocket", "chelsea")}
PHOTO_SIZES = [(224, 224), (97, 131), (1, 224), (224, 1), (13, 7), (700, 333), (60, 500), (512, 41)]


@pytest.mark.parametrize("name", sorted(PHOTOS))
def test_photographs_byte_for_byte_both_orders(kernel, name):
    img = PHOTOS[name]
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    for size in PHOTO_SIZES:
        assert np.array_equal(numba_bytes(img, size), pil_resize(img, size)), size
        assert np.array_equal(numba_bytes(img, size, "pillow12"), pil_two_passes(img, size, False)), size
        if vertical_first(img.shape[:2], size):  # where the orders differ, pillow13 is vertical first
            assert np.array_equal(numba_bytes(img, size), pil_two_passes(img, size, True)), size


def random_cases(rng, n):
    cases = [(480, 640, 224, 224), (640, 480, 224, 224), (1, 1, 1, 2), (1, 1, 9, 5), (5, 9, 1, 1), (1, 17, 1, 5),
             (17, 1, 5, 1), (2, 3, 3, 2), (200, 60, 50, 40), (64, 64, 30, 48), (5, 2000, 2, 3), (2000, 4, 3, 7),
             (481, 643, 224, 224), (3, 5, 3, 5)]
    while len(cases) < n:
        H, W = (int(v) for v in rng.integers(1, 90, 2))
        h, w = (int(v) for v in rng.integers(1, 130, 2))
        if rng.random() < 0.3:  # one side 1 pixel, or one side unchanged
            H, W, h, w = [1 if rng.random() < 0.3 else v for v in (H, W, h, w)]
            if rng.random() < 0.5:
                h = H
        cases.append((H, W, h, w))
    return cases


def test_random_images_many_sizes_equal_pillow_and_the_torch_route(kernel, monkeypatch):
    rng = np.random.default_rng(17)
    cases = random_cases(rng, 160)
    images = [rng.integers(0, 256, (H, W, 3), dtype=np.uint8) for H, W, _, _ in cases]
    ours = {order: [numba_bytes(img, c[2:], order) for img, c in zip(images, cases)]
            for order in ("pillow13", "pillow12")}
    monkeypatch.setattr(resize_module, "_numba_kernel", lambda: None)
    orders = {False: 0, True: 0}
    for img, (H, W, h, w), a, b in zip(images, cases, ours["pillow13"], ours["pillow12"]):
        vfirst = vertical_first((H, W), (h, w))
        orders[vfirst] += 1
        assert np.array_equal(a, pil_resize(img, (h, w))), (H, W, h, w)
        assert np.array_equal(b, pil_two_passes(img, (h, w), False) if h != H and w != W else a), (H, W, h, w)
        assert np.array_equal(a, resize_like_pil(img, (h, w))[0].numpy()), (H, W, h, w)  # the torch route
        assert np.array_equal(b, resize_like_pil(img, (h, w), order="pillow12")[0].numpy()), (H, W, h, w)
    assert orders[True] >= 5 and orders[False] >= 100


def test_views_batches_and_unaligned_memory(kernel):
    rng = np.random.default_rng(8)
    batch = rng.integers(0, 256, (3, 61, 84, 3), dtype=np.uint8)
    size = (29, 40)
    want = np.stack([pil_resize(i, size) for i in batch])
    assert np.array_equal(resize_like_pil(batch, size).numpy(), want)
    assert np.array_equal(resize_like_pil(batch[..., ::-1], size).numpy(),
                          np.stack([pil_resize(np.ascontiguousarray(i[..., ::-1]), size) for i in batch]))
    raw = np.zeros(61 * 84 * 3 + 1, np.uint8)
    shifted = raw[1:].reshape(61, 84, 3)  # C-contiguous, but not on a 4-byte boundary
    shifted[...] = batch[0]
    shifted.flags.writeable = False
    assert np.array_equal(resize_like_pil(shifted, size)[0].numpy(), want[0])
    assert np.array_equal(resize_like_pil(torch.from_numpy(batch[1]), size)[0].numpy(), want[1])
    out = np.empty((1, 3, *size), np.float32)
    assert resize_normalized_like_pil(batch[2:], size, out)
    assert len(kernel.signatures) == 1  # writable, read-only, unaligned, fused: no second compilation at run time


def test_fused_model_input_equals_resize_then_normalise(kernel, monkeypatch):
    """The numba route writes x / 127.5 - 1 while resizing: the same float32 bits as today's two steps
    (resize, then torch's division and subtraction), which are the reference's (x / 255 - 0.5) / 0.5."""
    rng = np.random.default_rng(9)
    frames = [rng.integers(0, 256, (480, 640, 3), dtype=np.uint8), PHOTOS["astronaut"], PHOTOS["coffee"],
              rng.integers(0, 256, (97, 131, 3), dtype=np.uint8),
              np.repeat(np.kron(np.arange(256, dtype=np.uint8).reshape(16, 16), np.ones((8, 8), np.uint8))[..., None],
                        3, axis=2)]  # flat 8x8 blocks of every value: each survives the enlargement
    fused = [to_model_input(f) for f in frames]
    buffer = torch.full((2, 3, 224, 224), 7.0)
    assert to_model_input(frames[0], out=buffer[1:2]).data_ptr() == buffer[1:2].data_ptr()
    direct = np.empty((1, 3, 50, 40), np.float32)
    assert resize_normalized_like_pil(frames[0][None], (50, 40), direct)
    with pytest.raises(ValueError, match="out must be"):
        to_model_input(frames[0], out=torch.empty(1, 3, 224, 223))
    monkeypatch.setattr(resize_module, "_numba_kernel", lambda: None)
    assert not resize_normalized_like_pil(frames[0][None], (50, 40), np.empty((1, 3, 50, 40), np.float32))
    for f, got in zip(frames, fused):
        want = to_model_input(f)
        assert got.dtype == torch.float32 and got.is_contiguous() and got.shape == (1, 3, 224, 224)
        assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    assert torch.equal(buffer[1:2].view(torch.int32), fused[0].view(torch.int32)) and (buffer[0] == 7).all()
    every_value = torch.arange(256, dtype=torch.float32).div(127.5).sub(1.0)
    assert torch.isin(every_value, fused[-1]).all()  # every uint8 value went through the fused normalisation
    reference = torch.from_numpy(pil_resize(frames[0], (50, 40)).copy()).permute(2, 0, 1).float().div(255.0)
    assert torch.equal(torch.from_numpy(direct[0]).view(torch.int32), reference.sub(0.5).div(0.5).view(torch.int32))


def test_without_numba_the_torch_route_runs_and_is_exact(monkeypatch, caplog):
    """Where the extra is not installed (numba's import fails), the torch route runs, says so once, and
    gives the same bytes."""
    rng = np.random.default_rng(10)
    img = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    monkeypatch.setitem(sys.modules, "numba", None)  # import numba -> ImportError
    resize_module._numba_kernel.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger="theia_ros.resize"):
            assert resize_module.prepare() == "torch" and resize_module._numba_kernel() is None
            assert np.array_equal(resize_like_pil(img, (64, 48))[0].numpy(), pil_resize(img, (64, 48)))
            x = to_model_input(img)
        assert sum("torch route" in r.getMessage() for r in caplog.records) == 1
    finally:
        resize_module._numba_kernel.cache_clear()
    monkeypatch.undo()
    assert resize_module._numba_kernel() is not None
    assert torch.equal(to_model_input(img).view(torch.int32), x.view(torch.int32))


def test_no_writable_cache_directory_still_compiles(tmp_path):
    """A read-only package directory and no usable cache directory elsewhere: numba finds no place for
    its cache (simulated: every cache directory numba tries refuses to be written); the kernel compiles without a cache
    and stays exact, nothing crashes. (A subprocess: it compiles from scratch, ~10 s.)"""
    script = (
        "import logging, sys\n"
        "logging.basicConfig(level=logging.INFO, stream=sys.stdout)\n"
        "from numba.core import caching\n"
        "def read_only(self):\n"
        "    raise PermissionError(13, 'Read-only file system', self.get_cache_path())\n"
        "caching._CacheLocator.ensure_cache_path = read_only\n"
        "import numpy as np\n"
        "from PIL import Image\n"
        "import theia_ros.resize as r\n"
        "assert r._numba_kernel() is not None\n"
        "img = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)\n"
        "want = np.asarray(Image.fromarray(img).resize((20, 30), Image.BILINEAR))\n"
        "assert np.array_equal(r.resize_like_pil(img, (30, 20))[0].numpy(), want)\n"
        "print('EXACT')\n")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "not-a-dir" / "cache"), PYTHONPATH=ROOT)
    (tmp_path / "not-a-dir").write_text("a file, so that no directory can be made below it")
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=str(tmp_path), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "EXACT" in proc.stdout and "compiling without one" in proc.stdout, proc.stdout
