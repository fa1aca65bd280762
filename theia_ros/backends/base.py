"""The interface the encoder uses to run Theia, whatever engine runs it.

A backend is built (or loaded from its cache) once, then `run_pixels()` maps a batch of
preprocessed pixels to features. It reports its precision, device and an identity that names
everything its output depends on. Backends are created by name in backends.factory.
"""
from abc import ABC, abstractmethod

import torch

from theia_ros.representations import TEACHER_PREFIX, is_teacher, teacher_of


class BackendError(RuntimeError):
    """A backend that cannot be built, loaded or trusted."""


class InferenceBackend(ABC):
    name = "base"

    def __init__(self, model, representation="tokens", precision="fp32", device="cpu", max_batch=4):
        self.model = model
        self.representation = representation
        self.precision = precision
        self.device = torch.device(device)
        self.max_batch = int(max_batch)

    @property
    def identity(self):
        """What the output depends on: shown in logs, diagnostics and bench tables."""
        return {
            "backend": self.name,
            "precision": self.precision,
            "device": str(self.device),
            "model": self.model.variant,
            "weights_id": self.model.weights_id,
            "random_weights": self.model.random_weights,
            "representation": self.representation,
        }

    @abstractmethod
    def run_pixels(self, pixels):
        """Preprocessed float pixels [B, 3, 224, 224] in [-1, 1] -> features [B, ...] on the CPU."""


def reference_forward(model, pixels, representation):
    """The fp32 eager torch output every other engine is validated against."""
    if is_teacher(representation):
        return model.teacher_from_pixels(pixels, teacher_of(representation))
    return model.features_from_pixels(pixels, representation)


def export_module(model, representation):
    """A module whose forward(pixels) returns ``representation`` (or ``teacher:<id>``'s map),
    for torch.export / ONNX / TensorRT."""
    if is_teacher(representation):
        return model.export_module(teacher=teacher_of(representation))
    return model.export_module(representation)


def canonical_representation(model, representation):
    """``teacher:clip`` and ``teacher:openai/clip-vit-large-patch14`` name the same output: engine
    cache keys use the full teacher id."""
    if is_teacher(representation):
        head = model.head_name(teacher_of(representation))
        for teacher in model.teachers:
            if model.head_name(teacher) == head:
                return TEACHER_PREFIX + teacher
    return representation
