"""OpenVINO backend speed settings (issue 17): a static batch-1 compilation next to the dynamic-batch one,
both gated; int8 with its floating-point layers in bf16 on native-bf16 CPUs (``int8_float``), in the key.

One module-scoped engine cache, one thread, theia-tiny random weights, a small int8 calibration set.
"""
import copy

import numpy as np
import pytest
import torch

from theia_ros.backends import cache
from theia_ros.backends import openvino_backend as ovb
from theia_ros.backends.base import BackendError
from theia_ros.backends.factory import create_backend
from theia_ros.backends.validation import validation_pixels

TINY = "random:theia-tiny-patch16-224-cddsv"
pytestmark = [pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning"),
              pytest.mark.usefixtures("one_torch_thread", "engine_cache"),
              pytest.mark.skipif(not (ovb.openvino_available() and ovb.nncf_available()),
                                 reason="openvino / nncf not installed")]


@pytest.fixture(scope="module")
def tiny():
    from theia_ros.encoder.model import load_model

    return load_model(TINY)


def _input_shape(compiled):
    return compiled.input(0).get_partial_shape()


def test_batch1_runs_a_static_compilation_equal_to_the_dynamic_one(tiny):
    backend = create_backend("openvino", tiny, precision="fp32", max_batch=3, threads=1)
    static = _input_shape(backend.compiled)
    assert static.is_static and list(static.to_shape()) == [1, 3, 224, 224]
    batched = _input_shape(backend.compiled_batched)
    assert batched.is_dynamic and batched[0].get_min_length() == 1 and batched[0].get_max_length() == 64
    for compiled in (backend.compiled, backend.compiled_batched):
        assert str(compiled.get_property("INFERENCE_PRECISION_HINT")) in ("<Type: 'float32'>", "f32", "float32")
        assert compiled.get_property("INFERENCE_NUM_THREADS") == 1
    assert backend.validation["batch1"] >= 0.9999 and backend.validation["batched"] >= 0.9999

    pixels = validation_pixels(3)
    one_by_one = torch.cat([backend.run_pixels(pixels[i:i + 1]) for i in range(3)])
    together = backend.run_pixels(pixels)
    dynamic = backend.compiled_batched.create_infer_request()
    dynamic.infer({0: pixels[:1].numpy()})
    assert torch.allclose(one_by_one[:1], torch.from_numpy(dynamic.get_output_tensor(0).data.copy()), atol=1e-4)
    assert torch.allclose(one_by_one, together, atol=1e-4) and not torch.equal(one_by_one[0], one_by_one[1])
    # batch 1 goes through the static compilation, more through the dynamic one
    calls = []
    for name in ("request", "batched_request"):
        setattr(backend, name, _Spy(getattr(backend, name), name, calls))
    backend.run_pixels(pixels[:1])
    backend.run_pixels(pixels[:2])
    assert calls == ["request", "batched_request"]

    # max_batch 1: no second compilation; a larger batch still runs, image by image, with the same values
    single = create_backend("openvino", tiny, precision="fp32", max_batch=1, threads=1)
    assert single.compiled_batched is None and single.batched_request is None
    assert single.cache.directory == backend.cache.directory  # the same IR: the compilations are not cached
    assert "batched" not in single.validation
    assert torch.allclose(single.run_pixels(pixels), one_by_one, atol=1e-4)


@pytest.mark.parametrize("path", ["request", "batched_request"])
def test_each_compilation_is_gated(tiny, monkeypatch, path):
    """A wrong batch-1 (or batched) compilation is refused even when the other one is right."""
    other = copy.deepcopy(tiny)
    with torch.no_grad():
        other.backbone.layers[5].mlp.fc2.weight.mul_(-3.0)  # a "miscompiled" layer
    wrong = ovb.convert(other, "mean")
    if path == "request":
        wrong.reshape({0: [1, 3, 224, 224]})
    wrong_request = ovb.core().compile_model(wrong, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}).create_infer_request()
    real = ovb.OpenVINOBackend._compile

    def compile_then_swap(self, ov_model):
        real(self, ov_model)
        setattr(self, path, wrong_request)

    monkeypatch.setattr(ovb.OpenVINOBackend, "_compile", compile_then_swap)
    batch = "1" if path == "request" else "2"
    with pytest.raises(BackendError, match=rf"refusing openvino fp32 engine .* at batch {batch}.* below the required"):
        create_backend("openvino", tiny, representation="mean", max_batch=2, threads=1, rebuild=True)


def test_int8_float_layers_in_bf16_where_native_and_in_the_key(tiny, monkeypatch):
    base = ovb.engine_key(tiny, "tokens", "int8", calibration={"count": 16})
    assert "int8_float" not in base  # f32: the key of engines built before the option
    assert cache.slot_name(ovb.engine_key(tiny, "tokens", "int8", calibration={"count": 16}, int8_float="bf16")) \
        != cache.slot_name(base)
    assert ovb.engine_key(tiny, "tokens", "fp32", int8_float="bf16") == ovb.engine_key(tiny, "tokens", "fp32")
    with pytest.raises(BackendError, match="int8_float must be one of"):
        create_backend("openvino", tiny, precision="int8", int8_float="fp8")

    native = ovb.cpu_has_native_bf16()
    backend = create_backend("openvino", tiny, precision="int8", max_batch=1, threads=1, calibration_size=16)
    expected = "bf16" if native else "f32"
    assert backend.int8_float == expected and backend.identity["int8_float"] == expected
    assert backend.key.get("int8_float", "f32") == expected
    hint = str(backend.compiled.get_property("INFERENCE_PRECISION_HINT"))
    assert hint in (("<Type: 'bfloat16'>", "bf16") if native else ("<Type: 'float32'>", "f32", "float32"))
    assert backend.validation["natural"] >= 0.99
    assert backend.compile_config()["INFERENCE_PRECISION_HINT"] == expected

    # a CPU without native bf16: auto gives f32 (another engine), bf16 asked is refused
    monkeypatch.setattr(ovb, "cpu_has_native_bf16", lambda: False)
    with pytest.raises(BackendError, match="int8_float bf16 needs a CPU with native bf16"):
        create_backend("openvino", tiny, precision="int8", int8_float="bf16")
    keys = []

    def stop_at_the_cache(kind, key, *args, **kwargs):
        keys.append(key)
        raise BackendError("stopped before building")

    monkeypatch.setattr(cache, "get_or_build", stop_at_the_cache)
    with pytest.raises(BackendError, match="stopped before building"):
        create_backend("openvino", tiny, precision="int8", max_batch=1, threads=1, calibration_size=16)
    assert "int8_float" not in keys[0] and (keys[0] == backend.key) is (not native)
    assert np.isfinite(backend.run_pixels(validation_pixels(1)).numpy()).all()


class _Spy:
    """An infer request that records which one ran."""

    def __init__(self, request, name, calls):
        self.request, self.name, self.calls = request, name, calls

    def infer(self, *args, **kwargs):
        self.calls.append(self.name)
        return self.request.infer(*args, **kwargs)

    def get_output_tensor(self, index):
        return self.request.get_output_tensor(index)
