"""Teachers: the vision foundation models whose feature maps the Theia student learns to predict.

Each teacher is one :class:`TeacherSpec` entry in :data:`TEACHERS` (add your own with
:func:`register_teacher`): which transformers class to build, how to preprocess the 224x224 uint8
image the student also sees, how to read a feature map ``[B, C, h, w]`` out of the model, and the
target size ``(C, H, W)`` the map is brought to.

How the published teachers are read (as the reference implementation extracted them; see
docs/distill.md for the reasoning behind each choice):

=================  ======================  ===========================================  ===============
teacher            transformers class      input (from the 224x224 uint8 image)          target (C,H,W)
=================  ======================  ===========================================  ===============
vit (ViT-H/14)     ViTModel                224, mean/std 0.5                             1280x16x16
dinov2 (DINOv2-L)  Dinov2Model             bicubic to 256, centre crop 224, ImageNet     1024x16x16
clip (CLIP-L/14)   CLIPVisionModel         224, CLIP mean/std                            1024x16x16
sam (SAM ViT-H)    SamModel.vision_encoder bilinear to 1024, ImageNet                    256x64x64
depth_anything     DepthAnythingFor...     bicubic to 518, ImageNet                      32x64x64
=================  ======================  ===========================================  ===============

* ViT, DINOv2, CLIP: ``last_hidden_state`` without the CLS token, as a 16x16 grid (ViT and DINOv2
  after their final LayerNorm, CLIP before ``post_layernorm``, as transformers returns them).
* SAM: the vision encoder's output after its neck (``image_embeddings``), already 64x64.
* Depth-Anything: the depth head's hidden feature: ``head.conv1`` on the last fused neck map,
  bilinear (align_corners) to the input resolution, ``head.conv2`` (32 channels, no ReLU), then
  nearest-neighbour to 64x64 (``F.interpolate``'s default mode, as the reference resized it).

Three ways to build a teacher (``mode``):

* ``"pretrained"``: ``from_pretrained(model_id, use_safetensors=True)`` from the hub / local cache;
* ``"random"``: the published architecture (full size) with random weights, offline (benchmarks);
* ``"small"``: a tiny random model built from a small config, offline, for tests; it produces the
  same grid (H, W) as the real teacher with fewer channels (:attr:`TeacherSpec.small_target`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import zlib
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Preprocess",
    "TeacherSpec",
    "Teacher",
    "TEACHERS",
    "TEACHER_MODES",
    "FEATURE_EXTRACTORS",
    "register_teacher",
    "resolve_teacher",
    "teacher_names",
    "teacher_fingerprint",
    "build_teacher",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)
TEACHER_MODES = ("pretrained", "random", "small")
# bump when what a teacher writes into the cache changes (invalidates cached features)
FEATURE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """How a teacher's input is made from the 224x224 RGB uint8 image (HF image-processor defaults).

    size: square side the image is resized to (skipped when equal to the input side);
    resample: "bilinear" or "bicubic"; crop: centre-crop side after resizing (None: no crop);
    mean/std: per-channel normalisation after scaling to [0, 1].
    """

    size: int
    resample: str = "bilinear"
    crop: Optional[int] = None
    mean: Tuple[float, float, float] = HALF
    std: Tuple[float, float, float] = HALF

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, H, W, 3] (any device) -> float32 [B, 3, s, s] normalised."""
        x = images.permute(0, 3, 1, 2).float()
        if x.shape[-2:] != (self.size, self.size):
            shrink = self.size < max(x.shape[-2:])
            x = F.interpolate(x, size=(self.size, self.size), mode=self.resample, align_corners=False,
                              antialias=shrink)
            x = x.round_().clamp_(0, 255)  # the HF processors resize uint8 images (PIL): stay on the uint8 grid
        if self.crop is not None and self.crop < self.size:
            top = (x.shape[-2] - self.crop) // 2
            left = (x.shape[-1] - self.crop) // 2
            x = x[..., top:top + self.crop, left:left + self.crop]
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return ((x / 255.0 - mean) / std).contiguous()


# ---------------------------------------------------------------------------------------------
# Feature extractors: model, preprocessed pixels -> [B, C, h, w]


def _tokens_grid(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """ViT-style models: last_hidden_state without CLS -> [B, C, h, w] (row-major patches)."""
    hidden = model(pixel_values=pixels).last_hidden_state
    patch = model.config.patch_size
    h, w = pixels.shape[-2] // patch, pixels.shape[-1] // patch
    tokens = hidden[:, hidden.shape[1] - h * w:]  # drop CLS (and register tokens, if any: they come first)
    return tokens.transpose(1, 2).unflatten(2, (h, w))


def _sam_embeddings(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """SAM vision encoder: image embeddings after the neck, [B, 256, 64, 64] for 1024 inputs."""
    return model(pixel_values=pixels).last_hidden_state


def _depth_anything_head(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Depth-Anything: the depth head's 32-channel hidden map at input resolution (before ReLU)."""
    outputs = model.backbone.forward_with_filtered_kwargs(pixels)
    patch = model.config.patch_size
    ph, pw = pixels.shape[-2] // patch, pixels.shape[-1] // patch
    fused = model.neck(outputs.feature_maps, ph, pw)
    x = model.head.conv1(fused[model.head.head_in_index])
    x = F.interpolate(x, (ph * patch, pw * patch), mode="bilinear", align_corners=True)
    return model.head.conv2(x)


FEATURE_EXTRACTORS: Dict[str, Callable[[nn.Module, torch.Tensor], torch.Tensor]] = {
    "tokens": _tokens_grid,
    "sam": _sam_embeddings,
    "depth_anything_head": _depth_anything_head,
}


# ---------------------------------------------------------------------------------------------
# The registry


@dataclasses.dataclass(frozen=True)
class TeacherSpec:
    """One teacher, by configuration.

    name:           short name used on the command line ("clip").
    model_id:       hub id; also the teacher id in the student's ``target_feature_sizes``.
    model_class:    transformers class built / loaded (``from_pretrained``).
    config_class:   transformers config class for ``full_config`` / ``small_config``.
    target:         (C, H, W) of the feature map the student predicts.
    feature:        key of :data:`FEATURE_EXTRACTORS` (or a callable model, pixels -> [B, C, h, w]).
    preprocess:     input preprocessing (from the 224x224 uint8 image).
    full_config:    config kwargs of the published architecture (offline "random" mode).
    small_config:   config kwargs of a tiny random stand-in ("small" mode, tests).
    small_preprocess / small_target: input and target of the small stand-in (target: same H, W).
    resize_mode:    how a map of another size is brought to (H, W): "nearest" or "bilinear".
    submodule:      keep only this attribute of the loaded model (SAM: "vision_encoder").
    small_class:    class for the small / random configs when it differs from ``model_class``.
    model_kwargs:   extra constructor / from_pretrained kwargs (ViT: add_pooling_layer=False).
    """

    name: str
    model_id: str
    model_class: str
    config_class: str
    target: Tuple[int, int, int]
    feature: object
    preprocess: Preprocess
    full_config: Mapping
    small_config: Mapping
    small_preprocess: Preprocess
    small_target: Tuple[int, int, int]
    resize_mode: str = "bilinear"
    submodule: Optional[str] = None
    small_class: Optional[str] = None
    model_kwargs: Mapping = dataclasses.field(default_factory=dict)

    def target_for(self, mode: str) -> Tuple[int, int, int]:
        return tuple(self.small_target if mode == "small" else self.target)

    def preprocess_for(self, mode: str) -> Preprocess:
        return self.small_preprocess if mode == "small" else self.preprocess


_DINOV2_LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4,
                     image_size=518, patch_size=14, layerscale_value=1.0, layer_norm_eps=1e-6)

TEACHERS: Dict[str, TeacherSpec] = {}


def register_teacher(spec: TeacherSpec, *, replace: bool = False) -> TeacherSpec:
    """Add a teacher to :data:`TEACHERS` (by its short name)."""
    if spec.name in TEACHERS and not replace:
        raise ValueError(f"teacher {spec.name!r} is already registered")
    if "." in spec.model_id:
        raise ValueError(f"teacher id {spec.model_id!r}: '.' is not allowed (checkpoint key separator)")
    for target in (spec.target, spec.small_target):
        if tuple(target[1:]) not in ((16, 16), (64, 64)):
            raise ValueError(f"teacher {spec.name!r}: target {target} must be 16x16 or 64x64 (lconv heads)")
    TEACHERS[spec.name] = spec
    return spec


register_teacher(TeacherSpec(
    name="vit", model_id="google/vit-huge-patch14-224-in21k", model_class="ViTModel", config_class="ViTConfig",
    target=(1280, 16, 16), feature="tokens", preprocess=Preprocess(224, "bilinear", None, HALF, HALF),
    full_config=dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, intermediate_size=5120,
                     image_size=224, patch_size=14),
    small_config=dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96,
                      image_size=224, patch_size=14),
    small_preprocess=Preprocess(224, "bilinear", None, HALF, HALF), small_target=(48, 16, 16),
    model_kwargs={"add_pooling_layer": False}))

register_teacher(TeacherSpec(
    name="dinov2", model_id="facebook/dinov2-large", model_class="Dinov2Model", config_class="Dinov2Config",
    target=(1024, 16, 16), feature="tokens",
    preprocess=Preprocess(256, "bicubic", 224, IMAGENET_MEAN, IMAGENET_STD),
    full_config=_DINOV2_LARGE,
    small_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=224,
                      patch_size=14),
    small_preprocess=Preprocess(256, "bicubic", 224, IMAGENET_MEAN, IMAGENET_STD), small_target=(32, 16, 16)))

register_teacher(TeacherSpec(
    name="clip", model_id="openai/clip-vit-large-patch14", model_class="CLIPVisionModel",
    config_class="CLIPVisionConfig", target=(1024, 16, 16), feature="tokens",
    preprocess=Preprocess(224, "bicubic", 224, CLIP_MEAN, CLIP_STD),
    full_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                     image_size=224, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                     projection_dim=768),
    small_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      image_size=224, patch_size=14, hidden_act="quick_gelu"),
    small_preprocess=Preprocess(224, "bicubic", 224, CLIP_MEAN, CLIP_STD), small_target=(32, 16, 16)))

register_teacher(TeacherSpec(
    name="sam", model_id="facebook/sam-vit-huge", model_class="SamModel", config_class="SamVisionConfig",
    target=(256, 64, 64), feature="sam", preprocess=Preprocess(1024, "bilinear", None, IMAGENET_MEAN, IMAGENET_STD),
    full_config=dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16,
                     global_attn_indexes=[7, 15, 23, 31], output_channels=256, image_size=1024, patch_size=16,
                     window_size=14, initializer_range=0.02),
    # 256 px input, 4 px patches: the same 64x64 grid at 1/16 of the pixels
    small_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, global_attn_indexes=[1],
                      output_channels=16, image_size=256, patch_size=4, window_size=8, mlp_dim=64,
                      initializer_range=0.02),  # SAM's default 1e-10 makes random features vanish
    small_preprocess=Preprocess(256, "bilinear", None, IMAGENET_MEAN, IMAGENET_STD), small_target=(16, 64, 64),
    submodule="vision_encoder", small_class="SamVisionModel"))

register_teacher(TeacherSpec(
    name="depth_anything", model_id="LiheYoung/depth-anything-large-hf", model_class="DepthAnythingForDepthEstimation",
    config_class="DepthAnythingConfig", target=(32, 64, 64), feature="depth_anything_head",
    preprocess=Preprocess(518, "bicubic", None, IMAGENET_MEAN, IMAGENET_STD),
    full_config=dict(backbone_config=dict(model_type="dinov2", out_indices=[5, 12, 18, 24],
                                          reshape_hidden_states=False, **_DINOV2_LARGE),
                     reassemble_hidden_size=1024, neck_hidden_sizes=[256, 512, 1024, 1024], fusion_hidden_size=256,
                     head_hidden_size=32),
    # 224 px input instead of 518: the head map is 224x224, then nearest to 64x64 as for the real one
    small_config=dict(backbone_config=dict(model_type="dinov2", hidden_size=32, num_hidden_layers=4,
                                           num_attention_heads=2, mlp_ratio=2, image_size=224, patch_size=14,
                                           out_indices=[1, 2, 3, 4], reshape_hidden_states=False),
                      reassemble_hidden_size=32, neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16,
                      head_hidden_size=32, initializer_range=0.1),  # 0.02 leaves the random head map ~1e-6
    small_preprocess=Preprocess(224, "bicubic", None, IMAGENET_MEAN, IMAGENET_STD), small_target=(32, 64, 64),
    resize_mode="nearest"))

_ALIASES = {"depth": "depth_anything", "depth-anything": "depth_anything", "dino": "dinov2", "dinov2-large": "dinov2"}


def teacher_names() -> List[str]:
    return list(TEACHERS)


def resolve_teacher(name: str) -> TeacherSpec:
    """A spec by short name, alias, or hub id."""
    key = _ALIASES.get(name, name)
    if key in TEACHERS:
        return TEACHERS[key]
    for spec in TEACHERS.values():
        if spec.model_id == name:
            return spec
    raise KeyError(f"unknown teacher {name!r}; known: {', '.join(TEACHERS)} (or their hub ids)")


def teacher_seed(spec: TeacherSpec, seed: int) -> int:
    """Per-teacher seed for random weights: independent of which other teachers are used."""
    return (zlib.crc32(spec.model_id.encode()) ^ int(seed)) & 0x7FFFFFFF


def teacher_fingerprint(spec: TeacherSpec, mode: str, *, seed: int = 0, revision: Optional[str] = None) -> str:
    """Hex digest naming what this teacher writes into the feature cache (changes invalidate it)."""
    if mode not in TEACHER_MODES:
        raise ValueError(f"teacher mode must be one of {TEACHER_MODES}, got {mode!r}")
    feature = spec.feature if isinstance(spec.feature, str) else getattr(spec.feature, "__qualname__", "custom")
    info = {
        "version": FEATURE_VERSION, "model_id": spec.model_id, "mode": mode, "feature": feature,
        "class": spec.small_class if mode != "pretrained" and spec.small_class else spec.model_class,
        "preprocess": dataclasses.asdict(spec.preprocess_for(mode)), "target": list(spec.target_for(mode)),
        "resize_mode": spec.resize_mode,
    }
    if mode == "pretrained":
        info["revision"] = revision or "main"
    else:
        info["seed"] = teacher_seed(spec, seed)
        info["config"] = spec.small_config if mode == "small" else spec.full_config
    return hashlib.sha1(json.dumps(info, sort_keys=True, default=str).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Built teachers


class Teacher:
    """A built teacher: ``teacher(images_uint8 [B, 224, 224, 3]) -> float32 [B, C, H, W]`` (target grid).

    ``calls`` counts forward batches (the feature cache's tests use it)."""

    def __init__(self, spec: TeacherSpec, model: nn.Module, mode: str, *, fingerprint: str,
                 device="cpu", autocast_dtype: Optional[torch.dtype] = None):
        self.spec = spec
        self.model = model
        self.mode = mode
        self.fingerprint = fingerprint
        self.device = torch.device(device)
        self.autocast_dtype = autocast_dtype
        self.preprocess = spec.preprocess_for(mode)
        self.target = spec.target_for(mode)
        self.extract = FEATURE_EXTRACTORS[spec.feature] if isinstance(spec.feature, str) else spec.feature
        self.calls = 0
        self.images = 0

    @property
    def teacher_id(self) -> str:
        return self.spec.model_id

    @property
    def name(self) -> str:
        return self.spec.name

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"teacher input must be uint8 [B, H, W, 3], got {images.dtype} {tuple(images.shape)}")
        self.calls += 1
        self.images += images.shape[0]
        pixels = self.preprocess(images.to(self.device))
        if self.autocast_dtype is not None:
            with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                fmap = self.extract(self.model, pixels)
        else:
            fmap = self.extract(self.model, pixels)
        fmap = fmap.float()
        C, H, W = self.target
        if fmap.shape[1] != C:
            raise RuntimeError(f"teacher {self.name}: feature map has {fmap.shape[1]} channels, target says {C}")
        if tuple(fmap.shape[-2:]) != (H, W):
            if self.spec.resize_mode == "nearest":
                fmap = F.interpolate(fmap, size=(H, W), mode="nearest")
            else:
                fmap = F.interpolate(fmap, size=(H, W), mode="bilinear", align_corners=False,
                                     antialias=fmap.shape[-1] > W)
        return fmap.cpu()

    def __repr__(self) -> str:
        return f"Teacher({self.name}, {self.spec.model_id}, mode={self.mode}, target={self.target})"


def _transformers_attr(name: str):
    import transformers

    try:
        return getattr(transformers, name)
    except AttributeError:
        raise KeyError(f"transformers {transformers.__version__} has no {name}") from None


def _build_from_config(spec: TeacherSpec, mode: str, seed: int) -> nn.Module:
    config_cls = _transformers_attr(spec.config_class)
    kwargs = dict(spec.small_config if mode == "small" else spec.full_config)
    config = config_cls(**kwargs)
    cls_name = spec.small_class or spec.model_class
    cls = _transformers_attr(cls_name)
    if spec.small_class is None and spec.submodule is not None:
        raise ValueError(f"teacher {spec.name}: a submodule teacher needs small_class for config builds")
    fork_devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(teacher_seed(spec, seed))
        model = cls(config, **dict(spec.model_kwargs))
    return model


def _load_pretrained(spec: TeacherSpec, revision: Optional[str], cache_dir) -> nn.Module:
    cls = _transformers_attr(spec.model_class)
    kwargs = dict(spec.model_kwargs)
    if revision:
        kwargs["revision"] = revision
    if cache_dir:
        kwargs["cache_dir"] = str(cache_dir)
    try:
        model = cls.from_pretrained(spec.model_id, use_safetensors=True, **kwargs)
    except OSError as exc:
        raise OSError(f"teacher {spec.name} ({spec.model_id}): cannot load its safetensors weights: {exc}. "
                      "Only safetensors weights are loaded: pass --teacher-revision with a revision that has "
                      "model.safetensors, pre-fill the Hugging Face cache where there is network, or use "
                      "--small-teachers / --random-teachers offline") from exc
    if spec.submodule:
        model = getattr(model, spec.submodule)
    return model


def build_teacher(name, mode: str = "pretrained", *, device="cpu", seed: int = 0, revision: Optional[str] = None,
                  cache_dir=None, precision: str = "fp32") -> Teacher:
    """Build one teacher (``name``: short name, alias, hub id or a :class:`TeacherSpec`).

    ``mode``: "pretrained" (hub weights, safetensors only), "random" (published architecture,
    random weights, offline) or "small" (tiny random config, offline, for tests).
    ``precision``: "fp32", or "bf16" / "fp16" (autocast; on GPUs).
    """
    spec = name if isinstance(name, TeacherSpec) else resolve_teacher(name)
    if mode not in TEACHER_MODES:
        raise ValueError(f"teacher mode must be one of {TEACHER_MODES}, got {mode!r}")
    if mode == "pretrained":
        model = _load_pretrained(spec, revision, cache_dir)
    else:
        model = _build_from_config(spec, mode, seed)
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    autocast = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in autocast:
        raise ValueError(f"teacher precision must be fp32, bf16 or fp16, got {precision!r}")
    return Teacher(spec, model, mode, fingerprint=teacher_fingerprint(spec, mode, seed=seed, revision=revision),
                   device=device, autocast_dtype=autocast[precision])


def specs_for(names: Sequence[str]) -> List[TeacherSpec]:
    """Specs for a list of names, in the order given, without duplicates."""
    out, seen = [], set()
    for n in names:
        spec = resolve_teacher(n)
        if spec.name not in seen:
            seen.add(spec.name)
            out.append(spec)
    return out
