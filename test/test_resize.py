"""The reference resize (theia_ros.resize): byte for byte Pillow's BILINEAR, on photographs and random images.

The oracle is Pillow itself (installed with matplotlib, whose bundled photographs are the inputs
made by others). Pillow 13 chooses the order of its two passes (vertically first when the height
shrinks by more than twice as many pixels as the width); older Pillows always go horizontally
first. The tests ask the installed Pillow, and build the other order's oracle from Pillow's own
one-axis resizes (a resize that changes one size is one pass, the same in every version).
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from theia_ros.resize import pil_coefficients, resize_like_pil, vertical_first

Image = pytest.importorskip("PIL.Image")
cbook = pytest.importorskip("matplotlib.cbook")
import PIL  # noqa: E402 (after the importorskip above, which makes Pillow optional for this file)

PIL_ORDER = "pillow13" if int(PIL.__version__.split(".")[0]) >= 13 else "pillow12"


def pil_resize(img, size):
    """What the reference preprocessing does: Pillow's BILINEAR with its defaults."""
    h, w = size
    return np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR))


def pil_two_passes(img, size, vertical_first_):
    """One Pillow pass per axis, in the given order (each one-axis resize is a single pass)."""
    h, w = size
    im = Image.fromarray(img)
    if vertical_first_:
        im = im.resize((im.width, h), Image.BILINEAR).resize((w, h), Image.BILINEAR)
    else:
        im = im.resize((w, im.height), Image.BILINEAR).resize((w, h), Image.BILINEAR)
    return np.asarray(im)


def ours(img, size, **kw):
    out = resize_like_pil(img, size, **kw)
    assert out.dtype == torch.uint8 and out.shape == (1, *size, 3)
    return out[0].numpy()


def photographs():
    """Pictures not made by us, bundled with matplotlib: a photograph, a product picture, an MRI slice (RGB uint8)."""
    pics = {}
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        pics["grace_hopper"] = np.asarray(Image.open(f).convert("RGB"))
    with cbook.get_sample_data("Minduka_Present_Blue_Pack.png") as f:
        pics["minduka"] = np.asarray(Image.open(f).convert("RGB"))
    with cbook.get_sample_data("s1045.ima.gz") as f:  # an MRI slice, 256x256 16-bit (read as matplotlib's demo does)
        mri = np.frombuffer(f.read(), np.uint16).reshape(256, 256)
    mri = (mri.astype(np.float64) / mri.max() * 255).astype(np.uint8)
    pics["mri"] = np.repeat(mri[..., None], 3, axis=2)
    return pics


PHOTOS = photographs()
PHOTO_SIZES = [(224, 224), (480, 640), (640, 480), (97, 131), (1, 224), (224, 1), (13, 7), (700, 333)]


@pytest.mark.parametrize("name", sorted(PHOTOS))
def test_photographs_byte_for_byte(name):
    img = PHOTOS[name]
    assert img.dtype == np.uint8 and img.ndim == 3 and min(img.shape[:2]) >= 128
    for size in PHOTO_SIZES:
        assert np.array_equal(ours(img, size), pil_resize(img, size)), size


def test_torch_antialiased_resize_is_not_enough():
    """Why this module exists: torch's antialiased bilinear on uint8 is off by one level here and there."""
    img = PHOTOS["grace_hopper"]
    ref = pil_resize(img, (224, 224))
    approx = F.interpolate(torch.from_numpy(img.copy()).permute(2, 0, 1)[None], size=(224, 224), mode="bilinear",
                           antialias=True)[0].permute(1, 2, 0).numpy()
    diff = np.abs(approx.astype(int) - ref)
    assert diff.max() == 1 and (diff > 0).mean() > 1e-4
    assert np.array_equal(ours(img, (224, 224)), ref)


def random_sizes(rng, n):
    sizes = [(480, 640, 224, 224), (640, 480, 224, 224), (720, 1280, 224, 224), (1280, 480, 224, 224),
             (1, 1, 1, 2), (1, 1, 9, 5), (5, 9, 1, 1), (1, 17, 1, 5), (17, 1, 5, 1), (1, 30, 4, 30), (30, 1, 30, 4),
             (2, 3, 3, 2), (9, 9, 8, 10), (100, 100, 99, 101)]
    while len(sizes) < n:
        H, W = (int(v) for v in rng.integers(1, 96, 2))
        h, w = (int(v) for v in rng.integers(1, 140, 2))
        if rng.random() < 0.25:  # one side 1 pixel, or one side unchanged
            H, W, h, w = [1 if rng.random() < 0.3 else v for v in (H, W, h, w)]
            if rng.random() < 0.5:
                h = H
        sizes.append((H, W, h, w))
    return sizes


def test_random_images_many_sizes_byte_for_byte():
    rng = np.random.default_rng(16)
    sizes = random_sizes(rng, 400)
    both = {False: 0, True: 0}
    for H, W, h, w in sizes:
        img = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        assert np.array_equal(ours(img, (h, w), order=PIL_ORDER), pil_resize(img, (h, w))), (H, W, h, w)
        both[vertical_first((H, W), (h, w), PIL_ORDER)] += 1
    assert both[False] > 50 and (PIL_ORDER == "pillow12" or both[True] > 50)  # both orders covered


def test_both_pass_orders_against_pillow_passes():
    """The order rule, checked where the two orders give different bytes: each order equals Pillow's
    own passes run in that order, and the default follows Pillow 13."""
    rng = np.random.default_rng(5)
    differ = 0
    for H, W, h, w in [(200, 60, 50, 40), (64, 64, 30, 48), (300, 100, 97, 90), (50, 20, 40, 30), (480, 640, 100, 600)]:
        img = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        v = pil_two_passes(img, (h, w), True)
        hz = pil_two_passes(img, (h, w), False)
        differ += not np.array_equal(v, hz)
        assert np.array_equal(ours(img, (h, w), order="pillow12"), hz)
        assert np.array_equal(ours(img, (h, w)), v if vertical_first((H, W), (h, w)) else hz)
    assert differ >= 4
    assert vertical_first((200, 60), (50, 40)) and not vertical_first((200, 60), (50, 40), "pillow12")
    assert not vertical_first((64, 64), (30, 47)) and vertical_first((64, 64), (30, 48))  # H-h > 2 (W-w), strictly
    assert not vertical_first((480, 640), (224, 224))  # the usual camera frame: the same bytes in every Pillow


def test_long_windows_take_the_float64_route():
    """Shrinking 2000 -> 3 (windows of ~1300 taps, too long to split into float32-exact parts)."""
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (5, 2000, 3), dtype=np.uint8)
    assert np.array_equal(ours(img, (2, 3)), pil_resize(img, (2, 3)))
    img = rng.integers(0, 256, (2000, 4, 3), dtype=np.uint8)
    assert np.array_equal(ours(img, (3, 7)), pil_resize(img, (3, 7)))


def test_float_rows_kernel_gives_the_same_bytes(monkeypatch):
    """Without torch's uint8-row embedding-bag kernel, float32 rows give the same bytes."""
    import theia_ros.resize as resize_module
    rng = np.random.default_rng(4)
    img = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    expected = pil_resize(img, (64, 48))
    monkeypatch.setattr(resize_module, "_numba_kernel", lambda: None)  # the torch route, where these kernels run
    monkeypatch.setattr(resize_module, "_bag_kernel", lambda: resize_module._float_bags)
    assert np.array_equal(ours(img, (64, 48)), expected)


def test_batch_numpy_torch_and_views():
    rng = np.random.default_rng(7)
    batch = rng.integers(0, 256, (3, 61, 83, 3), dtype=np.uint8)
    size = (29, 40)
    expected = np.stack([pil_resize(img, size) for img in batch])
    out = resize_like_pil(batch, size)
    assert out.shape == (3, 29, 40, 3) and out.dtype == torch.uint8
    assert np.array_equal(out.numpy(), expected)
    assert np.array_equal(resize_like_pil(torch.from_numpy(batch), size).numpy(), expected)
    assert np.array_equal(resize_like_pil(batch[1], size)[0].numpy(), expected[1])  # one [H, W, 3] image
    assert np.array_equal(out.contiguous().numpy(), expected)

    readonly = batch.copy()
    readonly.flags.writeable = False
    assert np.array_equal(resize_like_pil(readonly, size).numpy(), expected)
    assert np.array_equal(batch, readonly)  # the input is never written

    bgr = batch[..., ::-1]  # negative strides
    assert np.array_equal(resize_like_pil(bgr, size).numpy(), np.stack([pil_resize(np.ascontiguousarray(i), size)
                                                                        for i in bgr]))
    crop = batch[:, 5:50, 7:70]  # a strided window
    assert np.array_equal(resize_like_pil(crop, size).numpy(),
                          np.stack([pil_resize(np.ascontiguousarray(i), size) for i in crop]))
    every_other = batch[::2, :, ::2]
    view = every_other[0]
    view.flags.writeable = False
    assert np.array_equal(resize_like_pil(view, size)[0].numpy(), pil_resize(np.ascontiguousarray(view), size))
    t = torch.from_numpy(batch).permute(0, 2, 1, 3)  # a non-contiguous tensor: the transposed images
    assert np.array_equal(resize_like_pil(t, size).numpy(),
                          np.stack([pil_resize(np.ascontiguousarray(i.transpose(1, 0, 2)), size) for i in batch]))
    same = resize_like_pil(batch, (61, 83))  # nothing to resize: a copy
    assert np.array_equal(same.numpy(), batch) and same.data_ptr() != torch.from_numpy(batch).data_ptr()


def test_end_to_end_equals_the_reference_preprocessing():
    """The fact the theia profile relies on: normalising our uint8 result ((x / 255 - 0.5) / 0.5, as
    the reference's ToTensor then Normalize(0.5, 0.5)) gives exactly the reference's model input."""
    for name in ("grace_hopper", "minduka"):
        img = PHOTOS[name]
        ref = (torch.from_numpy(pil_resize(img, (224, 224)).copy()).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
        x = resize_like_pil(img, (224, 224))
        got = (x.permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
        torch.testing.assert_close(got[0], ref, rtol=0, atol=0)
        got_np = (torch.from_numpy(x[0].numpy().copy()).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
        torch.testing.assert_close(got_np, ref, rtol=0, atol=0)


def test_coefficients_are_pillows_fixed_point():
    """The integer weights: 22 fractional bits, summing to 2**22 within rounding, windows inside the image."""
    for n_in, n_out in [(640, 224), (480, 224), (224, 640), (7, 3), (1, 5), (5, 1)]:
        windows = pil_coefficients(n_in, n_out)
        assert len(windows) == n_out
        for first, ks in windows:
            assert 0 <= first and first + len(ks) <= n_in and ks
            assert abs(sum(ks) - (1 << 22)) <= len(ks)
    assert pil_coefficients(1, 5) == ((0, (1 << 22,)),) * 5


@pytest.mark.parametrize("images, size, error, match", [
    (np.zeros((4, 4, 3), np.float32), (2, 2), TypeError, "uint8"),
    (torch.zeros(4, 4, 3), (2, 2), TypeError, "uint8"),
    ([[0]], (2, 2), TypeError, "numpy array or torch tensor"),
    (np.zeros((4, 4), np.uint8), (2, 2), ValueError, "rank"),
    (np.zeros((4, 4, 4), np.uint8), (2, 2), ValueError, "3 channels"),
    (np.zeros((0, 4, 3), np.uint8), (2, 2), ValueError, "empty"),
    (np.zeros((4, 4, 3), np.uint8), (0, 2), ValueError, "size"),
    (np.zeros((4, 4, 3), np.uint8), (2,), ValueError, "size"),
    (np.zeros((4, 4, 3), np.uint8), (2.5, 2), ValueError, "size"),
    (np.zeros((4, 4, 3), np.uint8), (True, 2), ValueError, "size"),
])
def test_rejects(images, size, error, match):
    with pytest.raises(error, match=match):
        resize_like_pil(images, size)
    with pytest.raises(ValueError, match="order"):
        resize_like_pil(np.zeros((4, 4, 3), np.uint8), (2, 2), order="pillow11")
