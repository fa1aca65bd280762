"""The torch backend's low-precision gate checks held-out photographs too, like the engines' (issue 17)."""
import pytest
import torch

from theia_ros.backends import calibration
from theia_ros.backends.base import BackendError
from theia_ros.backends.torch_backend import TorchBackend
from theia_ros.encoder.model import load_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TINY = "random:theia-tiny-patch16-224-cddsv"


@pytest.fixture(scope="module")
def tiny():
    return load_model(TINY)


def test_bf16_is_gated_per_photograph(tiny):
    backend = TorchBackend(tiny, precision="bf16", max_batch=2)
    names, _ = calibration.natural_pixels((224, 224))
    assert len(names) >= 3
    result = backend.validation
    assert 0.999 <= result["natural"] <= 1.0 and 0.999 <= result["synthetic"] <= 1.0
    assert result["cosine"] == min(result["natural"], result["synthetic"]) == backend.validation_cosine
    assert result["worst_image"]


def test_bf16_is_refused_when_a_photograph_breaks_it(tiny, monkeypatch):
    names, pixels = calibration.natural_pixels((224, 224))
    broken = pixels.clone()
    broken[-1] = float("nan")  # one bad photograph: the gate must run it and say which
    monkeypatch.setattr(calibration, "natural_pixels", lambda size: (names, broken))
    with pytest.raises(BackendError, match="NaN or Inf"):
        TorchBackend(tiny, precision="bf16", max_batch=2)


def test_fp32_eager_is_not_gated(tiny, monkeypatch):
    monkeypatch.setattr(calibration, "natural_pixels", lambda size: pytest.fail("fp32 eager needs no gate"))
    backend = TorchBackend(tiny, precision="fp32")
    assert backend.validation is None and backend.validation_cosine is None
    with torch.inference_mode():
        assert backend.run_pixels(torch.zeros(1, 3, 224, 224)).shape == (1, 196, 192)
