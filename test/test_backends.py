"""Inference backends: engine cache (keys, stale / foreign / corrupt entries), the accuracy gate,
ONNX Runtime export / cache hit / accuracy, auto selection, TensorRT pure logic (and, where CUDA
and torch_tensorrt exist, real engines).

Every test uses a cache directory of this session ($THEIA_ROS_CACHE), never ~/.cache.
"""
import copy
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from theia_ros.backends import cache
from theia_ros.backends.base import BackendError
from theia_ros.backends.factory import create_backend
from theia_ros.backends.validation import (
    FP32_MIN_COSINE,
    check_output,
    cosine,
    reference_output,
    validation_pixels,
)

TINY = "random:theia-tiny-patch16-224-cddsv"
# torch.export's own deprecation chatter while exporting (not ours)
pytestmark = [pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning"),
              pytest.mark.usefixtures("one_torch_thread", "engine_cache")]


def _has(module):
    import importlib.util

    return importlib.util.find_spec(module) is not None


needs_ort = pytest.mark.skipif(not (_has("onnxruntime") and _has("onnx") and _has("onnxscript")),
                               reason="onnxruntime / onnx / onnxscript not installed")


@pytest.fixture(scope="session")
def tiny():
    from theia_ros.encoder.model import load_model

    return load_model(TINY)


# ---------------------------------------------------------------------------------- cache keys

KEY = {"backend": "fake", "variant": "theia-tiny-patch16-224-cddsv", "weights_id": "sha256:aa",
       "representation": "tokens", "precision": "fp16", "batch": [1, 4]}
ENV = {"gpu_name": "NVIDIA Orin", "compute_capability": "8.7", "tensorrt": "10.3.0", "torch_tensorrt": "2.8.0",
       "torch": "2.8.0"}


def test_cache_root_default_env_and_explicit(tmp_path, monkeypatch):
    monkeypatch.delenv(cache.ENV_VAR, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    default = cache.cache_root()
    assert default == Path(os.path.expanduser("~/.cache/theia_ros/engines"))  # never /tmp: survives reboots
    monkeypatch.setenv(cache.ENV_VAR, str(tmp_path / "env"))
    assert cache.cache_root() == tmp_path / "env"
    assert cache.cache_root(tmp_path / "x") == tmp_path / "x"


def test_key_digest_is_stable_and_separates_what_matters():
    shuffled = dict(reversed(list(KEY.items())))
    assert cache.key_digest(KEY) == cache.key_digest(shuffled)
    name = cache.slot_name(KEY)
    assert name.startswith("theia-tiny-patch16-224-cddsv_tokens_fp16_b1-4_")
    for field, value in [("weights_id", "sha256:bb"), ("precision", "fp32"), ("batch", [1, 8]),
                         ("representation", "teacher:facebook/sam-vit-huge")]:
        assert cache.slot_name({**KEY, field: value}) != name, field
    assert "/" not in cache.slot_name({**KEY, "representation": "teacher:facebook/sam-vit-huge"})


def _fake_entry(directory, key=KEY, env=ENV, payload=b"engine-bytes" * 100):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "engine.ep").write_bytes(payload)
    return cache.write_sidecar(directory, key, env, ["engine.ep"], {"validation": {"cosine": 0.9995}})


def test_check_entry_missing_valid_stale_foreign(tmp_path):
    slot = tmp_path / "slot"
    assert cache.check_entry(slot, KEY, ENV).startswith("missing")
    meta = _fake_entry(slot)
    assert meta["files"]["engine.ep"]["size"] == 1200
    assert cache.check_entry(slot, KEY, ENV) is None
    stale = cache.check_entry(slot, KEY, {**ENV, "tensorrt": "10.7.0"})
    assert stale.startswith("stale") and "10.3.0" in stale and "10.7.0" in stale
    assert cache.check_entry(slot, KEY, {**ENV, "torch_tensorrt": "2.9.0"}).startswith("stale")
    foreign = cache.check_entry(slot, KEY, {**ENV, "gpu_name": "NVIDIA GeForce RTX 4090", "compute_capability": "8.9"})
    assert foreign.startswith("foreign") and "RTX 4090" in foreign
    other_weights = cache.check_entry(slot, {**KEY, "weights_id": "sha256:bb"}, ENV)
    assert other_weights.startswith("foreign") and "weights_id" in other_weights


def test_check_entry_corrupt_files_and_sidecars(tmp_path):
    slot = tmp_path / "slot"
    _fake_entry(slot)
    engine = slot / "engine.ep"
    data = bytearray(engine.read_bytes())
    data[10] ^= 0xFF  # same size, other bytes: only the hash notices
    engine.write_bytes(bytes(data))
    assert "sha256" in cache.check_entry(slot, KEY, ENV)
    assert cache.check_entry(slot, KEY, ENV, verify_hashes=False) is None
    engine.write_bytes(b"short")
    assert cache.check_entry(slot, KEY, ENV).startswith("corrupt") and "bytes" in cache.check_entry(slot, KEY, ENV)
    engine.unlink()
    assert "missing" in cache.check_entry(slot, KEY, ENV) and cache.check_entry(slot, KEY, ENV).startswith("corrupt")
    (slot / cache.SIDECAR).write_text("{not json")
    assert cache.check_entry(slot, KEY, ENV).startswith("corrupt: unreadable sidecar")
    (slot / cache.SIDECAR).write_text(json.dumps({"format": cache.CACHE_FORMAT, "key": KEY, "environment": ENV}))
    assert cache.check_entry(slot, KEY, ENV) == "corrupt: sidecar lists no files"
    (slot / cache.SIDECAR).write_text(json.dumps({"format": 0, "key": KEY}))
    assert cache.check_entry(slot, KEY, ENV).startswith("stale: cache format")
    (slot / cache.SIDECAR).unlink()
    engine.write_bytes(b"half")
    assert cache.check_entry(slot, KEY, ENV).startswith("corrupt: no sidecar")  # half-written build


def test_get_or_build_hit_rebuild_and_refusal(tmp_path, caplog):
    calls = []

    def build(directory):
        calls.append(directory)
        (directory / "engine.ep").write_bytes(b"x" * 64)
        return {"files": ["engine.ep"], "validation": {"cosine": 0.9999}}

    first = cache.get_or_build("fake", KEY, ENV, build, root=tmp_path)
    assert first.status == "built" and len(calls) == 1 and first.meta["validation"]["cosine"] == 0.9999
    second = cache.get_or_build("fake", KEY, ENV, build, root=tmp_path)
    assert second.status == "hit" and len(calls) == 1 and second.directory == first.directory

    with caplog.at_level(logging.WARNING, logger="theia_ros.backends"):
        (first.directory / "engine.ep").write_bytes(b"y" * 64)  # corrupt
        third = cache.get_or_build("fake", KEY, ENV, build, root=tmp_path)
        assert third.status == "rebuilt" and "sha256" in third.reason and len(calls) == 2
        fourth = cache.get_or_build("fake", KEY, {**ENV, "tensorrt": "10.7.0"}, build, root=tmp_path)
        assert fourth.status == "rebuilt" and fourth.reason.startswith("stale") and len(calls) == 3
        fifth = cache.get_or_build("fake", KEY, {**ENV, "tensorrt": "10.7.0", "gpu_name": "RTX"}, build, root=tmp_path)
        assert fifth.reason.startswith("foreign")
    text = caplog.text
    assert "rebuilding" in text and "sha256" in text and "stale" in text and "foreign" in text

    def refuse(directory):
        (directory / "engine.ep").write_bytes(b"bad")
        raise BackendError("refusing: cosine 0.5")

    other = {**KEY, "precision": "fp32"}
    with pytest.raises(BackendError, match="refusing"):
        cache.get_or_build("fake", other, ENV, refuse, root=tmp_path)
    slot = tmp_path / "fake" / cache.slot_name(other)
    assert not (slot / cache.SIDECAR).exists() and not (slot / "engine.ep").exists()
    assert cache.get_or_build("fake", other, ENV, build, root=tmp_path).status == "built"


# ---------------------------------------------------------------------------------- accuracy gate

def test_validation_input_is_deterministic():
    a, b = validation_pixels(2), validation_pixels(2)
    assert a.shape == (2, 3, 224, 224) and torch.equal(a, b)
    assert -1.0 <= float(a.min()) and float(a.max()) <= 1.0 and float(a.std()) > 0.2
    assert not torch.equal(a[0], a[1])


def test_gate_refuses_wrong_outputs():
    torch.manual_seed(0)
    ref = torch.randn(2, 196, 192)
    assert check_output(ref.clone(), ref, FP32_MIN_COSINE, "same") > 0.999999
    slightly = ref + 1e-3 * torch.randn_like(ref)
    assert check_output(slightly, ref, FP32_MIN_COSINE, "close") >= FP32_MIN_COSINE
    wrong = ref.clone()
    wrong[1] = torch.randn(196, 192)  # one sample of the batch garbage: the worst sample counts
    with pytest.raises(BackendError, match=r"refusing broken engine: cosine similarity to fp32 torch is 0\.\d+"):
        check_output(wrong, ref, 0.999, "broken engine")
    with pytest.raises(BackendError, match="below the required 0.9999"):
        check_output(ref + 0.05 * torch.randn_like(ref), ref, 0.9999, "noisy fp16 engine")
    with pytest.raises(BackendError, match="shape"):
        check_output(ref[:, :10], ref, 0.999, "truncated")
    nan = ref.clone()
    nan[0, 0, 0] = float("nan")
    with pytest.raises(BackendError, match="NaN"):
        check_output(nan, ref, 0.999, "overflowing fp16 engine")


@needs_ort
def test_onnxruntime_refuses_an_engine_that_computes_something_else(tiny, monkeypatch, caplog):
    from theia_ros.backends import onnxruntime_backend as ortb

    real_export = ortb.export_onnx

    def export_other_model(model, representation, path, **kwargs):
        other = copy.deepcopy(model)
        with torch.no_grad():
            other.backbone.layers[5].mlp.fc2.weight.mul_(-3.0)  # a "miscompiled" layer
        return real_export(other, representation, path, **kwargs)

    monkeypatch.setattr(ortb, "export_onnx", export_other_model)
    with caplog.at_level(logging.WARNING, logger="theia_ros.backends"):
        with pytest.raises(BackendError, match=r"refusing onnxruntime fp32 graph .* below the required 0\.9999"):
            create_backend("onnxruntime", tiny, representation="mean", max_batch=2)
    assert "fused ONNX graph refused" in caplog.text  # the unfused graph was tried too
    slot = cache.cache_root() / "onnxruntime" / cache.slot_name(ortb.engine_key(tiny, "mean"))
    assert not (slot / cache.SIDECAR).exists()  # nothing recorded: the next creation exports again
    assert cache.check_entry(slot, ortb.engine_key(tiny, "mean"), {}).startswith("missing")


# ---------------------------------------------------------------------------------- onnxruntime

@needs_ort
def test_onnxruntime_export_cache_hit_and_accuracy(tiny, caplog, monkeypatch):
    from theia_ros.backends import onnxruntime_backend as ortb
    from theia_ros.preprocess import to_model_input

    exports = []
    real_export = ortb.export_onnx

    def counted_export(*args, **kwargs):
        exports.append(args[1])
        return real_export(*args, **kwargs)

    monkeypatch.setattr(ortb, "export_onnx", counted_export)
    first = create_backend("onnxruntime", tiny, representation="tokens", max_batch=4, threads=2)
    assert isinstance(first, ortb.OnnxRuntimeBackend) and first.cache.status == "built"
    assert exports == ["tokens"]
    assert first.engine_path.is_file() and first.engine_path.parent.parent.parent == cache.cache_root()
    meta = json.loads((first.engine_path.parent / cache.SIDECAR).read_text())
    assert meta["key"]["weights_id"] == tiny.weights_id and meta["key"]["opset"] <= 18
    assert meta["environment"]["onnxruntime"] and meta["validation"]["cosine"] >= 0.9999
    assert meta["graph_file"] == first.engine_path.name and set(meta["files"]) == {
        first.engine_path.name, first.engine_path.name + ".data"}
    opts = first.session.get_session_options()
    assert opts.intra_op_num_threads == 2
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"

    with caplog.at_level(logging.INFO, logger="theia_ros.backends"):
        second = create_backend("onnxruntime", tiny, representation="tokens", max_batch=4, threads=2)
    assert second.cache.status == "hit" and second.cache.reason == "cache hit"
    assert exports == ["tokens"]  # loaded from the cache, not exported again
    assert second.engine_path == first.engine_path and "loaded from cache" in caplog.text

    for batch in (1, 3):  # dynamic batch, and a different input than the build validated on
        pixels = torch.rand(batch, 3, 224, 224, generator=torch.Generator().manual_seed(batch)) * 2 - 1
        out = second.run_pixels(pixels)
        assert out.shape == (batch, 196, 192) and out.dtype == torch.float32
        assert cosine(out, reference_output(tiny, pixels, "tokens")) >= 0.9999
    images = np.random.default_rng(0).integers(0, 256, size=(2, 120, 160, 3), dtype=np.uint8)
    assert cosine(second.run_pixels(to_model_input(images)), tiny.forward_feature(images)) >= 0.9999
    assert second.identity["backend"] == "onnxruntime" and second.identity["engine"].endswith(".onnx")


@needs_ort
def test_onnxruntime_rejects_what_it_cannot_do(tiny):
    with pytest.raises(BackendError, match="fp32"):
        create_backend("onnxruntime", tiny, precision="fp16")
    with pytest.raises(BackendError, match="CPU only"):
        create_backend("onnxruntime", tiny, device="cuda")
    with pytest.raises(BackendError, match="unknown backend"):
        create_backend("tflite", tiny)


def test_lean_graph_matches_the_model(tiny):
    from theia_ros.backends.lean import LeanTheia

    pixels = validation_pixels(2)
    for rep in ("spatial", "teacher:clip"):
        with torch.inference_mode():
            out = LeanTheia(tiny, rep)(pixels)
        ref = reference_output(tiny, pixels, rep)
        assert out.shape == ref.shape and cosine(out, ref) >= 0.99999, rep


# ---------------------------------------------------------------------------------- torch

def test_torch_backend_low_precision_is_validated(tiny):
    from theia_ros.backends.torch_backend import cpu_has_fast_bf16

    fp32 = create_backend("torch", tiny, precision="fp32")
    assert fp32.validation_cosine is None  # the reference itself
    bf16 = create_backend("torch", tiny, precision="bf16", max_batch=2)
    assert bf16.validation_cosine >= 0.999
    lean = create_backend("torch", tiny, precision="fp32", lean=True)
    assert lean.validation_cosine >= 0.9999 and lean.identity["graph"] == "lean"
    if not cpu_has_fast_bf16():
        pytest.skip("bf16 runs but is emulated on this CPU")


# ---------------------------------------------------------------------------------- auto

def test_auto_plan_rules():
    from theia_ros.backends.factory import plan

    gpu = {"cuda": True, "tensorrt": True, "onnxruntime": True, "fast_bf16": True}
    assert [c[0] for c in plan("auto", "fp16", gpu)] == ["tensorrt", "torch"]
    assert plan("cuda:1", "fp16", gpu)[0][:3] == ("tensorrt", "fp16", "cuda:1")
    no_trt = {**gpu, "tensorrt": False}
    assert plan("auto", "fp32", no_trt)[0][:3] == ("torch", "fp32", "cuda")
    cpu = {"cuda": False, "tensorrt": False, "onnxruntime": True, "fast_bf16": True}
    assert [c[:2] for c in plan("auto", "fp32", cpu)] == [("onnxruntime", "fp32"), ("torch", "fp32")]
    assert plan("cpu", "fp32", gpu)[0][:3] == ("onnxruntime", "fp32", "cpu")  # cpu asked: stays on the CPU
    assert plan("auto", "bf16", cpu)[0][:2] == ("torch", "bf16")
    assert plan("auto", "bf16", {**cpu, "fast_bf16": False})[0][:2] == ("onnxruntime", "fp32")
    assert plan("auto", "fp16", cpu)[0][:2] == ("onnxruntime", "fp32")
    assert plan("auto", "fp32", {**cpu, "onnxruntime": False})[0][:2] == ("torch", "fp32")
    with pytest.raises(BackendError, match="CUDA is not available"):
        plan("cuda", "fp16", cpu)


def test_auto_on_this_machine(tiny):
    backend = create_backend("auto", tiny, precision="fp32", device="cpu", max_batch=4, threads=2)
    assert str(backend.device) == "cpu" and backend.precision == "fp32"
    # the measured CPU winner where ONNX Runtime is installed
    from theia_ros.backends.onnxruntime_backend import ort_available
    from theia_ros.backends.openvino_backend import openvino_available

    assert backend.name == ("openvino" if openvino_available() else "onnxruntime" if ort_available() else "torch")
    assert backend.auto_reason
    if torch.cuda.is_available():
        gpu = create_backend("auto", copy.deepcopy(tiny), precision="fp16", device="auto", max_batch=2)
        assert gpu.device.type == "cuda"


@needs_ort
def test_encoder_uses_backends(tiny):
    from theia_ros.backends.factory import create_encoder

    encoder = create_encoder(TINY, backend="onnxruntime", max_batch=2, threads=2)
    frames = [np.full((48, 64, 3), v, np.uint8) for v in (0, 80, 160)]
    features, timings = encoder.encode(frames)  # 3 frames in chunks of max_batch 2
    assert features.shape == (3, 196, 192)
    assert cosine(features, tiny.forward_feature(np.stack(frames))) >= 0.9999


def test_encoder_fills_one_input_batch_and_runs_it_in_chunks(tiny):
    """Frames of any size are preprocessed into one preallocated [max_batch, 3, 224, 224] batch, run in
    chunks of max_batch: the same numbers as preprocessing each chunk and running it directly."""
    from theia_ros.encoder.pipeline import FeatureEncoder
    from theia_ros.preprocess import PreprocessConfig, to_model_input

    encoder = FeatureEncoder(tiny, create_backend("torch", tiny, max_batch=2))
    rng = np.random.default_rng(3)
    frames = [rng.integers(0, 256, size, dtype=np.uint8) for size in [(48, 64, 3), (224, 224, 3), (30, 90, 3)]]
    configs = [None, None, PreprocessConfig(crop=(10, 0, 60, 30), letterbox=True)]
    buffer = encoder._pixels.data_ptr()
    features, timings = encoder.encode(frames, configs)
    pixels = [to_model_input(f, c) for f, c in zip(frames, configs)]
    with torch.inference_mode():
        expected = torch.cat([tiny.features_from_pixels(torch.cat(pixels[:2])), tiny.features_from_pixels(pixels[2])])
    torch.testing.assert_close(features, expected, rtol=0, atol=0)
    assert set(timings) == {"preprocess", "inference"} and all(t > 0 for t in timings.values())
    again, _ = encoder.encode(frames[2:] + frames[:1])  # refills the same buffer ...
    assert encoder._pixels.data_ptr() == buffer
    torch.testing.assert_close(features, expected, rtol=0, atol=0)  # ... without touching earlier results
    assert again.shape == (2, 196, 192)


def test_options_go_to_the_backend_that_takes_them(tiny, tmp_path):
    # one option set (as the encoder node passes it) serves every backend; a typo is an error
    options = {"cache_dir": tmp_path / "engines", "fp32_acc": "auto", "threads": 1}
    torch_backend = create_backend("torch", tiny, **options)
    assert torch_backend.name == "torch" and not (tmp_path / "engines").exists()
    with pytest.raises(BackendError, match="unknown backend option.*cachedir"):
        create_backend("torch", tiny, cachedir=tmp_path)
    with pytest.raises(BackendError, match="unknown backend 'tensorrtt'"):
        create_backend("tensorrtt", tiny)


# ---------------------------------------------------------------------------------- tensorrt (pure logic)

def test_tensorrt_batch_profile_and_key(tiny):
    from theia_ros.backends.tensorrt_backend import batch_profile, engine_key

    assert batch_profile(4) == ((1, 4, 4), 2)
    assert batch_profile(8, 2) == ((1, 2, 8), 2)
    assert batch_profile(1) == ((1, 1, 1), 1)
    with pytest.raises(BackendError):
        batch_profile(4, 5)
    k16 = engine_key(tiny, "tokens", "fp16", 4, 4)
    k32 = engine_key(tiny, "tokens", "fp32", 4, 4)
    assert cache.slot_name(k16) != cache.slot_name(k32) and k32["fp16_mode"] is None
    assert k16["weights_id"] == tiny.weights_id and k16["batch"] == [1, 4]


def _released_signatures():
    """Parameter names of torch_tensorrt.dynamo.compile / save / load in the released wheels
    (recorded by scripts/record_trt_signatures.py from the wheels' sources)."""
    path = Path(__file__).parent / "data" / "torch_tensorrt_signatures.json"
    data = json.loads(path.read_text())
    names = {}
    for version, entry in data.items():
        names[version] = {fn: set(sig["positional"]) | set(sig["keyword_only"])
                          for fn, sig in entry.items() if fn in ("dynamo.compile", "save", "load")}
    return names


TRT_SIGNATURES = _released_signatures()


def test_recorded_signatures_cover_the_versions_we_document():
    assert {"2.8.0", "2.10.0", "2.13.0", "2.14.0"} <= set(TRT_SIGNATURES)
    # what the docstrings claim of these releases, checked against the wheels' own sources
    assert "enabled_precisions" in TRT_SIGNATURES["2.10.0"]["dynamo.compile"]
    assert "enabled_precisions" not in TRT_SIGNATURES["2.13.0"]["dynamo.compile"]
    assert "enable_autocast" not in TRT_SIGNATURES["2.8.0"]["dynamo.compile"]
    assert "dynamic_shapes" not in TRT_SIGNATURES["2.8.0"]["save"]


_DTYPE = {"fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.mark.parametrize("version", sorted(TRT_SIGNATURES))
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_tensorrt_compile_arguments_exist_in_each_release(version, precision):
    from theia_ros.backends.tensorrt_backend import compile_kwargs

    params = TRT_SIGNATURES[version]["dynamo.compile"]
    kw = compile_kwargs(params, precision, "cuda:0", optimization_level=3)
    assert set(kw) <= params, f"{version}: not in dynamo.compile: {set(kw) - params}"
    assert "enabled_precisions" not in kw  # removed in 2.13 (would silently build fp32); never needed
    assert kw["min_block_size"] == 1 and kw["cache_built_engines"] is False and kw["disable_tf32"] is True
    assert kw["optimization_level"] == 3 and "use_fp32_acc" not in kw and "enable_autocast" not in kw
    if "use_explicit_typing" in params:  # before 2.13 it defaults to False: the fp16 graph would be re-typed
        assert kw["use_explicit_typing"] is True
    if "attn_bias_is_causal" in params:  # 2.13+ defaults to True
        assert kw["attn_bias_is_causal"] is False
    acc = compile_kwargs(params, precision, "cuda:0", fp32_acc=True)
    assert acc.get("use_fp32_acc") is (True if precision == "fp16" else None) and set(acc) <= params
    if precision == "fp32":
        return
    if "enable_autocast" in params:
        auto = compile_kwargs(params, precision, "cuda:0", fp16_mode="autocast")
        assert auto["enable_autocast"] is True and auto["autocast_low_precision_type"] == _DTYPE[precision]
        assert torch.ops.aten.native_layer_norm.default in auto["autocast_excluded_ops"] and set(auto) <= params
    else:
        with pytest.raises(BackendError, match="autocast"):
            compile_kwargs(params, precision, "cuda:0", fp16_mode="autocast")


@pytest.mark.parametrize("version", sorted(TRT_SIGNATURES))
def test_tensorrt_save_arguments_exist_in_each_release(version):
    from theia_ros.backends.tensorrt_backend import save_kwargs

    params = TRT_SIGNATURES[version]["save"]
    example = torch.zeros(2, 3, 224, 224)
    dyn = ({0: torch.export.Dim("batch", min=1, max=4)},)
    s = save_kwargs(params, example, dyn)
    assert set(s) <= params and s["output_format"] == "exported_program" and s["arg_inputs"][0] is example
    if "dynamic_shapes" in params:
        assert s["dynamic_shapes"] is dyn and s["retrace"] is True
    else:  # 2.8 would re-export a static batch when retracing
        assert "dynamic_shapes" not in s and s["retrace"] is False
    assert save_kwargs(params, example, None)["retrace"] is True
    assert "file_path" in TRT_SIGNATURES[version]["load"]


def test_tensorrt_low_precision_graph_keeps_norms_in_fp32(tiny):
    from theia_ros.backends.tensorrt_backend import Fp32LayerNorm, low_precision_module

    pixels = validation_pixels(2)
    ref = reference_output(tiny, pixels, "tokens")
    low = low_precision_module(tiny, "tokens", torch.bfloat16)
    norms = [m for m in low.modules() if isinstance(m, Fp32LayerNorm)]
    assert len(norms) == 2 * 12 + 1 and all(n.weight.dtype == torch.float32 for n in norms)  # heads not copied
    linear = low.module.model.backbone.layers[0].attention.q_proj
    assert linear.weight.dtype == torch.bfloat16
    assert low.module.model.backbone.config._attn_implementation == "eager"  # softmax in fp32
    with torch.inference_mode():
        out = low(pixels)
    assert out.dtype == torch.float32 and cosine(out, ref) >= 0.999
    # the original model is untouched
    assert tiny.backbone.layers[0].attention.q_proj.weight.dtype == torch.float32
    assert tiny.backbone.config._attn_implementation == "sdpa"
    teacher = low_precision_module(tiny, "teacher:clip", torch.bfloat16)
    with torch.inference_mode():
        assert cosine(teacher(pixels), reference_output(tiny, pixels, "teacher:clip")) >= 0.999
    # the graph exports with a dynamic batch (what torch_tensorrt.dynamo.compile receives)
    exported = torch.export.export(low, (pixels,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4)},),
                                   strict=False)
    assert exported.module()(pixels[:1]).shape == (1, 196, 192)


@pytest.mark.parametrize("graph", ["model", "lean"])
def test_tensorrt_graphs_use_only_ops_each_release_converts(tiny, graph):
    """Static check of what a GPU build would meet: every ATen op of the graphs handed to
    torch_tensorrt.dynamo.compile (after the core ATen decompositions, as its lowering does) has a
    TensorRT converter or is replaced / removed by torch-tensorrt's own lowering, in every recorded
    release; so the engine is one TensorRT block with no PyTorch fallback between layers.
    Converter capability checks (dtypes, dynamic shapes) need TensorRT itself and are not covered."""
    import operator

    from theia_ros.backends.tensorrt_backend import fp32_module, low_precision_module

    data = json.loads((Path(__file__).parent / "data" / "torch_tensorrt_signatures.json").read_text())
    modules = {"fp32": fp32_module(tiny, "tokens", graph),
               "fp16": low_precision_module(tiny, "tokens", torch.float16, graph)}
    example = validation_pixels(2)
    for precision, module in modules.items():
        with torch.no_grad():
            exported = torch.export.export(module, (example,), strict=False,
                                           dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4)},))
        lowered = exported.run_decompositions()
        ops = {str(n.target) for n in lowered.graph.nodes if n.op == "call_function"
               and n.target not in (operator.getitem, operator.mul, operator.add, operator.floordiv)}
        assert "aten.convolution.default" in ops and "aten.native_layer_norm.default" in ops
        for version, entry in data.items():
            known = set(entry["converted_ops"]) | set(entry["lowered_ops"])
            missing = {op for op in ops if op not in known and op.rsplit(".", 1)[0] not in known}
            assert not missing, f"torch-tensorrt {version} cannot convert {sorted(missing)} ({graph}, {precision})"


def test_tensorrt_backend_explains_what_is_missing(tiny):
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the real tensorrt tests below apply")
    with pytest.raises(BackendError, match="CUDA"):
        create_backend("tensorrt", tiny, precision="fp16", device="cuda")
    with pytest.raises(BackendError, match="needs a CUDA device"):
        create_backend("tensorrt", tiny, precision="fp16", device="cpu")


# ---------------------------------------------------------------------------------- tensorrt (GPU)

needs_trt = pytest.mark.skipif(not torch.cuda.is_available(), reason="tensorrt tests need a CUDA GPU (none here)")


@needs_trt
@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_tensorrt_engine_build_validate_cache_reload(tiny, precision, monkeypatch):
    pytest.importorskip("torch_tensorrt", reason="torch_tensorrt is not installed")
    from theia_ros.backends import tensorrt_backend as trtb

    builds = []
    real_build = trtb.TensorRTBackend._build

    def counted_build(self, directory):
        builds.append(directory)
        return real_build(self, directory)

    monkeypatch.setattr(trtb.TensorRTBackend, "_build", counted_build)
    model = copy.deepcopy(tiny).to("cuda")
    first = create_backend("tensorrt", model, precision=precision, device="cuda", max_batch=4)
    # gpu_check.sh hands in the engines its exports built: then the first creation is a hit too
    assert (first.cache.status, len(builds)) in (("built", 1), ("hit", 0))
    assert first.validation_cosine >= (0.9999 if precision == "fp32" else 0.999)
    pixels = validation_pixels(3)
    ref = reference_output(tiny, pixels, "tokens")
    assert cosine(first.run_pixels(pixels), ref) >= 0.999
    assert first.run_pixels(pixels[:1]).shape == (1, 196, 192)  # dynamic batch
    built = len(builds)
    second = create_backend("tensorrt", model, precision=precision, device="cuda", max_batch=4)
    assert second.cache.status == "hit" and len(builds) == built  # loaded, not rebuilt
    assert cosine(second.run_pixels(pixels), ref) >= 0.999


@needs_trt
def test_tensorrt_corrupt_engine_is_rebuilt(tiny, caplog):
    pytest.importorskip("torch_tensorrt", reason="torch_tensorrt is not installed")
    model = copy.deepcopy(tiny).to("cuda")
    first = create_backend("tensorrt", model, precision="fp16", device="cuda", max_batch=4)
    with open(first.engine_path, "r+b") as f:
        f.seek(100)
        f.write(b"\0" * 16)
    with caplog.at_level(logging.WARNING, logger="theia_ros.backends"):
        again = create_backend("tensorrt", model, precision="fp16", device="cuda", max_batch=4)
    assert again.cache.status == "rebuilt" and "sha256" in caplog.text


# ---------------------------------------------------------------------------------- CLI

@needs_ort
def test_cli_export_and_bench(capsys):
    from theia_ros.cli.main import main

    assert main(["export", TINY, "--backend", "onnxruntime", "--max-batch", "2"]) == 0
    out, err = capsys.readouterr()
    engine = Path(out.strip().splitlines()[-1])  # the engine's path, in the session's cache
    assert engine.is_file() and cache.cache_root() in engine.parents
    assert ("built in" in err or "hit in" in err) and "cosine" in err
    assert main(["bench", TINY, "--backends", "torch", "--precisions", "fp32", "--batches", "1",
                 "--seconds", "0.2", "--rounds", "1"]) == 0
    table = capsys.readouterr().out
    assert "| torch | fp32 | cpu | 1 |" in table and "unavailable" not in table


@needs_ort
def test_bench_table(tiny, capsys):
    from theia_ros.backends.bench import Case, markdown_table, run_bench

    cases = [Case("torch", "fp32", "cpu"), Case("onnxruntime", "fp32", "cpu", {"threads": 2}),
             Case("tensorrt", "fp16", "cpu")]  # the last cannot run here: reported, not fatal
    rows = run_bench(tiny, cases, batches=[2], seconds=0.1, rounds=2, progress=lambda m: None)
    assert len(rows) == 3
    by = {r.backend: r for r in rows}
    assert by["torch"].speedup == pytest.approx(1.0) and by["torch"].cosine > 0.99999
    assert by["onnxruntime"].cosine >= 0.9999 and by["onnxruntime"].median_ms > 0
    assert by["onnxruntime"].images_per_s == pytest.approx(1e3 / by["onnxruntime"].median_ms)
    assert by["tensorrt"].error
    table = markdown_table(rows)
    assert table.count("\n") == 4 and "| onnxruntime | fp32 | cpu | 2 |" in table and "unavailable" in table


# ---------------------------------------------------------------------------------- tensorrt flow, stand-in

class _FakeTorchTensorRT:
    """Stands in for torch_tensorrt on the CPU: 'compiles' to the exported program's module, saves
    and loads with torch.export; records the calls. Exercises TensorRTBackend's export, compile
    arguments, validation gate, cache and reload paths without a GPU."""

    __version__ = "0.0-fake"

    def __init__(self, corrupt=False):
        import types

        self.compiles, self.saves, self.loads = [], [], []
        self.corrupt = corrupt
        self.needs_fp32_acc = False  # True: only an engine compiled with use_fp32_acc computes the model
        outer = self

        class Input:
            def __init__(self, min_shape, opt_shape, max_shape, dtype):
                self.min_shape, self.opt_shape, self.max_shape, self.dtype = min_shape, opt_shape, max_shape, dtype

        def compile(exported_program, arg_inputs=None, *, device=None, min_block_size=5, use_explicit_typing=False,
                    cache_built_engines=True, reuse_cached_engines=True, disable_tf32=False, use_fp32_acc=False,
                    attn_bias_is_causal=True):
            outer.compiles.append({"arg_inputs": arg_inputs, "use_explicit_typing": use_explicit_typing,
                                   "use_fp32_acc": use_fp32_acc, "attn_bias_is_causal": attn_bias_is_causal,
                                   "exported": exported_program})
            module = exported_program.module()
            if outer.corrupt or (outer.needs_fp32_acc and not use_fp32_acc):  # the gate must refuse it
                def broken(x):
                    return module(x) * -1.0
                return broken
            return module

        self.Input = Input
        self.dynamo = types.SimpleNamespace(compile=compile)

    def save(self, module, file_path, *, output_format="exported_program", arg_inputs=None, retrace=False,
             dynamic_shapes=None):
        self.saves.append({"output_format": output_format, "dynamic_shapes": dynamic_shapes})
        exported = self.compiles[-1]["exported"]
        torch.export.save(exported, file_path)

    def load(self, file_path):
        self.loads.append(file_path)
        return torch.export.load(file_path)


@pytest.fixture
def fake_trt(monkeypatch):
    from theia_ros.backends import tensorrt_backend as trtb

    fake = _FakeTorchTensorRT()
    env = {"gpu_name": "Fake GPU", "compute_capability": "8.7", "platform": "x86_64", "torch": torch.__version__,
           "cuda": "12.6", "torch_tensorrt": "0.0-fake", "tensorrt": "10.3.0"}
    monkeypatch.setattr(trtb.TensorRTBackend, "_require_cuda", False)
    monkeypatch.setattr(trtb, "import_torch_tensorrt", lambda: fake)
    monkeypatch.setattr(trtb, "gpu_environment", lambda device: dict(env))
    fake.env = env
    return fake


def test_tensorrt_flow_with_a_stand_in(tiny, fake_trt, caplog):
    from theia_ros.backends import tensorrt_backend as trtb

    model = copy.deepcopy(tiny)
    first = create_backend("tensorrt", model, precision="bf16", device="cpu", max_batch=4)
    assert first.cache.status == "built" and len(fake_trt.compiles) == 1
    call = fake_trt.compiles[0]
    assert call["use_explicit_typing"] is True and call["arg_inputs"][0].max_shape == (4, 3, 224, 224)
    assert fake_trt.saves[0]["output_format"] == "exported_program" and fake_trt.saves[0]["dynamic_shapes"]
    assert first.validation_cosine >= 0.999 and first.engine_path.name == trtb.ENGINE_FILE
    pixels = validation_pixels(3)
    ref = reference_output(tiny, pixels, "tokens")
    assert cosine(first.run_pixels(pixels), ref) >= 0.999

    second = create_backend("tensorrt", model, precision="bf16", device="cpu", max_batch=4)
    assert second.cache.status == "hit" and len(fake_trt.compiles) == 1 and len(fake_trt.loads) == 1
    assert second.run_pixels(pixels[:1]).shape == (1, 196, 192)  # dynamic batch survives save/load
    assert cosine(second.run_pixels(pixels), ref) >= 0.999
    with pytest.raises(BackendError, match="exceeds"):
        second.run_pixels(validation_pixels(5))

    fake_trt.env["tensorrt"] = "10.7.0"  # TensorRT upgraded: the engine is stale
    with caplog.at_level(logging.WARNING, logger="theia_ros.backends"):
        third = create_backend("tensorrt", model, precision="bf16", device="cpu", max_batch=4)
    assert third.cache.status == "rebuilt" and len(fake_trt.compiles) == 2
    assert "stale" in caplog.text and "10.3.0" in caplog.text and "10.7.0" in caplog.text

    fake_trt.corrupt = True
    with pytest.raises(BackendError, match="refusing tensorrt bf16 engine"):
        create_backend("tensorrt", model, precision="bf16", device="cpu", max_batch=2)


def test_tensorrt_fp16_rebuilds_with_fp32_accumulation_only_when_refused(tiny, fake_trt, caplog):
    model = copy.deepcopy(tiny)
    first = create_backend("tensorrt", model, precision="fp16", device="cpu", max_batch=2)
    assert [c["use_fp32_acc"] for c in fake_trt.compiles] == [False] and first.fp32_acc_used is False
    assert fake_trt.compiles[0]["attn_bias_is_causal"] is False

    fake_trt.needs_fp32_acc = True  # a GPU whose fp16 GEMMs lose too much: the first engine is refused
    with caplog.at_level(logging.WARNING, logger="theia_ros.backends"):
        second = create_backend("tensorrt", model, precision="fp16", device="cpu", max_batch=4)
    assert [c["use_fp32_acc"] for c in fake_trt.compiles[1:]] == [False, True]
    assert "rebuilding with fp32 accumulation" in caplog.text and "refusing tensorrt fp16 engine" in caplog.text
    assert second.fp32_acc_used is True and second.validation_cosine >= 0.999
    again = create_backend("tensorrt", model, precision="fp16", device="cpu", max_batch=4)
    assert again.cache.status == "hit" and again.fp32_acc_used is True and len(fake_trt.compiles) == 3

    with pytest.raises(BackendError, match="refusing tensorrt fp16 engine"):  # "off": no second try
        create_backend("tensorrt", model, precision="fp16", device="cpu", max_batch=3, fp32_acc="off")
    assert [c["use_fp32_acc"] for c in fake_trt.compiles[3:]] == [False]
    on = create_backend("tensorrt", model, precision="fp16", device="cpu", max_batch=3, fp32_acc="on")
    assert [c["use_fp32_acc"] for c in fake_trt.compiles[4:]] == [True] and on.fp32_acc_used is True
    with pytest.raises(BackendError, match="fp32_acc must be one of"):
        create_backend("tensorrt", model, precision="fp16", device="cpu", fp32_acc="yes")
