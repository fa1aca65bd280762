"""Eager PyTorch backend: CPU or CUDA, fp32 / fp16 / bf16, inference mode; optionally torch.compile.

fp16/bf16 run under autocast (matmuls and convolutions in low precision, LayerNorm and softmax
accumulated in fp32) and are checked once against fp32 on the validation input (cosine >= 0.999)
when the backend is created.  ``compile=True`` wraps the forward in ``torch.compile`` (CPU:
inductor with weight freezing; CUDA: "reduce-overhead", i.e. CUDA graphs); the first call at each
batch size compiles (tens of seconds on a small CPU).

Any input size: pixels [B, 3, H, W] of any H, W >= 16 run with the backend's ``pos_interpolation``
(``input_size`` only sets the size of the validation input; with torch.compile each new size
compiles once).
"""
import logging
import time

import torch
from torch import nn

from theia_ros.backends.base import BackendError, InferenceBackend, reference_forward
from theia_ros.representations import is_teacher, teacher_of

log = logging.getLogger("theia_ros.backends")

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bf16 matmul instructions (AVX512-BF16 or AMX); without them
    bf16 on the CPU is emulated and slower than fp32."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    for name in probes:
        fn = getattr(torch.cpu, name, None)
        try:
            if fn is not None and fn():
                return True
        except Exception:  # broad on purpose: private probes; absent or failing means "no"
            pass
    return False


class _Forward(nn.Module):
    """pixels -> one representation, optionally under autocast (what torch.compile sees)."""

    def __init__(self, model, representation, device_type, dtype, lean=False, pos_interpolation="scale_factor"):
        super().__init__()
        self.model = model
        self.lean = None
        if lean:
            from theia_ros.backends.lean import LeanTheia

            self.lean = LeanTheia(model, representation, pos_interpolation=pos_interpolation)
        self.representation = representation
        self.pos_interpolation = pos_interpolation
        self.device_type = device_type
        self.dtype = dtype

    def _run(self, pixels):
        if self.lean is not None:
            return self.lean(pixels)
        return reference_forward(self.model, pixels, self.representation, self.pos_interpolation)

    def forward(self, pixels):
        if self.dtype == torch.float32:
            return self._run(pixels)
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self._run(pixels)


class TorchBackend(InferenceBackend):
    name = "torch"
    fixed_input_size = False

    def __init__(self, model, representation="tokens", precision="fp32", device="cpu", max_batch=4,
                 compile=False, lean=False, validate=None, input_size=None,  # noqa: A002 (mirrors torch.compile)
                 pos_interpolation="scale_factor"):
        super().__init__(model, representation, precision, device, max_batch, input_size, pos_interpolation)
        if precision not in _DTYPES:
            raise BackendError(f"torch backend: unknown precision {precision!r}; use one of {sorted(_DTYPES)}")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise BackendError("torch backend: CUDA requested but torch.cuda.is_available() is False")
        if self.device.type == "cpu" and precision == "fp16":
            raise BackendError("torch backend: fp16 on the CPU is slower than fp32 and inexact; use fp32 or bf16")
        if is_teacher(representation):
            model.head_name(teacher_of(representation))  # unknown teacher: fail now, not per frame
        self.model = model.to(self.device).eval()
        self._dtype = _DTYPES[precision]
        self.compile_mode = _compile_mode(compile, self.device)
        self.lean = bool(lean)
        self._forward = _Forward(self.model, representation, self.device.type, self._dtype, self.lean,
                                 self.pos_interpolation)
        if self.compile_mode is not None:
            self._forward = _compiled(self._forward, self.compile_mode)
        self.validation_cosine = None
        if validate is None:
            validate = precision != "fp32" or self.compile_mode is not None or self.lean
        if validate:
            self._validate()

    @property
    def identity(self):
        identity = super().identity
        if self.compile_mode is not None:
            identity["compile"] = self.compile_mode
        if self.lean:
            identity["graph"] = "lean"
        return identity

    def _validate(self):
        from theia_ros.backends.validation import check_output, min_cosine_for, reference_output, validation_pixels

        pixels = validation_pixels(min(2, self.max_batch), size=self.input_size)
        start = time.perf_counter()
        reference = reference_output(self.model, pixels, self.representation, self.device, self.pos_interpolation)
        what = f"torch {self.precision} on {self.device}"
        if self.compile_mode:
            what += f" (compile {self.compile_mode})"
        self.validation_cosine = check_output(self.run_pixels(pixels), reference, min_cosine_for(self.precision), what)
        log.info("%s: cosine %.6f to fp32 torch on the validation input (%.1f s)", what, self.validation_cosine,
                 time.perf_counter() - start)

    @torch.inference_mode()
    def run_pixels(self, pixels):
        pixels = pixels.to(self.device, non_blocking=True)
        out = self._forward(pixels)
        if self.device.type != "cpu" or out.dtype != torch.float32:
            return out.float().cpu()
        if self.compile_mode is not None:
            return out.clone()  # compiled programs may reuse their output buffers
        return out


def _compile_mode(compile, device):  # `compile` as torch.compile's own option name
    if compile in (False, None, "", "none", "off"):
        return None
    if compile is True or compile in ("default", "auto", "on"):
        return "reduce-overhead" if device.type == "cuda" else "freezing"
    if compile in ("freezing", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs", "inductor"):
        return compile
    raise BackendError(f"torch backend: unknown compile mode {compile!r}; use true, freezing, inductor, "
                       "reduce-overhead, max-autotune")


def _compiled(module, mode):
    if mode == "freezing":  # inductor with weights folded in as constants (oneDNN prepacking on CPU)
        return torch.compile(module, dynamic=False, options={"freezing": True})
    if mode == "inductor":
        return torch.compile(module, dynamic=False)
    return torch.compile(module, mode=mode, dynamic=False)
