"""The Isaac Lab preprocessing profile and tokens at any input size (issue 16), plain Python.

Golden tokens in ``test/data/isaaclab`` were made with transformers' own ``ViTModel(pixel_values,
interpolate_pos_encoding=True)`` on the conformance checkpoint, once with transformers 4.44.2
(position embeddings interpolated with ``scale_factor``) and once with 5.24 (``size``); see the README
there.  Here the package's model must reproduce both, at every size, to max abs 1e-4; engines for
several input sizes coexist in one cache; the teacher heads refuse any size but 224x224.
"""
import copy
import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conformance_weights import write_checkpoint
from test_backends import fake_trt, needs_ort  # noqa: F401 (a pytest fixture and a marker shared with test_backends)

from theia_ros.backends import cache
from theia_ros.backends.base import BackendError
from theia_ros.backends.factory import create_backend, create_encoder
from theia_ros.backends.validation import cosine, reference_output, validation_pixels
from theia_ros.encoder.model import interpolate_position_embeddings, load_model
from theia_ros.encoder.pipeline import FeatureEncoder
from theia_ros.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PreprocessConfig,
    input_size,
    patch_grid,
    pos_interpolation_applies,
    to_model_input,
)
from theia_ros.representations import feature_shape_for, select_representation

pytestmark = pytest.mark.usefixtures("one_torch_thread", "engine_cache")

DATA = Path(__file__).resolve().parent / "data" / "isaaclab"
GOLDEN_SEED = 2024
VARIANT = "theia-tiny-patch16-224-cddsv"
SIZES = [(224, 224), (480, 640), (128, 128), (100, 150), (96, 128), (720, 1280)]
CONVENTIONS = ("scale_factor", "size")
TINY = "random:theia-tiny-patch16-224-cddsv"


@pytest.fixture(scope="module")
def golden_model(tmp_path_factory):
    return load_model(write_checkpoint(VARIANT, tmp_path_factory.mktemp("ckpt") / VARIANT, GOLDEN_SEED))


@pytest.fixture(scope="module")
def tiny():
    return load_model(TINY)


@pytest.fixture(scope="module")
def goldens():
    out = {}
    for convention in CONVENTIONS:
        with np.load(DATA / f"golden_{convention}.npz") as z:
            out[convention] = {k: z[k] for k in z.files}
    return out


@pytest.fixture(scope="module")
def photographs():
    """The golden script's two source images (matplotlib's sample photograph and MRI slice)."""
    import sys

    sys.path.insert(0, str(DATA))
    try:
        from make_goldens import photographs as load
    finally:
        sys.path.remove(str(DATA))
    return load()


_TOKENS = {}


def isaaclab_tokens(model, sources, size, convention):
    """Our tokens for the golden inputs, through the public API (cached: the 720x1280 ones are slow)."""
    key = (id(model), size, convention)
    if key not in _TOKENS:
        config = PreprocessConfig(profile="isaaclab", size=size, pos_interpolation=convention)
        _TOKENS[key] = torch.cat([model.forward_feature(image, config=config) for image in sources]).numpy()
    return _TOKENS[key]


# ---------------------------------------------------------------------------------- goldens

def test_goldens_record_what_made_them(goldens):
    for convention, golden in goldens.items():
        meta = json.loads(str(golden["meta"]))
        assert meta["convention"] == convention and meta["seed"] == GOLDEN_SEED and meta["variant"] == VARIANT
        major, minor = (int(v) for v in meta["transformers"].split(".")[:2])
        assert ((major, minor) <= (4, 44)) == (convention == "scale_factor"), meta["transformers"]
        assert [tuple(s) for s in meta["sizes"]] == SIZES


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("convention", CONVENTIONS)
def test_tokens_equal_transformers_goldens(golden_model, goldens, photographs, size, convention):
    golden = goldens[convention]
    tag = f"{size[0]}x{size[1]}"
    # the input: Isaac Lab's camera image brought to `size` with OpenCV's area interpolation
    resized = np.stack([cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_AREA) for img in photographs])
    assert hashlib.sha256(resized.tobytes()).hexdigest() == str(golden[f"{tag}/input_sha256"]), \
        "the resized input differs from the one the goldens were made on (OpenCV or the image decoder changed)"
    tokens = isaaclab_tokens(golden_model, photographs, size, convention)
    rows, columns = size[0] // 16, size[1] // 16
    assert tokens.shape == (2, rows * columns, 192)
    index = golden[f"{tag}/index"]
    assert np.abs(tokens[:, index] - golden[f"{tag}/tokens"]).max() <= 1e-4
    # every token and every channel, through their fingerprints
    assert np.abs(tokens.mean(axis=2) - golden[f"{tag}/token_mean"]).max() <= 1e-4
    assert np.abs(np.sqrt((tokens.astype(np.float64) ** 2).mean(axis=2)) - golden[f"{tag}/token_rms"]).max() <= 1e-4
    assert np.abs(tokens.mean(axis=1) - golden[f"{tag}/channel_mean"]).max() <= 1e-4


@pytest.mark.parametrize("size", [s for s in SIZES if s != (224, 224)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_the_two_conventions_are_told_apart(golden_model, goldens, photographs, size):
    """Off the 14x14 grid the conventions differ by far more than the 1e-4 tolerance: the golden test
    of one convention fails on the tokens of the other."""
    tag = f"{size[0]}x{size[1]}"
    index = goldens["size"][f"{tag}/index"]
    between = np.abs(goldens["size"][f"{tag}/tokens"] - goldens["scale_factor"][f"{tag}/tokens"]).max()
    assert between > 1e-3
    ours = isaaclab_tokens(golden_model, photographs, size, "scale_factor")[:, index]
    assert np.abs(ours - goldens["size"][f"{tag}/tokens"]).max() > 1e-3


def test_at_224_both_conventions_are_the_model_unchanged(goldens, golden_model):
    np.testing.assert_array_equal(goldens["size"]["224x224/tokens"], goldens["scale_factor"]["224x224/tokens"])
    pos = golden_model.backbone.embeddings.position_embeddings
    for convention in CONVENTIONS:
        assert interpolate_position_embeddings(pos, 224, 224, convention) is pos
    # 14x14 grid, H != W: resampled; "size" to the same 14x14 is exact, "scale_factor" (14.1 / 14) is not
    torch.testing.assert_close(interpolate_position_embeddings(pos, 224, 230, "size"), pos, rtol=0, atol=1e-7)
    assert (interpolate_position_embeddings(pos, 224, 230, "scale_factor") - pos).abs().max() > 1e-3
    assert not pos_interpolation_applies((224, 224)) and not pos_interpolation_applies((239, 239))
    assert pos_interpolation_applies((224, 240)) and pos_interpolation_applies((240, 240))


@pytest.mark.parametrize("size", [(448, 448), (96, 200), (17, 33)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_any_size_equals_this_transformers_vit(tiny, size):
    """On any pixels the backbone equals the installed transformers' ViTModel with
    interpolate_pos_encoding=True (the "size" convention), every token, CLS included."""
    pixels = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        ref = tiny.backbone(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state
        ours = tiny.features_from_pixels(pixels, "all_tokens", "size")
        spatial = tiny.features_from_pixels(pixels, "spatial", "size")
    assert ours.shape == (2, 1 + (size[0] // 16) * (size[1] // 16), 192)
    assert (ours - ref).abs().max().item() <= 1e-5
    assert spatial.shape == (2, 192, size[0] // 16, size[1] // 16)
    torch.testing.assert_close(spatial, select_representation(ours, "spatial", (size[0] // 16, size[1] // 16)))


# ---------------------------------------------------------------------------------- preprocessing

def test_isaaclab_preprocessing_is_isaac_labs_recipe():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    # Isaac Lab: image.permute(0, 3, 1, 2).float() / 255.0, then (image - mean) / std
    x = torch.from_numpy(image)[None].permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(list(IMAGENET_MEAN)).view(1, 3, 1, 1)
    std = torch.tensor(list(IMAGENET_STD)).view(1, 3, 1, 1)
    expected = (x - mean) / std
    config = PreprocessConfig(profile="isaaclab")
    torch.testing.assert_close(to_model_input(image, config), expected, rtol=0, atol=0)  # own size: no resize
    assert input_size(config, (120, 160)) == (120, 160) and patch_grid(config, (120, 160)) == (7, 10)
    # a given size: OpenCV's area interpolation first
    sized = PreprocessConfig(profile="isaaclab", size=(60, 90))
    area = cv2.resize(image, (90, 60), interpolation=cv2.INTER_AREA)
    x = torch.from_numpy(area)[None].permute(0, 3, 1, 2).float() / 255.0
    torch.testing.assert_close(to_model_input(image, sized), (x - mean) / std, rtol=0, atol=0)
    # crop / letterbox apply first, in both profiles
    boxed = PreprocessConfig(profile="isaaclab", crop=(10, 20, 100, 50), letterbox=True)
    assert input_size(boxed, (120, 160)) == (100, 100) and to_model_input(image, boxed).shape == (1, 3, 100, 100)


def test_theia_profile_sizes_and_reference():
    image = np.random.default_rng(1).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    assert to_model_input(image).shape == (1, 3, 224, 224)
    assert to_model_input(image, PreprocessConfig(size=(320, 480))).shape == (1, 3, 320, 480)
    assert input_size(PreprocessConfig(), (480, 640)) == (224, 224)
    assert patch_grid(PreprocessConfig(size=(320, 480)), (10, 10)) == (20, 30)
    x = to_model_input(image, PreprocessConfig(size=(320, 480)))
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    assert PreprocessConfig().is_reference and PreprocessConfig(size=(224, 224)).is_reference
    assert not PreprocessConfig(profile="isaaclab").is_reference and not PreprocessConfig(size=(448, 448)).is_reference
    assert PreprocessConfig(profile="isaaclab").is_identity  # geometry only, as before


@pytest.mark.parametrize("kwargs, match", [
    ({"profile": "isaac"}, "profile must be one of theia, isaaclab"),
    ({"pos_interpolation": "bicubic"}, "pos_interpolation must be one of scale_factor, size"),
    ({"size": (15, 64)}, "at least 16x16"),
    ({"size": (64,)}, "size must be"),
    ({"size": 224}, "size must be"),
    ({"size": (64.0, 64)}, "size must be"),
])
def test_bad_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PreprocessConfig(**kwargs)


def test_isaaclab_image_smaller_than_a_patch_is_refused():
    with pytest.raises(ValueError, match="smaller than one 16x16 patch"):
        to_model_input(np.zeros((10, 200, 3), np.uint8), PreprocessConfig(profile="isaaclab"))


def test_shapes_on_other_grids():
    assert feature_shape_for("tokens", 192, (7, 10)) == (70, 192)
    assert feature_shape_for("all_tokens", 192, (7, 10)) == (71, 192)
    assert feature_shape_for("spatial", 192, (7, 10)) == (192, 7, 10)
    assert feature_shape_for("spatial", 192) == (192, 14, 14) and feature_shape_for("cls", 192, (7, 10)) == (192,)
    tokens = torch.arange(2 * 71 * 3, dtype=torch.float32).reshape(2, 71, 3)
    spatial = select_representation(tokens, "spatial", (7, 10))
    assert spatial.shape == (2, 3, 7, 10)
    torch.testing.assert_close(spatial[:, :, 1, 2], tokens[:, 1 + 1 * 10 + 2])  # row-major patch order


# ---------------------------------------------------------------------------------- teacher heads

def test_teacher_heads_refuse_other_sizes(tiny):
    image = np.zeros((120, 160, 3), np.uint8)
    assert tiny.forward(image, "clip")["openai/clip-vit-large-patch14"].shape == (1, 256, 1024)  # 224 works
    for config in (PreprocessConfig(profile="isaaclab"), PreprocessConfig(size=(256, 256))):
        with pytest.raises(ValueError, match="teacher heads take 224x224 inputs only"):
            tiny.forward(image, "clip", config=config)
    with pytest.raises(ValueError, match="teacher heads take 224x224 inputs only.*96x128"):
        tiny.teacher_from_pixels(torch.zeros(1, 3, 96, 128), "clip")
    with pytest.raises(BackendError, match="teacher heads take 224x224 inputs only"):
        create_backend("torch", tiny, representation="teacher:clip", input_size=(96, 128))
    with pytest.raises(ValueError, match="teacher heads take 224x224"):
        tiny.export_module(teacher="clip", input_size=(96, 128))
    # an encoder for a teacher: fine at 224, refused for an Isaac Lab camera of its own size
    encoder = FeatureEncoder(tiny, create_backend("torch", tiny, representation="teacher:clip", max_batch=2))
    assert encoder.encode([image])[0].shape == (1, 256, 1024)
    with pytest.raises(ValueError, match="no backend of this encoder runs 120x160 inputs"):
        encoder.encode([image], [PreprocessConfig(profile="isaaclab")])


# ---------------------------------------------------------------------------------- encoder and backends

def test_encoder_groups_frames_by_input_size(tiny):
    """Cameras with different input sizes share one encoder: each size gets its own batch (and, for
    engines, backend); features come back in the frames' order, as a list when their shapes differ."""
    rng = np.random.default_rng(2)
    frames = [rng.integers(0, 256, (120, 160, 3), dtype=np.uint8) for _ in range(5)]
    configs = [None, PreprocessConfig(profile="isaaclab"), PreprocessConfig(profile="isaaclab", size=(64, 64)),
               PreprocessConfig(profile="isaaclab", pos_interpolation="size"), None]
    def factory(size, pos_interpolation):
        return create_backend("torch", tiny, max_batch=2, input_size=size, pos_interpolation=pos_interpolation)

    encoder = FeatureEncoder(tiny, create_backend("torch", tiny, max_batch=2), backend_factory=factory)
    features, timings = encoder.encode(frames, configs)
    assert isinstance(features, list) and [tuple(f.shape) for f in features] == [
        (196, 192), (70, 192), (16, 192), (70, 192), (196, 192)]
    for frame, config, got in zip(frames, configs, features):
        torch.testing.assert_close(got, tiny.forward_feature(frame, config=config)[0], rtol=0, atol=1e-6)
    assert not torch.allclose(features[1], features[3], atol=1e-3)  # the two conventions differ at 7x10
    # eager torch takes any size: one backend per position-embedding convention
    assert [b.pos_interpolation for b in encoder.backends] == ["scale_factor", "size"]
    assert sorted(encoder._buffers) == [(64, 64), (120, 160), (224, 224)]
    pooled = FeatureEncoder(tiny, create_backend("torch", tiny, representation="cls", max_batch=2),
                            backend_factory=lambda size, pos: create_backend("torch", tiny, "cls", max_batch=2,
                                                                             pos_interpolation=pos))
    stacked, _ = pooled.encode(frames, configs)  # one shape for all: a tensor, in order
    assert isinstance(stacked, torch.Tensor) and stacked.shape == (5, 192)
    torch.testing.assert_close(stacked[2], tiny.forward_feature(frames[2], "cls", configs[2])[0], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="2 frames but 1 preprocess configs"):
        encoder.encode(frames[:2], configs[:1])


def test_torch_backend_any_size(tiny):
    backend = create_backend("torch", tiny, input_size=(96, 128), pos_interpolation="size", max_batch=2)
    assert backend.identity["input_size"] == [96, 128] and backend.identity["pos_interpolation"] == "size"
    assert backend.accepts((480, 640), "size") and not backend.accepts((480, 640), "scale_factor")
    assert backend.accepts((224, 224), "scale_factor")  # same numbers either way there
    pixels = validation_pixels(2, size=(96, 128))
    torch.testing.assert_close(backend.run_pixels(pixels), reference_output(tiny, pixels, "tokens", None, "size"))
    lean = create_backend("torch", tiny, lean=True, input_size=(80, 144), max_batch=2)
    assert lean.validation_cosine >= 0.9999
    pixels = validation_pixels(2, size=(80, 144))
    assert cosine(lean.run_pixels(pixels), reference_output(tiny, pixels, "tokens")) >= 0.9999


@needs_ort
def test_onnx_engines_for_two_sizes_coexist_and_match_torch(tiny, engine_cache):
    from theia_ros.backends.onnxruntime_backend import engine_key

    encoder = create_encoder(TINY, backend="onnxruntime", max_batch=2, threads=1, input_size=(96, 128))
    first = encoder.backend
    assert first.cache.status == "built" and first.input_size == (96, 128)
    rng = np.random.default_rng(4)
    frames = [rng.integers(0, 256, (96, 128, 3), dtype=np.uint8), rng.integers(0, 256, (120, 200, 3), dtype=np.uint8)]
    configs = [PreprocessConfig(profile="isaaclab"),
               PreprocessConfig(profile="isaaclab", size=(80, 144), pos_interpolation="size")]
    features, _ = encoder.encode(frames, configs)  # the second size builds a second engine
    assert len(encoder.backends) == 2
    second = encoder.backends[1]
    assert second.name == "onnxruntime" and second.input_size == (80, 144) and second.pos_interpolation == "size"
    slots = sorted(p.name for p in (Path(engine_cache) / "onnxruntime").iterdir() if p.is_dir())
    assert len(slots) == 2 and any("96x128" in s for s in slots) and any("80x144" in s for s in slots)
    for frame, config, got in zip(frames, configs, features):
        want = tiny.forward_feature(frame, config=config)[0]
        assert got.shape == want.shape and cosine(got[None], want[None]) >= 0.9999
        assert (got - want).abs().max().item() <= 1e-4  # measured 5e-6
    # both stay usable from the cache: a new backend for the first size loads it, it does not export again
    again = create_backend("onnxruntime", tiny, max_batch=2, threads=1, input_size=(96, 128))
    assert again.cache.status == "hit" and again.engine_path == first.engine_path
    with pytest.raises(BackendError, match="built for 96x128 inputs"):
        again.run_pixels(validation_pixels(1))
    # 224x224 keys are as before (engines cached before issue 16 are still found); other sizes name theirs
    assert "input_size" not in engine_key(tiny, "tokens", input_size=(224, 224), pos_interpolation="size")
    assert engine_key(tiny, "tokens", input_size=(224, 224)) == engine_key(tiny, "tokens")
    key = engine_key(tiny, "tokens", input_size=(96, 128))
    assert key["input_size"] == [96, 128] and key["pos_interpolation"] == "scale_factor"
    assert cache.key_digest(key) != cache.key_digest(engine_key(tiny, "tokens", input_size=(96, 128),
                                                                pos_interpolation="size"))


def test_tensorrt_stand_in_at_another_size(tiny, fake_trt):  # noqa: F811 (the imported pytest fixture, as a parameter)
    """The TensorRT build path at a size other than 224x224, with the CPU stand-in for torch_tensorrt."""
    fake = fake_trt
    model = copy.deepcopy(tiny)
    backend = create_backend("tensorrt", model, precision="fp32", device="cpu", max_batch=2, input_size=(96, 128))
    assert fake.compiles[0]["arg_inputs"][0].max_shape == (2, 3, 96, 128)
    assert backend.key["input_size"] == [96, 128] and "96x128" in backend.engine_path.parent.name
    pixels = validation_pixels(2, size=(96, 128))
    assert cosine(backend.run_pixels(pixels), reference_output(tiny, pixels, "tokens")) >= 0.9999
    with pytest.raises(BackendError, match="built for 96x128 inputs"):
        backend.run_pixels(validation_pixels(1))
