"""The accuracy gate every built engine passes: cosine to fp32 eager torch on a fixed input."""
from __future__ import annotations

import numpy as np
import torch

from theia_ros.backends.base import BackendError

# fp32 engines must reproduce torch almost exactly; fp16/bf16 ones within the usual rounding; int8 ones
# (post-training quantization) per image on natural photographs
FP32_MIN_COSINE = 0.9999
LOW_PRECISION_MIN_COSINE = 0.999
INT8_MIN_COSINE = 0.99


def min_cosine_for(precision: str) -> float:
    if precision == "int8":
        return INT8_MIN_COSINE
    return FP32_MIN_COSINE if precision == "fp32" else LOW_PRECISION_MIN_COSINE


def validation_pixels(batch: int = 2, seed: int = 1234, size=(224, 224)) -> torch.Tensor:
    """A fixed, deterministic batch of model inputs [batch, 3, H, W] in [-1, 1] (``size`` = (H, W)):
    smooth colour gradients, a few blocks and noise, like a camera image (same on every machine)."""
    from theia_ros.preprocess import PreprocessConfig, to_model_input

    h, w = int(size[0]), int(size[1])
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy, xx = yy / max(h - 1, 1), xx / max(w - 1, 1)
    images = []
    for i in range(batch):
        phase = rng.uniform(0, 2 * np.pi, size=3)
        img = np.stack([0.5 + 0.5 * np.sin(2 * np.pi * (xx * (1 + c) + yy * (2 - c) * (i + 1)) / 2 + phase[c])
                        for c in range(3)], axis=-1) * 200.0
        for _ in range(4):  # a few flat blocks with hard edges (40 pixels at 224x224)
            y0, x0 = rng.integers(0, max(1, min(h, w) - 44), size=2)
            img[y0:y0 + 40, x0:x0 + 40] = rng.uniform(0, 255, size=3)
        img += rng.normal(0, 8, size=img.shape)
        images.append(np.clip(img, 0, 255).astype(np.uint8))
    return to_model_input(np.stack(images), PreprocessConfig(size=(h, w)))


def cosine_per_sample(output, reference) -> torch.Tensor:
    """Cosine similarity of each sample's flattened output to the reference's, in float64."""
    out = torch.as_tensor(output).detach().to("cpu", torch.float64).reshape(len(output), -1)
    ref = torch.as_tensor(reference).detach().to("cpu", torch.float64).reshape(len(reference), -1)
    return torch.nn.functional.cosine_similarity(out, ref, dim=1, eps=1e-30)


def cosine(output, reference) -> float:
    """The worst sample's cosine similarity (what the gate and the bench tables report)."""
    return float(cosine_per_sample(output, reference).min())


def check_output(output, reference, min_cosine: float, what: str) -> float:
    """Raise BackendError unless ``output`` matches ``reference`` (shape, finite, cosine);
    returns the cosine."""
    output, reference = torch.as_tensor(output), torch.as_tensor(reference)
    if tuple(output.shape) != tuple(reference.shape):
        raise BackendError(f"refusing {what}: output shape {tuple(output.shape)} differs from fp32 torch's "
                           f"{tuple(reference.shape)}")
    if not bool(torch.isfinite(output.float()).all()):
        raise BackendError(f"refusing {what}: its output holds NaN or Inf on the validation input")
    value = cosine(output, reference)
    if not value >= min_cosine:
        raise BackendError(f"refusing {what}: cosine similarity to fp32 torch is {value:.6f} on the validation "
                           f"input, below the required {min_cosine}; use another precision or backend")
    return value


def reference_output(model, pixels, representation, device=None, pos_interpolation="scale_factor"):
    """fp32 eager torch output on ``pixels`` (computed where the model lives, returned on the CPU)."""
    from theia_ros.backends.base import reference_forward

    device = device if device is not None else next(model.parameters()).device
    with torch.inference_mode():
        return reference_forward(model, pixels.to(device), representation, pos_interpolation).float().cpu()


def gate(run, model, representation, precision, what, input_size=(224, 224), pos_interpolation="scale_factor",
         max_batch=2, natural=None, device=None) -> dict:
    """The accuracy gate of an engine: ``run`` (pixels -> output) against fp32 eager torch on the fixed
    synthetic input and, for precisions below fp32 (or ``natural=True``), on held-out natural photographs
    (backends.calibration.natural_pixels; never the int8 calibration images), per image, at
    ``min_cosine_for(precision)``.  The reference runs where the model lives (``device``; default the
    CPU).  Raises BackendError naming the worst image; returns
    ``{"cosine": worst, "synthetic": ..., "natural": ..., "worst_image": name, "min_cosine": ...}``."""
    import logging

    min_cos = min_cosine_for(precision)
    natural = precision != "fp32" if natural is None else natural
    sets = [("synthetic", [f"synthetic {i}" for i in range(min(2, max_batch))],
             validation_pixels(min(2, max_batch), size=input_size))]
    if natural:
        from theia_ros.backends.calibration import natural_pixels

        names, pixels = natural_pixels(input_size)
        sets.append(("natural", names, pixels))
    result = {"min_cosine": min_cos, "representation": representation}
    worst, worst_name = float("inf"), ""
    for label, names, pixels in sets:
        reference = reference_output(model, pixels, representation, device or torch.device("cpu"), pos_interpolation)
        chunks = [torch.as_tensor(run(pixels[i:i + max_batch])) for i in range(0, len(pixels), max_batch)]
        output = torch.cat(chunks)
        check_output(output, reference, -1.0, f"{what} on {label} images")  # shape and finiteness
        per = cosine_per_sample(output, reference)
        index = int(per.argmin())
        result[label] = float(per[index])
        if float(per[index]) < worst:
            worst, worst_name = float(per[index]), names[index]
    result.update(cosine=worst, worst_image=worst_name)
    logging.getLogger("theia_ros.backends").info(
        "%s (%s): worst cosine to fp32 torch %.6f on %s (%s; required %s)", what, representation, worst, worst_name,
        ", ".join(f"{label} {result[label]:.6f}" for label, _, _ in sets), min_cos)
    if not worst >= min_cos:
        raise BackendError(f"refusing {what}: cosine similarity to fp32 torch is {worst:.6f} on {worst_name} "
                           f"({representation}), below the required {min_cos}; use another precision or backend")
    return result
