"""The theia profile's normalisation written with one pass fewer gives the reference's float32 bits."""
import numpy as np
import torch

from theia_ros.preprocess import to_model_input


def reference_normalisation(x: torch.Tensor) -> torch.Tensor:
    """torchvision's ToTensor (x / 255) then Normalize(mean=0.5, std=0.5), as three float32 operations."""
    return x.float().div(255.0).sub(0.5).div(0.5)


def test_every_uint8_value_normalises_bit_for_bit():
    values = np.arange(256, dtype=np.uint8)
    img = np.resize(values, (224, 224 * 3)).reshape(224, 224, 3)  # every value, in every channel; no resize
    got = to_model_input(img)
    want = reference_normalisation(torch.from_numpy(img).permute(2, 0, 1)[None])
    assert got.dtype == torch.float32 and got.is_contiguous()
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))  # the same bits, not just close
    assert {float(v) for v in got.unique()} == {float(v) for v in reference_normalisation(torch.arange(256))}
    assert got.min().item() == -1.0 and got.max().item() == 1.0


def test_resized_frame_normalises_bit_for_bit():
    rng = np.random.default_rng(3)
    frame = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    from theia_ros.resize import resize_like_pil

    want = reference_normalisation(resize_like_pil(frame, (224, 224)).permute(0, 3, 1, 2))
    out = torch.empty(2, 3, 224, 224)
    got = to_model_input(frame, out=out[1:2])
    assert got.data_ptr() == out[1:2].data_ptr()
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


def test_a_single_multiply_would_not_be_bit_exact():
    # why the division stays a division: x * (2 / 255) - 1 differs in the last bit for some values
    x = torch.arange(256, dtype=torch.float32)
    assert not torch.equal(x.mul(2.0 / 255.0).sub(1.0), reference_normalisation(x))
