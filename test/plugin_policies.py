"""A policy living outside theia_ros, loaded by dotted path (`plugin_policies:SineOrNanPolicy`)."""
import numpy as np

from theia_ros.policies import Policy


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
