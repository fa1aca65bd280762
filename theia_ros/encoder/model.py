"""The Theia encoder: DeiT backbone + "lconv" translator heads, loaded from weights only.

Plain Python (torch, transformers' ViTModel, safetensors, huggingface_hub); no ROS.

    model = load_model("theaiinstitute/theia-tiny-patch16-224-cddsv")      # hub id (cache first)
    model = load_model("/path/to/checkpoint_dir")                         # config.json + model.safetensors
    model = load_model("random:theia-tiny-patch16-224-cddsv", seed=0)      # deterministic random weights
    tokens = model.forward_feature(rgb_uint8_batch)                        # [B, 196, C]

The network is built from ``config.json`` alone; code shipped with a checkpoint is never run and
weights are read only from ``model.safetensors``, with strict key and shape checking against the
published layout (transformers 4.x ``ViTModel`` names under ``backbone.model.``, renamed here to
transformers 5.x names by :func:`checkpoint_key_to_module_key`).

``random:<variant>`` with seed N produces exactly the tensors that the conformance tool
``make_weights.py keys_<variant>.tsv DIR --seed N`` writes (same values, same per-key seeding).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

from theia_ros.representations import REPRESENTATIONS
from theia_ros.weights import (FLOAT_DTYPES, CheckpointError, check_checkpoint_shapes, file_sha256, names_listing,
                               read_safetensors_header)
from theia_ros.preprocess import PreprocessConfig, to_model_input

__all__ = [
    "VARIANTS",
    "BACKBONES",
    "TEACHER_FEATURE_SIZES",
    "HUB_ORGANISATION",
    "TheiaConfig",
    "LConvHead",
    "TheiaModel",
    "load_model",
    "variant_config",
    "checkpoint_key_to_module_key",
    "checkpoint_key_order",
    "head_module_name",
    "module_key_to_checkpoint_key",
    "expected_checkpoint_shapes",
]

HUB_ORGANISATION = "theaiinstitute"
VARIANTS = tuple(f"theia-{size}-patch16-224-{teachers}"
                 for size in ("tiny", "small", "base") for teachers in ("cdiv", "cddsv"))


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """A DeiT backbone (plain ViT, no distillation token): patch 16, 224x224, 12 layers."""

    hidden_size: int
    num_heads: int
    intermediate_size: int
    num_layers: int = 12
    patch_size: int = 16
    image_size: int = 224
    layer_norm_eps: float = 1e-12

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid


BACKBONES: Dict[str, BackboneSpec] = {
    "facebook/deit-tiny-patch16-224": BackboneSpec(192, 3, 768),
    "facebook/deit-small-patch16-224": BackboneSpec(384, 6, 1536),
    "facebook/deit-base-patch16-224": BackboneSpec(768, 12, 3072),
}

# Published teachers and their feature maps (C, H, W), in the published checkpoints' order.
TEACHER_FEATURE_SIZES: Dict[str, Tuple[int, int, int]] = {
    "google/vit-huge-patch14-224-in21k": (1280, 16, 16),
    "facebook/dinov2-large": (1024, 16, 16),
    "openai/clip-vit-large-patch14": (1024, 16, 16),
    "facebook/sam-vit-huge": (256, 64, 64),
    "LiheYoung/depth-anything-large-hf": (32, 64, 64),
}
_TEACHER_SETS = {
    "cdiv": ("google/vit-huge-patch14-224-in21k", "facebook/dinov2-large", "openai/clip-vit-large-patch14"),
    "cddsv": tuple(TEACHER_FEATURE_SIZES),
}
_TEACHER_SHORT_NAMES = {  # friendly aliases accepted by forward(teachers=...)
    "vit": "google/vit-huge-patch14-224-in21k",
    "dinov2": "facebook/dinov2-large",
    "clip": "openai/clip-vit-large-patch14",
    "sam": "facebook/sam-vit-huge",
    "depth_anything": "LiheYoung/depth-anything-large-hf",
}


# --------------------------------------------------------------------------------------------
# config.json
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TheiaConfig:
    """The config.json fields that define the network (others are ignored)."""

    backbone: str
    target_feature_sizes: Tuple[Tuple[str, Tuple[int, int, int]], ...]
    image_size: int = 224
    translator_type: str = "lconv"
    translator_hidden_size_factor: float = 1.0

    @property
    def spec(self) -> BackboneSpec:
        return BACKBONES[self.backbone]

    @property
    def hidden_size(self) -> int:
        return self.spec.hidden_size

    @property
    def teachers(self) -> List[str]:
        return [t for t, _ in self.target_feature_sizes]

    @property
    def size(self) -> str:
        return self.backbone.split("/")[-1].split("-")[1]  # facebook/deit-<size>-patch16-224

    @property
    def variant(self) -> str:
        teachers = set(self.teachers)
        for name, members in _TEACHER_SETS.items():
            if teachers == set(members):
                return f"theia-{self.size}-patch16-224-{name}"
        return f"theia-{self.size}-patch16-224-custom"

    @classmethod
    def from_dict(cls, raw: Mapping, where: str = "config") -> "TheiaConfig":
        def fail(msg):
            raise CheckpointError(f"{where}: {msg}")

        if not isinstance(raw, Mapping):
            fail(f"expected a JSON object, got {type(raw).__name__}")
        backbone = raw.get("backbone")
        if backbone is None:
            fail("no 'backbone' field")
        if backbone not in BACKBONES:
            fail(f"unknown backbone {backbone!r}; supported: {', '.join(BACKBONES)}")
        image_size = raw.get("image_size", 224)
        if image_size != 224:
            fail(f"unsupported image_size {image_size!r} (Theia checkpoints use 224)")
        translator_type = raw.get("translator_type", "lconv")
        if translator_type != "lconv":
            fail(f"unsupported translator_type {translator_type!r} (only 'lconv' is implemented)")
        factor = raw.get("translator_hidden_size_factor", 1.0)
        if not isinstance(factor, (int, float)) or isinstance(factor, bool) or factor <= 0:
            fail(f"bad translator_hidden_size_factor {factor!r}")
        for field, allowed in (("num_reg_tokens", (0, None)), ("feature_reduce_method", (None,)),
                               ("feature_neck", (False, None))):
            if raw.get(field) not in allowed:
                fail(f"unsupported {field}={raw.get(field)!r} (published checkpoints use {allowed[0]!r})")
        sizes = raw.get("target_feature_sizes")
        if not isinstance(sizes, Mapping) or not sizes:
            fail("'target_feature_sizes' must be a non-empty object {teacher id: [C, H, W]}")
        targets = []
        for teacher, chw in sizes.items():
            if (not isinstance(chw, (list, tuple)) or len(chw) != 3
                    or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in chw)):
                fail(f"target_feature_sizes[{teacher!r}] must be [C, H, W] positive integers, got {chw!r}")
            if tuple(chw[1:]) not in ((16, 16), (64, 64)):
                fail(f"teacher {teacher!r}: unsupported feature map size {chw[1]}x{chw[2]} "
                     "(lconv heads make 16x16 or 64x64)")
            if "." in teacher or not teacher:
                fail(f"unsupported teacher id {teacher!r}")
            targets.append((teacher, tuple(int(v) for v in chw)))
        return cls(backbone=backbone, target_feature_sizes=tuple(targets), image_size=224,
                   translator_type="lconv", translator_hidden_size_factor=float(factor))


def variant_config(variant: str) -> dict:
    """The config.json contents (fields that matter) of a published variant, e.g. 'theia-tiny-patch16-224-cddsv'."""
    m = re.fullmatch(r"theia-(tiny|small|base)-patch16-224-(cdiv|cddsv)", variant or "")
    if not m:
        raise CheckpointError(f"unknown Theia variant {variant!r}; published variants: {', '.join(VARIANTS)}")
    size, teacher_set = m.groups()
    return {
        "backbone": f"facebook/deit-{size}-patch16-224",
        "image_size": 224,
        "translator_type": "lconv",
        "translator_hidden_size_factor": 1.0,
        "target_feature_sizes": {t: list(TEACHER_FEATURE_SIZES[t]) for t in _TEACHER_SETS[teacher_set]},
        "feature_reduce_method": None,
        "num_reg_tokens": 0,
        "feature_neck": False,
    }


def _read_config(path: Path) -> TheiaConfig:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"missing config file {path}") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read config file {path}: {exc}") from None
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise CheckpointError(f"cannot parse config file {path}: {exc}") from None
    return TheiaConfig.from_dict(raw, where=str(path))


# --------------------------------------------------------------------------------------------
# Translator heads ("lconv")
# --------------------------------------------------------------------------------------------

class _TokensToGrid(nn.Module):
    """[B, H*W, C] -> [B, C, H, W] (row-major patch order)."""

    def __init__(self, height: int, width: int):
        super().__init__()
        self.height, self.width = height, width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2).unflatten(2, (self.height, self.width))


class _GridToTokens(nn.Module):
    """[B, C, H, W] -> [B, H*W, C]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)


class LConvHead(nn.Module):
    """Theia's light-conv translator: patch tokens [B, 196, D] -> teacher features [B, H*W, C_t].

    Module indices follow the published state_dict (``pad.1``, ``adapter.{0,1,3,4,6,8}``):

    * ``pad``: tokens -> [D, 14, 14] -> ConvTranspose2d(k=3) -> 16x16;
    * 16x16 targets: [LayerNorm(C,16,16) -> Conv3x3 -> ReLU] x2 -> LayerNorm -> Linear;
    * 64x64 targets: LayerNorm -> ConvTranspose2d(16->31) -> ReLU -> LayerNorm ->
      ConvTranspose2d(31->64) -> ReLU -> LayerNorm -> Linear.
    """

    def __init__(self, in_dim: int, target: Tuple[int, int, int], grid: int = 14, hidden_size_factor: float = 1.0):
        super().__init__()
        out_dim, height, width = target
        hidden = int(in_dim * hidden_size_factor)
        self.target = tuple(target)
        self.pad = nn.Sequential(_TokensToGrid(grid, grid), nn.ConvTranspose2d(in_dim, hidden, kernel_size=3))
        side = grid + 2  # 16
        if (height, width) == (side, side):
            self.adapter = nn.Sequential(
                nn.LayerNorm([hidden, side, side]),
                nn.Conv2d(hidden, hidden, kernel_size=3, padding=1),
                nn.ReLU(),
                nn.LayerNorm([hidden, side, side]),
                nn.Conv2d(hidden, hidden, kernel_size=3, padding=1),
                nn.ReLU(),
                nn.LayerNorm([hidden, side, side]),
                _GridToTokens(),
                nn.Linear(hidden, out_dim),
            )
        elif (height, width) == (64, 64) and side == 16:
            self.adapter = nn.Sequential(
                nn.LayerNorm([hidden, 16, 16]),
                nn.ConvTranspose2d(hidden, hidden, kernel_size=3, stride=2, padding=1),  # 16 -> 31
                nn.ReLU(),
                nn.LayerNorm([hidden, 31, 31]),
                nn.ConvTranspose2d(hidden, hidden, kernel_size=3, stride=2, output_padding=1),  # 31 -> 64
                nn.ReLU(),
                nn.LayerNorm([hidden, 64, 64]),
                _GridToTokens(),
                nn.Linear(hidden, out_dim),
            )
        else:
            raise CheckpointError(f"lconv head: unsupported target feature size {target}")

    def forward(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.pad(patch_tokens))

    def flops(self) -> int:
        """2 x multiply-adds of one image through the head (convolutions and the linear layer)."""
        total = 0
        size = None
        for module in list(self.pad) + list(self.adapter):
            if isinstance(module, _TokensToGrid):
                size = module.height
            elif isinstance(module, nn.ConvTranspose2d):  # every input pixel scatters a k x k kernel
                k = module.kernel_size[0]
                total += 2 * size * size * module.in_channels * module.out_channels * k * k
                size = (size - 1) * module.stride[0] - 2 * module.padding[0] + k + module.output_padding[0]
            elif isinstance(module, nn.Conv2d):
                k = module.kernel_size[0]
                size = (size + 2 * module.padding[0] - k) // module.stride[0] + 1
                total += 2 * size * size * module.in_channels * module.out_channels * k * k
            elif isinstance(module, nn.Linear):
                total += 2 * size * size * module.in_features * module.out_features
        return total


# --------------------------------------------------------------------------------------------
# Key names: published checkpoint (transformers 4.x ViTModel) <-> this module (transformers 5.x)
# --------------------------------------------------------------------------------------------

_CKPT_BACKBONE = "backbone.model."
_CKPT_HEADS = "translator.translator_heads."
# per-layer sub-modules, checkpoint name -> transformers 5.x ViTLayer name, in checkpoint order
_LAYER_RENAMES = (
    ("attention.attention.query", "attention.q_proj"),
    ("attention.attention.key", "attention.k_proj"),
    ("attention.attention.value", "attention.v_proj"),
    ("attention.output.dense", "attention.o_proj"),
    ("intermediate.dense", "mlp.fc1"),
    ("output.dense", "mlp.fc2"),
    ("layernorm_before", "layernorm_before"),
    ("layernorm_after", "layernorm_after"),
)
_LAYER_TO_MODULE = dict(_LAYER_RENAMES)
_LAYER_TO_CKPT = {new: old for old, new in _LAYER_RENAMES}
_EMBEDDING_KEYS = ("embeddings.cls_token", "embeddings.position_embeddings",
                   "embeddings.patch_embeddings.projection.weight", "embeddings.patch_embeddings.projection.bias")
_HEAD_MODULES = ("pad.1", "adapter.0", "adapter.1", "adapter.3", "adapter.4", "adapter.6", "adapter.8")


def head_module_name(teacher: str) -> str:
    """The attribute name of a teacher's head inside ``TheiaModel.heads`` (ids hold '/', '-')."""
    return re.sub(r"[^0-9A-Za-z_]", "_", teacher)


def checkpoint_key_to_module_key(key: str, teachers: Iterable[str]) -> Optional[str]:
    """Published state_dict key -> this module's state_dict key; None if the key is not part of the layout.

    backbone.model.embeddings.*                      -> backbone.embeddings.*
    backbone.model.encoder.layer.N.<4.x module>.P    -> backbone.layers.N.<5.x module>.P
    backbone.model.layernorm.P                       -> backbone.layernorm.P
    translator.translator_heads.<teacher id>.REST    -> heads.<head_module_name(teacher)>.REST
    """
    if key.startswith(_CKPT_BACKBONE):
        rest = key[len(_CKPT_BACKBONE):]
        if rest in _EMBEDDING_KEYS or rest in ("layernorm.weight", "layernorm.bias"):
            return "backbone." + rest
        m = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)", rest)
        if m and m.group(2) in _LAYER_TO_MODULE:
            return f"backbone.layers.{int(m.group(1))}.{_LAYER_TO_MODULE[m.group(2)]}.{m.group(3)}"
        return None
    if key.startswith(_CKPT_HEADS):
        rest = key[len(_CKPT_HEADS):]
        for teacher in teachers:
            if rest.startswith(teacher + "."):
                return f"heads.{head_module_name(teacher)}.{rest[len(teacher) + 1:]}"
    return None


def module_key_to_checkpoint_key(key: str, teachers: Iterable[str]) -> str:
    """Inverse of :func:`checkpoint_key_to_module_key` (raises KeyError for foreign keys)."""
    if key.startswith("backbone."):
        rest = key[len("backbone."):]
        if rest in _EMBEDDING_KEYS or rest in ("layernorm.weight", "layernorm.bias"):
            return _CKPT_BACKBONE + rest
        m = re.fullmatch(r"layers\.(\d+)\.(.+)\.(weight|bias)", rest)
        if m and m.group(2) in _LAYER_TO_CKPT:
            return f"{_CKPT_BACKBONE}encoder.layer.{m.group(1)}.{_LAYER_TO_CKPT[m.group(2)]}.{m.group(3)}"
    elif key.startswith("heads."):
        name, _, rest = key[len("heads."):].partition(".")
        for teacher in teachers:
            if head_module_name(teacher) == name:
                return f"{_CKPT_HEADS}{teacher}.{rest}"
    raise KeyError(f"not a Theia module key: {key}")


def checkpoint_key_order(config: TheiaConfig) -> List[str]:
    """Every published state_dict key of ``config``, in the reference implementation's order."""
    keys = [_CKPT_BACKBONE + k for k in _EMBEDDING_KEYS]
    for i in range(config.spec.num_layers):
        for module, _ in _LAYER_RENAMES:
            keys += [f"{_CKPT_BACKBONE}encoder.layer.{i}.{module}.{p}" for p in ("weight", "bias")]
    keys += [_CKPT_BACKBONE + "layernorm.weight", _CKPT_BACKBONE + "layernorm.bias"]
    for teacher in config.teachers:
        for module in _HEAD_MODULES:
            keys += [f"{_CKPT_HEADS}{teacher}.{module}.{p}" for p in ("weight", "bias")]
    return keys


# --------------------------------------------------------------------------------------------
# safetensors: header-only reading, strict checking, hashing
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------

def _vit_config(spec: BackboneSpec):
    from transformers import ViTConfig

    return ViTConfig(
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        intermediate_size=spec.intermediate_size,
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        layer_norm_eps=spec.layer_norm_eps,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        num_channels=3,
        qkv_bias=True,
        attn_implementation="sdpa",
    )


class TheiaModel(nn.Module):
    """Theia: a DeiT backbone whose patch tokens are the robot-facing features, plus one
    translator head per teacher.  Build it with :func:`load_model`.

    Attributes: ``variant``, ``model_id``, ``hidden_size``, ``teachers``, ``random_weights``,
    ``weights_id``, ``num_parameters``, ``config`` (:class:`TheiaConfig`).
    """

    def __init__(self, config: TheiaConfig, *, variant: Optional[str] = None, model_id: str = "",
                 weights_id: str = "", random_weights: bool = False):
        super().__init__()
        from transformers import ViTModel

        self.config = config
        spec = config.spec
        self.spec = spec
        self.variant = variant or config.variant
        self.model_id = model_id
        self.weights_id = weights_id
        self.random_weights = random_weights
        self.hidden_size = spec.hidden_size
        self.teachers = config.teachers
        self.target_feature_sizes = dict(config.target_feature_sizes)
        self.grid = spec.grid
        self.backbone = ViTModel(_vit_config(spec), add_pooling_layer=False)
        self.backbone.config._attn_implementation = "sdpa"
        self.heads = nn.ModuleDict()
        self._head_names = {}
        for teacher, target in config.target_feature_sizes:
            name = head_module_name(teacher)
            if name in self.heads:
                raise CheckpointError(f"teacher ids {teacher!r} and another map to the same head name {name!r}")
            self.heads[name] = LConvHead(spec.hidden_size, target, grid=spec.grid,
                                         hidden_size_factor=config.translator_hidden_size_factor)
            self._head_names[teacher] = name

    # ---- bookkeeping ---------------------------------------------------------------------
    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def device(self) -> torch.device:
        return self.backbone.embeddings.cls_token.device

    @property
    def dtype(self) -> torch.dtype:
        return self.backbone.embeddings.cls_token.dtype

    def checkpoint_shapes(self) -> Dict[str, Tuple[int, ...]]:
        """Published state_dict key -> shape this model expects, in the reference order."""
        own = {k: tuple(v.shape) for k, v in self.state_dict().items()}
        expected = {}
        for key in checkpoint_key_order(self.config):
            module_key = checkpoint_key_to_module_key(key, self.teachers)
            expected[key] = own.pop(module_key)
        if own:  # the renaming table and the module disagree: a bug here, not in the checkpoint
            raise AssertionError(f"module keys without a checkpoint name: {sorted(own)}")
        return expected

    def info(self) -> dict:
        """A plain dict describing the model (for logs, diagnostics, the CLI)."""
        return {
            "variant": self.variant,
            "model_id": self.model_id,
            "weights_id": self.weights_id,
            "random_weights": self.random_weights,
            "num_parameters": self.num_parameters,
            "hidden_size": self.hidden_size,
            "num_tokens": self.spec.num_patches,
            "image_size": self.spec.image_size,
            "teachers": list(self.teachers),
            "target_feature_sizes": {t: list(s) for t, s in self.target_feature_sizes.items()},
            "dtype": str(self.dtype).replace("torch.", ""),
            "device": str(self.device),
        }

    def flops_per_image(self, teachers: Iterable[str] = ()) -> int:
        """2 x multiply-adds for one 224 image through the backbone (and the given heads),
        counted from the architecture (matmuls and convolutions; norms/softmax/GELU ignored)."""
        s = self.spec
        n, d, m = s.num_patches + 1, s.hidden_size, s.intermediate_size
        patch = 2 * s.num_patches * d * 3 * s.patch_size ** 2
        per_layer = (2 * n * d * 3 * d      # q, k, v projections
                     + 2 * 2 * n * n * d    # scores q k^T and the weighted sum of values
                     + 2 * n * d * d        # output projection
                     + 2 * 2 * n * d * m)   # MLP
        total = patch + s.num_layers * per_layer
        for teacher in teachers:
            total += self.heads[self._head(teacher)].flops()
        return total

    def _head(self, teacher: str) -> str:
        teacher = _TEACHER_SHORT_NAMES.get(teacher, teacher)
        name = self._head_names.get(teacher)
        if name is None:
            raise ValueError(f"unknown teacher {teacher!r}; this model has: {', '.join(self.teachers)}")
        return name

    # ---- tensor-in, tensor-out (export friendly) ------------------------------------------
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed pixels [B, 3, 224, 224] -> all tokens [B, 197, C] (CLS first), final LayerNorm applied."""
        bb = self.backbone
        hidden = bb.embeddings(pixels.to(self.dtype))
        for layer in bb.layers:
            hidden = layer(hidden)
        return bb.layernorm(hidden)

    def features_from_pixels(self, pixels: torch.Tensor, representation: str = "tokens") -> torch.Tensor:
        """Preprocessed pixels [B, 3, 224, 224] (see preprocess.to_model_input) -> features.

        representation: "tokens" [B, 196, C] (patch tokens, row-major 14x14; what robots use),
        "cls" [B, C], "mean" / "max" [B, C] (pooled over patch tokens), "all_tokens" [B, 197, C]
        (CLS first), "spatial" [B, C, 14, 14].
        """
        if representation not in REPRESENTATIONS:
            raise ValueError(f"unknown representation {representation!r}; choose from {', '.join(REPRESENTATIONS)}")
        tokens = self.encode_pixels(pixels)
        if representation == "all_tokens":
            return tokens
        if representation == "cls":
            return tokens[:, 0]
        patches = tokens[:, 1:]
        if representation == "tokens":
            return patches
        if representation == "mean":
            return patches.mean(dim=1)
        if representation == "max":
            return patches.amax(dim=1)
        return patches.transpose(1, 2).unflatten(2, (self.grid, self.grid))  # spatial

    def teacher_from_pixels(self, pixels: torch.Tensor, teacher: str) -> torch.Tensor:
        """Preprocessed pixels -> one teacher's predicted feature map [B, H*W, C_teacher]."""
        head = self.heads[self._head(teacher)]
        return head(self.encode_pixels(pixels)[:, 1:])

    def export_module(self, representation: str = "tokens", teacher: Optional[str] = None) -> nn.Module:
        """A module whose forward(pixels) returns one representation (or one teacher's map),
        for torch.export / ONNX / TensorRT."""
        if teacher is not None:
            self._head(teacher)
        elif representation not in REPRESENTATIONS:
            raise ValueError(f"unknown representation {representation!r}; choose from {', '.join(REPRESENTATIONS)}")
        return _ExportWrapper(self, representation, teacher)

    # ---- images in (uint8 RGB) ------------------------------------------------------------
    def _pixels(self, images, preprocess: Optional[PreprocessConfig]) -> torch.Tensor:
        if isinstance(images, torch.Tensor) and images.is_floating_point():
            raise TypeError("images must be uint8 RGB [B,H,W,3]; for preprocessed float pixels "
                            "[B,3,224,224] use features_from_pixels / teacher_from_pixels")
        pixels = to_model_input(images, preprocess, size=self.spec.image_size)
        return pixels.to(device=self.device, dtype=self.dtype, non_blocking=True)

    def forward_feature(self, images, representation: str = "tokens",
                        preprocess: Optional[PreprocessConfig] = None) -> torch.Tensor:
        """uint8 RGB images [B, H, W, 3] or [H, W, 3] (numpy or torch) -> features (see features_from_pixels)."""
        if representation not in REPRESENTATIONS:
            raise ValueError(f"unknown representation {representation!r}; choose from {', '.join(REPRESENTATIONS)}")
        with torch.inference_mode():
            return self.features_from_pixels(self._pixels(images, preprocess), representation)

    def forward(self, images, teachers: Optional[Iterable[str]] = None,
                preprocess: Optional[PreprocessConfig] = None) -> Dict[str, torch.Tensor]:
        """uint8 RGB images -> {teacher id: [B, H*W, C_teacher]} for ``teachers`` (default: all).
        Only the heads asked for run; unknown teacher -> ValueError."""
        if isinstance(teachers, str):
            teachers = [teachers]
        wanted = list(self.teachers) if teachers is None else list(teachers)
        names = {t: self._head(t) for t in wanted}
        with torch.inference_mode():
            patches = self.encode_pixels(self._pixels(images, preprocess))[:, 1:]
            return {_TEACHER_SHORT_NAMES.get(t, t): self.heads[name](patches) for t, name in names.items()}

    def extra_repr(self) -> str:
        return f"variant={self.variant!r}, weights_id={self.weights_id!r}, random_weights={self.random_weights}"


class _ExportWrapper(nn.Module):
    def __init__(self, model: TheiaModel, representation: str, teacher: Optional[str]):
        super().__init__()
        self.model = model
        self.representation = representation
        self.teacher = teacher

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.teacher is not None:
            return self.model.teacher_from_pixels(pixels, self.teacher)
        return self.model.features_from_pixels(pixels, self.representation)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

def expected_checkpoint_shapes(config: Union[TheiaConfig, Mapping, str]) -> Dict[str, Tuple[int, ...]]:
    """Published key -> shape for a variant name, a config.json dict or a TheiaConfig
    (built on the meta device: no weights are allocated)."""
    if isinstance(config, str):
        config = variant_config(config)
    if not isinstance(config, TheiaConfig):
        config = TheiaConfig.from_dict(config)
    return _build_empty(config).checkpoint_shapes()


def _build_empty(config: TheiaConfig, **kwargs) -> TheiaModel:
    with torch.device("meta"):
        return TheiaModel(config, **kwargs)


def _random_tensor(key: str, shape: Tuple[int, ...], seed: int, index: int) -> np.ndarray:
    """The conformance tool's recipe: N(0, 0.02), norm scales 1 + N(0, 0.1); per-key generator [seed, index]."""
    rng = np.random.default_rng([seed, index])
    norm_scale = key.endswith(".weight") and (("layernorm" in key and len(shape) == 1) or len(shape) == 3)
    if norm_scale:
        return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    return (0.02 * rng.standard_normal(shape)).astype(np.float32)


def _materialise(model: TheiaModel, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype,
                 device) -> TheiaModel:
    state = {}
    for key, tensor in tensors.items():
        module_key = checkpoint_key_to_module_key(key, model.teachers)
        state[module_key] = tensor.to(dtype=dtype)
    model.load_state_dict(state, strict=True, assign=True)
    left = [name for name, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:  # every tensor must come from the checkpoint
        raise CheckpointError(f"{model.model_id}: tensors not set by the checkpoint: {names_listing(left)}")
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return model.to(device)


def _resolve_source(source: str, revision: Optional[str], cache_dir) -> Tuple[Path, str]:
    """-> (directory holding config.json + model.safetensors, model_id)."""
    path = Path(os.path.expanduser(str(source)))
    if path.exists():
        if path.is_file():
            if path.name in ("model.safetensors", "config.json"):
                path = path.parent
            else:
                raise CheckpointError(f"{path} is a file; pass the checkpoint directory "
                                      "(holding config.json and model.safetensors)")
        return path, str(path.resolve())
    text = str(source)
    looks_like_path = text.startswith(("/", ".", "~")) or text.count("/") != 1 or text.endswith(".safetensors")
    if looks_like_path or not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text):
        raise CheckpointError(
            f"checkpoint {text!r} not found: not an existing directory, a hub id like "
            f"'{HUB_ORGANISATION}/{VARIANTS[1]}', or 'random:<variant>'")
    return _hub_snapshot(text, revision, cache_dir), text


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_cache_dir(cache_dir):
    if cache_dir is not None:
        return str(cache_dir)
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None  # huggingface_hub's default


def _hub_snapshot(repo_id: str, revision: Optional[str], cache_dir) -> Path:
    """Resolve a hub id to a local snapshot holding config.json and model.safetensors only:
    the local cache first, then (unless HF_HUB_OFFLINE) a download of just those two files."""
    from huggingface_hub import snapshot_download

    files = ["config.json", "model.safetensors"]
    cache = _hub_cache_dir(cache_dir)
    how = (f"download it where there is network access, e.g. `hf download {repo_id} config.json "
           f"model.safetensors --local-dir DIR` (older huggingface_hub: `huggingface-cli download ...`), "
           f"and pass DIR as the source, or unset HF_HUB_OFFLINE")

    def complete(folder) -> bool:
        return folder is not None and all((Path(folder) / f).is_file() for f in files)

    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=cache, allow_patterns=files,
                                   local_files_only=True)
        if complete(folder):
            return Path(folder)
    except Exception:  # noqa: BLE001  (not cached: any of several hub errors)
        pass
    if _hub_offline():
        raise CheckpointError(f"checkpoint {repo_id!r} is not in the local Hugging Face cache "
                              f"({cache or 'default cache'}) and HF_HUB_OFFLINE is set; {how}")
    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=cache, allow_patterns=files)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(
            f"could not download checkpoint {repo_id!r} ({type(exc).__name__}: {exc}); {how}") from None
    if not complete(folder):
        raise CheckpointError(f"hub repository {repo_id!r} has no config.json + model.safetensors "
                              f"(only safetensors weights are loaded)")
    return Path(folder)


def _load_tensors(path: Path) -> Dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot read safetensors file {path}: {exc}") from None


def load_model(source: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu", seed: Optional[int] = None,
               dtype: torch.dtype = torch.float32, *, revision: Optional[str] = None,
               cache_dir: Optional[Union[str, os.PathLike]] = None) -> TheiaModel:
    """Load a Theia encoder, in eval mode without gradients, on ``device`` in ``dtype``.

    ``source``:
      * a local directory with ``config.json`` + ``model.safetensors`` (published layout);
      * a hub id such as ``theaiinstitute/theia-tiny-patch16-224-cddsv`` (cached copy first; else
        download of those two files unless ``HF_HUB_OFFLINE`` is set; ``revision`` pins a commit);
      * ``random:<variant>`` (e.g. ``random:theia-tiny-patch16-224-cddsv``): deterministic random
        weights from ``seed`` (default 0), equal to ``make_weights.py ... --seed <seed>``'s.
    ``seed`` only applies to ``random:`` sources.

    Raises :class:`CheckpointError` (with the path or id) for anything wrong with the checkpoint.
    """
    source = os.fspath(source)
    if source.startswith("random:"):
        variant = source[len("random:"):]
        seed = 0 if seed is None else seed
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        config = TheiaConfig.from_dict(variant_config(variant), where=source)
        model = _build_empty(config, variant=variant, model_id=source,
                             weights_id=f"random:{variant}:seed={int(seed)}", random_weights=True)
        shapes = model.checkpoint_shapes()
        tensors = {k: torch.from_numpy(_random_tensor(k, shape, int(seed), i))
                   for i, (k, shape) in enumerate(shapes.items())}
        return _materialise(model, tensors, dtype, device)

    directory, model_id = _resolve_source(source, revision, cache_dir)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint {directory} is not a directory")
    config = _read_config(directory / "config.json")
    weights = directory / "model.safetensors"
    if not weights.exists():
        others = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt*"))
        hint = f" (found {', '.join(others)}; only safetensors weights are loaded)" if others else ""
        raise CheckpointError(f"missing weights file {weights}{hint}")
    header = read_safetensors_header(weights)
    model = _build_empty(config, model_id=model_id)
    expected = model.checkpoint_shapes()
    check_checkpoint_shapes(expected, {k: shape for k, (_, shape) in header.items()}, where=str(weights))
    bad_dtypes = [f"{k} ({dt})" for k, (dt, _) in header.items() if dt not in FLOAT_DTYPES]
    if bad_dtypes:
        raise CheckpointError(f"{weights}: non-floating-point tensors: {names_listing(bad_dtypes)}")
    tensors = _load_tensors(weights)
    model.weights_id = "sha256:" + file_sha256(weights)
    return _materialise(model, tensors, dtype, device)
