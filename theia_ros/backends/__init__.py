"""Inference backends: one interface, several engines (see base.InferenceBackend)."""
from theia_ros.backends.base import BackendError, InferenceBackend, create_backend  # noqa: F401
