"""OpenVINO backend (fp32, bf16, calibrated int8), the natural-image gate, auto's plan with and without
openvino, the bench's openvino rows (issue 17).

One module-scoped engine cache, one thread, theia-tiny random weights, a small int8 calibration set.
"""
import json
import logging

import numpy as np
import pytest
import torch

from theia_ros.backends import cache
from theia_ros.backends import openvino_backend as ovb
from theia_ros.backends.base import BackendError
from theia_ros.backends.factory import create_backend
from theia_ros.backends.validation import cosine_per_sample, reference_output

TINY = "random:theia-tiny-patch16-224-cddsv"
pytestmark = [pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning"),
              pytest.mark.usefixtures("one_torch_thread", "engine_cache")]
# the extra is optional: engine tests need it; its absence is simulated in the plan test below
needs_ov = pytest.mark.skipif(not (ovb.openvino_available() and ovb.nncf_available()),
                              reason="openvino / nncf not installed")


@pytest.fixture(scope="module")
def tiny():
    from theia_ros.encoder.model import load_model

    return load_model(TINY)


@pytest.fixture(scope="module")
def photos():
    from theia_ros.backends.calibration import natural_pixels

    return natural_pixels((224, 224))


def _per_image(backend, model, pixels, representation):
    out = torch.cat([backend.run_pixels(pixels[i:i + 2]) for i in range(0, len(pixels), 2)])
    return cosine_per_sample(out, reference_output(model, pixels, representation))


@needs_ov
def test_fp32_equals_torch_on_photographs_pins_f32_and_threads(tiny, photos):
    backend = create_backend("openvino", tiny, precision="fp32", max_batch=2, threads=1)
    assert backend.name == "openvino" and backend.cache.status == "built"
    # OpenVINO runs bf16 by default on CPUs with native bf16: fp32 must be pinned
    assert str(backend.compiled.get_property("INFERENCE_PRECISION_HINT")) in ("<Type: 'float32'>", "f32", "float32")
    assert backend.compiled.get_property("INFERENCE_NUM_THREADS") == 1
    assert backend.compiled.get_property("ENABLE_CPU_PINNING") is False
    names, pixels = photos
    per = _per_image(backend, tiny, pixels, "tokens")
    assert len(per) == len(names) >= 6 and float(per.min()) >= 0.9999
    meta = json.loads((backend.engine_path.parent / cache.SIDECAR).read_text())
    assert meta["environment"]["openvino"] and meta["key"]["weights_id"] == tiny.weights_id
    assert meta["validation"]["cosine"] >= 0.9999 and set(meta["files"]) == {"model.xml", "model.bin"}


@needs_ov
def test_cached_engine_is_loaded_and_a_tampered_one_rebuilt(tiny, monkeypatch, caplog):
    converts = []
    real = ovb.convert
    monkeypatch.setattr(ovb, "convert", lambda *a, **k: converts.append(a[1]) or real(*a, **k))
    first = create_backend("openvino", tiny, representation="cls", max_batch=2, threads=1)
    with caplog.at_level(logging.INFO, logger="theia_ros.backends"):
        second = create_backend("openvino", tiny, representation="cls", max_batch=2, threads=1)
    assert second.cache.status == "hit" and converts == ["cls"] and "loaded from cache" in caplog.text
    assert second.validation_cosine >= 0.9999
    # weights altered on disk with the sidecar rewritten to match: the hashes cannot see it, the gate does
    directory = first.engine_path.parent
    weights = np.fromfile(directory / "model.bin", dtype=np.float32)
    (-weights).tofile(directory / "model.bin")
    meta = cache.read_sidecar(directory)
    cache.write_sidecar(directory, meta["key"], meta["environment"], list(meta["files"]),
                        {k: meta[k] for k in ("validation",)})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="theia_ros.backends"):
        third = create_backend("openvino", tiny, representation="cls", max_batch=2, threads=1)
    assert third.cache.status == "rebuilt" and "cannot be used" in caplog.text and converts == ["cls", "cls"]
    assert third.validation_cosine >= 0.9999


@needs_ov
def test_a_failing_gate_refuses_the_engine(tiny, monkeypatch):
    import copy

    real = ovb.convert

    def convert_other_model(model, representation, *args, **kwargs):
        other = copy.deepcopy(model)
        with torch.no_grad():
            other.backbone.layers[5].mlp.fc2.weight.mul_(-3.0)  # a "miscompiled" layer
        return real(other, representation, *args, **kwargs)

    monkeypatch.setattr(ovb, "convert", convert_other_model)
    with pytest.raises(BackendError, match=r"refusing openvino fp32 engine .* below the required 0\.9999"):
        create_backend("openvino", tiny, representation="mean", max_batch=2, threads=1)
    slot = cache.cache_root() / "openvino" / cache.slot_name(ovb.engine_key(tiny, "mean"))
    assert not (slot / cache.SIDECAR).exists()  # nothing recorded


@needs_ov
def test_bf16_where_native_else_refused(tiny, photos, monkeypatch):
    if ovb.cpu_has_native_bf16():
        backend = create_backend("openvino", tiny, precision="bf16", max_batch=2, threads=1)
        assert backend.validation["natural"] >= 0.999 and backend.validation["synthetic"] >= 0.999
        assert str(backend.compiled.get_property("INFERENCE_PRECISION_HINT")) in ("<Type: 'bfloat16'>", "bf16")
        assert float(_per_image(backend, tiny, photos[1], "tokens").min()) >= 0.999
    monkeypatch.setattr(ovb, "cpu_has_native_bf16", lambda: False)
    with pytest.raises(BackendError, match="bf16 needs a CPU with native bf16"):
        create_backend("openvino", tiny, precision="bf16")
    with pytest.raises(BackendError, match="fp16 runs on an Intel GPU only"):
        create_backend("openvino", tiny, precision="fp16")
    if not ovb.intel_gpus():
        with pytest.raises(BackendError, match="sees no Intel GPU"):
            create_backend("openvino", tiny, precision="fp16", device="xpu")


def test_calibration_set_is_deterministic_natural_and_held_out():
    from theia_ros.backends.calibration import CALIBRATION_PHOTOS, HELD_OUT_PHOTOS, CalibrationSet

    a, b = CalibrationSet(count=9), CalibrationSet(count=9)
    assert a.identity == b.identity and torch.equal(a.pixels, b.pixels)
    assert a.pixels.shape == (9, 3, 224, 224) and float(a.pixels.std()) > 0.2  # photographs, not flat frames
    assert CalibrationSet(count=10).identity != a.identity and CalibrationSet(count=9, seed=1).identity != a.identity
    assert not set(CALIBRATION_PHOTOS) & set(HELD_OUT_PHOTOS)
    with pytest.raises(BackendError, match="must be a CalibrationFrames"):
        CalibrationSet(extra=["/a/bag/path"])


def test_calibration_takes_frames_of_a_bag(tmp_path):
    from test_bags import make_camera_bag

    from theia_ros.backends.calibration import CalibrationSet
    from theia_ros.bags.calibration import calibration_frames

    make_camera_bag(tmp_path / "cams", "mcap", n=6)
    extra = calibration_frames(tmp_path / "cams", limit=4)
    frames = extra.frames
    assert 1 <= len(frames) <= 4 and all(f.ndim == 3 and f.shape[2] == 3 and f.dtype == np.uint8 for f in frames)
    with_bag = CalibrationSet(count=3, extra=extra)
    assert len(with_bag) == 3 + len(frames) and with_bag.identity["bag"]["path"] == str(tmp_path / "cams")
    assert with_bag.identity != CalibrationSet(count=3).identity  # another set, another int8 engine
    with pytest.raises(BackendError, match="no camera"):
        calibration_frames(tmp_path / "cams", topics=["/joint_states"])
    with pytest.raises(BackendError, match="does not exist"):
        calibration_frames(tmp_path / "nonexistent")


@needs_ov
def test_int8_engine_passes_per_image_on_held_out_photographs(tiny, photos):
    backend = create_backend("openvino", tiny, precision="int8", max_batch=2, threads=1, calibration_size=16)
    assert backend.precision == "int8" and backend.int8_recipe in ovb.INT8_RECIPES
    names, pixels = photos
    per = _per_image(backend, tiny, pixels, "tokens")
    assert float(per.min()) >= 0.99, dict(zip(names, per.tolist()))
    assert float(per.min()) < 0.99999  # really quantized, not an fp32 engine
    key = backend.key
    assert key["precision"] == "int8" and key["calibration"]["count"] == 16
    assert key["calibration"]["photographs"][0] == "astronaut" and backend.cache.directory.name.find("int8") > 0
    assert backend.validation["natural"] >= 0.99 and backend.validation["worst_image"]
    other = ovb.engine_key(tiny, "tokens", "int8", calibration={**key["calibration"], "count": 64})
    assert cache.slot_name(other) != backend.cache.directory.name  # another calibration set, another engine


def test_int8_elsewhere_is_a_clear_error(tiny):
    with pytest.raises(BackendError, match="int8"):
        create_backend("torch", tiny, precision="int8")
    with pytest.raises(BackendError, match="int8"):
        create_backend("onnxruntime", tiny, precision="int8")


def test_plan_prefers_openvino_and_falls_back_with_a_reason(tiny, monkeypatch, caplog):
    from theia_ros.backends import factory

    cpu = {"cuda": False, "tensorrt": False, "onnxruntime": True, "openvino": True, "nncf": True, "fast_bf16": True}
    assert [c[:2] for c in factory.plan("cpu", "fp32", cpu)] == [("openvino", "fp32"), ("onnxruntime", "fp32"),
                                                                 ("torch", "fp32")]
    assert [c[:2] for c in factory.plan("auto", "bf16", cpu)][:2] == [("openvino", "bf16"), ("torch", "bf16")]
    assert factory.plan("auto", "int8", cpu)[0][:2] == ("openvino", "int8")
    assert factory.plan("auto", "int8", {**cpu, "nncf": False})[0][:2] == ("openvino", "fp32")
    no_ov = factory.plan("auto", "int8", {**cpu, "openvino": False})
    assert no_ov[0][:2] == ("onnxruntime", "fp32") and "int8 asked but openvino is not installed" in no_ov[0][3]
    assert "openvino (not installed)" in factory.plan("auto", "fp32", {**cpu, "openvino": False})[0][3]
    assert factory.plan("cuda", "int8", {**cpu, "cuda": True})[0][1] == "fp16"
    # the probe: an environment without the openvino extra (its import fails)
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.split(".")[0] in (
        "openvino", "nncf") else real_find_spec(name, *a))
    caps = factory._capabilities()
    assert caps["openvino"] is False and caps["nncf"] is False
    with pytest.raises(BackendError, match="openvino package is not installed"):
        create_backend("openvino", tiny)
    monkeypatch.setattr(factory, "_capabilities", lambda: {**caps, "onnxruntime": False})
    with caplog.at_level(logging.INFO, logger="theia_ros.backends"):
        backend = create_backend("auto", tiny, precision="int8", device="cpu", max_batch=2)
    assert backend.name == "torch" and backend.precision == "fp32"
    assert "int8 asked but openvino is not installed" in backend.auto_reason and backend.auto_reason in caplog.text


def test_node_precision_parameter_takes_int8():
    from theia_ros.nodes.theia_encoder import ENCODER_PARAMETERS

    precision = next(p for p in ENCODER_PARAMETERS if p.name == "precision")
    backend = next(p for p in ENCODER_PARAMETERS if p.name == "backend")
    assert precision.check("int8") == "int8" and backend.check("openvino") == "openvino"
    with pytest.raises(ValueError):
        precision.check("int4")


@needs_ov
def test_bench_times_frames_and_writes_json(tmp_path, capsys):
    from theia_ros.cli.main import main

    out = tmp_path / "rows.json"
    assert main(["bench", TINY, "--backends", "openvino", "--precisions", "fp32", "--batches", "1", "--seconds",
                 "0.1", "--rounds", "1", "--threads", "1", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| openvino | fp32 | cpu | 1 | 480x640 frame |" in table and "unavailable" not in table
    rows = json.loads(out.read_text())["rows"]
    assert {(r["backend"], r["input"]) for r in rows} == {(b, i) for b in ("torch", "openvino")
                                                          for i in ("pixels", "frame")}
    for r in rows:
        assert r["median_ms"] > 0 and r["p90_ms"] >= r["median_ms"] and r["speedup"] > 0 and r["cosine"] >= 0.9999
