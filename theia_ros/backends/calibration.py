"""Natural images for int8 calibration and for the accuracy gate of low-precision engines.

Photographs ship inside packages the project already installs (scikit-image's ``skimage.data``, in
the wheel; no download), so every machine builds the same calibration set:

* :data:`CALIBRATION_PHOTOS` (astronaut, coffee, chelsea, rocket, cat, immunohistochemistry,
  hubble_deep_field) give the calibration set: each photograph whole, then deterministic random
  crops (40-100 % of the side), horizontal flips and aspect changes, until ``count`` images
  (default 64), each turned into a 480x640 camera frame (Pillow bilinear) as a camera would deliver it;
* :data:`HELD_OUT_PHOTOS` (motorcycle_left, retina, grace_hopper from matplotlib when present) are
  never calibrated on: the gate checks int8 / bf16 engines on them (with a flipped and a cropped
  view each), so that an engine is judged on images it was not tuned to.

Frames of the user's own cameras join the calibration set as :class:`CalibrationFrames` (frames and
what names them); bags.calibration reads them from a bag (``calibration_bag`` / ``--calibration-bag``:
up to 32 frames spread evenly over its Image / CompressedImage topics), so that this module reads no
bags.  Everything is preprocessed as the encoder does (preprocess.to_model_input with the engine's
input size); ``CalibrationSet.identity`` names the set (recipe, photographs and the scikit-image
version they come from, count, seed, and the extra frames' identity) for the engine cache key.
"""
from __future__ import annotations

import functools
import logging
from typing import Dict, List, NamedTuple, Optional

import numpy as np
import torch

from theia_ros.backends.base import BackendError

log = logging.getLogger("theia_ros.backends")

CALIBRATION_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "cat", "immunohistochemistry",
                      "hubble_deep_field")
HELD_OUT_PHOTOS = ("motorcycle_left", "retina", "grace_hopper")
DEFAULT_CALIBRATION_SIZE = 64
CALIBRATION_SEED = 0
#: bump when the way the set is made changes (a different set makes a different int8 engine)
CALIBRATION_RECIPE = 2
#: (height, width) of the camera frames the photographs are turned into (a common camera mode)
FRAME_SIZE = (480, 640)


def _photograph(name: str) -> np.ndarray:
    if name == "grace_hopper":  # matplotlib's bundled sample photograph
        from matplotlib import cbook

        with cbook.get_sample_data("grace_hopper.jpg") as handle:
            from PIL import Image

            return np.asarray(Image.open(handle).convert("RGB"))
    try:
        import skimage.data
    except ImportError:
        raise BackendError("natural calibration / validation images need scikit-image (pip install "
                           "'theia_ros[openvino]' or scikit-image)") from None
    if name == "motorcycle_left":
        image = skimage.data.stereo_motorcycle()[0]
    else:
        image = getattr(skimage.data, name)()
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return np.ascontiguousarray(image[..., :3].astype(np.uint8))


def photograph(name: str) -> np.ndarray:
    """RGB uint8 [H, W, 3] of a packaged photograph (a name of CALIBRATION_PHOTOS or HELD_OUT_PHOTOS)."""
    if name not in CALIBRATION_PHOTOS + HELD_OUT_PHOTOS:
        raise BackendError(f"unknown photograph {name!r}; known: {', '.join(CALIBRATION_PHOTOS + HELD_OUT_PHOTOS)}")
    return _photograph(name)


def as_frame(image: np.ndarray, size=FRAME_SIZE) -> np.ndarray:
    """``image`` as a camera would deliver it: RGB uint8 of ``size`` (height, width; default 480x640),
    resized with Pillow's bilinear filter (the photographs are larger than camera frames)."""
    from PIL import Image

    h, w = int(size[0]), int(size[1])
    if image.shape[:2] == (h, w):
        return image
    return np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((w, h), Image.BILINEAR))


def _views(image: np.ndarray, count: int, rng: np.random.Generator, size=FRAME_SIZE) -> List[np.ndarray]:
    """The image itself, then ``count - 1`` random crops (40-100 % of each side, so scales and aspect
    ratios vary), every other one flipped; each as a camera frame of ``size``."""
    h, w = image.shape[:2]
    out = [as_frame(image, size)]
    for k in range(1, count):
        ch, cw = (max(16, int(round(side * rng.uniform(0.4, 1.0)))) for side in (h, w))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        view = image[y:y + ch, x:x + cw]
        if k % 2:
            view = view[:, ::-1]
        out.append(as_frame(view, size))
    return out


def calibration_photographs(count: int = DEFAULT_CALIBRATION_SIZE, seed: int = CALIBRATION_SEED,
                            size=FRAME_SIZE) -> List[np.ndarray]:
    """``count`` RGB uint8 camera frames of ``size`` made from CALIBRATION_PHOTOS, the same on every machine."""
    count = int(count)
    if count < 1:
        raise BackendError(f"calibration set size must be at least 1, got {count}")
    rng = np.random.default_rng(seed)
    photos = [_photograph(name) for name in CALIBRATION_PHOTOS]
    per = [count // len(photos) + (1 if i < count % len(photos) else 0) for i in range(len(photos))]
    images = []
    for photo, n in zip(photos, per):
        if n:
            images.extend(_views(photo, n, rng, size))
    return images


def held_out_photographs() -> Dict[str, np.ndarray]:
    """name -> 480x640 RGB uint8 frame: HELD_OUT_PHOTOS (those that load here), each whole, flipped and a
    centre crop."""
    out = {}
    for name in HELD_OUT_PHOTOS:
        try:
            image = _photograph(name)
        except (ImportError, OSError, BackendError) as exc:  # matplotlib or scikit-image may be missing
            log.debug("held-out photograph %s unavailable: %s", name, exc)
            continue
        h, w = image.shape[:2]
        out[name] = as_frame(image)
        out[name + " (flipped)"] = as_frame(image[:, ::-1])
        out[name + " (centre crop)"] = as_frame(image[h // 4:h - h // 4, w // 4:w - w // 4])
    if not out:
        raise BackendError("no held-out photograph could be loaded (scikit-image missing?)")
    return out


def to_pixels(images, input_size) -> torch.Tensor:
    """RGB uint8 images of any sizes -> model input [N, 3, H, W] at ``input_size``, as the encoder does."""
    from theia_ros.preprocess import PreprocessConfig, to_model_input

    config = PreprocessConfig(size=tuple(int(v) for v in input_size))
    return torch.cat([to_model_input(image, config) for image in images])


class CalibrationFrames(NamedTuple):
    """Frames of the user's cameras for the calibration set (RGB uint8 [H, W, 3], any sizes) and a dict that
    names them in the engine cache key (e.g. the bag's path, size and frame count: bags.calibration)."""

    frames: tuple
    identity: dict


class CalibrationSet:
    """The int8 calibration set for one input size: :attr:`identity` names it (cheap: what the engine cache key
    holds), :attr:`pixels` makes it (photographs, then the bag's frames, preprocessed; only when an engine is
    built)."""

    def __init__(self, input_size=(224, 224), count: int = DEFAULT_CALIBRATION_SIZE, seed: int = CALIBRATION_SEED,
                 extra: Optional[CalibrationFrames] = None):
        self.input_size = tuple(int(v) for v in input_size)
        self.count, self.seed = int(count), int(seed)
        if self.count < 1:
            raise BackendError(f"calibration set size must be at least 1, got {count}")
        if extra is not None and not isinstance(extra, CalibrationFrames):
            raise BackendError(f"extra calibration frames must be a CalibrationFrames, got {type(extra).__name__}")
        self.extra = extra
        try:
            import skimage

            photos_version = skimage.__version__
        except ImportError:
            photos_version = None
        self.identity = {
            "recipe": CALIBRATION_RECIPE,
            "photographs": list(CALIBRATION_PHOTOS),
            "scikit_image": photos_version,
            "count": self.count,
            "seed": self.seed,
            "bag": None if extra is None else dict(extra.identity),
        }
        self._pixels = None

    @property
    def pixels(self) -> torch.Tensor:
        if self._pixels is None:
            images = calibration_photographs(self.count, self.seed)
            if self.extra is not None:
                images = images + list(self.extra.frames)
            self._pixels = to_pixels(images, self.input_size)
        return self._pixels

    def __len__(self):
        return len(self.pixels)


def natural_pixels(input_size=(224, 224)):
    """(names, pixels [N, 3, H, W]) of the held-out photographs at ``input_size`` (the gate's natural images)."""
    names, pixels = _natural_pixels(tuple(int(v) for v in input_size))
    return list(names), pixels.clone()


@functools.lru_cache(maxsize=4)
def _natural_pixels(input_size):
    images = held_out_photographs()
    return tuple(images), to_pixels(list(images.values()), input_size)
