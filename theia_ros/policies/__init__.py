"""Policies that act on Theia features: a small, swappable interface (no ROS imports).

- :mod:`.base`: specs, :class:`Observation`, :class:`ObservationBuffer`, the abstract
  :class:`Policy` and the registry (:func:`make_policy`, :func:`load_policy_class`).
- Built-ins, registered as ``theia_ros.policies`` entry points in setup.py:
  ``hold`` (:mod:`.hold`), ``mlp`` (:mod:`.mlp`), ``theia_head`` (:mod:`.theia_head`).
  The learned ones share :mod:`.torch_policy`. Importing this package does not import torch.

A third-party package adds a policy by subclassing :class:`Policy` and declaring one entry
point, e.g. in its setup.py::

    entry_points={"theia_ros.policies": ["my_policy = my_pkg.policy:MyPolicy"]}
"""
from theia_ros.policies.base import (
    CONFIG_FILE,
    ENTRY_POINT_GROUP,
    WEIGHTS_FILE,
    ActionSpec,
    CheckpointError,
    Observation,
    ObservationBuffer,
    ObservationError,
    ObservationSpec,
    Policy,
    PolicyConfigError,
    PolicyError,
    UnknownPolicyError,
    available_policies,
    load_policy_class,
    make_policy,
    random_observation,
    read_config,
)

__all__ = [
    "CONFIG_FILE",
    "ENTRY_POINT_GROUP",
    "WEIGHTS_FILE",
    "ActionSpec",
    "CheckpointError",
    "Observation",
    "ObservationBuffer",
    "ObservationError",
    "ObservationSpec",
    "Policy",
    "PolicyConfigError",
    "PolicyError",
    "UnknownPolicyError",
    "available_policies",
    "load_policy_class",
    "make_policy",
    "random_observation",
    "read_config",
]
