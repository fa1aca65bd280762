"""The published checkpoint layout, plain Python: key names (transformers 4.x ``ViTModel`` names
under ``backbone.model.``, as the published Theia checkpoints store them) <-> this package's module
names (transformers 5.x), the keys' reference order, and each key's shape, computed from the config
alone (no module is built, no weight allocated)."""
from __future__ import annotations

import re
from typing import Dict, Iterable, List, Mapping, Optional, Tuple, Union

from theia_ros.encoder.config import BackboneSpec, TheiaConfig, variant_config
from theia_ros.weights import CheckpointError

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


def _backbone_shapes(spec: BackboneSpec) -> Dict[str, Tuple[int, ...]]:
    """Backbone key (without the ``backbone.model.`` prefix; layers as layer 0) -> shape."""
    d, m, p = spec.hidden_size, spec.intermediate_size, spec.patch_size
    square, vector = (d, d), (d,)
    return {
        "embeddings.cls_token": (1, 1, d),
        "embeddings.position_embeddings": (1, spec.num_patches + 1, d),
        "embeddings.patch_embeddings.projection.weight": (d, 3, p, p),
        "embeddings.patch_embeddings.projection.bias": vector,
        **{f"attention.attention.{name}.{param}": square if param == "weight" else vector
           for name in ("query", "key", "value") for param in ("weight", "bias")},
        "attention.output.dense.weight": square, "attention.output.dense.bias": vector,
        "intermediate.dense.weight": (m, d), "intermediate.dense.bias": (m,),
        "output.dense.weight": (d, m), "output.dense.bias": vector,
        **{f"{norm}.{param}": vector for norm in ("layernorm_before", "layernorm_after", "layernorm")
           for param in ("weight", "bias")},
    }


def _head_shapes(in_dim: int, target: Tuple[int, int, int], grid: int, hidden_size_factor: float):
    """lconv head module (``_HEAD_MODULES``) -> (weight shape, bias shape); see model.LConvHead."""
    out_dim, height, width = target
    hidden = int(in_dim * hidden_size_factor)
    side = grid + 2  # the transposed 3x3 convolution pads the patch grid by one on each side
    if (height, width) == (side, side):
        norm_sides = (side, side, side)
    elif (height, width) == (64, 64) and side == 16:
        norm_sides = (16, 31, 64)  # two stride-2 transposed convolutions: 16 -> 31 -> 64
    else:
        raise CheckpointError(f"lconv head: unsupported target feature size {target}")
    conv = ((hidden, hidden, 3, 3), (hidden,))
    norms = [((hidden, s, s), (hidden, s, s)) for s in norm_sides]
    return {"pad.1": ((in_dim, hidden, 3, 3), (hidden,)),
            "adapter.0": norms[0], "adapter.1": conv, "adapter.3": norms[1], "adapter.4": conv,
            "adapter.6": norms[2], "adapter.8": ((out_dim, hidden), (out_dim,))}


def expected_checkpoint_shapes(config: Union[TheiaConfig, Mapping, str]) -> Dict[str, Tuple[int, ...]]:
    """Published key -> shape, in the reference order, for a variant name, a config.json dict or a
    TheiaConfig."""
    if isinstance(config, str):
        config = variant_config(config)
    if not isinstance(config, TheiaConfig):
        config = TheiaConfig.from_dict(config)
    spec = config.spec
    backbone = _backbone_shapes(spec)
    heads = {teacher: _head_shapes(spec.hidden_size, target, spec.grid, config.translator_hidden_size_factor)
             for teacher, target in config.target_feature_sizes}
    shapes = {}
    for key in checkpoint_key_order(config):
        if key.startswith(_CKPT_HEADS):
            teacher, rest = key[len(_CKPT_HEADS):].split(".", 1)  # teacher ids hold no '.'
            module, param = rest.rsplit(".", 1)
            shapes[key] = heads[teacher][module][0 if param == "weight" else 1]
        else:
            shapes[key] = backbone[re.sub(r"^encoder\.layer\.\d+\.", "", key[len(_CKPT_BACKBONE):])]
    return shapes
