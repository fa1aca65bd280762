"""The abstract :class:`Policy`: observation in, one action out; its config and checkpoint files.

Plain Python (numpy, PyYAML, safetensors); no ROS and no torch imports here. Learned policies
build on :class:`theia_ros.policies.torch_policy.TorchPolicy`. A checkpoint is a directory with
``config.yaml`` (:meth:`Policy.to_config`) and ``model.safetensors`` (:meth:`Policy.state_tensors`);
a missing, unreadable or ill-fitting one raises :class:`theia_ros.weights.CheckpointError`.
Building a policy by name (or from a checkpoint whose class is not known in advance) is the
registry's job: :func:`theia_ros.policies.registry.make_policy`.
"""
from __future__ import annotations

import abc
import copy
import inspect
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from theia_ros.policies.errors import PolicyConfigError, PolicyError
from theia_ros.policies.specs import ActionSpec, Observation, ObservationSpec
from theia_ros.weights import CheckpointError

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1


class Policy(abc.ABC):
    """Base class of all policies: observation in, one action out.

    Contract for implementers (subclass, then register an entry point in the group
    ``theia_ros.policies`` of your own package, ``name = "my_policy"``)::

        class MyPolicy(Policy):
            name = "my_policy"                       # the entry point name
            default_params = {"gain": 1.0}           # every accepted param with its default

            def __init__(self, observation_spec, action_spec, params=None, **kw):
                super().__init__(observation_spec, action_spec, params, **kw)
                ...                                  # check the specs, build the model from self.params

            def _act(self, observation):             # -> array-like [action_spec.dim]
                ...

    - :meth:`act` validates the observation against :attr:`observation_spec` (shapes, finite
      values) unless an :class:`~theia_ros.policies.buffer.ObservationBuffer` of that spec built
      it (the buffer checked every message), calls :meth:`_act`, checks its result is a finite float vector of
      ``action_spec.dim`` values, clips it to the action limits and returns float64.
      Policies raise :class:`PolicyError` (or a subclass) for anything they cannot act on.
    - :meth:`reset` clears per-episode state (history, latched targets); called before the
      first episode too. Override it (and call super) when the policy keeps state.
    - Weights: override :meth:`state_tensors` / :meth:`load_state_tensors`; they are stored
      in ``model.safetensors`` (never pickles) next to ``config.yaml``, which holds
      :meth:`to_config` (policy name, specs, params). Policies without tensors need no
      weights file.
    - Construction: ``Cls(observation_spec, action_spec, params)``, ``Cls.from_config(dict)``,
      ``Cls.from_pretrained(dir)`` or, by name or from any checkpoint,
      :func:`~theia_ros.policies.registry.make_policy` (which picks the class from the config's
      ``policy`` entry).
    """

    #: registry (entry point) name; saved in config.yaml
    name: ClassVar[str] = ""
    #: accepted params and their defaults
    default_params: ClassVar[Mapping[str, Any]] = {}

    def __init__(self, observation_spec: ObservationSpec, action_spec: ActionSpec,
                 params: Mapping[str, Any] | None = None, **overrides: Any):
        if not isinstance(observation_spec, ObservationSpec):
            raise PolicyConfigError(
                f"observation_spec must be an ObservationSpec, got {type(observation_spec).__name__}")
        if not isinstance(action_spec, ActionSpec):
            raise PolicyConfigError(f"action_spec must be an ActionSpec, got {type(action_spec).__name__}")
        self._observation_spec = observation_spec
        self._action_spec = action_spec
        merged = dict(params or {})
        merged.update(overrides)
        unknown = sorted(set(merged) - set(self.default_params))
        if unknown:
            raise PolicyConfigError(
                f"{self._label()}: unknown params {unknown}; accepted: {sorted(self.default_params)}")
        self.params: dict[str, Any] = {**_deepcopy_plain(self.default_params), **merged}

    # ---- interface

    @property
    def observation_spec(self) -> ObservationSpec:
        return self._observation_spec

    @property
    def action_spec(self) -> ActionSpec:
        return self._action_spec

    def reset(self) -> None:
        """Clear per-episode state."""

    def act(self, observation: Observation) -> np.ndarray:
        """One action, float64 [action_spec.dim], clipped to the action limits."""
        observation.ensure_valid(self._observation_spec)
        raw = self._act(observation)
        try:
            action = np.array(raw, dtype=np.float64)  # a copy: never alias policy or observation state
        except (TypeError, ValueError):
            raise PolicyError(f"{self._label()} returned a non-numeric action {type(raw).__name__}") from None
        if action.shape != (self._action_spec.dim,):
            raise PolicyError(f"{self._label()} returned an action of shape {action.shape}, "
                              f"expected ({self._action_spec.dim},)")
        if not np.isfinite(action).all():
            raise PolicyError(f"{self._label()} returned a non-finite action {action.tolist()}")
        return self._action_spec.clip(action)

    @abc.abstractmethod
    def _act(self, observation: Observation):
        """Implementation of :meth:`act` on an observation that fits :attr:`observation_spec`
        (shapes, finite values); returns [action_spec.dim]."""

    # ---- weights

    def state_tensors(self) -> dict[str, Any]:
        """Named tensors (numpy arrays or torch tensors) to store in model.safetensors."""
        return {}

    def load_state_tensors(self, tensors: Mapping[str, Any]) -> None:
        """Load what :meth:`state_tensors` returned; raise :class:`CheckpointError` on mismatch."""
        if tensors:
            raise CheckpointError(f"{self._label()} has no weights but the checkpoint holds {sorted(tensors)[:10]}")

    def _read_weights(self, path: Path) -> dict[str, Any]:
        from safetensors.numpy import load_file
        return load_file(str(path))

    def _write_weights(self, path: Path, tensors: dict[str, Any], metadata: dict[str, str]) -> None:
        from safetensors.numpy import save_file
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata=metadata)

    # ---- config and checkpoints

    def to_config(self) -> dict:
        """The dict :meth:`from_config` accepts (plain YAML types)."""
        return {
            "format_version": FORMAT_VERSION,
            "policy": self.name or dotted_name(type(self)),
            "class": dotted_name(type(self)),
            "observation": self._observation_spec.to_dict(),
            "action": self._action_spec.to_dict(),
            "params": _to_plain(self.params),
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "Policy":
        """Build from ``{"observation": {...}, "action": {...}, "params": {...}}`` (plus the
        optional ``policy`` name, which must name this class)."""
        if not isinstance(config, Mapping):
            raise PolicyConfigError(f"policy config must be a mapping, got {type(config).__name__}")
        cls._check_config_names_this_class(config)
        allowed = {"format_version", "policy", "class", "observation", "action", "params"}
        unknown = sorted(set(config) - allowed)
        if unknown:
            raise PolicyConfigError(f"unknown policy config keys {unknown}; allowed: {sorted(allowed)}")
        version = config.get("format_version", FORMAT_VERSION)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise PolicyConfigError(f"config format_version {version!r} is newer than this code ({FORMAT_VERSION})")
        for key in ("observation", "action"):
            if key not in config:
                raise PolicyConfigError(f"policy config lacks the '{key}' section")
        params = config.get("params") or {}
        if not isinstance(params, Mapping):
            raise PolicyConfigError(f"'params' must be a mapping, got {type(params).__name__}")
        return cls(ObservationSpec.from_dict(config["observation"]), ActionSpec.from_dict(config["action"]),
                   dict(params))

    @classmethod
    def _check_config_names_this_class(cls, config: Mapping[str, Any]) -> None:
        if inspect.isabstract(cls):
            raise PolicyConfigError(f"{cls.__name__} is abstract; make_policy(None, config) picks the class "
                                    "from the config's 'policy' entry")
        name = config.get("policy")
        if name is not None and name not in {cls.name, dotted_name(cls)} and config.get("class") != dotted_name(cls):
            raise PolicyConfigError(f"config is for policy {name!r}, not {cls.name or dotted_name(cls)!r}")

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write ``config.yaml`` and ``model.safetensors`` into directory `path` (created)."""
        import yaml
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = self.state_tensors()
        meta = {"policy": self.name or dotted_name(type(self)), "format_version": str(FORMAT_VERSION)}
        _atomic_write(path / CONFIG_FILE, lambda p: Path(p).write_text(
            yaml.safe_dump(self.to_config(), sort_keys=False, default_flow_style=None)))
        _atomic_write(path / WEIGHTS_FILE, lambda p: self._write_weights(Path(p), tensors, meta))
        return path

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, overrides: Mapping[str, Any] | None = None) -> "Policy":
        """Load a directory written by :meth:`save_pretrained` into this class.

        `overrides` is merged into the stored config before construction (nested mappings are
        merged, e.g. ``{"observation": {"cameras": ["cam0"]}}`` or tighter action limits); the
        weights must still fit exactly. Raises :class:`CheckpointError` for a missing or
        unreadable directory/file, a config of another policy, and weights that do not fit."""
        path = Path(path)
        config = read_config(path, overrides)
        try:
            policy = cls.from_config(config)
        except PolicyConfigError as exc:
            raise CheckpointError(f"{path / CONFIG_FILE}: {exc}") from exc
        weights = path / WEIGHTS_FILE
        if not weights.is_file():
            if policy.state_tensors():
                raise CheckpointError(f"checkpoint {path} lacks {WEIGHTS_FILE} (policy {policy._label()} has weights)")
            return policy
        try:
            tensors = policy._read_weights(weights)
        except Exception as exc:  # safetensors raises its own error type for corrupt files
            raise CheckpointError(f"{weights}: not a readable safetensors file ({type(exc).__name__}: {exc})") from exc
        try:
            policy.load_state_tensors(tensors)
        except CheckpointError as exc:
            raise CheckpointError(f"{weights}: {exc}") from exc
        return policy

    # ---- misc

    def _label(self) -> str:
        return f"policy {self.name or type(self).__name__!r}"

    def __repr__(self) -> str:
        o, a = self._observation_spec, self._action_spec
        return (f"{type(self).__name__}(cameras={o.cameras}, representation={o.representation!r}, "
                f"feature_shape={o.feature_shape}, history={o.history}, proprio={len(o.proprio_joints)}, "
                f"action={a.dim} {a.mode})")


def read_config(path: str | os.PathLike, overrides: Mapping[str, Any] | None = None) -> dict:
    """config.yaml of checkpoint directory `path` as a dict (CheckpointError if unreadable), with
    `overrides` merged in (nested mappings merged key by key)."""
    import yaml
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is not a directory (expected {CONFIG_FILE} + {WEIGHTS_FILE})")
    cfg_path = path / CONFIG_FILE
    if not cfg_path.is_file():
        raise CheckpointError(f"checkpoint {path} lacks {CONFIG_FILE}")
    try:
        config = yaml.safe_load(cfg_path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{cfg_path}: not valid YAML ({exc})") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{cfg_path}: expected a mapping, got {type(config).__name__}")
    return _deep_merge(config, overrides) if overrides else config


def _atomic_write(target: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _deep_merge(base: Mapping, override: Mapping) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def _to_plain(x):
    if isinstance(x, Mapping):
        return {str(k): _to_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_plain(v) for v in x]
    if isinstance(x, np.ndarray):
        return _to_plain(x.tolist())
    if isinstance(x, np.generic):
        return x.item()
    return x


def _deepcopy_plain(x):
    return copy.deepcopy(dict(x))


def dotted_name(cls: type) -> str:
    """``module:QualName`` of a class: how config.yaml names a policy class without an entry point."""
    return f"{cls.__module__}:{cls.__qualname__}"
