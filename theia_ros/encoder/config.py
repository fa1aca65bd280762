"""The encoder's vocabulary and defaults, plain Python (no torch): published variants, backbones,
teachers, the config.json fields that define the network, and how the encoder runs unless told
otherwise (the one place for the defaults and choices of the node, the CLI and FeatureEncoder)."""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Dict, List, Mapping, Tuple

from theia_ros.weights import CheckpointError

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
TEACHER_SETS = {
    "cdiv": ("google/vit-huge-patch14-224-in21k", "facebook/dinov2-large", "openai/clip-vit-large-patch14"),
    "cddsv": tuple(TEACHER_FEATURE_SIZES),
}
TEACHER_SHORT_NAMES = {  # friendly aliases accepted by forward(teachers=...)
    "vit": "google/vit-huge-patch14-224-in21k",
    "dinov2": "facebook/dinov2-large",
    "clip": "openai/clip-vit-large-patch14",
    "sam": "facebook/sam-vit-huge",
    "depth_anything": "LiheYoung/depth-anything-large-hf",
}

DEFAULT_MODEL = f"{HUB_ORGANISATION}/theia-tiny-patch16-224-cddsv"
#: How the encoder runs unless told otherwise: the one place for these defaults. The encoder node's
#: parameters and the CLI's shared encoder options take them from here; backends.factory.create_encoder takes
#: the rest but defaults to eager torch on the CPU (the reference engine). threads 0 keeps torch's own
#: default.
ENCODER_DEFAULTS = {
    "model": DEFAULT_MODEL,
    "seed": 0,
    "backend": "auto",
    "precision": "fp32",
    "device": "auto",
    "max_batch": 4,
    "representation": "tokens",
    "output_dtype": "float32",
    "threads": 0,
}
BACKEND_CHOICES = ("auto", "torch", "onnxruntime", "openvino", "tensorrt")
PRECISION_CHOICES = ("fp32", "fp16", "bf16", "int8")
OUTPUT_DTYPE_CHOICES = ("float32", "float16")

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
        for name, members in TEACHER_SETS.items():
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
        "target_feature_sizes": {t: list(TEACHER_FEATURE_SIZES[t]) for t in TEACHER_SETS[teacher_set]},
        "feature_reduce_method": None,
        "num_reg_tokens": 0,
        "feature_neck": False,
    }


def read_config(path: Path) -> TheiaConfig:
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
