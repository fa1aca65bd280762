"""Eager PyTorch backend: CPU or CUDA, fp32 / fp16 / bf16, inference mode."""
import torch

from theia_ros.backends.base import BackendError, InferenceBackend, reference_forward

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class TorchBackend(InferenceBackend):
    name = "torch"

    def __init__(self, model, representation="tokens", precision="fp32", device="cpu", max_batch=4):
        super().__init__(model, representation, precision, device, max_batch)
        if precision not in _DTYPES:
            raise BackendError(f"torch backend: unknown precision {precision!r}; use one of {sorted(_DTYPES)}")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise BackendError("torch backend: CUDA requested but torch.cuda.is_available() is False")
        if self.device.type == "cpu" and precision == "fp16":
            raise BackendError("torch backend: fp16 on the CPU is slower than fp32 and inexact; use fp32 or bf16")
        self.model = model.to(self.device).eval()
        self._dtype = _DTYPES[precision]

    @torch.inference_mode()
    def run_pixels(self, pixels):
        pixels = pixels.to(self.device, non_blocking=True)
        if self.precision == "fp32":
            out = reference_forward(self.model, pixels, self.representation)
        else:  # autocast keeps LayerNorm and softmax accumulation in fp32
            with torch.autocast(self.device.type, dtype=self._dtype):
                out = reference_forward(self.model, pixels, self.representation)
        return out.float().cpu() if self.device.type != "cpu" or out.dtype != torch.float32 else out
