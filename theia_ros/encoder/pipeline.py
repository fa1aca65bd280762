"""The encoder core the node adapts to ROS: frames in, feature tensors out (plain Python).

A FeatureEncoder is given its model and backend; backends.factory.create_encoder builds both from a
checkpoint (so the encoder layer does not import the backends that run it)."""
import logging
import time

import torch

from theia_ros.encoder.config import ENCODER_DEFAULTS, OUTPUT_DTYPE_CHOICES
from theia_ros.preprocess import IMAGE_SIZE, to_model_input

log = logging.getLogger(__name__)


class FeatureEncoder:
    """Runs one model through one backend on batches of RGB frames of any size.

    Frames are preprocessed straight into one preallocated input batch ``[max_batch, 3, 224, 224]``
    (one copy per frame), which the backend runs in chunks of ``max_batch``.
    """

    def __init__(self, model, backend, output_dtype=ENCODER_DEFAULTS["output_dtype"]):
        if output_dtype not in OUTPUT_DTYPE_CHOICES:
            raise ValueError(f"output_dtype must be one of {', '.join(OUTPUT_DTYPE_CHOICES)}, got {output_dtype!r}")
        self.model = model
        self.backend = backend
        self.output_dtype = output_dtype
        self._torch_out = torch.float32 if output_dtype == "float32" else torch.float16
        self._pixels = torch.empty(backend.max_batch, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.float32)

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
        step = len(self._pixels)
        outputs, preprocess_s, inference_s = [], 0.0, 0.0
        for start in range(0, len(frames), step):
            t0 = time.perf_counter()
            chunk = range(start, min(start + step, len(frames)))
            for slot, index in enumerate(chunk):
                to_model_input(frames[index], configs[index], out=self._pixels[slot:slot + 1])
            t1 = time.perf_counter()
            outputs.append(self.backend.run_pixels(self._pixels[:len(chunk)]))
            preprocess_s += t1 - t0
            inference_s += time.perf_counter() - t1
        t2 = time.perf_counter()
        features = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        features = features.to(self._torch_out)
        inference_s += time.perf_counter() - t2
        return features, {"preprocess": preprocess_s, "inference": inference_s}

    def warm_up(self, iterations=2):
        import numpy as np

        frame = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
        for _ in range(iterations):
            self.encode([frame])
