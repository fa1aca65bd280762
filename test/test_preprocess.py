"""Preprocessing (theia_ros.preprocess): RGB uint8 -> model input, crop / letterbox."""

import numpy as np
import pytest
import torch

from theia_ros.preprocess import PreprocessConfig, to_model_input


def rng_image(h=37, w=53, c=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8)


# ---- model input ------------------------------------------------------------------------------------

def test_model_input_224_is_exact_normalisation():
    img = rng_image(224, 224)
    x = to_model_input(img)
    assert x.shape == (1, 3, 224, 224) and x.dtype == torch.float32 and x.is_contiguous()
    expected = (torch.from_numpy(img).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
    torch.testing.assert_close(x[0], expected, rtol=0, atol=0)
    assert x.min() >= -1 and x.max() <= 1


def test_model_input_resize_matches_pil():
    Image = pytest.importorskip("PIL.Image")
    img = rng_image(480, 640, seed=3)
    x = to_model_input(img)
    ref = np.asarray(Image.fromarray(img).resize((224, 224), Image.BILINEAR)).astype(np.float32)
    ref = (torch.from_numpy(ref).permute(2, 0, 1) / 255 - 0.5) / 0.5
    diff = (x[0] - ref).abs()
    assert diff.max() <= 2 / 255 + 1e-6  # at most one uint8 level (antialiased bilinear, uint8)
    assert (diff > 1e-6).float().mean() < 0.01


def test_model_input_batch_forms_agree():
    imgs = np.stack([rng_image(120, 160, seed=s) for s in range(3)])
    batch = to_model_input(imgs)
    assert batch.shape == (3, 3, 224, 224)
    torch.testing.assert_close(to_model_input(torch.from_numpy(imgs)), batch, rtol=0, atol=0)
    torch.testing.assert_close(to_model_input(imgs[1]), batch[1:2], rtol=0, atol=0)
    bgr_view = imgs[..., ::-1]  # negative strides
    torch.testing.assert_close(to_model_input(bgr_view), to_model_input(np.ascontiguousarray(bgr_view)), rtol=0, atol=0)


def test_model_input_into_a_preallocated_batch():
    frames = [rng_image(120, 160, seed=1), rng_image(224, 224, seed=2)]
    batch = torch.full((3, 3, 224, 224), 7.0)
    for slot, frame in enumerate(frames):
        written = to_model_input(frame, out=batch[slot:slot + 1])
        assert written.data_ptr() == batch[slot].data_ptr()  # written in place, no second copy
    torch.testing.assert_close(batch[:2], torch.cat([to_model_input(f) for f in frames]), rtol=0, atol=0)
    assert bool((batch[2] == 7.0).all())  # the slot not asked for is untouched
    crop = PreprocessConfig(crop=(0, 0, 50, 60), letterbox=True)
    torch.testing.assert_close(to_model_input(frames[0], crop, out=batch[2:]), to_model_input(frames[0], crop),
                               rtol=0, atol=0)
    with pytest.raises(ValueError, match="out must be"):
        to_model_input(np.stack([frames[1], frames[1]]), out=batch[:1])  # two frames, one slot
    with pytest.raises(ValueError, match="out must be"):
        to_model_input(frames[0], out=torch.empty(1, 3, 224, 224, dtype=torch.float16))


@pytest.mark.parametrize("images,error,match", [
    (np.zeros((2, 32, 32, 4), np.uint8), ValueError, "3 channels"),
    (np.zeros((32, 32, 1), np.uint8), ValueError, "3 channels"),
    (np.zeros((32, 32, 3), np.float32), TypeError, "uint8"),
    (torch.zeros(1, 32, 32, 3, dtype=torch.int16), TypeError, "uint8"),
    (np.zeros((32, 3), np.uint8), ValueError, "rank"),
    (np.zeros((1, 1, 32, 32, 3), np.uint8), ValueError, "rank"),
    (np.zeros((0, 32, 32, 3), np.uint8), ValueError, "empty"),
    (np.zeros((1, 0, 32, 3), np.uint8), ValueError, "empty"),
    ([[[0, 0, 0]]], TypeError, "numpy array or torch tensor"),
])
def test_model_input_rejects(images, error, match):
    with pytest.raises(error, match=match):
        to_model_input(images)


# ---- crop / letterbox -------------------------------------------------------------------------------

def test_crop():
    img = rng_image(100, 200)
    config = PreprocessConfig(crop=(10, 20, 50, 60))
    torch.testing.assert_close(to_model_input(img, config), to_model_input(np.ascontiguousarray(img[20:80, 10:60])),
                               rtol=0, atol=0)
    with pytest.raises(ValueError, match="does not fit"):
        to_model_input(img, PreprocessConfig(crop=(180, 0, 50, 10)))


def test_letterbox():
    from theia_ros.preprocess import apply_crop_letterbox

    img = torch.from_numpy(rng_image(60, 100))[None]
    boxed = apply_crop_letterbox(img, PreprocessConfig(letterbox=True, fill=(1, 2, 3)))
    assert boxed.shape == (1, 100, 100, 3)
    assert torch.equal(boxed[0, 20:80], img[0])
    assert boxed[0, 0, 0].tolist() == [1, 2, 3] and boxed[0, 99, 99].tolist() == [1, 2, 3]
    tall = apply_crop_letterbox(torch.from_numpy(rng_image(90, 30))[None], PreprocessConfig(letterbox=True))
    assert tall.shape == (1, 90, 90, 3) and int(tall[0, :, :30].max()) == 0
    both = PreprocessConfig(crop=(0, 0, 40, 20), letterbox=True)
    assert apply_crop_letterbox(img, both).shape == (1, 40, 40, 3)
    assert to_model_input(rng_image(60, 100), both).shape == (1, 3, 224, 224)


def test_default_config_is_identity():
    img = rng_image(90, 120)
    assert PreprocessConfig().is_identity
    torch.testing.assert_close(to_model_input(img, PreprocessConfig()), to_model_input(img), rtol=0, atol=0)


@pytest.mark.parametrize("kwargs", [dict(crop=(0, 0, 0, 10)), dict(crop=(-1, 0, 5, 5)), dict(crop=(0, 0, 5)),
                                    dict(crop=(0.5, 0, 5, 5)), dict(fill=300), dict(fill=(1, 2))])
def test_config_validation(kwargs):
    with pytest.raises(ValueError):
        PreprocessConfig(**kwargs)
