"""Shared base of the learned (torch) policies: module, normalisation, batching, weights.

A :class:`TorchPolicy` owns ``policy.module`` (:class:`PolicyModule`), an ``nn.Module`` that
holds the network (``module.net``) and the normalisation buffers ``proprio_mean``,
``proprio_std`` (per proprio joint) and ``action_mean``, ``action_std`` (per action dim).
They default to 0 / 1 (identity); training code sets them with :meth:`TorchPolicy.set_normalization`
and they are saved with the weights.

Batches (:meth:`TorchPolicy.predict_batch`, e.g. from a training set)::

    {"features": {camera: float tensor [B, history, *feature_shape]},
     "proprio": float tensor [B, history, n_proprio_joints]}      # absent without proprio joints

Subclasses implement :meth:`TorchPolicy.build_network`, whose module's
``forward(features: list[Tensor], proprio: Tensor | None) -> Tensor [B, action_dim]`` gets the
cameras in ``observation_spec.cameras`` order and the *normalised* proprio, and returns
*normalised* actions.
"""
from __future__ import annotations

import abc
import contextlib
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from theia_ros.policies.errors import PolicyConfigError, PolicyError
from theia_ros.policies.policy import Policy
from theia_ros.policies.specs import Observation
from theia_ros.weights import CheckpointError, shape_mismatches

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh, "elu": nn.ELU,
               "leaky_relu": nn.LeakyReLU}


class PolicyModule(nn.Module):
    """Network plus normalisation buffers; ``forward`` maps raw inputs to normalised actions."""

    def __init__(self, net: nn.Module, n_proprio: int, n_action: int):
        super().__init__()
        self.net = net
        self.register_buffer("proprio_mean", torch.zeros(n_proprio))
        self.register_buffer("proprio_std", torch.ones(n_proprio))
        self.register_buffer("action_mean", torch.zeros(n_action))
        self.register_buffer("action_std", torch.ones(n_action))

    def forward(self, features: list[torch.Tensor], proprio: torch.Tensor | None) -> torch.Tensor:
        if proprio is not None:
            proprio = (proprio - self.proprio_mean) / self.proprio_std
        return self.net(features, proprio)

    def unnormalize_actions(self, actions: torch.Tensor) -> torch.Tensor:
        return actions * self.action_std + self.action_mean

    def normalize_actions(self, actions: torch.Tensor) -> torch.Tensor:
        return (actions - self.action_mean) / self.action_std


class TorchPolicy(Policy):
    """A policy whose computation is a torch ``nn.Module`` (float32).

    Params common to all torch policies: ``seed`` (int or None): seeds the weight
    initialisation without touching the global RNG.
    """

    default_params = {"seed": None}

    def __init__(self, observation_spec, action_spec, params=None, **overrides):
        super().__init__(observation_spec, action_spec, params, **overrides)
        seed = self.params["seed"]
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise PolicyConfigError(f"{self._label()}: 'seed' must be an int or null, got {seed!r}")
        rng = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
        with rng:
            if seed is not None:
                torch.manual_seed(seed)
            net = self.build_network()
        self.module = PolicyModule(net, len(observation_spec.proprio_joints), action_spec.dim)
        self.module.eval()

    @abc.abstractmethod
    def build_network(self) -> nn.Module:
        """The network: ``forward(features: list[Tensor], proprio: Tensor | None)`` -> [B, action_dim]."""

    # ---- device

    @property
    def device(self) -> torch.device:
        return self.module.proprio_mean.device

    def to(self, device) -> "TorchPolicy":
        self.module.to(device)
        return self

    # ---- normalisation

    def set_normalization(self, *, proprio_mean=None, proprio_std=None, action_mean=None, action_std=None) -> None:
        """Set any of the per-dimension statistics (array-likes; std must be > 0)."""
        n_p, n_a = len(self.observation_spec.proprio_joints), self.action_spec.dim
        for name, value, n in (("proprio_mean", proprio_mean, n_p), ("proprio_std", proprio_std, n_p),
                               ("action_mean", action_mean, n_a), ("action_std", action_std, n_a)):
            if value is None:
                continue
            t = torch.as_tensor(np.asarray(value, dtype=np.float32)).reshape(-1)
            if t.numel() != n:
                raise PolicyConfigError(f"{name} has {t.numel()} values, expected {n}")
            if not torch.isfinite(t).all() or (name.endswith("std") and (t <= 0).any()):
                raise PolicyConfigError(f"{name} must be finite" + (" and > 0" if name.endswith("std") else ""))
            getattr(self.module, name).copy_(t)

    def normalize_actions(self, actions: torch.Tensor) -> torch.Tensor:
        """Raw actions [B, action_dim] -> the normalised space :meth:`predict_batch` (normalized=True) uses."""
        return self.module.normalize_actions(actions.to(self.device, torch.float32))

    # ---- batches

    def predict_batch(self, batch: Mapping, *, normalized: bool = False) -> torch.Tensor:
        """Actions [B, action_dim] for a batch (differentiable; honours the module's train/eval
        mode). ``normalized=True`` returns them in the normalised space (for training losses)."""
        spec = self.observation_spec
        if "features" not in batch or not isinstance(batch["features"], Mapping):
            raise PolicyError("batch needs a 'features' mapping camera -> tensor")
        feats = []
        bsize = None
        for cam in spec.cameras:
            if cam not in batch["features"]:
                raise PolicyError(f"batch lacks features of camera {cam!r} (has {sorted(batch['features'])})")
            x = torch.as_tensor(batch["features"][cam]).to(self.device, torch.float32)
            if tuple(x.shape[1:]) != (spec.history, *spec.feature_shape):
                raise PolicyError(f"camera {cam!r}: batch features have shape {tuple(x.shape)}, expected "
                                  f"[B, {spec.history}, {', '.join(map(str, spec.feature_shape))}]")
            bsize = x.shape[0] if bsize is None else bsize
            if x.shape[0] != bsize:
                raise PolicyError("batch features of the cameras have different batch sizes")
            feats.append(x)
        proprio = None
        if spec.proprio_joints:
            if batch.get("proprio") is None:
                raise PolicyError(f"batch lacks 'proprio' for joints {spec.proprio_joints}")
            proprio = torch.as_tensor(batch["proprio"]).to(self.device, torch.float32)
            if tuple(proprio.shape) != (bsize, spec.history, len(spec.proprio_joints)):
                raise PolicyError(f"batch proprio has shape {tuple(proprio.shape)}, expected "
                                  f"[{bsize}, {spec.history}, {len(spec.proprio_joints)}]")
        out = self.module(feats, proprio)
        return out if normalized else self.module.unnormalize_actions(out)

    def _act(self, observation: Observation) -> np.ndarray:
        # act() checked the observation against the spec: a batch of one goes straight to the module
        feats = [self._tensor(observation.features[cam]) for cam in self.observation_spec.cameras]
        proprio = self._tensor(observation.proprio) if self.observation_spec.proprio_joints else None
        was_training = self.module.training
        if was_training:
            self.module.eval()
        try:
            with torch.inference_mode():
                out = self.module.unnormalize_actions(self.module(feats, proprio))
        finally:
            if was_training:
                self.module.train()
        return out[0].to("cpu", torch.float64).numpy()

    def _tensor(self, array) -> torch.Tensor:
        """float32 tensor [1, *array.shape] on the policy's device."""
        return torch.from_numpy(np.asarray(array, dtype=np.float32)[None]).to(self.device)

    # ---- weights

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.module.state_dict().items()}

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        own = self.module.state_dict()
        problems = shape_mismatches({k: v.shape for k, v in own.items()}, {k: v.shape for k, v in tensors.items()})
        if problems:
            raise CheckpointError(f"weights do not fit {self._label()} with this config: " + "; ".join(problems))
        bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise CheckpointError(f"weights contain non-finite values in {bad[:10]}")
        self.module.load_state_dict({k: v.to(self.device) for k, v in tensors.items()}, strict=True)

    def _read_weights(self, path):
        from safetensors.torch import load_file
        return load_file(str(path))

    def _write_weights(self, path, tensors, metadata):
        from safetensors.torch import save_file
        save_file(tensors, str(path), metadata=metadata)


def make_mlp(in_dim: int, hidden: Sequence[int], out_dim: int, activation: str = "relu",
             batch_norm: bool = False, dropout: float = 0.0) -> nn.Sequential:
    """Linear [-> BatchNorm1d] -> activation [-> Dropout] per hidden size, then a Linear."""
    if activation not in ACTIVATIONS:
        raise PolicyConfigError(f"unknown activation {activation!r}; known: {sorted(ACTIVATIONS)}")
    layers: list[nn.Module] = []
    d = in_dim
    for h in hidden:
        layers.append(nn.Linear(d, h))
        if batch_norm:
            layers.append(nn.BatchNorm1d(h))
        layers.append(ACTIVATIONS[activation]())
        if dropout:
            layers.append(nn.Dropout(dropout))
        d = h
    layers.append(nn.Linear(d, out_dim))
    return nn.Sequential(*layers)


def check_int_list(label: str, value, name: str) -> list[int]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        raise PolicyConfigError(f"{label}: '{name}' must be a list of positive ints, got {value!r}")
    return list(value)


def check_dropout(label: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise PolicyConfigError(f"{label}: 'dropout' must be in [0, 1), got {value!r}")
    return float(value)
