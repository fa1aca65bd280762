"""RGB uint8 -> the Theia model input (plain Python: numpy, torch; no ROS).

:func:`to_model_input`: RGB uint8 ``[B, H, W, 3]`` (or one ``[H, W, 3]``) -> the float tensor
``[B, 3, 224, 224]`` in ``[-1, 1]`` that Theia was trained on: antialiased bilinear resize
straight to 224x224 (no crop, aspect not kept) *on uint8* (PIL-style), then ``x / 255``, then
``(x - 0.5) / 0.5``.  An optional per-camera :class:`PreprocessConfig` crops and/or letterboxes
first; both are off by default, and turning them on changes what the model sees.  ROS image
messages become RGB in :mod:`theia_ros.images`.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "IMAGE_SIZE",
    "PreprocessConfig",
    "apply_crop_letterbox",
    "to_model_input",
]

IMAGE_SIZE = 224


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    """Per-camera geometry applied before the resize to 224x224 (all off by default).

    crop:      (x, y, w, h) region of interest in pixels, or None for the full image.
    letterbox: pad (after cropping) to a centred square with ``fill`` so the aspect ratio is
               kept, instead of stretching to 224x224 (Theia was trained on stretched/square
               ImageNet crops; letterboxing is a per-camera choice, not the reference behaviour).
    fill:      uint8 padding value, one int or an (r, g, b) triple.
    """

    crop: Optional[Tuple[int, int, int, int]] = None
    letterbox: bool = False
    fill: Union[int, Tuple[int, int, int]] = 0

    def __post_init__(self):
        if self.crop is not None:
            crop = tuple(self.crop)
            if len(crop) != 4 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in crop):
                raise ValueError(f"crop must be four integers (x, y, w, h), got {self.crop!r}")
            x, y, w, h = (int(v) for v in crop)
            if x < 0 or y < 0 or w <= 0 or h <= 0:
                raise ValueError(f"crop (x, y, w, h) needs x, y >= 0 and w, h > 0, got {crop}")
            object.__setattr__(self, "crop", (x, y, w, h))
        fill = self.fill
        values = (fill,) if isinstance(fill, (int, np.integer)) else tuple(fill)
        if len(values) not in (1, 3) or not all(0 <= int(v) <= 255 for v in values):
            raise ValueError(f"fill must be an int or an (r, g, b) triple in 0..255, got {fill!r}")
        object.__setattr__(self, "fill", int(values[0]) if len(values) == 1 else tuple(int(v) for v in values))

    @property
    def is_identity(self) -> bool:
        return self.crop is None and not self.letterbox


def _check_images(images) -> torch.Tensor:
    """Validate an RGB uint8 batch and return it as a torch uint8 tensor [B, H, W, 3] (no copy)."""
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise TypeError(f"images must be uint8 RGB, got numpy dtype {images.dtype}")
        arr = images
    elif isinstance(images, torch.Tensor):
        if images.dtype != torch.uint8:
            raise TypeError(f"images must be uint8 RGB, got torch dtype {images.dtype}")
        arr = images
    else:
        raise TypeError(
            f"images must be a uint8 numpy array or torch tensor [B,H,W,3] or [H,W,3], got {type(images).__name__}")
    if arr.ndim == 3:
        arr = arr[None]
    elif arr.ndim != 4:
        raise ValueError(f"images must have shape [B,H,W,3] or [H,W,3], got rank {arr.ndim} {tuple(arr.shape)}")
    b, h, w, c = arr.shape
    if c != 3:
        raise ValueError(f"images must be RGB with 3 channels in the last dimension, got shape {tuple(arr.shape)}")
    if b == 0 or h == 0 or w == 0:
        raise ValueError(f"empty images: shape {tuple(arr.shape)}")
    if isinstance(arr, np.ndarray):
        if any(s < 0 for s in arr.strides):  # e.g. a [..., ::-1] BGR view: torch needs positive strides
            arr = np.ascontiguousarray(arr)
        if not arr.flags.writeable:
            # read-only views of ROS buffers: torch warns about them, but nothing here writes to them
            import warnings
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                return torch.from_numpy(arr)
        return torch.from_numpy(arr)
    return arr


def apply_crop_letterbox(images: torch.Tensor, config: PreprocessConfig) -> torch.Tensor:
    """Crop then letterbox a uint8 batch [B, H, W, 3] as ``config`` says (a view when only cropping)."""
    if config.crop is not None:
        x, y, w, h = config.crop
        H, W = images.shape[1], images.shape[2]
        if x + w > W or y + h > H:
            raise ValueError(f"crop (x={x}, y={y}, w={w}, h={h}) does not fit an image of {W}x{H}")
        images = images[:, y:y + h, x:x + w, :]
    if config.letterbox:
        B, H, W, _ = images.shape
        side = max(H, W)
        if H != W:
            fill = torch.tensor(config.fill if isinstance(config.fill, tuple) else (config.fill,) * 3,
                                dtype=torch.uint8, device=images.device)
            out = fill.expand(B, side, side, 3).clone()
            top, left = (side - H) // 2, (side - W) // 2
            out[:, top:top + H, left:left + W, :] = images
            images = out
    return images


def to_model_input(images, config: Optional[PreprocessConfig] = None, size: int = IMAGE_SIZE,
                   out: Optional[torch.Tensor] = None) -> torch.FloatTensor:
    """RGB uint8 images -> float32 ``[B, 3, size, size]`` in [-1, 1], Theia's preprocessing.

    ``images``: numpy array or torch tensor, uint8, ``[B, H, W, 3]`` or ``[H, W, 3]`` (RGB).
    Resizes straight to ``size`` x ``size`` with antialiased bilinear interpolation on uint8
    (matches PIL's BILINEAR to within 1 level), skipped when already that size; then
    ``(x / 255 - 0.5) / 0.5``.  The result lives on the images' device, contiguous NCHW; with
    ``out`` (a contiguous float32 ``[B, 3, size, size]`` tensor, e.g. a slice of a preallocated
    batch) it is written there and ``out`` is returned.

    Raises TypeError for a non-uint8 dtype or non-array input, ValueError for a wrong rank,
    channel count or empty images, or an ``out`` of the wrong shape or dtype.
    """
    x = _check_images(images)
    if config is not None and not config.is_identity:
        x = apply_crop_letterbox(x, config)
    x = x.permute(0, 3, 1, 2)  # NHWC memory viewed as NCHW (channels_last strides, no copy)
    if x.shape[-2:] != (size, size):
        if x.device.type == "cpu":
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        else:  # uint8 antialiasing is a CPU kernel; elsewhere resize in float and round like uint8 would
            x = F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
            x = x.round_().clamp_(0, 255)
    if out is None:
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device)  # contiguous NCHW
    elif out.shape != x.shape or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 tensor of shape {tuple(x.shape)}, got "
                         f"{out.dtype} {tuple(out.shape)}")
    out.copy_(x)
    # same operations, same rounding as the reference: ToTensor (x / 255) then Normalize(0.5, 0.5)
    return out.div_(255.0).sub_(0.5).div_(0.5)
