"""`mlp`: an MLP on pooled Theia features (plus proprioception)."""
from __future__ import annotations

import torch
from torch import nn

from theia_ros.policies.errors import PolicyConfigError
from theia_ros.policies.torch_policy import ACTIVATIONS, TorchPolicy, check_dropout, check_int_list, make_mlp


class PooledMLPNet(nn.Module):
    """Pool each camera's features per frame to [C], optionally LayerNorm them, concatenate
    cameras x history and the flattened proprio, then an MLP."""

    def __init__(self, layout: str, pool: str, dim: int, n_cameras: int, history: int, n_proprio: int,
                 n_action: int, hidden_sizes, activation: str, feature_norm: bool, dropout: float):
        super().__init__()
        self.layout = layout
        self.pool = pool
        self.norm = nn.LayerNorm(dim) if feature_norm else nn.Identity()
        in_dim = n_cameras * history * dim + history * n_proprio
        self.mlp = make_mlp(in_dim, hidden_sizes, n_action, activation, dropout=dropout)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, *feature_shape] -> [B, H, C]."""
        if self.layout == "vector":
            return x
        if self.layout == "map":  # [B, H, C, h, w]
            x = x.flatten(3).transpose(2, 3)
        elif self.layout == "tokens_cls":  # [B, H, 1+N, C]
            if self.pool == "cls":
                return x[:, :, 0]
            x = x[:, :, 1:]
        return x.amax(dim=2) if self.pool == "max" else x.mean(dim=2)

    def forward(self, features: list[torch.Tensor], proprio: torch.Tensor | None) -> torch.Tensor:
        x = torch.stack([self.pooled(f) for f in features], dim=1)  # [B, K, H, C]
        parts = [self.norm(x).flatten(1)]
        if proprio is not None:
            parts.append(proprio.flatten(1))
        return self.mlp(torch.cat(parts, dim=1))


class PooledMLPPolicy(TorchPolicy):
    """MLP on pooled features of each camera x history frame, concatenated with proprio.

    Accepts every representation: vectors (cls/mean/max) are used as they are; tokens [N, C]
    and maps [C, H, W] are pooled over positions; all_tokens drop CLS unless ``pool: cls``.

    Params: hidden_sizes [256, 256]; activation "relu" (relu, gelu, silu, tanh, elu,
    leaky_relu); pool "mean" | "max" | "cls" (all_tokens only); feature_norm True (LayerNorm
    of each pooled vector, which keeps the scale of raw ViT features in check); dropout 0.0;
    seed None.
    """

    name = "mlp"
    default_params = {**TorchPolicy.default_params, "hidden_sizes": [256, 256], "activation": "relu",
                      "pool": "mean", "feature_norm": True, "dropout": 0.0}

    def build_network(self) -> nn.Module:
        o, p, label = self.observation_spec, self.params, self._label()
        if o.layout == "other":
            raise PolicyConfigError(f"{label}: cannot pool features of shape {o.feature_shape}")
        if p["pool"] not in ("mean", "max", "cls"):
            raise PolicyConfigError(f"{label}: 'pool' must be mean, max or cls, got {p['pool']!r}")
        if p["pool"] == "cls" and o.layout != "tokens_cls":
            raise PolicyConfigError(f"{label}: pool 'cls' needs representation all_tokens, got {o.representation!r}")
        if p["activation"] not in ACTIVATIONS:
            raise PolicyConfigError(f"{label}: unknown activation {p['activation']!r}; known: {sorted(ACTIVATIONS)}")
        if not isinstance(p["feature_norm"], bool):
            raise PolicyConfigError(f"{label}: 'feature_norm' must be true or false")
        return PooledMLPNet(o.layout, p["pool"], o.feature_dim, len(o.cameras), o.history, len(o.proprio_joints),
                            self.action_spec.dim, check_int_list(label, p["hidden_sizes"], "hidden_sizes"),
                            p["activation"], p["feature_norm"], check_dropout(label, p["dropout"]))
