"""The interface the encoder uses to run Theia, whatever engine runs it.

A backend is built (or loaded from its cache) once, then `run()` maps a batch of uint8 RGB images
to features. It reports its precision, device and an identity that names everything its output
depends on.
"""
import inspect
from abc import ABC, abstractmethod

import torch

from theia_ros.preprocess import to_model_input
from theia_ros.representations import TEACHER_PREFIX

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

    def run(self, images):
        """uint8 RGB images [B, H, W, 3] (numpy or torch) -> features [B, ...] on the CPU."""
        return self.run_pixels(to_model_input(images))

    @abstractmethod
    def run_pixels(self, pixels):
        """Preprocessed float pixels [B, 3, 224, 224] in [-1, 1] -> features [B, ...] on the CPU."""


def reference_forward(model, pixels, representation):
    """The fp32 eager torch output every other engine is validated against."""
    if representation.startswith(TEACHER_PREFIX):
        return model.teacher_from_pixels(pixels, representation[len(TEACHER_PREFIX):])
    return model.features_from_pixels(pixels, representation)


def export_module(model, representation):
    """A module whose forward(pixels) returns ``representation`` (or ``teacher:<id>``'s map),
    for torch.export / ONNX / TensorRT."""
    if representation.startswith(TEACHER_PREFIX):
        return model.export_module(teacher=representation[len(TEACHER_PREFIX):])
    return model.export_module(representation)


def canonical_representation(model, representation):
    """``teacher:clip`` and ``teacher:openai/clip-vit-large-patch14`` name the same output: engine
    cache keys use the full teacher id."""
    if representation.startswith(TEACHER_PREFIX):
        head = model._head(representation[len(TEACHER_PREFIX):])
        for teacher in model.teachers:
            if model._head(teacher) == head:
                return TEACHER_PREFIX + teacher
    return representation


BACKENDS = ("torch", "onnxruntime", "tensorrt", "auto")


def create_backend(name, model, representation="tokens", precision="fp32", device="cpu", max_batch=4, **options):
    """Build a backend by name.

    * "torch": eager PyTorch on the CPU or CUDA (fp32, bf16; fp16 on CUDA), optional torch.compile;
    * "onnxruntime": ONNX Runtime on the CPU (fp32), ONNX graph exported once and cached;
    * "tensorrt": Torch-TensorRT engine on CUDA (fp32, fp16, bf16), built once and cached;
    * "auto": the fastest of those that run here at ``precision`` (see backends.auto).
    Options are passed to the backend that takes them (e.g. cache_dir, rebuild, threads, compile,
    fp32_acc), so one set of options serves whichever backend is chosen; an option no backend takes
    is an error.
    """
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}")
    classes = backend_classes()
    unknown = set(options).difference(*(_accepted(cls) for cls in classes.values()))
    if unknown:
        raise BackendError(f"unknown backend option(s) {', '.join(sorted(unknown))}")
    if name != "auto" and device in (None, "", "auto"):  # auto picks its own; the others need a device
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "auto":
        from theia_ros.backends.auto import create_auto_backend

        return create_auto_backend(model, representation, precision, device, max_batch, **options)
    return classes[name](model, representation, precision, device, max_batch, **options_for(classes[name], options))


def _accepted(cls) -> set:
    return set(inspect.signature(cls.__init__).parameters)


def options_for(cls, options: dict) -> dict:
    """The options backend class `cls` takes (one option set serves whichever backend is chosen)."""
    accepted = _accepted(cls)
    return {k: v for k, v in options.items() if k in accepted}


def backend_classes() -> dict:
    """The concrete backend classes by name (imported here: each module imports torch only)."""
    from theia_ros.backends.onnxruntime_backend import OnnxRuntimeBackend
    from theia_ros.backends.tensorrt_backend import TensorRTBackend
    from theia_ros.backends.torch_backend import TorchBackend

    return {"torch": TorchBackend, "onnxruntime": OnnxRuntimeBackend, "tensorrt": TensorRTBackend}
