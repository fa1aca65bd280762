"""RGB uint8 -> the Theia model input (plain Python: numpy, torch; no ROS).

Two preprocessing profiles (:data:`PROFILES`), chosen per camera with :class:`PreprocessConfig`:

* ``"theia"`` (default, the reference pipeline Theia was trained with): resize straight to the
  input size (224x224 unless ``size`` says otherwise; no crop, aspect not kept) with bilinear
  interpolation *on uint8* (PIL-style), then ``x / 255``, then ``(x - 0.5) / 0.5`` (range [-1, 1]);
* ``"isaaclab"`` (Isaac Lab's ``image_features`` observation term): no resize (the camera's own
  resolution) unless ``size`` is given, in which case OpenCV's area interpolation brings the image to
  that size first; then ``x.float() / 255`` and ImageNet mean/std, in Isaac Lab's order of operations.

Either profile may run the model at a size other than 224x224: the patch grid is then
``(H // 16, W // 16)`` (:func:`patch_grid`) and the model interpolates its position embeddings to it
(``pos_interpolation``: transformers <= 4.44's ``"scale_factor"`` or >= 4.45's ``"size"``
convention, see encoder.model).  An optional crop and/or letterbox applies first in both profiles;
both are off by default, and turning them on changes what the model sees.  ROS image messages become
RGB in :mod:`theia_ros.images`.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from theia_ros.images import as_rgb_batch
from theia_ros.resize import resize_like_pil, resize_normalized_like_pil

__all__ = [
    "IMAGE_SIZE",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PATCH_SIZE",
    "POS_INTERPOLATIONS",
    "PROFILES",
    "PreprocessConfig",
    "apply_crop_letterbox",
    "geometry_size",
    "input_size",
    "patch_grid",
    "pos_interpolation_applies",
    "to_model_input",
]

IMAGE_SIZE = 224
PATCH_SIZE = 16
#: "theia": the reference pipeline (resize to 224, [-1, 1]); "isaaclab": Isaac Lab's image_features recipe
PROFILES = ("theia", "isaaclab")
#: how position embeddings reach a patch grid other than 14x14: transformers <= 4.44 ("scale_factor",
#: what the published checkpoints' config.json records: 4.41.2) or >= 4.45 ("size")
POS_INTERPOLATIONS = ("scale_factor", "size")
#: Isaac Lab's normalisation (ImageNet statistics), applied after x / 255
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    """Per-camera preprocessing: geometry, profile and the input size the model sees.

    crop:      (x, y, w, h) region of interest in pixels, or None for the full image.
    letterbox: pad (after cropping) to a centred square with ``fill`` so the aspect ratio is
               kept, instead of stretching to 224x224 (Theia was trained on stretched/square
               ImageNet crops; letterboxing is a per-camera choice, not the reference behaviour).
    fill:      uint8 padding value, one int or an (r, g, b) triple.
    profile:   "theia" (reference: resize to ``size`` or 224x224, [-1, 1]) or "isaaclab" (Isaac
               Lab: the image's own size unless ``size`` is given, OpenCV area resize, ImageNet
               mean/std), see the module docstring.
    size:      (height, width) the model sees, each >= 16 (the patch grid is (H // 16, W // 16));
               None: 224x224 for "theia", the image's own size (after crop/letterbox) for "isaaclab".
    pos_interpolation: "scale_factor" (transformers <= 4.44, the checkpoints' recorded version) or
               "size" (transformers >= 4.45): how position embeddings are interpolated to a patch grid
               other than 14x14 (the two agree only on 14x14 grids of square images).
    """

    crop: Optional[Tuple[int, int, int, int]] = None
    letterbox: bool = False
    fill: Union[int, Tuple[int, int, int]] = 0
    profile: str = "theia"
    size: Optional[Tuple[int, int]] = None
    pos_interpolation: str = "scale_factor"

    def __post_init__(self):
        if self.crop is not None:
            crop = tuple(self.crop)
            if len(crop) != 4 or not all(_is_int(v) for v in crop):
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
        if self.profile not in PROFILES:
            raise ValueError(f"profile must be one of {', '.join(PROFILES)}, got {self.profile!r}")
        if self.pos_interpolation not in POS_INTERPOLATIONS:
            raise ValueError(f"pos_interpolation must be one of {', '.join(POS_INTERPOLATIONS)}, "
                             f"got {self.pos_interpolation!r}")
        if self.size is not None:
            try:
                size = tuple(self.size)
            except TypeError:
                size = (self.size,)
            if len(size) != 2 or not all(_is_int(v) for v in size):
                raise ValueError(f"size must be (height, width) integers or None, got {self.size!r}")
            if min(size) < PATCH_SIZE:
                raise ValueError(f"size (height, width) must be at least {PATCH_SIZE}x{PATCH_SIZE} (one "
                                 f"{PATCH_SIZE}-pixel patch), got {tuple(int(v) for v in size)}")
            object.__setattr__(self, "size", (int(size[0]), int(size[1])))

    @property
    def is_identity(self) -> bool:
        """No crop and no letterbox (geometry only; the profile and size are not considered)."""
        return self.crop is None and not self.letterbox

    @property
    def is_reference(self) -> bool:
        """Exactly the reference pipeline: theia profile at 224x224, no crop, no letterbox."""
        return self.is_identity and self.profile == "theia" and self.size in (None, (IMAGE_SIZE, IMAGE_SIZE))


DEFAULT_CONFIG = PreprocessConfig()


def geometry_size(config: Optional[PreprocessConfig], image_hw) -> Tuple[int, int]:
    """(height, width) of an image of size ``image_hw`` after ``config``'s crop and letterbox."""
    h, w = int(image_hw[0]), int(image_hw[1])
    config = config or DEFAULT_CONFIG
    if config.crop is not None:
        x, y, cw, ch = config.crop
        if x + cw > w or y + ch > h:
            raise ValueError(f"crop (x={x}, y={y}, w={cw}, h={ch}) does not fit an image of {w}x{h}")
        h, w = ch, cw
    if config.letterbox:
        h = w = max(h, w)
    return h, w


def input_size(config: Optional[PreprocessConfig], image_hw) -> Tuple[int, int]:
    """(height, width) the model sees for an image of size ``image_hw`` (height, width):
    ``config.size`` when given; else 224x224 for the theia profile and the image's own size (after
    crop / letterbox) for the isaaclab profile.  ValueError for an image smaller than one patch."""
    config = config or DEFAULT_CONFIG
    if config.size is not None:
        return config.size
    if config.profile == "theia":
        return (IMAGE_SIZE, IMAGE_SIZE)
    h, w = geometry_size(config, image_hw)
    if min(h, w) < PATCH_SIZE:
        raise ValueError(f"an image of {w}x{h} is smaller than one {PATCH_SIZE}x{PATCH_SIZE} patch; the isaaclab "
                         "profile keeps the image's own size: give a size to resize to")
    return (h, w)


def patch_grid(config: Optional[PreprocessConfig], image_hw) -> Tuple[int, int]:
    """(rows, columns) of the patch grid the model produces for an image of size ``image_hw``:
    ``(H // 16, W // 16)`` of :func:`input_size` (pixels past the last whole patch are ignored, as
    transformers' ViT does)."""
    h, w = input_size(config, image_hw)
    return (h // PATCH_SIZE, w // PATCH_SIZE)


def pos_interpolation_applies(size) -> bool:
    """Whether position embeddings are interpolated for an input of ``size`` (height, width): not on
    the 14x14 grid of a square input (transformers' shortcut), where both conventions of
    :data:`POS_INTERPOLATIONS` give the model's own embeddings, so their results are identical."""
    h, w = int(size[0]), int(size[1])
    grid = IMAGE_SIZE // PATCH_SIZE
    return not (h == w and h // PATCH_SIZE == grid)


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
    arr = as_rgb_batch(arr)
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


def _resize_theia(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """uint8 NHWC -> uint8 NCHW (a view of NHWC memory) at ``size``: the reference's bilinear resize."""
    if x.device.type == "cpu":  # bit-exact PIL BILINEAR, as the reference resizes
        return resize_like_pil(x, size).permute(0, 3, 1, 2)
    # uint8 antialiasing is a CPU kernel; elsewhere resize in float and round like uint8 would
    x = F.interpolate(x.permute(0, 3, 1, 2).float(), size=size, mode="bilinear", align_corners=False, antialias=True)
    return x.round_().clamp_(0, 255)


def _resize_normalize_theia(x: torch.Tensor, size: Tuple[int, int],
                            out: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """uint8 NHWC on the CPU -> the theia model input (resize, then x / 127.5 - 1) in one pass over the
    pixels, written to ``out`` (or a new tensor): the numba route of theia_ros.resize, the same bits as
    resizing then normalising. None, with nothing written, where that route is not installed."""
    target = (x.shape[0], 3, *size)
    if out is None:
        out = torch.empty(target, dtype=torch.float32)
    elif tuple(out.shape) != target or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 tensor of shape {target}, got "
                         f"{out.dtype} {tuple(out.shape)}")
    return out if resize_normalized_like_pil(x.numpy(), size, out.numpy()) else None


def _resize_area(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """uint8 NHWC -> uint8 NHWC at ``size`` with OpenCV's INTER_AREA, image by image (on the CPU)."""
    import cv2

    h, w = size
    frames = x.cpu().numpy()
    out = np.empty((frames.shape[0], h, w, 3), np.uint8)
    for i, frame in enumerate(frames):
        out[i] = cv2.resize(frame, (w, h), interpolation=cv2.INTER_AREA)
    return torch.from_numpy(out).to(x.device)


def to_model_input(images, config: Optional[PreprocessConfig] = None,
                   out: Optional[torch.Tensor] = None) -> torch.FloatTensor:
    """RGB uint8 images -> float32 ``[B, 3, H, W]``, the model input ``config`` describes.

    ``images``: numpy array or torch tensor, uint8, ``[B, H, W, 3]`` or ``[H, W, 3]`` (RGB).
    ``config`` (default: the reference pipeline): crop / letterbox first, then the profile:

    * "theia": bilinear resize on uint8 to :func:`input_size` (224x224 unless ``config.size``; PIL's
      BILINEAR exactly when theia_ros.resize is available, else antialiased bilinear within one
      level of it; skipped when already that size), then ``(x / 255 - 0.5) / 0.5``; on the CPU with
      numba installed, both in one pass (theia_ros.resize.resize_normalized_like_pil, the same bits);
    * "isaaclab": OpenCV INTER_AREA resize to ``config.size`` when given (none otherwise), then
      ``x.float() / 255``, then ``(x - mean) / std`` with ImageNet's statistics, as Isaac Lab does.

    The result lives on the images' device, contiguous NCHW; with ``out`` (a contiguous float32
    ``[B, 3, H, W]`` tensor, e.g. a slice of a preallocated batch) it is written there and ``out`` is
    returned.

    Raises TypeError for a non-uint8 dtype or non-array input, ValueError for a wrong rank,
    channel count or empty images, an image smaller than a patch, or an ``out`` of the wrong shape
    or dtype.
    """
    x = _check_images(images)
    config = config or DEFAULT_CONFIG
    size = input_size(config, x.shape[1:3])  # of the image as given: crop and letterbox count in it
    if not config.is_identity:
        x = apply_crop_letterbox(x, config)
    if config.profile == "theia":
        if tuple(x.shape[1:3]) != size:
            if x.device.type == "cpu" and (out is None or out.device.type == "cpu"):
                fused = _resize_normalize_theia(x, size, out)
                if fused is not None:
                    return fused
            x = _resize_theia(x, size)
        else:
            x = x.permute(0, 3, 1, 2)  # NHWC memory viewed as NCHW (channels_last strides, no copy)
    else:
        if tuple(x.shape[1:3]) != size:
            x = _resize_area(x, size)
        x = x.permute(0, 3, 1, 2)
    if out is None:
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device)  # contiguous NCHW
    elif out.shape != x.shape or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 tensor of shape {tuple(x.shape)}, got "
                         f"{out.dtype} {tuple(out.shape)}")
    out.copy_(x)
    if config.profile == "theia":
        # the reference's ToTensor (x / 255) then Normalize(0.5, 0.5), bit for bit in one pass fewer:
        # (q - 0.5) / 0.5 == 2q - 1 and 2 * (x / 255) == x / 127.5 in float32 (scaling by 2 commutes
        # with rounding), checked for all 256 inputs in test/test_preprocess_fast.py
        return out.div_(127.5).sub_(1.0)
    # Isaac Lab: image.permute(0, 3, 1, 2).float() / 255.0, then (image - mean) / std (float32 tensors)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=out.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=out.device).view(1, 3, 1, 1)
    return out.div_(255.0).sub_(mean).div_(std)
