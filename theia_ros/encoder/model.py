"""The Theia encoder: DeiT backbone + "lconv" translator heads, loaded from weights only.

Plain Python (torch, transformers' ViTModel, safetensors, huggingface_hub); no ROS.

    model = load_model("theaiinstitute/theia-tiny-patch16-224-cddsv")      # hub id (cache first)
    model = load_model("/path/to/checkpoint_dir")                         # config.json + model.safetensors
    model = load_model("random:theia-tiny-patch16-224-cddsv", seed=0)      # deterministic random weights
    tokens = model.forward_feature(rgb_uint8_batch)                        # [B, 196, C]
    tokens = model.forward_feature(rgb, config=PreprocessConfig(profile="isaaclab"))  # [B, (H//16)*(W//16), C]

The network is built from ``config.json`` alone; code shipped with a checkpoint is never run and
weights are read only from ``model.safetensors``, with strict key and shape checking against the
published layout (encoder.checkpoint: transformers 4.x ``ViTModel`` names under ``backbone.model.``,
renamed to this module's transformers 5.x names). encoder.config holds the variants and reads
config.json; encoder.hub resolves hub ids to local files.

``random:<variant>`` with seed N produces exactly the tensors that the conformance tool
``make_weights.py keys_<variant>.tsv DIR --seed N`` writes (same values, same per-key seeding).

Any input size: the backbone runs on pixels [B, 3, H, W] with H, W >= 16 and produces a patch grid of
(H // 16, W // 16), its position embeddings interpolated to that grid as transformers' ViTModel does
with ``interpolate_pos_encoding=True`` (:func:`interpolate_position_embeddings`; two conventions, see
there).  At 224x224 nothing is interpolated.  The translator heads were trained on the 14x14 grid of
224x224 inputs and refuse any other size.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Iterable, Mapping, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from theia_ros.encoder.checkpoint import checkpoint_key_to_module_key, expected_checkpoint_shapes, head_module_name
from theia_ros.encoder.config import TEACHER_SHORT_NAMES, BackboneSpec, TheiaConfig, read_config, variant_config
from theia_ros.encoder.hub import resolve_source
from theia_ros.preprocess import PATCH_SIZE, POS_INTERPOLATIONS, PreprocessConfig, to_model_input
from theia_ros.representations import check_representation, select_representation
from theia_ros.weights import (
    FLOAT_DTYPES,
    CheckpointError,
    check_checkpoint_shapes,
    check_finite,
    file_sha256,
    names_listing,
    read_safetensors_header,
)

__all__ = ["LConvHead", "TheiaModel", "interpolate_position_embeddings", "load_model"]


# --------------------------------------------------------------------------------------------
# Position embeddings at other input sizes
# --------------------------------------------------------------------------------------------

def check_pos_interpolation(pos_interpolation: str) -> None:
    if pos_interpolation not in POS_INTERPOLATIONS:
        raise ValueError(f"pos_interpolation must be one of {', '.join(POS_INTERPOLATIONS)}, got {pos_interpolation!r}")


def interpolate_position_embeddings(position_embeddings: torch.Tensor, height: int, width: int,
                                    pos_interpolation: str = "scale_factor",
                                    patch_size: int = PATCH_SIZE) -> torch.Tensor:
    """Position embeddings [1, 1 + S*S, C] (CLS first, an S x S grid) -> [1, 1 + gh*gw, C] for pixels
    of ``height`` x ``width``, patch grid (gh, gw) = (height // patch_size, width // patch_size), as
    transformers' ViTEmbeddings.interpolate_pos_encoding computes them:

    * unchanged when the grid has S*S patches and height == width (transformers' shortcut);
    * otherwise the patch part, as [1, C, S, S], is resampled with bicubic interpolation
      (align_corners=False), the CLS embedding kept:
      - "scale_factor" (transformers <= 4.44, the version the checkpoints record):
        ``scale_factor=((gh + 0.1) / S, (gw + 0.1) / S)``;
      - "size" (transformers >= 4.45): ``size=(gh, gw)``.
    The two differ on every other grid (tokens max abs ~1e-2 to 1e-1 apart).  Computed in float32
    (what fp32 checkpoints do) and returned in the embeddings' dtype.
    """
    check_pos_interpolation(pos_interpolation)
    num_positions = position_embeddings.shape[1] - 1
    side = int(round(num_positions ** 0.5))
    rows, columns = int(height) // patch_size, int(width) // patch_size
    if rows < 1 or columns < 1:
        raise ValueError(f"an input of {width}x{height} pixels is smaller than one {patch_size}x{patch_size} patch")
    if rows * columns == num_positions and int(height) == int(width):
        return position_embeddings
    dim = position_embeddings.shape[-1]
    cls_embedding = position_embeddings[:, :1]
    grid = position_embeddings[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2).float()
    if pos_interpolation == "scale_factor":
        # the +0.1 keeps floor(S * factor) at the wanted grid despite floating point (transformers <= 4.44)
        grid = F.interpolate(grid, scale_factor=((rows + 0.1) / side, (columns + 0.1) / side), mode="bicubic",
                             align_corners=False)
    else:
        grid = F.interpolate(grid, size=(rows, columns), mode="bicubic", align_corners=False)
    if tuple(grid.shape[-2:]) != (rows, columns):
        raise AssertionError(f"interpolated position embeddings are {tuple(grid.shape[-2:])}, "
                             f"expected {(rows, columns)}")
    grid = grid.permute(0, 2, 3, 1).reshape(1, rows * columns, dim).to(position_embeddings.dtype)
    return torch.cat([cls_embedding, grid], dim=1)


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
            total += self.heads[self.head_name(teacher)].flops()
        return total

    def head_name(self, teacher: str) -> str:
        """The name in ``heads`` of a teacher's head (teacher id or short name); ValueError if unknown."""
        teacher = TEACHER_SHORT_NAMES.get(teacher, teacher)
        name = self._head_names.get(teacher)
        if name is None:
            raise ValueError(f"unknown teacher {teacher!r}; this model has: {', '.join(self.teachers)}")
        return name

    # ---- tensor-in, tensor-out (export friendly) ------------------------------------------
    def position_embeddings_for(self, height: int, width: int, pos_interpolation: str = "scale_factor") -> torch.Tensor:
        """The position embeddings [1, 1 + gh*gw, C] for pixels of ``height`` x ``width`` (see
        :func:`interpolate_position_embeddings`): the model's own at 224x224."""
        return interpolate_position_embeddings(self.backbone.embeddings.position_embeddings, height, width,
                                               pos_interpolation, self.spec.patch_size)

    def patch_grid(self, height: int, width: int) -> Tuple[int, int]:
        """(rows, columns) of the patch grid of pixels of ``height`` x ``width``."""
        return (int(height) // self.spec.patch_size, int(width) // self.spec.patch_size)

    def encode_pixels(self, pixels: torch.Tensor, pos_interpolation: str = "scale_factor",
                      position_embeddings: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Preprocessed pixels [B, 3, H, W] -> all tokens [B, 1 + gh*gw, C] (CLS first), final LayerNorm
        applied; (gh, gw) = (H // 16, W // 16).  What transformers' ViTModel(pixels,
        interpolate_pos_encoding=True).last_hidden_state holds.  ``position_embeddings``: precomputed
        :meth:`position_embeddings_for` of this size (exported graphs keep them as a constant)."""
        bb = self.backbone
        emb = bb.embeddings
        pixels = pixels.to(self.dtype)
        batch, _, height, width = pixels.shape
        if position_embeddings is None:
            position_embeddings = self.position_embeddings_for(height, width, pos_interpolation)
        hidden = emb.patch_embeddings.projection(pixels).flatten(2).transpose(1, 2)
        hidden = torch.cat([emb.cls_token.expand(batch, -1, -1), hidden], dim=1) + position_embeddings
        for layer in bb.layers:
            hidden = layer(hidden)
        return bb.layernorm(hidden)

    def features_from_pixels(self, pixels: torch.Tensor, representation: str = "tokens",
                             pos_interpolation: str = "scale_factor") -> torch.Tensor:
        """Preprocessed pixels [B, 3, H, W] (see preprocess.to_model_input) -> features.

        representation: "tokens" [B, N, C] (patch tokens, row-major; N = 196 = 14x14 at 224x224,
        (H // 16) * (W // 16) otherwise; what robots use), "cls" [B, C], "mean" / "max" [B, C] (pooled
        over patch tokens), "all_tokens" [B, 1 + N, C] (CLS first), "spatial" [B, C, H // 16, W // 16].
        pos_interpolation: "scale_factor" or "size", how position embeddings reach a grid other than
        14x14 (see :func:`interpolate_position_embeddings`).
        """
        check_representation(representation)
        tokens = self.encode_pixels(pixels, pos_interpolation)
        return select_representation(tokens, representation, self.patch_grid(*pixels.shape[-2:]))

    def check_teacher_input(self, height: int, width: int) -> None:
        """ValueError unless the translator heads can take pixels of ``height`` x ``width`` (224x224 only)."""
        size = self.spec.image_size
        if (int(height), int(width)) != (size, size):
            raise ValueError(f"the teacher heads take {size}x{size} inputs only (they were trained on the "
                             f"{self.grid}x{self.grid} patch grid), got {int(height)}x{int(width)} (height x width); "
                             "use the theia profile without an input size, or a backbone representation")

    def teacher_from_pixels(self, pixels: torch.Tensor, teacher: str) -> torch.Tensor:
        """Preprocessed pixels [B, 3, 224, 224] -> one teacher's predicted feature map [B, H*W, C_teacher].
        ValueError for any other input size."""
        head = self.heads[self.head_name(teacher)]
        self.check_teacher_input(*pixels.shape[-2:])
        return head(self.encode_pixels(pixels)[:, 1:])

    def export_module(self, representation: str = "tokens", teacher: Optional[str] = None,
                      input_size: Optional[Tuple[int, int]] = None, pos_interpolation: str = "scale_factor"
                      ) -> nn.Module:
        """A module whose forward(pixels) returns one representation (or one teacher's map),
        for torch.export / ONNX / TensorRT.  With ``input_size`` (height, width) the module takes
        pixels of that size only and holds their position embeddings as a constant (an exported graph
        then has no interpolation in it)."""
        check_pos_interpolation(pos_interpolation)
        if teacher is not None:
            self.head_name(teacher)
            if input_size is not None:
                self.check_teacher_input(*input_size)
        else:
            check_representation(representation)
        return _ExportWrapper(self, representation, teacher, input_size, pos_interpolation)

    # ---- images in (uint8 RGB) ------------------------------------------------------------
    def _pixels(self, images, config: Optional[PreprocessConfig]) -> torch.Tensor:
        if isinstance(images, torch.Tensor) and images.is_floating_point():
            raise TypeError("images must be uint8 RGB [B,H,W,3]; for preprocessed float pixels "
                            "[B,3,H,W] use features_from_pixels / teacher_from_pixels")
        pixels = to_model_input(images, config)
        return pixels.to(device=self.device, dtype=self.dtype, non_blocking=True)

    def forward_feature(self, images, representation: str = "tokens",
                        config: Optional[PreprocessConfig] = None) -> torch.Tensor:
        """uint8 RGB images [B, H, W, 3] or [H, W, 3] (numpy or torch) -> features (see
        features_from_pixels), preprocessed as ``config`` says (default: the reference pipeline;
        ``config.pos_interpolation`` picks the position-embedding convention)."""
        check_representation(representation)
        pos_interpolation = config.pos_interpolation if config is not None else "scale_factor"
        with torch.inference_mode():
            return self.features_from_pixels(self._pixels(images, config), representation, pos_interpolation)

    def forward(self, images, teachers: Optional[Iterable[str]] = None,
                config: Optional[PreprocessConfig] = None) -> Dict[str, torch.Tensor]:
        """uint8 RGB images -> {teacher id: [B, H*W, C_teacher]} for ``teachers`` (default: all).
        Only the heads asked for run; unknown teacher -> ValueError; so is a ``config`` whose input
        size is not 224x224 (the heads are 224-only)."""
        if isinstance(teachers, str):
            teachers = [teachers]
        wanted = list(self.teachers) if teachers is None else list(teachers)
        names = {t: self.head_name(t) for t in wanted}
        with torch.inference_mode():
            pixels = self._pixels(images, config)
            self.check_teacher_input(*pixels.shape[-2:])
            patches = self.encode_pixels(pixels)[:, 1:]
            return {TEACHER_SHORT_NAMES.get(t, t): self.heads[name](patches) for t, name in names.items()}

    def extra_repr(self) -> str:
        return f"variant={self.variant!r}, weights_id={self.weights_id!r}, random_weights={self.random_weights}"


class _ExportWrapper(nn.Module):
    def __init__(self, model: TheiaModel, representation: str, teacher: Optional[str],
                 input_size: Optional[Tuple[int, int]] = None, pos_interpolation: str = "scale_factor"):
        super().__init__()
        self.model = model
        self.representation = representation
        self.teacher = teacher
        self.pos_interpolation = pos_interpolation
        self.input_size = None if input_size is None else (int(input_size[0]), int(input_size[1]))
        pos = None
        if self.input_size is not None:
            with torch.no_grad():
                pos = model.position_embeddings_for(*self.input_size, pos_interpolation).detach().clone()
        self.register_buffer("position_embeddings", pos, persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.input_size is not None and tuple(pixels.shape[-2:]) != self.input_size:
            raise ValueError(f"this module takes {self.input_size[0]}x{self.input_size[1]} pixels (height x width), "
                             f"got {tuple(pixels.shape[-2:])}")
        if self.teacher is not None:
            head = self.model.heads[self.model.head_name(self.teacher)]
            self.model.check_teacher_input(*pixels.shape[-2:])
            return head(self.model.encode_pixels(pixels, position_embeddings=self.position_embeddings)[:, 1:])
        tokens = self.model.encode_pixels(pixels, self.pos_interpolation, self.position_embeddings)
        return select_representation(tokens, self.representation, self.model.patch_grid(*pixels.shape[-2:]))


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

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
    dtype_name = str(dtype).replace("torch.", "")
    for key, tensor in tensors.items():
        module_key = checkpoint_key_to_module_key(key, model.teachers)
        state[module_key] = tensor.to(dtype=dtype)
        # NaN / Inf in the file, or a value too large for ``dtype``: refused, never published as features
        check_finite(key, state[module_key], where=f"checkpoint {model.model_id} (as {dtype_name})")
    model.load_state_dict(state, strict=True, assign=True)
    left = [name for name, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:  # every tensor must come from the checkpoint
        raise CheckpointError(f"{model.model_id}: tensors not set by the checkpoint: {names_listing(left)}")
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return model.to(device)


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
        tensors = {k: torch.from_numpy(_random_tensor(k, shape, int(seed), i))
                   for i, (k, shape) in enumerate(expected_checkpoint_shapes(config).items())}
        return _materialise(model, tensors, dtype, device)

    directory, model_id = resolve_source(source, revision, cache_dir)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint {directory} is not a directory")
    config = read_config(directory / "config.json")
    weights = directory / "model.safetensors"
    if not weights.exists():
        others = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt*"))
        hint = f" (found {', '.join(others)}; only safetensors weights are loaded)" if others else ""
        raise CheckpointError(f"missing weights file {weights}{hint}")
    header = read_safetensors_header(weights)
    check_checkpoint_shapes(expected_checkpoint_shapes(config), {k: shape for k, (_, shape) in header.items()},
                            where=str(weights))
    bad_dtypes = [f"{k} ({dt})" for k, (dt, _) in header.items() if dt not in FLOAT_DTYPES]
    if bad_dtypes:
        raise CheckpointError(f"{weights}: non-floating-point tensors: {names_listing(bad_dtypes)}")
    model = _build_empty(config, model_id=model_id)
    tensors = _load_tensors(weights)
    model.weights_id = "sha256:" + file_sha256(weights)
    return _materialise(model, tensors, dtype, device)
