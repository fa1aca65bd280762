"""The interface the encoder uses to run Theia, whatever engine runs it.

A backend is built (or loaded from its cache) once, then `run_pixels()` maps a batch of
preprocessed pixels to features. It reports its precision, device and an identity that names
everything its output depends on. Backends are created by name in backends.factory.

Input size: a backend is created for one ``input_size`` (height, width; default 224x224) and one
``pos_interpolation`` (how position embeddings reach a patch grid other than 14x14, see
encoder.model.interpolate_position_embeddings).  Engines (ONNX Runtime, TensorRT) are built for that
size and take nothing else; eager torch takes any size.  :meth:`InferenceBackend.accepts` says which
inputs a backend takes; FeatureEncoder keeps one backend per input size it meets.
"""
from abc import ABC, abstractmethod

import torch

from theia_ros.preprocess import IMAGE_SIZE, PATCH_SIZE, POS_INTERPOLATIONS, pos_interpolation_applies
from theia_ros.representations import TEACHER_PREFIX, is_teacher, teacher_of

DEFAULT_INPUT_SIZE = (IMAGE_SIZE, IMAGE_SIZE)


class BackendError(RuntimeError):
    """A backend that cannot be built, loaded or trusted."""


def check_input_size(input_size, representation="tokens"):
    """``input_size`` as a (height, width) tuple of ints (None: 224x224); BackendError for sizes under
    one patch, or for a teacher head at any size but 224x224 (the heads are 224-only)."""
    if input_size is None:
        return DEFAULT_INPUT_SIZE
    try:
        h, w = (int(v) for v in input_size)
    except (TypeError, ValueError):
        raise BackendError(f"input_size must be (height, width), got {input_size!r}") from None
    if min(h, w) < PATCH_SIZE:
        raise BackendError(f"input_size must be at least {PATCH_SIZE}x{PATCH_SIZE}, got {h}x{w} (height x width)")
    if is_teacher(representation) and (h, w) != DEFAULT_INPUT_SIZE:
        raise BackendError(f"{representation}: the teacher heads take {IMAGE_SIZE}x{IMAGE_SIZE} inputs only, "
                           f"got an input size of {h}x{w} (height x width); use a backbone representation "
                           "(tokens, spatial, cls, ...) at other sizes")
    return (h, w)


def check_pos_interpolation(pos_interpolation):
    if pos_interpolation not in POS_INTERPOLATIONS:
        raise BackendError(f"pos_interpolation must be one of {', '.join(POS_INTERPOLATIONS)}, "
                           f"got {pos_interpolation!r}")
    return pos_interpolation


def size_key(input_size, pos_interpolation):
    """(input_size, pos_interpolation or None): None where the convention makes no difference (the
    14x14 grid of a square input), so such inputs share one engine."""
    input_size = (int(input_size[0]), int(input_size[1]))
    return input_size, (pos_interpolation if pos_interpolation_applies(input_size) else None)


class InferenceBackend(ABC):
    name = "base"
    #: engines built for one input size take nothing else; eager torch takes any
    fixed_input_size = True

    def __init__(self, model, representation="tokens", precision="fp32", device="cpu", max_batch=4,
                 input_size=None, pos_interpolation="scale_factor"):
        self.model = model
        self.representation = representation
        self.precision = precision
        self.device = torch.device(device)
        self.max_batch = int(max_batch)
        self.input_size = check_input_size(input_size, representation)
        self.pos_interpolation = check_pos_interpolation(pos_interpolation)

    def accepts(self, input_size, pos_interpolation="scale_factor") -> bool:
        """Whether this backend runs pixels of ``input_size`` (height, width) with ``pos_interpolation``."""
        size, pos = size_key(input_size, pos_interpolation)
        if not self.fixed_input_size:
            if is_teacher(self.representation):
                return size == DEFAULT_INPUT_SIZE
            return pos is None or pos == self.pos_interpolation
        return (size, pos) == size_key(self.input_size, self.pos_interpolation)

    def check_pixels(self, pixels):
        """BackendError unless pixels [B, 3, H, W] have this engine's input size (engines only)."""
        if self.fixed_input_size and tuple(pixels.shape[-2:]) != self.input_size:
            raise BackendError(f"{self.name} backend: this engine was built for {self.input_size[0]}x"
                               f"{self.input_size[1]} inputs (height x width), got pixels of shape "
                               f"{tuple(pixels.shape)}; build one per input size (FeatureEncoder does)")

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
            "input_size": list(self.input_size),
            "pos_interpolation": self.pos_interpolation,
        }

    @abstractmethod
    def run_pixels(self, pixels):
        """Preprocessed float pixels [B, 3, H, W] (preprocess.to_model_input) -> features [B, ...] on
        the CPU.  Engines take their ``input_size`` only; eager torch any size."""


def reference_forward(model, pixels, representation, pos_interpolation="scale_factor"):
    """The fp32 eager torch output every other engine is validated against."""
    if is_teacher(representation):
        return model.teacher_from_pixels(pixels, teacher_of(representation))
    return model.features_from_pixels(pixels, representation, pos_interpolation)


def export_module(model, representation, input_size=None, pos_interpolation="scale_factor"):
    """A module whose forward(pixels) returns ``representation`` (or ``teacher:<id>``'s map),
    for torch.export / ONNX / TensorRT; with ``input_size`` it takes that size only, its position
    embeddings a constant."""
    if is_teacher(representation):
        return model.export_module(teacher=teacher_of(representation), input_size=input_size)
    return model.export_module(representation, input_size=input_size, pos_interpolation=pos_interpolation)


def engine_size_fields(input_size, pos_interpolation) -> dict:
    """Engine cache key fields for the input size: none at 224x224 (keys, and so cached engines, of
    224x224 engines stay as they were), else the size and the position-embedding convention."""
    size, pos = size_key(input_size, pos_interpolation)
    if size == DEFAULT_INPUT_SIZE:
        return {}
    return {"input_size": list(size), "pos_interpolation": pos}


def canonical_representation(model, representation):
    """``teacher:clip`` and ``teacher:openai/clip-vit-large-patch14`` name the same output: engine
    cache keys use the full teacher id."""
    if is_teacher(representation):
        head = model.head_name(teacher_of(representation))
        for teacher in model.teachers:
            if model.head_name(teacher) == head:
                return TEACHER_PREFIX + teacher
    return representation
