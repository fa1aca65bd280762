"""A policy living outside theia_ros, loaded by dotted path (`plugin_policies:SineOrNanPolicy`)."""
import numpy as np

from theia_ros.policies import Policy, PolicyError


class SineOrNanPolicy(Policy):
    """Commands `offset + mean(features)`, or NaN when `nan` is true (to exercise the safety filter)."""

    name = "sine_or_nan"
    default_params = {"offset": 0.0, "nan": False}

    def _act(self, observation):
        if self.params["nan"]:
            return np.full(self.action_spec.dim, np.nan)
        camera = self.observation_spec.cameras[0]
        value = self.params["offset"] + float(np.mean(observation.features[camera][-1]))
        return np.full(self.action_spec.dim, value)


class LevelOrFaultPolicy(Policy):
    """Commands mean(features) for every joint; a mean of -1 raises PolicyError (an action the node rejects),
    -2 returns NaN past Policy.act's own check (so the node's safety filter is what refuses it)."""

    name = "level_or_fault"

    def _level(self, observation):
        return float(np.mean(observation.features[self.observation_spec.cameras[0]][-1]))

    def act(self, observation):
        if np.isclose(self._level(observation), -2.0):
            return np.full(self.action_spec.dim, np.nan)
        return super().act(observation)

    def _act(self, observation):
        level = self._level(observation)
        if np.isclose(level, -1.0):
            raise PolicyError("level_or_fault: asked to fail")
        return np.full(self.action_spec.dim, level)
