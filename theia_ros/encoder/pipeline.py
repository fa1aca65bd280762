"""The encoder core the node adapts to ROS: frames in, feature tensors out (plain Python)."""
import logging
import time

import torch

from theia_ros.backends import create_backend
from theia_ros.encoder.model import load_model
from theia_ros.preprocess import to_model_input

log = logging.getLogger(__name__)

DEFAULT_MODEL = "theaiinstitute/theia-tiny-patch16-224-cddsv"
#: How the encoder runs unless told otherwise: the one place for these defaults. The encoder node's
#: parameters, the CLI's shared encoder options (encode-bag, export, bench) and FeatureEncoder.load
#: take them from here. threads 0 keeps torch's own default.
ENCODER_DEFAULTS = {
    "model": DEFAULT_MODEL,
    "seed": 0,
    "backend": "auto",
    "precision": "fp32",
    "device": "auto",
    "max_batch": 4,
    "representation": "tokens",
    "output_dtype": "float32",
    "threads": 0,
}
BACKEND_CHOICES = ("auto", "torch", "onnxruntime", "tensorrt")
PRECISION_CHOICES = ("fp32", "fp16", "bf16")
OUTPUT_DTYPE_CHOICES = ("float32", "float16")


class FeatureEncoder:
    """Runs one model through one backend on batches of RGB frames of any size."""

    def __init__(self, model, backend, output_dtype="float32"):
        if output_dtype not in ("float32", "float16"):
            raise ValueError(f"output_dtype must be float32 or float16, got {output_dtype!r}")
        self.model = model
        self.backend = backend
        self.output_dtype = output_dtype
        self._torch_out = torch.float32 if output_dtype == "float32" else torch.float16

    @classmethod
    def load(cls, source, *, seed=None, backend="torch", precision="fp32", device="cpu", max_batch=4,
             representation="tokens", output_dtype="float32", **backend_options):
        model = load_model(source, device="cpu", seed=seed)
        engine = create_backend(backend, model, representation=representation, precision=precision,
                                device=device, max_batch=max_batch, **backend_options)
        return cls(model, engine, output_dtype)

    @property
    def representation(self):
        return self.backend.representation

    @property
    def metadata(self):
        """Fields every features message carries."""
        return {"model_id": self.model.model_id, "representation": self.representation,
                "weights_id": self.model.weights_id, "random_weights": bool(self.model.random_weights)}

    def encode(self, frames, preprocess_configs=None):
        """RGB uint8 frames (list of [H, W, 3], sizes may differ) -> (features [B, ...], timings).

        timings: seconds spent in "preprocess" and "inference".
        """
        configs = preprocess_configs or [None] * len(frames)
        t0 = time.perf_counter()
        if len(frames) == 1:
            pixels = to_model_input(frames[0], configs[0])
        else:  # frames may differ in size: resize each, then batch
            pixels = torch.cat([to_model_input(frame, config) for frame, config in zip(frames, configs)])
        t1 = time.perf_counter()
        step = self.backend.max_batch
        outputs = [self.backend.run_pixels(pixels[i:i + step]) for i in range(0, len(pixels), step)]
        features = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        features = features.to(self._torch_out)
        t2 = time.perf_counter()
        return features, {"preprocess": t1 - t0, "inference": t2 - t1}

    def warm_up(self, iterations=2):
        import numpy as np

        frame = np.zeros((224, 224, 3), np.uint8)
        for _ in range(iterations):
            self.encode([frame])
