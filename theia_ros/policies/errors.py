"""Errors of the policy layer. A checkpoint that cannot be read or does not fit raises
:class:`theia_ros.weights.CheckpointError`, the package's one checkpoint error."""


class PolicyError(Exception):
    """Base class of the errors raised by the policy layer."""


class ObservationError(PolicyError, ValueError):
    """An observation (or a pushed message) does not fit the observation spec."""


class PolicyConfigError(PolicyError, ValueError):
    """A policy configuration (spec, params, config.yaml) is invalid."""


class UnknownPolicyError(PolicyError, LookupError):
    """No policy class of that name is registered or importable."""

    def __str__(self):  # LookupError would repr() the message
        return str(self.args[0]) if self.args else ""
