"""`theia_head`: the Theia paper's downstream policy head on patch tokens.

tokens [196, C] -> map [C, 14, 14]; cameras and history frames stacked on channels
([K*H*C, 14, 14], camera-major, oldest frame first) ->
Conv 4x4/2 (pad 1) -> 256 x 7x7 -> LayerNorm -> ReLU ->
Conv 3x3/2 -> 256 x 3x3 -> LayerNorm -> ReLU ->
Conv 3x3 -> 256 x 1x1 -> LayerNorm -> ReLU -> flatten ->
concat flattened (normalised) proprio -> MLP (Linear -> BatchNorm1d -> ReLU per hidden layer)
-> action. LayerNorms normalise over (C, H, W) of their feature map.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

from theia_ros.policies.errors import PolicyConfigError
from theia_ros.policies.torch_policy import TorchPolicy, check_dropout, check_int_list, make_mlp


def conv_sizes(grid: int) -> tuple[int, int, int]:
    """Spatial sizes after the three convolutions for a grid x grid input (14 -> 7, 3, 1)."""
    s1 = (grid + 2 - 4) // 2 + 1
    s2 = (s1 - 3) // 2 + 1
    s3 = s2 - 3 + 1
    return s1, s2, s3


class TheiaHeadNet(nn.Module):
    def __init__(self, layout: str, grid: int, dim: int, n_cameras: int, history: int, n_proprio: int,
                 n_action: int, channels: int, mlp_hidden, dropout: float):
        super().__init__()
        self.layout = layout
        self.grid = grid
        s1, s2, s3 = conv_sizes(grid)
        self.encoder = nn.Sequential(OrderedDict([
            ("conv1", nn.Conv2d(n_cameras * history * dim, channels, kernel_size=4, stride=2, padding=1)),
            ("norm1", nn.LayerNorm([channels, s1, s1])),
            ("relu1", nn.ReLU()),
            ("conv2", nn.Conv2d(channels, channels, kernel_size=3, stride=2)),
            ("norm2", nn.LayerNorm([channels, s2, s2])),
            ("relu2", nn.ReLU()),
            ("conv3", nn.Conv2d(channels, channels, kernel_size=3, stride=1)),
            ("norm3", nn.LayerNorm([channels, s3, s3])),
            ("relu3", nn.ReLU()),
            ("flatten", nn.Flatten()),
        ]))
        self.mlp = make_mlp(channels * s3 * s3 + history * n_proprio, mlp_hidden, n_action, "relu",
                            batch_norm=True, dropout=dropout)

    def to_map(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, *feature_shape] -> [B, H, C, grid, grid]."""
        if self.layout == "map":
            return x
        if self.layout == "tokens_cls":
            x = x[:, :, 1:]
        b, h, n, c = x.shape
        return x.transpose(2, 3).reshape(b, h, c, self.grid, self.grid)  # row-major patch grid

    def forward(self, features: list[torch.Tensor], proprio: torch.Tensor | None) -> torch.Tensor:
        maps = torch.stack([self.to_map(f) for f in features], dim=1)  # [B, K, H, C, g, g]
        x = self.encoder(maps.flatten(1, 3))
        if proprio is not None:
            x = torch.cat([x, proprio.flatten(1)], dim=1)
        return self.mlp(x)


class TheiaHeadPolicy(TorchPolicy):
    """Conv head of the Theia paper on spatial features (tokens, all_tokens or spatial).

    Params: channels 256 (conv width); mlp_hidden [256, 256]; dropout 0.0; seed None.
    BatchNorm runs in eval mode in :meth:`act` (running statistics); training code puts
    ``policy.module`` in train mode and needs batches of more than one sample.
    """

    name = "theia_head"
    default_params = {**TorchPolicy.default_params, "channels": 256, "mlp_hidden": [256, 256], "dropout": 0.0}

    def build_network(self) -> nn.Module:
        o, p, label = self.observation_spec, self.params, self._label()
        if o.layout == "map":
            if o.feature_shape[1] != o.feature_shape[2]:
                raise PolicyConfigError(f"{label}: needs a square feature map, got {o.feature_shape}")
            grid = o.feature_shape[1]
        elif o.layout in ("tokens", "tokens_cls"):
            n = o.feature_shape[0] - (1 if o.layout == "tokens_cls" else 0)
            grid = math.isqrt(n)
            if grid * grid != n:
                raise PolicyConfigError(f"{label}: {n} tokens do not form a square grid")
        else:
            raise PolicyConfigError(f"{label}: needs spatial features (tokens, all_tokens or spatial), got "
                                    f"{o.representation!r} {o.feature_shape}")
        if conv_sizes(grid)[2] != 1:
            raise PolicyConfigError(f"{label}: a {grid}x{grid} grid does not reduce to 1x1 "
                                    f"(sizes {conv_sizes(grid)}); Theia gives 14x14")
        channels = p["channels"]
        if isinstance(channels, bool) or not isinstance(channels, int) or channels <= 0:
            raise PolicyConfigError(f"{label}: 'channels' must be a positive int, got {channels!r}")
        return TheiaHeadNet(o.layout, grid, o.feature_dim, len(o.cameras), o.history, len(o.proprio_joints),
                            self.action_spec.dim, channels, check_int_list(label, p["mlp_hidden"], "mlp_hidden"),
                            check_dropout(label, p["dropout"]))

    @property
    def spatial_sizes(self) -> tuple[int, int, int]:
        """Spatial sizes after conv1, conv2, conv3 (7, 3, 1 for Theia's 14x14 grid)."""
        return conv_sizes(self.module.net.grid)
