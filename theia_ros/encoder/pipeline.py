"""The encoder core the node adapts to ROS: frames in, feature tensors out (plain Python).

A FeatureEncoder is given its model and backend; backends.factory.create_encoder builds both from a
checkpoint (so the encoder layer does not import the backends that run it)."""
import logging
import time

import torch

from theia_ros.encoder.config import ENCODER_DEFAULTS, OUTPUT_DTYPE_CHOICES
from theia_ros.preprocess import IMAGE_SIZE, POS_INTERPOLATIONS, input_size, pos_interpolation_applies, to_model_input

log = logging.getLogger(__name__)


def input_key(input_hw, pos_interpolation="scale_factor"):
    """The key frames are grouped by: (input size, pos_interpolation), the convention None where it
    makes no difference (the 14x14 grid of a square input)."""
    size = (int(input_hw[0]), int(input_hw[1]))
    return size, (pos_interpolation if pos_interpolation_applies(size) else None)


class FeatureEncoder:
    """Runs one model on batches of RGB frames of any size, through one backend per model input size.

    Each frame's preprocessing config (preprocess.PreprocessConfig: profile, input size,
    pos_interpolation) decides the input size the model sees.  Frames are grouped by input size (and
    position-embedding convention) and preprocessed straight into one preallocated batch per size
    ``[max_batch, 3, H, W]`` (one copy per frame), which that size's backend runs in chunks of
    ``max_batch``.  The first backend is the one given; a further size is run by a backend from
    ``backend_factory(input_size, pos_interpolation)`` (built on first use, or up front with
    :meth:`prepare`), unless a backend already running accepts it (eager torch takes any size).
    """

    def __init__(self, model, backend, output_dtype=ENCODER_DEFAULTS["output_dtype"], backend_factory=None):
        if output_dtype not in OUTPUT_DTYPE_CHOICES:
            raise ValueError(f"output_dtype must be one of {', '.join(OUTPUT_DTYPE_CHOICES)}, got {output_dtype!r}")
        self.model = model
        self.backend = backend  # the first backend: its representation, precision and identity stand for all
        self.backends = [backend]
        self.backend_factory = backend_factory
        self.output_dtype = output_dtype
        self._torch_out = torch.float32 if output_dtype == "float32" else torch.float16
        self._buffers = {}  # input size -> preallocated float32 batch [max_batch, 3, H, W]
        self._routes = {}   # input_key -> backend
        self._buffer(getattr(backend, "input_size", (IMAGE_SIZE, IMAGE_SIZE)), backend.max_batch)

    @property
    def _pixels(self):
        """The preallocated batch of the first backend's input size."""
        return self._buffers[getattr(self.backend, "input_size", (IMAGE_SIZE, IMAGE_SIZE))]

    @property
    def representation(self):
        return self.backend.representation

    @property
    def metadata(self):
        """Fields every features message carries."""
        return {"model_id": self.model.model_id, "representation": self.representation,
                "weights_id": self.model.weights_id, "random_weights": bool(self.model.random_weights)}

    def _buffer(self, size, max_batch):
        buffer = self._buffers.get(size)
        if buffer is None or len(buffer) < max_batch:
            buffer = self._buffers[size] = torch.empty(max_batch, 3, *size, dtype=torch.float32)
        return buffer

    def backend_for(self, input_hw, pos_interpolation="scale_factor"):
        """The backend that runs inputs of ``input_hw`` (height, width) with ``pos_interpolation``:
        one already built that accepts them, else a new one from the backend factory.  Raises
        ValueError when none can (no factory), or the factory's error (e.g. a teacher head at a
        size other than 224x224)."""
        if pos_interpolation not in POS_INTERPOLATIONS:
            raise ValueError(f"pos_interpolation must be one of {', '.join(POS_INTERPOLATIONS)}, "
                             f"got {pos_interpolation!r}")
        key = input_key(input_hw, pos_interpolation)
        backend = self._routes.get(key)
        if backend is not None:
            return backend
        for candidate in self.backends:
            if self._accepts(candidate, key[0], pos_interpolation):
                backend = candidate
                break
        else:
            if self.backend_factory is None:
                raise ValueError(f"no backend of this encoder runs {key[0][0]}x{key[0][1]} inputs (height x width) "
                                 f"with pos_interpolation {pos_interpolation}, and it has no backend factory to "
                                 "build one (backends.factory.create_encoder gives it one)")
            backend = self.backend_factory(key[0], pos_interpolation)
            self.backends.append(backend)
        self._routes[key] = backend
        return backend

    @staticmethod
    def _accepts(backend, size, pos_interpolation):
        accepts = getattr(backend, "accepts", None)
        if accepts is None:  # a stand-in without the method: the 224x224 reference size only
            return size == (IMAGE_SIZE, IMAGE_SIZE)
        return accepts(size, pos_interpolation)

    def prepare(self, input_hw, pos_interpolation="scale_factor"):
        """Build (or find) the backend for ``input_hw`` now rather than at its first frame; returns it."""
        return self.backend_for(input_hw, pos_interpolation)

    def encode(self, frames, preprocess_configs=None):
        """RGB uint8 frames (list of [H, W, 3], sizes may differ) -> (features, timings).

        ``preprocess_configs``: one preprocess.PreprocessConfig (or None: the reference pipeline) per
        frame.  features: a tensor [B, ...] in the frames' order when every frame's features have the
        same shape (always so when all frames have one input size); otherwise (input sizes with
        different patch grids) a list of per-frame tensors [...], in the frames' order.
        timings: seconds spent in "preprocess" and "inference".
        """
        configs = list(preprocess_configs) if preprocess_configs is not None else [None] * len(frames)
        if len(configs) != len(frames):
            raise ValueError(f"{len(frames)} frames but {len(configs)} preprocess configs")
        groups = {}
        for index, (frame, config) in enumerate(zip(frames, configs)):
            shape = tuple(getattr(frame, "shape", ()))
            if len(shape) < 3:
                to_model_input(frame, config)  # not an image: raises its TypeError / ValueError
            size = input_size(config, shape[-3:-1])
            pos = config.pos_interpolation if config is not None else "scale_factor"
            groups.setdefault(input_key(size, pos), (pos, []))[1].append(index)
        results = [None] * len(frames)
        outputs, preprocess_s, inference_s = [], 0.0, 0.0
        for (size, _), (pos, indices) in groups.items():
            backend = self.backend_for(size, pos)
            buffer = self._buffer(size, backend.max_batch)
            step = backend.max_batch
            for start in range(0, len(indices), step):
                t0 = time.perf_counter()
                chunk = indices[start:start + step]
                for slot, index in enumerate(chunk):
                    to_model_input(frames[index], configs[index], out=buffer[slot:slot + 1])
                t1 = time.perf_counter()
                out = backend.run_pixels(buffer[:len(chunk)])
                outputs.append((chunk, out))
                preprocess_s += t1 - t0
                inference_s += time.perf_counter() - t1
        t2 = time.perf_counter()
        if len(outputs) == 1:
            features = outputs[0][1]
        elif len(groups) == 1:  # one size in several chunks: in order already
            features = torch.cat([out for _, out in outputs])
        else:
            for chunk, out in outputs:
                for row, index in enumerate(chunk):
                    results[index] = out[row]
            shapes = {tuple(r.shape) for r in results}
            features = torch.stack(results) if len(shapes) == 1 else results
        if isinstance(features, list):
            features = [f.to(self._torch_out) for f in features]
        else:
            features = features.to(self._torch_out)
        inference_s += time.perf_counter() - t2
        return features, {"preprocess": preprocess_s, "inference": inference_s}

    def warm_up(self, iterations=2, shapes=None):
        """Run a few frames of zeros through the encoder.  ``shapes``: (image (height, width),
        PreprocessConfig or None) pairs to warm up (default: one 224x224 frame, reference pipeline)."""
        import numpy as np

        from theia_ros.resize import prepare

        prepare()  # the exact resize's compiled route: now, not on the first camera frame
        shapes = shapes or [((IMAGE_SIZE, IMAGE_SIZE), None)]
        frames = [np.zeros((int(h), int(w), 3), np.uint8) for (h, w), _ in shapes]
        for _ in range(iterations):
            self.encode(frames, [config for _, config in shapes])
