"""A lean, export-friendly re-statement of Theia's forward pass, sharing the model's weights.

Same mathematics as ``TheiaModel.features_from_pixels`` / ``teacher_from_pixels`` (DeiT backbone
as transformers' ViTModel computes it, plus the lconv heads), fewer and larger operations:

* q, k and v projections packed into one matmul per layer;
* the token stream kept as a 2-D [batch x 197, C] matrix, so every projection is one GEMM with
  its bias folded in (ONNX Runtime turns these into Gemm / FusedGemm nodes);
* attention as a single operation: ``scaled_dot_product_attention`` in torch, or, for ONNX
  export (``onnx_attention=True``), a custom op that the exporter writes as ONNX Runtime's fused
  ``com.microsoft.MultiHeadAttention`` kernel.

Any input size, as the model: position embeddings interpolated to the patch grid (encoder.model.
interpolate_position_embeddings); with ``input_size`` given, the graph takes that size only and holds
the interpolated embeddings as a constant (what exported engines use).

Backends check it against the model itself on the validation input (cosine >= 0.9999 in fp32),
so a drift between this file and the model cannot go unnoticed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from theia_ros.encoder.model import check_pos_interpolation, interpolate_position_embeddings
from theia_ros.representations import check_representation, is_teacher, select_representation, teacher_of


@torch.library.custom_op("theia_ros::multi_head_attention", mutates_args=())
def multi_head_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Self-attention on [B, S, D] q/k/v (D = heads x head dim) -> [B, S, D], scale 1/sqrt(head dim)."""
    return _sdpa(query, key, value, num_heads)


@multi_head_attention.register_fake
def _(query, key, value, num_heads):
    return torch.empty_like(query)


def _sdpa(query, key, value, num_heads):
    batch, seq, dim = query.shape
    head = dim // num_heads

    def split(x):
        return x.view(batch, seq, num_heads, head).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(query), split(key), split(value))
    return out.transpose(1, 2).reshape(batch, seq, dim)


def onnx_translation_table():
    """{custom op: onnxscript function} for torch.onnx.export(custom_translation_table=...):
    the attention op becomes com.microsoft.MultiHeadAttention (ONNX Runtime contrib op)."""
    import onnx
    import onnxscript

    # ONNX registers no schemas for ONNX Runtime's contrib ops; describe the part we use (not
    # registered globally, only handed to the op builder)
    schema = onnx.defs.OpSchema(
        "MultiHeadAttention", "com.microsoft", 1,
        inputs=[onnx.defs.OpSchema.FormalParameter(name, "T") for name in ("query", "key", "value")],
        outputs=[onnx.defs.OpSchema.FormalParameter("output", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "float tensors")],
        attributes=[onnx.defs.OpSchema.Attribute("num_heads", onnx.defs.OpSchema.AttrType.INT, "heads")],
    )
    mha_op = onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1), "MultiHeadAttention", schema)

    def mha(query, key, value, num_heads: int):
        return mha_op(query, key, value, num_heads=num_heads)

    return {torch.ops.theia_ros.multi_head_attention.default: mha}


class _LeanLayer(nn.Module):
    def __init__(self, layer, num_heads):
        super().__init__()
        att = layer.attention
        self.num_heads = num_heads
        self.ln1, self.ln2 = layer.layernorm_before, layer.layernorm_after
        qkv = nn.Linear(att.q_proj.in_features, 3 * att.q_proj.out_features, device=att.q_proj.weight.device,
                        dtype=att.q_proj.weight.dtype)
        with torch.no_grad():
            qkv.weight.copy_(torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight]))
            qkv.bias.copy_(torch.cat([att.q_proj.bias, att.k_proj.bias, att.v_proj.bias]))
        qkv.requires_grad_(False)
        self.qkv, self.proj = qkv, att.o_proj
        self.fc1, self.fc2 = layer.mlp.fc1, layer.mlp.fc2

    def forward(self, x, batch: int, seq: int, onnx_attention: bool):
        dim = x.shape[-1]
        q, k, v = self.qkv(self.ln1(x)).view(batch, seq, 3 * dim).chunk(3, dim=-1)
        if onnx_attention:
            att = multi_head_attention(q, k, v, self.num_heads)
        else:
            att = _sdpa(q.contiguous(), k.contiguous(), v.contiguous(), self.num_heads)
        x = x + self.proj(att.reshape(batch * seq, dim))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class LeanTheia(nn.Module):
    """pixels [B, 3, H, W] -> one representation (or one teacher's map), like
    ``model.export_module(representation)`` but restated for speed (see module docstring).
    ``input_size`` (height, width): take that size only, its position embeddings precomputed."""

    def __init__(self, model, representation="tokens", onnx_attention=False, input_size=None,
                 pos_interpolation="scale_factor"):
        super().__init__()
        bb = model.backbone
        emb = bb.embeddings
        check_pos_interpolation(pos_interpolation)
        self.representation = representation
        self.onnx_attention = onnx_attention
        self.grid = model.grid
        self.patch_size = model.spec.patch_size
        self.pos_interpolation = pos_interpolation
        self.patch = emb.patch_embeddings.projection
        self.cls_token, self.position_embeddings = emb.cls_token, emb.position_embeddings
        self.input_size = None if input_size is None else (int(input_size[0]), int(input_size[1]))
        fixed = None
        if self.input_size is not None:
            with torch.no_grad():
                fixed = model.position_embeddings_for(*self.input_size, pos_interpolation).detach().clone()
        self.register_buffer("fixed_position_embeddings", fixed, persistent=False)
        num_heads = model.spec.num_heads
        self.layers = nn.ModuleList(_LeanLayer(layer, num_heads) for layer in bb.layers)
        self.norm = bb.layernorm
        self.head = None
        if is_teacher(representation):
            self.head = model.heads[model.head_name(teacher_of(representation))]
            if self.input_size is not None:
                model.check_teacher_input(*self.input_size)
        else:
            check_representation(representation)

    def forward(self, pixels):
        batch, _, height, width = pixels.shape
        if self.input_size is not None:
            if (height, width) != self.input_size:
                raise ValueError(f"this graph takes {self.input_size[0]}x{self.input_size[1]} pixels (height x "
                                 f"width), got {tuple(pixels.shape)}")
            position_embeddings = self.fixed_position_embeddings
        else:
            if self.head is not None and (height, width) != (self.grid * self.patch_size,) * 2:
                raise ValueError(f"the teacher heads take {self.grid * self.patch_size}x{self.grid * self.patch_size} "
                                 f"inputs only, got {height}x{width} (height x width)")
            position_embeddings = interpolate_position_embeddings(self.position_embeddings, height, width,
                                                                  self.pos_interpolation, self.patch_size)
        grid = (height // self.patch_size, width // self.patch_size)
        x = self.patch(pixels).flatten(2).transpose(1, 2)                     # [B, rows * columns, C]
        x = torch.cat([self.cls_token.expand(batch, -1, -1), x], dim=1) + position_embeddings
        seq, dim = x.shape[1], x.shape[2]
        x = x.reshape(batch * seq, dim)
        for layer in self.layers:
            x = layer(x, batch, seq, self.onnx_attention)
        tokens = self.norm(x).view(batch, seq, dim)
        if self.head is not None:
            return self.head(tokens[:, 1:])
        return select_representation(tokens, self.representation, grid)
