"""Theia encoder core (theia_ros.encoder: config, checkpoint layout, hub, model): conformance, strict
loading, errors, representations.

Checkpoints are written once per session by the project's deterministic writer
(``test/conformance_weights.py``) from the key lists in ``test/data/conformance`` (in the repository:
a bare clone runs every test); the golden outputs there are the reference implementation's on the
seed-2024 tiny checkpoint. Base (and small-cddsv) checkpoints are checked without materialising
their weights: key/shape maps on the meta device and sparse header-only safetensors files.
"""
import hashlib
import json
import os
import shutil
import struct

import numpy as np
import pytest
import torch
from conformance_weights import CONFORMANCE_DIR, keys_file, read_keys, write_checkpoint

from theia_ros.encoder.checkpoint import (
    checkpoint_key_to_module_key,
    expected_checkpoint_shapes,
    module_key_to_checkpoint_key,
)
from theia_ros.encoder.config import VARIANTS, TheiaConfig, variant_config
from theia_ros.encoder.model import TheiaModel, load_model
from theia_ros.preprocess import to_model_input
from theia_ros.representations import REPRESENTATIONS, select_representation
from theia_ros.weights import CheckpointError, check_checkpoint_shapes, read_safetensors_header

TINY = "theia-tiny-patch16-224-cddsv"
GOLDEN_SEED = 2024


def read_tsv(variant):
    """key -> shape of a published checkpoint, in the reference order."""
    return {key: shape for key, shape, _dtype in read_keys(keys_file(variant))}


def make_weights(variant, out_dir, seed):
    return write_checkpoint(variant, out_dir, seed)


# ---- session fixtures: each checkpoint written once ------------------------------------------

@pytest.fixture(scope="session")
def golden():
    path = CONFORMANCE_DIR / f"golden_{TINY}.npz"
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return make_weights(TINY, tmp_path_factory.mktemp("ckpt") / TINY, GOLDEN_SEED)


@pytest.fixture(scope="session")
def tiny_cdiv_dir(tmp_path_factory):
    variant = "theia-tiny-patch16-224-cdiv"
    return make_weights(variant, tmp_path_factory.mktemp("ckpt") / variant, 7)


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    return load_model(tiny_dir)


def write_variant(src_dir, dst_dir, mutate=None, config_mutate=None):
    """Copy a checkpoint, optionally editing its tensors (dict) or its config (dict)."""
    from safetensors.numpy import load_file, save_file

    dst_dir.mkdir(parents=True)
    config = json.loads((src_dir / "config.json").read_text())
    if config_mutate:
        config_mutate(config)
    (dst_dir / "config.json").write_text(json.dumps(config))
    if mutate is None:
        os.symlink(src_dir / "model.safetensors", dst_dir / "model.safetensors")
    else:
        tensors = load_file(str(src_dir / "model.safetensors"))
        mutate(tensors)
        save_file(tensors, str(dst_dir / "model.safetensors"))
    return dst_dir


def write_sparse_checkpoint(path, shapes):
    """A safetensors file whose header lists `shapes` (F32) and whose data is a sparse hole:
    the size of a real checkpoint on paper, no weights on disk or in memory."""
    header, offset = {}, 0
    for key, shape in shapes.items():
        nbytes = 4 * int(np.prod(shape))
        header[key] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        f.truncate(8 + len(raw) + offset)
    return path


def cosine(a, b):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


# ---- conformance with the reference implementation --------------------------------------------

def test_conformance_tokens_224(tiny_model, golden):
    out = tiny_model.forward_feature(golden["input_224"]).numpy()
    assert out.shape == (2, 196, 192)
    assert np.abs(out - golden["forward_feature_224"]).max() <= 1e-4


def test_conformance_tokens_480x640(tiny_model, golden):
    out = tiny_model.forward_feature(golden["input_480x640"]).numpy()
    ref = golden["forward_feature_480x640"]
    assert out.shape == ref.shape == (1, 196, 192)
    assert cosine(out, ref) >= 0.99999
    # the resize is PIL's to the byte (theia_ros.resize), so the tokens are the reference's to float rounding
    assert np.abs(out - ref).max() <= 1e-4


def test_conformance_cls(tiny_model, golden):
    out = tiny_model.forward_feature(golden["input_224"], representation="cls").numpy()
    ref = golden["cls_224"]
    assert out.shape == ref.shape
    assert np.abs(out - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


def test_conformance_translators(tiny_model, golden):
    outs = tiny_model(golden["input_224"])
    assert list(outs) == tiny_model.teachers
    for teacher, out in outs.items():
        ref = golden[f"translator_224/{teacher}"]
        c, h, w = tiny_model.target_feature_sizes[teacher]
        assert out.shape == (2, h * w, c)
        err = np.abs(out[:, :32].numpy() - ref).max()
        assert err <= 1e-4 * max(1.0, np.abs(ref).max()), (teacher, err)


def test_random_source_equals_conformance_weights(tiny_model, tiny_dir):
    rnd = load_model(f"random:{TINY}", seed=GOLDEN_SEED)
    assert rnd.random_weights and not tiny_model.random_weights
    assert rnd.weights_id == f"random:{TINY}:seed={GOLDEN_SEED}"
    own, other = tiny_model.state_dict(), rnd.state_dict()
    assert own.keys() == other.keys()
    assert all(torch.equal(own[k], other[k]) for k in own)


def test_file_metadata(tiny_model, tiny_dir):
    digest = hashlib.sha256((tiny_dir / "model.safetensors").read_bytes()).hexdigest()
    assert tiny_model.weights_id == f"sha256:{digest}"
    assert tiny_model.variant == TINY
    assert tiny_model.model_id == str(tiny_dir.resolve())
    assert tiny_model.hidden_size == 192
    assert tiny_model.num_parameters == 16_166_944
    assert tiny_model.teachers == list(variant_config(TINY)["target_feature_sizes"])
    assert not tiny_model.training
    assert not any(p.requires_grad for p in tiny_model.parameters())


# ---- representations and heads ---------------------------------------------------------------

def test_representations(tiny_model, golden):
    images = golden["input_224"]
    out = {r: tiny_model.forward_feature(images, representation=r) for r in REPRESENTATIONS}
    tokens = out["tokens"]
    assert tokens.shape == (2, 196, 192)
    assert out["cls"].shape == (2, 192) and out["mean"].shape == (2, 192) and out["max"].shape == (2, 192)
    assert out["all_tokens"].shape == (2, 197, 192)
    assert out["spatial"].shape == (2, 192, 14, 14)
    torch.testing.assert_close(out["all_tokens"][:, 1:], tokens)
    torch.testing.assert_close(out["all_tokens"][:, 0], out["cls"])
    torch.testing.assert_close(out["mean"], tokens.mean(1))
    torch.testing.assert_close(out["max"], tokens.amax(1))
    # spatial is the row-major 14x14 grid of the patch tokens
    torch.testing.assert_close(out["spatial"][:, :, 2, 5], tokens[:, 2 * 14 + 5])
    with pytest.raises(ValueError, match="representation"):
        tiny_model.forward_feature(images, representation="pooled")


def test_select_representation_on_known_tokens():
    """Every published name selects what REPRESENTATIONS says, at the shape feature_shape_for gives."""
    from theia_ros.representations import feature_shape_for

    tokens = torch.randn(2, 197, 5, generator=torch.Generator().manual_seed(0))
    patches = tokens[:, 1:].numpy()
    for name in REPRESENTATIONS:
        assert select_representation(tokens, name).shape == (2, *feature_shape_for(name, 5)), name
    np.testing.assert_array_equal(select_representation(tokens, "cls").numpy(), tokens[:, 0].numpy())
    np.testing.assert_array_equal(select_representation(tokens, "all_tokens").numpy(), tokens.numpy())
    np.testing.assert_array_equal(select_representation(tokens, "tokens").numpy(), patches)
    mean = select_representation(tokens, "mean").numpy()
    np.testing.assert_allclose(mean, patches.mean(axis=1), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(select_representation(tokens, "max").numpy(), patches.max(axis=1))
    spatial = select_representation(tokens, "spatial").numpy()  # [B, C, row, column], patches row-major
    np.testing.assert_array_equal(spatial[:, :, 3, 11], patches[:, 3 * 14 + 11])
    with pytest.raises(ValueError, match="unknown representation 'pooled'"):
        select_representation(tokens, "pooled")


def test_pixels_api_matches_images_api(tiny_model, golden):
    images = golden["input_480x640"]
    pixels = to_model_input(images)
    with torch.inference_mode():
        direct = tiny_model.features_from_pixels(pixels, "tokens")
        sam = tiny_model.teacher_from_pixels(pixels, "facebook/sam-vit-huge")
    torch.testing.assert_close(direct, tiny_model.forward_feature(images), rtol=0, atol=0)
    torch.testing.assert_close(sam, tiny_model(images, teachers=["facebook/sam-vit-huge"])["facebook/sam-vit-huge"],
                               rtol=0, atol=0)
    with pytest.raises(TypeError, match="features_from_pixels"):
        tiny_model.forward_feature(pixels)


def test_forward_runs_only_requested_heads(tiny_model, golden):
    calls = []
    hooks = [head.register_forward_hook(lambda mod, inp, out, name=name: calls.append(name))
             for name, head in tiny_model.heads.items()]
    try:
        out = tiny_model(golden["input_224"][:1], teachers=["facebook/dinov2-large"])
    finally:
        for h in hooks:
            h.remove()
    assert list(out) == ["facebook/dinov2-large"]
    assert out["facebook/dinov2-large"].shape == (1, 256, 1024)
    assert calls == ["facebook_dinov2_large"]
    with pytest.raises(ValueError) as err:
        tiny_model(golden["input_224"][:1], teachers=["facebook/not-a-teacher"])
    assert "facebook/not-a-teacher" in str(err.value) and "openai/clip-vit-large-patch14" in str(err.value)


def test_flops_count(tiny_model):
    assert 2.4e9 < tiny_model.flops_per_image() < 2.6e9  # THEIA.md: ~2.5 GFLOP for tiny


def test_export_dynamic_batch(tiny_model):
    pixels = torch.rand(2, 3, 224, 224) * 2 - 1
    module = tiny_model.export_module("tokens")
    batch = torch.export.Dim("batch", min=1, max=16)
    program = torch.export.export(module, (pixels,), dynamic_shapes={"pixels": {0: batch}})
    three = torch.rand(3, 3, 224, 224) * 2 - 1
    with torch.inference_mode():
        torch.testing.assert_close(program.module()(three), tiny_model.features_from_pixels(three, "tokens"))


def test_bfloat16_load():
    fp32 = load_model(f"random:{TINY}", seed=1)
    bf16 = load_model(f"random:{TINY}", seed=1, dtype=torch.bfloat16)
    images = np.random.default_rng(0).integers(0, 256, (1, 224, 224, 3), dtype=np.uint8)
    a, b = fp32.forward_feature(images), bf16.forward_feature(images)
    assert b.dtype == torch.bfloat16
    assert cosine(a.numpy(), b.float().numpy()) > 0.99


# ---- layouts: every published variant, strictly ----------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_expected_layout_matches_published_keys(variant):
    tsv = read_tsv(variant)
    expected = expected_checkpoint_shapes(variant)  # meta device: nothing allocated
    assert list(expected.items()) == list(tsv.items())
    total = int(open(CONFORMANCE_DIR / f"keys_{variant}.tsv").readline().split()[-2])
    assert sum(int(np.prod(s)) for s in expected.values()) == total


@pytest.mark.parametrize("variant", VARIANTS)
def test_key_mapping_is_a_bijection(variant):
    config = variant_config(variant)
    teachers = list(config["target_feature_sizes"])
    with torch.device("meta"):
        module_shapes = {k: tuple(v.shape) for k, v in TheiaModel(TheiaConfig.from_dict(config)).state_dict().items()}
    mapped = {checkpoint_key_to_module_key(k, teachers) for k in read_tsv(variant)}
    assert mapped == set(module_shapes)
    # the layout computed from the config alone is the layout of the modules built from it
    assert {checkpoint_key_to_module_key(k, teachers): shape
            for k, shape in expected_checkpoint_shapes(variant).items()} == module_shapes
    for key in read_tsv(variant):
        assert module_key_to_checkpoint_key(checkpoint_key_to_module_key(key, teachers), teachers) == key
    assert checkpoint_key_to_module_key("backbone.model.pooler.dense.weight", teachers) is None


@pytest.mark.parametrize("variant", ["theia-small-patch16-224-cddsv", "theia-base-patch16-224-cdiv",
                                     "theia-base-patch16-224-cddsv"])
def test_header_only_strict_check(variant, tmp_path):
    """Full-size checkpoints as sparse files: header read, offsets validated, strict check."""
    tsv = read_tsv(variant)
    path = write_sparse_checkpoint(tmp_path / "model.safetensors", tsv)
    header = read_safetensors_header(path)
    found = {k: shape for k, (_, shape) in header.items()}
    expected = expected_checkpoint_shapes(variant)
    check_checkpoint_shapes(expected, found)
    first_layer_key = "backbone.model.encoder.layer.0.attention.attention.query.weight"
    broken = dict(found)
    del broken[first_layer_key]
    broken["backbone.model.pooler.dense.bias"] = (10,)
    broken["backbone.model.embeddings.position_embeddings"] = (1, 50, 7)
    with pytest.raises(CheckpointError) as err:
        check_checkpoint_shapes(expected, broken, where=str(path))
    msg = str(err.value)
    assert first_layer_key in msg and "backbone.model.pooler.dense.bias" in msg
    assert "backbone.model.embeddings.position_embeddings" in msg and "1x50x7" in msg


def test_strict_load_tiny_cdiv(tiny_cdiv_dir):
    model = load_model(tiny_cdiv_dir)
    assert model.variant == "theia-tiny-patch16-224-cdiv"
    assert model.num_parameters == 10_039_168
    assert len(model.teachers) == 3
    assert model.forward_feature(np.zeros((224, 224, 3), np.uint8)).shape == (1, 196, 192)


def test_strict_load_small_cdiv(tmp_path_factory):
    variant = "theia-small-patch16-224-cdiv"  # 147 MB: written once, removed afterwards
    directory = make_weights(variant, tmp_path_factory.mktemp("ckpt") / variant, 3)
    try:
        model = load_model(directory)
        assert model.variant == variant and model.hidden_size == 384
        assert model.num_parameters == 36_663_808
        reference = load_model(f"random:{variant}", seed=3)
        pixels = torch.rand(1, 3, 224, 224) * 2 - 1
        with torch.inference_mode():
            torch.testing.assert_close(model.features_from_pixels(pixels), reference.features_from_pixels(pixels),
                                       rtol=0, atol=0)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# ---- refused checkpoints -----------------------------------------------------------------------

MISSING = "backbone.model.encoder.layer.3.attention.attention.key.bias"
EXTRA = "backbone.model.pooler.dense.weight"
MISSHAPED = "translator.translator_heads.facebook/dinov2-large.adapter.8.weight"


@pytest.mark.parametrize("case", ["missing", "unexpected", "misshaped"])
def test_refuses_wrong_keys(case, tiny_cdiv_dir, tmp_path):
    def mutate(tensors):
        if case == "missing":
            del tensors[MISSING]
        elif case == "unexpected":
            tensors[EXTRA] = np.zeros((192, 192), np.float32)
        else:
            tensors[MISSHAPED] = np.zeros((1000, 192), np.float32)

    directory = write_variant(tiny_cdiv_dir, tmp_path / case, mutate)
    with pytest.raises(CheckpointError) as err:
        load_model(directory)
    msg = str(err.value)
    assert {"missing": MISSING, "unexpected": EXTRA, "misshaped": MISSHAPED}[case] in msg
    assert case.replace("misshaped", "mis-shaped") in msg
    assert str(directory / "model.safetensors") in msg


def test_missing_weights_file(tiny_cdiv_dir, tmp_path):
    directory = tmp_path / "ckpt"
    directory.mkdir()
    shutil.copy(tiny_cdiv_dir / "config.json", directory / "config.json")
    with pytest.raises(CheckpointError, match="missing weights file .*model.safetensors"):
        load_model(directory)
    (directory / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="only safetensors"):
        load_model(directory)


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="missing config file"):
        load_model(tmp_path)


def test_truncated_safetensors(tiny_cdiv_dir, tmp_path):
    directory = write_variant(tiny_cdiv_dir, tmp_path / "ckpt")
    weights = directory / "model.safetensors"
    data = weights.read_bytes()
    weights.unlink()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated") as err:
        load_model(directory)
    assert str(weights) in str(err.value)
    weights.write_bytes(b"\x10\x00")
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(directory)
    weights.write_bytes(struct.pack("<Q", 12) + b"{not json!!}")
    with pytest.raises(CheckpointError, match="unparsable header"):
        load_model(directory)


def test_unparsable_config(tiny_cdiv_dir, tmp_path):
    directory = write_variant(tiny_cdiv_dir, tmp_path / "ckpt")
    (directory / "config.json").write_text('{"backbone": "facebook/deit-tiny-patch16-224",')
    with pytest.raises(CheckpointError, match="cannot parse config file") as err:
        load_model(directory)
    assert str(directory / "config.json") in str(err.value)


def test_unknown_backbone(tiny_cdiv_dir, tmp_path):
    directory = write_variant(tiny_cdiv_dir, tmp_path / "ckpt",
                              config_mutate=lambda c: c.update(backbone="facebook/deit-huge-patch14-224"))
    with pytest.raises(CheckpointError, match="unknown backbone 'facebook/deit-huge-patch14-224'"):
        load_model(directory)


def test_unsupported_translator(tiny_cdiv_dir, tmp_path):
    directory = write_variant(tiny_cdiv_dir, tmp_path / "ckpt", config_mutate=lambda c: c.update(translator_type="mlp"))
    with pytest.raises(CheckpointError, match="translator_type"):
        load_model(directory)


# ---- random weights and hub ids ----------------------------------------------------------------

def test_random_weights_flagged_and_deterministic():
    a = load_model("random:theia-tiny-patch16-224-cdiv")
    b = load_model("random:theia-tiny-patch16-224-cdiv", seed=0)
    c = load_model("random:theia-tiny-patch16-224-cdiv", seed=5)
    assert a.random_weights and a.weights_id == "random:theia-tiny-patch16-224-cdiv:seed=0"
    assert c.weights_id.endswith(":seed=5")
    key = "backbone.layers.0.attention.q_proj.weight"
    assert torch.equal(a.state_dict()[key], b.state_dict()[key])
    assert not torch.equal(a.state_dict()[key], c.state_dict()[key])
    with pytest.raises(CheckpointError, match="unknown Theia variant"):
        load_model("random:theia-huge-patch16-224-cdiv")
    with pytest.raises(ValueError, match="seed"):
        load_model("random:theia-tiny-patch16-224-cdiv", seed=-1)


def _clean_hub_env(monkeypatch, home):
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_hub_id_not_cached_offline(monkeypatch, tmp_path):
    _clean_hub_env(monkeypatch, tmp_path / "empty_hf_home")
    with pytest.raises(CheckpointError) as err:
        load_model("theaiinstitute/theia-tiny-patch16-224-cdiv")
    msg = str(err.value)
    assert "theaiinstitute/theia-tiny-patch16-224-cdiv" in msg and "HF_HUB_OFFLINE" in msg
    assert "download" in msg


def test_hub_id_from_cache_offline(monkeypatch, tmp_path, tiny_cdiv_dir):
    """A hub id resolves from the Hugging Face cache layout without any network."""
    home = tmp_path / "hf_home"
    repo = home / "hub" / "models--theaiinstitute--theia-tiny-patch16-224-cdiv"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for name in ("config.json", "model.safetensors"):
        os.symlink(tiny_cdiv_dir / name, snapshot / name)
    _clean_hub_env(monkeypatch, home)
    model = load_model("theaiinstitute/theia-tiny-patch16-224-cdiv")
    assert model.model_id == "theaiinstitute/theia-tiny-patch16-224-cdiv"
    assert model.variant == "theia-tiny-patch16-224-cdiv" and not model.random_weights
    assert model.weights_id.startswith("sha256:")


def test_bad_images_refused(tiny_model):
    with pytest.raises(ValueError, match="3 channels"):
        tiny_model.forward_feature(np.zeros((1, 64, 64, 4), np.uint8))
    with pytest.raises(TypeError, match="uint8"):
        tiny_model.forward_feature(np.zeros((1, 64, 64, 3), np.float32))


# ---- CLI -----------------------------------------------------------------------------------------

def test_cli_info(capsys, tiny_dir):
    from theia_ros.cli.main import main

    assert main(["info", f"random:{TINY}", "--seed", "4"]) == 0
    out = capsys.readouterr().out
    assert TINY in out and "16,166,944" in out and f"random:{TINY}:seed=4" in out
    assert "random weights: yes" in out and "192" in out and "facebook/sam-vit-huge" in out
    assert main(["info", str(tiny_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["weights_id"].startswith("sha256:") and info["random_weights"] is False
    assert main(["info", str(tiny_dir / "nowhere")]) == 1
    assert "not found" in capsys.readouterr().err
    assert main(["info", "random:theia-huge-patch16-224-cdiv"]) == 1
    assert "unknown Theia variant" in capsys.readouterr().err
