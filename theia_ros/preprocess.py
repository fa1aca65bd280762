"""Image preprocessing for the Theia encoder (plain Python: numpy, OpenCV, torch; no ROS).

Two layers:

* converters from what ROS carries (``sensor_msgs/Image`` raw buffers, ``sensor_msgs/CompressedImage``
  jpeg/png) to RGB uint8 ``[H, W, 3]`` numpy arrays, at most one copy each
  (:func:`image_to_rgb`, :func:`decode_compressed`);
* :func:`to_model_input`: RGB uint8 ``[B, H, W, 3]`` (or one ``[H, W, 3]``) -> the float tensor
  ``[B, 3, 224, 224]`` in ``[-1, 1]`` that Theia was trained on: antialiased bilinear resize
  straight to 224x224 (no crop, aspect not kept) *on uint8* (PIL-style), then ``x / 255``, then
  ``(x - 0.5) / 0.5``.  An optional per-camera :class:`PreprocessConfig` crops and/or letterboxes
  first; both are off by default, and turning them on changes what the model sees.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "IMAGE_SIZE",
    "SUPPORTED_ENCODINGS",
    "SUPPORTED_COMPRESSED_FORMATS",
    "ImageDecodeError",
    "PreprocessConfig",
    "image_to_rgb",
    "decode_compressed",
    "apply_crop_letterbox",
    "to_model_input",
]

IMAGE_SIZE = 224

# ROS `sensor_msgs/Image.encoding` values image_to_rgb understands -> channels per pixel
_ENCODING_CHANNELS = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1}
SUPPORTED_ENCODINGS = tuple(_ENCODING_CHANNELS)
SUPPORTED_COMPRESSED_FORMATS = ("jpeg", "png")


class ImageDecodeError(ValueError):
    """An image message could not be turned into an RGB uint8 array."""


# --------------------------------------------------------------------------------------------
# ROS buffers -> RGB uint8 HWC
# --------------------------------------------------------------------------------------------

def _as_uint8_buffer(data, what: str) -> np.ndarray:
    """A flat uint8 numpy view of bytes / bytearray / array.array / memoryview / ndarray (no copy)."""
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8:
            raise ImageDecodeError(f"{what}: expected uint8 data, got a numpy array of {data.dtype}")
        return data.reshape(-1)
    try:
        return np.frombuffer(data, dtype=np.uint8)
    except (TypeError, ValueError) as exc:
        raise ImageDecodeError(f"{what}: data of type {type(data).__name__} is not a byte buffer ({exc})") from None


def image_to_rgb(buffer, height: int, width: int, step: int, encoding: str) -> np.ndarray:
    """Convert a raw ``sensor_msgs/Image`` buffer to an RGB uint8 ``[height, width, 3]`` array.

    ``buffer`` is ``msg.data`` (bytes, bytearray, array.array('B'), memoryview or a uint8 numpy
    array); ``step`` is the row length in bytes (>= width * channels; extra bytes are row padding
    and are skipped).  Supported encodings: :data:`SUPPORTED_ENCODINGS` (``mono8`` is replicated
    to three channels).

    At most one copy is made: ``rgb8`` and ``rgba8`` come back as (possibly read-only, possibly
    strided) views into ``buffer``; ``bgr8``, ``bgra8`` and ``mono8`` as one new contiguous array.
    Copy the result if it must outlive ``buffer``.

    Raises :class:`ImageDecodeError` for an unsupported encoding, zero or negative sizes,
    ``step < width * channels``, or a buffer shorter than ``step * height``.
    """
    enc = encoding.strip().lower() if isinstance(encoding, str) else encoding
    if enc not in _ENCODING_CHANNELS:
        raise ImageDecodeError(
            f"unsupported image encoding {encoding!r}; supported: {', '.join(SUPPORTED_ENCODINGS)}")
    channels = _ENCODING_CHANNELS[enc]
    for name, value in (("height", height), ("width", width), ("step", step)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise ImageDecodeError(f"{name} must be an integer, got {value!r}")
    height, width, step = int(height), int(width), int(step)
    if height <= 0 or width <= 0:
        raise ImageDecodeError(f"empty image: height={height}, width={width} ({encoding})")
    row = width * channels
    if step < row:
        raise ImageDecodeError(
            f"step {step} is smaller than width * channels = {width} * {channels} = {row} ({encoding})")
    flat = _as_uint8_buffer(buffer, f"{encoding} image {width}x{height}")
    needed = step * height
    if flat.size < needed:
        raise ImageDecodeError(
            f"image data too short: {flat.size} bytes for {height} rows of step {step} "
            f"(need {needed}) ({encoding} {width}x{height})")
    # [height, width, channels] view honouring the row stride (no copy)
    pixels = np.lib.stride_tricks.as_strided(
        flat, shape=(height, width, channels), strides=(step, channels, 1), writeable=False)

    if enc == "rgb8":
        return pixels
    if enc == "rgba8":
        return pixels[:, :, :3]
    import cv2  # row-strided views go to OpenCV as they are: one copy, into the result

    if enc == "mono8":
        return cv2.cvtColor(pixels[:, :, 0], cv2.COLOR_GRAY2RGB)
    if enc == "bgr8":
        return cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB)
    return cv2.cvtColor(pixels, cv2.COLOR_BGRA2RGB)


def _compressed_kind(fmt: str) -> str:
    """'jpeg' or 'png' from a CompressedImage.format such as 'jpeg', 'png' or 'bgr8; jpeg compressed bgr8'."""
    if not isinstance(fmt, str):
        raise ImageDecodeError(f"compressed image format must be a string, got {fmt!r}")
    f = fmt.lower()
    # image_transport writes "<encoding>; <jpeg|png> compressed <encoding>"
    if ";" in f:
        f = f.split(";", 1)[1]
    f = f.strip()
    if f.startswith("jpeg") or f.startswith("jpg"):
        return "jpeg"
    if f.startswith("png"):
        return "png"
    raise ImageDecodeError(
        f"unsupported compressed image format {fmt!r}; supported: {', '.join(SUPPORTED_COMPRESSED_FORMATS)}")


def decode_compressed(data, format: str = "jpeg") -> np.ndarray:  # noqa: A002 (ROS field name)
    """Decode a ``sensor_msgs/CompressedImage`` payload (jpeg or png) to RGB uint8 ``[H, W, 3]``.

    ``format`` is the message's ``format`` field ('jpeg', 'png', or image_transport's
    '<enc>; jpeg compressed <enc>').  Gray and alpha images come back as three-channel RGB.
    Raises :class:`ImageDecodeError` on empty, corrupt or truncated data.
    """
    import cv2

    kind = _compressed_kind(format)
    buf = _as_uint8_buffer(data, f"{kind} image")
    if buf.size == 0:
        raise ImageDecodeError(f"empty {kind} data")
    if kind == "jpeg" and buf.size >= 2 and not (buf[0] == 0xFF and buf[1] == 0xD8):
        raise ImageDecodeError(f"corrupt jpeg data: no start-of-image marker ({buf.size} bytes)")
    if kind == "png" and not bytes(buf[:8]) == b"\x89PNG\r\n\x1a\n":
        raise ImageDecodeError(f"corrupt png data: bad signature ({buf.size} bytes)")
    if kind == "jpeg":
        # libjpeg fills a truncated stream with gray and only warns: refuse it instead
        # (0xFF 0xD9 cannot occur inside entropy-coded data; tolerate a few trailing bytes after it)
        if b"\xff\xd9" not in bytes(buf[-64:]):
            raise ImageDecodeError(f"truncated jpeg data: no end-of-image marker ({buf.size} bytes)")
    try:
        rgb_flag = getattr(cv2, "IMREAD_COLOR_RGB", None)
        img = cv2.imdecode(buf, rgb_flag if rgb_flag is not None else cv2.IMREAD_COLOR)
    except cv2.error as exc:
        raise ImageDecodeError(f"corrupt {kind} data ({buf.size} bytes): {exc}") from None
    if img is None or img.size == 0:
        raise ImageDecodeError(f"corrupt {kind} data: OpenCV could not decode {buf.size} bytes")
    if rgb_flag is None:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ImageDecodeError(f"{kind} decoded to an unexpected array {img.shape} {img.dtype}")
    return img


# --------------------------------------------------------------------------------------------
# RGB uint8 -> model input
# --------------------------------------------------------------------------------------------

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


def to_model_input(images, config: Optional[PreprocessConfig] = None, size: int = IMAGE_SIZE) -> torch.FloatTensor:
    """RGB uint8 images -> float32 ``[B, 3, size, size]`` in [-1, 1], Theia's preprocessing.

    ``images``: numpy array or torch tensor, uint8, ``[B, H, W, 3]`` or ``[H, W, 3]`` (RGB).
    Resizes straight to ``size`` x ``size`` with antialiased bilinear interpolation on uint8
    (matches PIL's BILINEAR to within 1 level), skipped when already that size; then
    ``(x / 255 - 0.5) / 0.5``.  The result lives on the images' device, contiguous NCHW.

    Raises TypeError for a non-uint8 dtype or non-array input, ValueError for a wrong rank,
    channel count or empty images.
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
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)  # contiguous NCHW
    out.copy_(x)
    # same operations, same rounding as the reference: ToTensor (x / 255) then Normalize(0.5, 0.5)
    return out.div_(255.0).sub_(0.5).div_(0.5)
