"""Policies by name: the ``theia_ros.policies`` entry point group, dotted paths, :func:`make_policy`.

A third-party package adds a policy by subclassing :class:`~theia_ros.policies.policy.Policy` and
declaring one entry point in the group :data:`ENTRY_POINT_GROUP`.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from theia_ros.policies.errors import PolicyConfigError, PolicyError, UnknownPolicyError
from theia_ros.policies.policy import CONFIG_FILE, Policy, dotted_name, read_config
from theia_ros.weights import CheckpointError

ENTRY_POINT_GROUP = "theia_ros.policies"


def available_policies() -> dict[str, str]:
    """Entry point name -> ``module:attr`` of every installed policy (group theia_ros.policies)."""
    found: dict[str, str] = {}
    conflicts: dict[str, set[str]] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in found and found[ep.name] != ep.value:
            conflicts.setdefault(ep.name, {found[ep.name]}).add(ep.value)
        found.setdefault(ep.name, ep.value)
    if conflicts:
        raise PolicyError(f"conflicting '{ENTRY_POINT_GROUP}' entry points: "
                          + "; ".join(f"{n!r} -> {sorted(v)}" for n, v in sorted(conflicts.items())))
    return dict(sorted(found.items()))


def load_policy_class(name: str) -> type[Policy]:
    """The Policy subclass for `name`: an entry point name in the group ``theia_ros.policies``,
    or a dotted path ``package.module:Class`` / ``package.module.Class``."""
    if not isinstance(name, str) or not name:
        raise UnknownPolicyError(f"policy name must be a non-empty string, got {name!r}")
    registered = available_policies()
    if name in registered:
        target = registered[name]
        try:
            obj = _import_dotted(target)
        except (ImportError, AttributeError) as exc:
            raise PolicyError(f"policy entry point {name!r} = {target!r} failed to load: "
                              f"{type(exc).__name__}: {exc}") from exc
        return _check_policy_class(obj, f"entry point {name!r} ({target})")
    if ":" in name or "." in name:
        try:
            obj = _import_dotted(name)
        except (ImportError, AttributeError, ValueError) as exc:
            module_name = name.partition(":")[0] if ":" in name else name.rpartition(".")[0]
            if isinstance(exc, ImportError):
                missing = exc.name if isinstance(exc, ModuleNotFoundError) else None
                if not missing or not (module_name == missing or module_name.startswith(missing + ".")):
                    raise  # the module exists but one of its own imports failed: show that
            raise UnknownPolicyError(
                f"unknown policy {name!r}: cannot import it ({type(exc).__name__}: {exc}); registered "
                f"policies: {sorted(registered) or 'none'}") from exc
        return _check_policy_class(obj, repr(name))
    raise UnknownPolicyError(
        f"unknown policy {name!r}; registered policies ('{ENTRY_POINT_GROUP}' entry points): "
        f"{sorted(registered) or 'none'}; or give a dotted path 'package.module:Class'")


def _import_dotted(path: str):
    if ":" in path:
        module_name, _, attr = path.partition(":")
    else:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"not a dotted path 'package.module:Class': {path!r}")
    obj = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _check_policy_class(obj, what: str) -> type[Policy]:
    if not (isinstance(obj, type) and issubclass(obj, Policy)):
        raise PolicyError(f"{what} is {obj!r}, not a subclass of theia_ros.policies.Policy")
    return obj


def policy_class_for_config(config: Mapping[str, Any], base: type[Policy] = Policy) -> type[Policy]:
    """The class a policy config names (its ``policy`` entry, else its ``class``); it must derive from `base`."""
    if not isinstance(config, Mapping):
        raise PolicyConfigError(f"policy config must be a mapping, got {type(config).__name__}")
    name = config.get("policy")
    if not name:
        raise PolicyConfigError(f"config has no 'policy' entry; cannot choose a class via {base.__name__}")
    try:
        target = load_policy_class(name)
    except UnknownPolicyError:
        if not config.get("class"):
            raise
        target = load_policy_class(config["class"])
    if not issubclass(target, base):
        raise PolicyConfigError(f"policy {name!r} ({dotted_name(target)}) is not a {base.__name__}")
    return target


def make_policy(name: str | None, config: Mapping[str, Any] | None = None,
                checkpoint: str | os.PathLike | None = None) -> Policy:
    """A policy by registry name or dotted path, or the one a config or checkpoint names.

    - checkpoint given: :meth:`Policy.from_pretrained` (`config`, if any, overrides parts of
      the stored config); `name` may be None (taken from the checkpoint) or must match it.
    - no checkpoint: ``from_config(config)``; `config` needs the ``observation`` and ``action``
      sections and may hold ``params``; with `name` None, its ``policy`` entry names the class.
    """
    cls = Policy if name is None else load_policy_class(name)
    if checkpoint is not None:
        if inspect.isabstract(cls):  # the stored config names the class
            try:
                cls = policy_class_for_config(read_config(checkpoint, config), base=cls)
            except PolicyConfigError as exc:
                raise CheckpointError(f"{Path(checkpoint) / CONFIG_FILE}: {exc}") from exc
        return cls.from_pretrained(checkpoint, overrides=config)
    if config is None:
        if name is None:
            raise PolicyConfigError("make_policy needs a name, a config or a checkpoint")
        raise PolicyConfigError(f"policy {name!r} needs a config with 'observation' and 'action' sections "
                                "(or a checkpoint)")
    if inspect.isabstract(cls):
        return policy_class_for_config(config, base=cls).from_config(config)
    config = dict(config)
    config.setdefault("policy", cls.name or dotted_name(cls))
    return cls.from_config(config)
