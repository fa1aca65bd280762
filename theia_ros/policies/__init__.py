"""Policies that act on Theia features: a small, swappable interface (no ROS imports).

- :mod:`.errors`: :class:`PolicyError` and its kinds (a checkpoint that cannot be used raises
  :class:`theia_ros.weights.CheckpointError`).
- :mod:`.specs`: :class:`ObservationSpec`, :class:`ActionSpec`, :class:`Observation`.
- :mod:`.buffer`: :class:`ObservationBuffer` (stamp alignment of features and joint states).
- :mod:`.policy`: the abstract :class:`Policy` with its config and checkpoint files.
- :mod:`.registry`: policies by name (:func:`make_policy`, :func:`load_policy_class`).
- :mod:`.safety`: :class:`~theia_ros.policies.safety.CommandFilter`, between a policy and a robot.
- Built-ins, registered as ``theia_ros.policies`` entry points in setup.py:
  ``hold`` (:mod:`.hold`), ``mlp`` (:mod:`.mlp`), ``theia_head`` (:mod:`.theia_head`).
  The learned ones share :mod:`.torch_policy`. Importing this package does not import torch.

Data flow: the encoder publishes per-camera Theia features and the robot publishes joint states.
An adapter (the ROS policy node, a replay script, a simulator loop) pushes both into an
:class:`ObservationBuffer`, which aligns them by stamp and builds an :class:`Observation` matching
the policy's :class:`ObservationSpec`; :meth:`Policy.act` maps it to one action for the joints of
its :class:`ActionSpec`::

    policy = make_policy("mlp", checkpoint="runs/pick/ckpt")       # or make_policy("hold", config)
    buffer = ObservationBuffer(policy.observation_spec, max_skew=0.05)
    buffer.push_features("front", stamp, tokens)                   # per camera message
    buffer.push_joint_state(stamp, names, positions, velocities)   # per joint state message
    if buffer.ready():
        action = policy.act(buffer.build())                        # np.float64 [n_joints]

Stamps are float seconds on one clock (the ROS clock of the messages).

A third-party package adds a policy by subclassing :class:`Policy` and declaring one entry
point, e.g. in its setup.py::

    entry_points={"theia_ros.policies": ["my_policy = my_pkg.policy:MyPolicy"]}
"""
from theia_ros.policies.buffer import ObservationBuffer
from theia_ros.policies.errors import ObservationError, PolicyConfigError, PolicyError, UnknownPolicyError
from theia_ros.policies.policy import CONFIG_FILE, WEIGHTS_FILE, Policy, read_config
from theia_ros.policies.registry import ENTRY_POINT_GROUP, available_policies, load_policy_class, make_policy
from theia_ros.policies.specs import ActionSpec, Observation, ObservationSpec, random_observation

__all__ = [
    "CONFIG_FILE",
    "ENTRY_POINT_GROUP",
    "WEIGHTS_FILE",
    "ActionSpec",
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
