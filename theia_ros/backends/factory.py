"""Backends by name: create_backend, backend="auto" (the fastest backend that runs here and passes
the accuracy gate), and create_encoder (a checkpoint and its backend as one FeatureEncoder).

Auto's order (first that can be built wins; a failure to build or validate falls through to the next):

* CUDA device (``device`` "cuda[:N]", or "auto" with a GPU present):
  1. tensorrt at the requested precision, when torch_tensorrt imports;
  2. torch (eager) on that GPU at the requested precision.
* CPU (``device`` "cpu", or "auto" without a GPU):
  - fp32: openvino fp32 (when the openvino extra is installed), then onnxruntime (lean graph: packed
    qkv, fused attention), then torch fp32: the order measured on this project's 2-core reference
    machine (theia-tiny batch 1, 224 input, one thread: openvino 1.54x, onnxruntime 1.47x eager torch;
    issue 17's run: 1.75x / 1.57x), all equal in accuracy (cosine >= 0.9999); neither engine spins
    its threads;
  - bf16: openvino bf16, then torch bf16 (autocast), when the CPU has native bf16 (AVX512-BF16 /
    AMX) and they pass the 0.999 cosine gate; otherwise the fp32 order above (bf16 emulation is
    slower than fp32);
  - int8: openvino int8 (NNCF, calibrated on natural photographs; gate 0.99 per image) when openvino
    and nncf are installed; otherwise the fp32 order above, the reason logged;
  - fp16: no fast fp16 on CPUs: the fp32 order above.
  On CUDA, int8 is not offered: auto runs fp16 there (more accurate than int8, and fast).
The precision auto actually uses is never below the one asked for in accuracy terms except
bf16 -> bf16 and int8 -> int8; asking fp16 on a CPU gives fp32.

Input sizes: a backend is built for one ``input_size`` (height, width; default 224x224) and
``pos_interpolation``; engines take that size only.  create_encoder hands FeatureEncoder a factory
that builds the same kind of backend (same engine, precision, device and options as the first,
auto's choice included) for every further input size its frames need.
"""
from __future__ import annotations

import inspect
import logging

import torch

from theia_ros.backends.base import BackendError
from theia_ros.encoder.config import BACKEND_CHOICES, ENCODER_DEFAULTS
from theia_ros.encoder.model import load_model
from theia_ros.encoder.pipeline import FeatureEncoder

log = logging.getLogger("theia_ros.backends")


def create_backend(name, model, representation="tokens", precision="fp32", device="cpu", max_batch=4,
                   input_size=None, pos_interpolation="scale_factor", **options):
    """Build a backend by name (one of encoder.config.BACKEND_CHOICES) for pixels of ``input_size``
    (height, width; None: 224x224) with position embeddings interpolated as ``pos_interpolation``
    says ("scale_factor" or "size"; see encoder.model.interpolate_position_embeddings).

    * "torch": eager PyTorch on the CPU or CUDA (fp32, bf16; fp16 on CUDA), optional torch.compile;
    * "onnxruntime": ONNX Runtime on the CPU (fp32), ONNX graph exported once and cached;
    * "openvino": OpenVINO on the CPU (fp32, bf16 with native bf16, calibrated int8) or an Intel GPU
      ("xpu": fp16, fp32), converted once and cached;
    * "tensorrt": Torch-TensorRT engine on CUDA (fp32, fp16, bf16), built once and cached;
    * "auto": the fastest of those that run here at ``precision`` (see the module docstring).
    Options are passed to the backend that takes them (e.g. cache_dir, rebuild, threads, compile,
    fp32_acc), so one set of options serves whichever backend is chosen; an option no backend takes
    is an error.
    """
    if name not in BACKEND_CHOICES:
        raise BackendError(f"unknown backend {name!r}; available: {', '.join(BACKEND_CHOICES)}")
    classes = backend_classes()
    unknown = set(options).difference(*(_accepted(cls) for cls in classes.values()))
    if unknown:
        raise BackendError(f"unknown backend option(s) {', '.join(sorted(unknown))}")
    if name == "auto":
        return create_auto_backend(model, representation, precision, device, max_batch, input_size=input_size,
                                   pos_interpolation=pos_interpolation, **options)
    if device in (None, "", "auto"):  # auto picks its own; the others need a device
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return classes[name](model, representation, precision, device, max_batch, input_size=input_size,
                         pos_interpolation=pos_interpolation, **options_for(classes[name], options))


def _accepted(cls) -> set:
    return set(inspect.signature(cls.__init__).parameters)


def options_for(cls, options: dict) -> dict:
    """The options backend class `cls` takes (one option set serves whichever backend is chosen)."""
    accepted = _accepted(cls)
    return {k: v for k, v in options.items() if k in accepted}


def backend_classes() -> dict:
    """The concrete backend classes by name (imported here: each module imports torch only)."""
    from theia_ros.backends.onnxruntime_backend import OnnxRuntimeBackend
    from theia_ros.backends.openvino_backend import OpenVINOBackend
    from theia_ros.backends.tensorrt_backend import TensorRTBackend
    from theia_ros.backends.torch_backend import TorchBackend

    return {"torch": TorchBackend, "onnxruntime": OnnxRuntimeBackend, "openvino": OpenVINOBackend,
            "tensorrt": TensorRTBackend}


# ---------------------------------------------------------------------------------- auto

def _capabilities():
    from theia_ros.backends.onnxruntime_backend import ort_available
    from theia_ros.backends.openvino_backend import nncf_available, openvino_available
    from theia_ros.backends.tensorrt_backend import tensorrt_available
    from theia_ros.backends.torch_backend import cpu_has_fast_bf16

    return {
        "cuda": torch.cuda.is_available(),
        "tensorrt": tensorrt_available(),
        "onnxruntime": ort_available(),
        "openvino": openvino_available(),
        "nncf": nncf_available(),
        "fast_bf16": cpu_has_fast_bf16(),
    }


def plan(device, precision, caps):
    """Candidates [(backend, precision, device, why)] in order of preference (pure function)."""
    device = "auto" if device in (None, "", "auto") else str(device)
    if device == "auto":
        device = "cuda" if caps.get("cuda") else "cpu"
    if device.startswith("cuda"):
        if not caps.get("cuda"):
            raise BackendError(f"auto backend: device {device!r} asked for, but CUDA is not available")
        note = ""
        if precision == "int8":  # no int8 engine on CUDA: fp16 is faster there and more accurate than int8
            precision, note = "fp16", "; int8 asked, not offered on CUDA: fp16"
        out = []
        if caps.get("tensorrt"):
            out.append(("tensorrt", precision, device, "CUDA and torch_tensorrt present"))
        why = "CUDA present" + ("" if caps.get("tensorrt") else ", no torch_tensorrt")
        out.append(("torch", precision, device, why))
        return [(b, p, d, why + note) for b, p, d, why in out]
    if device != "cpu":
        raise BackendError(f"auto backend: unknown device {device!r}; use auto, cpu or cuda[:N]")
    fp32 = []
    if caps.get("openvino"):
        fp32.append(("openvino", "fp32", "cpu", "fastest accurate fp32 CPU backend measured"))
    if caps.get("onnxruntime"):
        fp32.append(("onnxruntime", "fp32", "cpu", "fastest accurate fp32 CPU backend measured"
                     + ("" if caps.get("openvino") else " without openvino (not installed)")))
    fp32.append(("torch", "fp32", "cpu", "eager fp32 on the CPU"))
    if precision == "int8":
        if caps.get("openvino") and caps.get("nncf"):
            return [("openvino", "int8", "cpu", "int8 asked: openvino with NNCF calibration")] + \
                [(b, p, d, why + "; int8 engine not usable") for b, p, d, why in fp32]
        missing = "openvino" if not caps.get("openvino") else "nncf"
        return [(b, p, d, why + f"; int8 asked but {missing} is not installed") for b, p, d, why in fp32]
    if precision == "bf16":
        if caps.get("fast_bf16"):
            bf16 = [("openvino", "bf16", "cpu", "CPU with native bf16, openvino fastest measured")] \
                if caps.get("openvino") else []
            return bf16 + [("torch", "bf16", "cpu", "CPU with native bf16")] + fp32
        return [(b, p, d, why + "; bf16 asked but this CPU has no native bf16") for b, p, d, why in fp32]
    if precision == "fp16":
        return [(b, p, d, why + "; fp16 asked, CPUs have no fast fp16") for b, p, d, why in fp32]
    return fp32


def create_auto_backend(model, representation="tokens", precision="fp32", device="auto", max_batch=4,
                        input_size=None, pos_interpolation="scale_factor", **options):
    """The first candidate of :func:`plan` on this machine that builds and passes its accuracy gate."""
    candidates = plan(device, precision, _capabilities())
    classes = backend_classes()
    failures = []
    if options.get("cuda_graphs") and not str(candidates[0][2]).startswith("cuda"):
        log.info("auto backend: cuda_graphs applies to torch on CUDA only; ignored on the CPU")
        options = {k: v for k, v in options.items() if k != "cuda_graphs"}
    for name, prec, dev, why in candidates:
        cls = classes[name]
        try:
            backend = cls(model, representation, prec, dev, max_batch, input_size=input_size,
                          pos_interpolation=pos_interpolation, **options_for(cls, options))
        except BackendError as exc:
            failures.append(f"{name} {prec} on {dev}: {exc}")
            log.warning("auto backend: %s %s on %s not usable (%s); trying the next", name, prec, dev, exc)
            continue
        backend.auto_reason = why
        log.info("auto backend: chose %s %s on %s (%s)", name, prec, dev, why)
        return backend
    raise BackendError("auto backend: no backend could be built: " + "; ".join(failures))


def create_encoder(source, *, seed=None, backend="torch", precision=ENCODER_DEFAULTS["precision"], device="cpu",
                   max_batch=ENCODER_DEFAULTS["max_batch"], representation=ENCODER_DEFAULTS["representation"],
                   output_dtype=ENCODER_DEFAULTS["output_dtype"], input_size=None, pos_interpolation="scale_factor",
                   **backend_options) -> FeatureEncoder:
    """Load checkpoint ``source`` and build its backend into a FeatureEncoder. backend and device default
    to eager torch on the CPU, the reference engine; the node and the CLI pass ENCODER_DEFAULTS' "auto".

    ``input_size`` / ``pos_interpolation``: what the first backend is built for (default 224x224);
    frames needing other sizes get backends of the same kind on first use (or up front with
    ``FeatureEncoder.prepare``)."""
    model = load_model(source, device="cpu", seed=seed)
    engine = create_backend(backend, model, representation=representation, precision=precision, device=device,
                            max_batch=max_batch, input_size=input_size, pos_interpolation=pos_interpolation,
                            **backend_options)
    return FeatureEncoder(model, engine, output_dtype, backend_factory=sibling_factory(engine, backend_options))


def sibling_factory(engine, options):
    """A function (input_size, pos_interpolation) -> a backend of ``engine``'s kind (name, precision,
    device, max_batch, options) for that input size: what FeatureEncoder builds further sizes with."""
    model, representation = engine.model, engine.representation
    name, precision, device, max_batch = engine.name, engine.precision, str(engine.device), engine.max_batch
    options = dict(options)
    if not getattr(engine, "cuda_graphs", False):  # auto dropped it (the CPU): the siblings are built alike
        options.pop("cuda_graphs", None)

    def build(input_size, pos_interpolation):
        log.info("building a %s %s backend for %dx%d inputs (pos_interpolation %s)", name, precision,
                 input_size[0], input_size[1], pos_interpolation)
        return create_backend(name, model, representation=representation, precision=precision, device=device,
                              max_batch=max_batch, input_size=input_size, pos_interpolation=pos_interpolation,
                              **options)

    return build
