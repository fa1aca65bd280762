"""Weights and engines that must not be trusted (issue 15): a checkpoint holding NaN or Inf is refused
at load naming the tensor, and an engine from the cache passes the accuracy gate against fp32 torch
before its first frame or is rebuilt (an ONNX graph altered on disk with its sidecar rewritten to
match; the TensorRT path with a stand-in for torch_tensorrt, as test_backends does)."""
import copy
import json
import logging
import re
import shutil

import numpy as np
import pytest
import torch
from test_backends import fake_trt  # noqa: F401 (a pytest fixture shared with test_backends)

from theia_ros.backends import cache
from theia_ros.backends.factory import create_backend
from theia_ros.backends.validation import cosine, reference_output, validation_pixels
from theia_ros.encoder.model import load_model
from theia_ros.weights import CheckpointError, sha256_file

TINY = "random:theia-tiny-patch16-224-cddsv"
# torch.export's own deprecation chatter while exporting (not ours)
pytestmark = [pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning"),
              pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def tiny():
    return load_model(TINY)


# ---- checkpoints with NaN or Inf -------------------------------------------------------------------

@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A checkpoint directory in the published layout (config.json + model.safetensors)."""
    from theia_ros.distill.student import write_published

    return write_published(load_model("random:theia-tiny-patch16-224-cdiv", seed=5),
                           tmp_path_factory.mktemp("ckpt") / "theia-tiny")


def edited_copy(src, dst, edit):
    """A copy of checkpoint `src` whose tensors `edit` changes, written by safetensors' own writer."""
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    tensors = load_file(str(src / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


KEY = "backbone.model.encoder.layer.3.intermediate.dense.weight"


@pytest.mark.parametrize("value,counts", [(float("nan"), "1 NaN and 0 infinite"),
                                          (float("-inf"), "0 NaN and 1 infinite")])
def test_checkpoint_holding_nan_or_inf_is_refused_naming_the_tensor(published, tmp_path, value, counts):
    good = load_model(published)  # the untouched checkpoint loads
    assert all(bool(p.isfinite().all()) for p in good.parameters())

    def poison(tensors):
        assert KEY in tensors
        tensors[KEY][7, 11] = value

    bad = edited_copy(published, tmp_path / "bad", poison)
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint {bad} (as float32): tensor '{KEY}' ") +
                       r"\(\d+x\d+\) holds " + counts):
        load_model(bad)


def test_checkpoint_value_too_large_for_float16_is_refused_as_float16(published, tmp_path):
    def huge(tensors):
        tensors[KEY][0, 0] = 1e6  # finite in float32, infinite in float16

    big = edited_copy(published, tmp_path / "big", huge)
    assert all(bool(p.isfinite().all()) for p in load_model(big).parameters())  # fine in float32
    with pytest.raises(CheckpointError, match=r"\(as float16\): tensor '" + re.escape(KEY)):
        load_model(big, dtype=torch.float16)


# ---- engines from the cache: the accuracy gate on every load ----------------------------------------

def _has(module):
    import importlib.util

    return importlib.util.find_spec(module) is not None


needs_ort = pytest.mark.skipif(not (_has("onnxruntime") and _has("onnx") and _has("onnxscript")),
                               reason="onnxruntime / onnx / onnxscript not installed")


def scale_one_initializer(graph_path, factor=1.5):
    """Multiply the largest float initializer of an ONNX graph with external data by `factor`, in place
    in its .data file (same size); returns (its name, the .data file)."""
    import onnx

    model = onnx.load(str(graph_path), load_external_data=False)
    best = None
    for init in model.graph.initializer:
        info = {e.key: e.value for e in init.external_data}
        if init.data_type == onnx.TensorProto.FLOAT and "location" in info:
            if best is None or int(info["length"]) > int(best[1]["length"]):
                best = (init.name, info)
    name, info = best
    data_file = graph_path.parent / info["location"]
    offset, length = int(info.get("offset", 0)), int(info["length"])
    with open(data_file, "r+b") as f:
        f.seek(offset)
        values = np.frombuffer(f.read(length), np.float32) * np.float32(factor)
        f.seek(offset)
        f.write(values.astype(np.float32).tobytes())
    return name, data_file


def rewrite_sidecar_hashes(directory):
    """What a tamperer who knows the cache layout does: make meta.json agree with the files again."""
    meta = json.loads((directory / cache.SIDECAR).read_text())
    for name in meta["files"]:
        meta["files"][name] = {"size": (directory / name).stat().st_size, "sha256": sha256_file(directory / name)}
    (directory / cache.SIDECAR).write_text(json.dumps(meta, indent=2))


@needs_ort
def test_altered_cached_onnx_graph_fails_the_gate_and_is_rebuilt(tiny, tmp_path, caplog):
    import onnxruntime as ort

    options = {"representation": "tokens", "max_batch": 2, "threads": 1, "cache_dir": tmp_path / "engines"}
    first = create_backend("onnxruntime", tiny, **options)
    assert first.cache.status == "built"
    slot, graph = first.engine_path.parent, first.engine_path
    pixels = validation_pixels(2)
    reference = reference_output(tiny, pixels, "tokens")

    name, data_file = scale_one_initializer(graph)
    rewrite_sidecar_hashes(slot)
    assert cache.check_entry(slot, first.key, first.environment) is None  # the cache sees nothing wrong
    tampered = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    tampered_cos = cosine(torch.from_numpy(tampered.run(None, {"pixels": pixels.numpy()})[0]), reference)
    assert tampered_cos < 0.999, (name, tampered_cos)  # what a cache hit would have published

    with caplog.at_level(logging.INFO, logger="theia_ros.backends"):
        second = create_backend("onnxruntime", tiny, **options)
    assert second.cache.status == "rebuilt", caplog.text
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING][0]
    assert f"onnxruntime graph {graph} from the cache cannot be used" in warning, warning
    assert "below the required 0.9999" in warning and warning.endswith("rebuilding"), warning
    assert sha256_file(data_file) == json.loads((slot / cache.SIDECAR).read_text())["files"][data_file.name]["sha256"]
    for batch in (pixels, torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(4)) * 2 - 1):
        assert cosine(second.run_pixels(batch), reference_output(tiny, batch, "tokens")) >= 0.9999

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="theia_ros.backends"):
        third = create_backend("onnxruntime", tiny, **options)  # an intact cached graph: gate passed, no rebuild
    assert third.cache.status == "hit" and third.validation_cosine >= 0.9999
    gate = re.search(r"loaded from cache, accuracy gate passed \(cosine ([\d.]+), (\d+) ms\)", caplog.text)
    assert gate, caplog.text
    print(f"\naccuracy gate on a cache hit (onnxruntime, theia-tiny, batch 2): {gate.group(2)} ms; "
          f"tampered graph's cosine {tampered_cos:.4f}")


def test_cached_tensorrt_engine_failing_the_gate_is_rebuilt(tiny, tmp_path, monkeypatch, caplog, fake_trt):  # noqa: F811 (the imported pytest fixture, as a parameter)
    """The TensorRT path on the CPU, with test_backends' stand-in for torch_tensorrt: a cached engine that
    loads but computes something else (what an altered engine file with a matching sidecar gives)."""
    fake = fake_trt
    model = copy.deepcopy(tiny)
    options = {"precision": "bf16", "device": "cpu", "max_batch": 2, "cache_dir": tmp_path / "engines"}
    first = create_backend("tensorrt", model, **options)
    assert first.cache.status == "built" and len(fake.compiles) == 1

    real_load = fake.load

    def altered_load(path):
        program = real_load(path).module()
        return lambda x: program(x) * 0.5 + 0.1  # loads fine, output off

    monkeypatch.setattr(fake, "load", altered_load)
    with caplog.at_level(logging.WARNING, logger="theia_ros.backends"):
        second = create_backend("tensorrt", model, **options)
    assert second.cache.status == "rebuilt" and len(fake.compiles) == 2
    assert "from the cache cannot be used" in caplog.text and "refusing tensorrt bf16 engine" in caplog.text
    pixels = validation_pixels(2)
    assert cosine(second.run_pixels(pixels), reference_output(tiny, pixels, "tokens")) >= 0.999
