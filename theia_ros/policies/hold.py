"""`hold`: keep the robot where it is (a safe fallback and a wiring test). No torch."""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from theia_ros.policies.errors import PolicyConfigError, PolicyError
from theia_ros.policies.policy import Policy
from theia_ros.policies.specs import Observation


class HoldPolicy(Policy):
    """Hold a position; in velocity mode, command zeros.

    Params:
      position: None (default), a list of ``action_spec.dim`` values, or a mapping
        joint name -> value for every commanded joint. When set, it is always commanded.
      latch: with no `position`, True (default) latches the measured position (newest proprio
        row) at the first :meth:`act` after :meth:`reset` and keeps commanding it, so the robot
        cannot creep; False commands the newest measured position at every step.

    Without `position`, position mode needs every commanded joint among the proprio joints to know what
    to hold; without them every act is refused (nothing is commanded) and says why.
    """

    name = "hold"
    default_params = {"position": None, "latch": True}

    def __init__(self, observation_spec, action_spec, params=None, **overrides):
        super().__init__(observation_spec, action_spec, params, **overrides)
        a = self.action_spec
        self._fixed = None
        self._index = None
        pos = self.params["position"]
        if not isinstance(self.params["latch"], bool):
            raise PolicyConfigError(f"hold: 'latch' must be true or false, got {self.params['latch']!r}")
        if a.mode == "velocity":
            self._fixed = np.zeros(a.dim)
        elif pos is not None:
            if isinstance(pos, Mapping):
                missing = [j for j in a.joint_names if j not in pos]
                extra = sorted(set(pos) - set(a.joint_names))
                if missing or extra:
                    raise PolicyConfigError(f"hold: 'position' mapping lacks joints {missing} / has unknown {extra}")
                pos = [pos[j] for j in a.joint_names]
            try:
                fixed = np.array(pos, dtype=np.float64).reshape(-1)
            except (TypeError, ValueError):
                raise PolicyConfigError(f"hold: 'position' must be numbers, got {pos!r}") from None
            if fixed.shape != (a.dim,) or not np.isfinite(fixed).all():
                raise PolicyConfigError(f"hold: 'position' needs {a.dim} finite values, got {pos!r}")
            self._fixed = fixed
        else:
            joints = self.observation_spec.proprio_joints
            self._unmeasured = [j for j in a.joint_names if j not in joints]
            if not self._unmeasured:
                self._index = np.array([joints.index(j) for j in a.joint_names])
        self._latched = None

    def reset(self) -> None:
        self._latched = None

    def _act(self, observation: Observation) -> np.ndarray:
        if self._fixed is not None:
            return self._fixed.copy()
        if self._index is None:  # nothing known to hold (a graph without joint states): command nothing
            raise PolicyError(f"hold: commanded joints {self._unmeasured} are not among the proprio joints "
                              f"{self.observation_spec.proprio_joints}; add them or set the 'position' param")
        if self._latched is not None:
            return self._latched.copy()
        if observation.proprio is None:
            raise PolicyError("hold: the observation has no proprio to hold")
        current = np.asarray(observation.proprio, dtype=np.float64)[-1, self._index]
        if self.params["latch"]:
            self._latched = current.copy()
        return current
