"""ROS image messages -> RGB uint8 ``[H, W, 3]`` (plain Python: numpy, OpenCV, simplejpeg; no ROS).

One conversion for everything that reads images: the encoder node (rclpy messages) and the bag
tools (rosbags messages) both call :func:`message_to_rgb`. ``sensor_msgs/Image`` raw buffers
(:func:`image_to_rgb`) and ``sensor_msgs/CompressedImage`` jpeg/png payloads
(:func:`decode_compressed`) are converted with at most one copy. A size limit is checked once
per frame, on the declared size, before any pixel is converted or decoded: for jpeg and png the
size comes from the stream's own header (JPEG SOF, PNG IHDR).

Damaged data is refused, never decoded into a plausible picture. libjpeg only *warns* about
corrupt entropy-coded data ("Corrupt JPEG data: bad Huffman code") or a stream that ends early,
fills in what it could not decode, and OpenCV's ``imdecode`` hands that picture back without
saying so; jpeg is therefore decoded by simplejpeg (libjpeg-turbo's TurboJPEG API, bundled in its
wheel) with ``strict=True``, which turns every libjpeg warning into an error. png is decoded by
OpenCV (libpng errors make ``imdecode`` fail) after every chunk's CRC has been checked here:
libpng only warns about a CRC error in an ancillary chunk and decodes the image anyway. libpng's
remaining warnings (extra compressed data after the last row) stay invisible through OpenCV and
are not checked: finding them would mean inflating the data twice, for no damaged pixel.
"""
from __future__ import annotations

import struct
import zlib

import numpy as np

__all__ = [
    "SUPPORTED_ENCODINGS",
    "SUPPORTED_COMPRESSED_FORMATS",
    "ImageDecodeError",
    "image_to_rgb",
    "decode_compressed",
    "compressed_size",
    "message_to_rgb",
    "as_rgb_batch",
]

# ROS `sensor_msgs/Image.encoding` values image_to_rgb understands -> channels per pixel
_ENCODING_CHANNELS = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1}
SUPPORTED_ENCODINGS = tuple(_ENCODING_CHANNELS)
SUPPORTED_COMPRESSED_FORMATS = ("jpeg", "png")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class ImageDecodeError(ValueError):
    """An image message could not be turned into an RGB uint8 array."""


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


def image_to_rgb(buffer, height: int, width: int, step: int, encoding: str,
                 max_pixels: int | None = None) -> np.ndarray:
    """Convert a raw ``sensor_msgs/Image`` buffer to an RGB uint8 ``[height, width, 3]`` array.

    ``buffer`` is ``msg.data`` (bytes, bytearray, array.array('B'), memoryview or a uint8 numpy
    array); ``step`` is the row length in bytes (>= width * channels; extra bytes are row padding
    and are skipped).  Supported encodings: :data:`SUPPORTED_ENCODINGS` (``mono8`` is replicated
    to three channels).

    At most one copy is made: ``rgb8`` and ``rgba8`` come back as (possibly read-only, possibly
    strided) views into ``buffer``; ``bgr8``, ``bgra8`` and ``mono8`` as one new contiguous array.
    Copy the result if it must outlive ``buffer``.

    Raises :class:`ImageDecodeError` for an unsupported encoding, zero or negative sizes,
    ``step < width * channels``, a buffer shorter than ``step * height``, or more than
    ``max_pixels`` pixels.
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
    _check_pixels(width, height, max_pixels)
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


def decode_compressed(data, format: str = "jpeg", max_pixels: int | None = None) -> np.ndarray:
    """Decode a ``sensor_msgs/CompressedImage`` payload (jpeg or png) to RGB uint8 ``[H, W, 3]``.

    ``format`` is the message's ``format`` field ('jpeg', 'png', or image_transport's
    '<enc>; jpeg compressed <enc>').  Gray and alpha images come back as three-channel RGB.
    Raises :class:`ImageDecodeError` on empty, corrupt or truncated data (any decoder warning
    counts: libjpeg's "Corrupt JPEG data: ...", a png chunk whose CRC does not match), and, before
    decoding anything, when the size the stream declares exceeds ``max_pixels``.
    """
    kind = _compressed_kind(format)
    buf = _as_uint8_buffer(data, f"{kind} image")
    if buf.size == 0:
        raise ImageDecodeError(f"empty {kind} data")
    if kind == "jpeg" and buf.size >= 2 and not (buf[0] == 0xFF and buf[1] == 0xD8):
        raise ImageDecodeError(f"corrupt jpeg data: no start-of-image marker ({buf.size} bytes)")
    if kind == "png" and not bytes(buf[:8]) == _PNG_SIGNATURE:
        raise ImageDecodeError(f"corrupt png data: bad signature ({buf.size} bytes)")
    if kind == "jpeg":
        # a stream cut short: say so before the decoder does
        # (0xFF 0xD9 cannot occur inside entropy-coded data; tolerate a few trailing bytes after it)
        if b"\xff\xd9" not in bytes(buf[-64:]):
            raise ImageDecodeError(f"truncated jpeg data: no end-of-image marker ({buf.size} bytes)")
    if max_pixels is not None:
        width, height = compressed_size(buf, kind)
        _check_pixels(width, height, max_pixels)
    img = _decode_jpeg(buf) if kind == "jpeg" else _decode_png(buf)
    if img is None or img.size == 0:
        raise ImageDecodeError(f"corrupt {kind} data: could not decode {buf.size} bytes")
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ImageDecodeError(f"{kind} decoded to an unexpected array {img.shape} {img.dtype}")
    return img


def _decode_jpeg(buf: np.ndarray):
    """libjpeg-turbo through simplejpeg, strict: every libjpeg warning (corrupt entropy-coded data,
    a premature end, extraneous bytes) raises instead of filling the picture with guesses."""
    import simplejpeg

    try:
        return simplejpeg.decode_jpeg(buf, colorspace="RGB", strict=True)
    except ValueError as exc:  # simplejpeg's error for libjpeg errors and (strict) warnings
        raise ImageDecodeError(f"corrupt jpeg data ({buf.size} bytes): {exc}") from None


def _decode_png(buf: np.ndarray):
    """Chunk structure and every CRC checked here, then libpng through OpenCV (its errors: None)."""
    import cv2

    _check_png_chunks(buf)
    rgb_flag = getattr(cv2, "IMREAD_COLOR_RGB", None)
    try:
        img = cv2.imdecode(buf, rgb_flag if rgb_flag is not None else cv2.IMREAD_COLOR)
    except cv2.error as exc:
        raise ImageDecodeError(f"corrupt png data ({buf.size} bytes): {exc}") from None
    if img is not None and rgb_flag is None:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return img


def _check_png_chunks(buf) -> None:
    """Walk a png's chunks: IHDR first, each chunk whole with a matching CRC-32, up to IEND.
    ImageDecodeError names the first chunk that fails. Costs a CRC pass over the data (~5% of
    decoding it)."""
    view = memoryview(buf).cast("B")
    size, pos, first = len(view), len(_PNG_SIGNATURE), True
    while True:
        if pos + 12 > size:
            raise ImageDecodeError(f"corrupt png data: truncated, no IEND chunk ({size} bytes)")
        (length,) = struct.unpack_from(">I", view, pos)
        kind = bytes(view[pos + 4:pos + 8])
        end = pos + 8 + length
        if length > 2**31 - 1 or not kind.isalpha():
            raise ImageDecodeError(f"corrupt png data: bad chunk header at byte {pos}")
        if first and kind != b"IHDR":
            raise ImageDecodeError(f"corrupt png data: first chunk is {kind!r}, not IHDR")
        if end + 4 > size:
            raise ImageDecodeError(f"corrupt png data: truncated, chunk {kind.decode()} at byte {pos} ends past "
                                   f"the end of the {size} bytes")
        (crc,) = struct.unpack_from(">I", view, end)
        if zlib.crc32(view[pos + 4:end]) != crc:
            raise ImageDecodeError(f"corrupt png data: CRC error in chunk {kind.decode()} at byte {pos}")
        if kind == b"IEND":
            return
        pos, first = end + 4, False


def _check_pixels(width: int, height: int, max_pixels: int | None) -> None:
    if max_pixels is not None and width * height > max_pixels:
        raise ImageDecodeError(f"{width}x{height} frame exceeds max_image_pixels={max_pixels}")


_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_JPEG_NO_LENGTH = {0x01, *range(0xD0, 0xD8)}  # TEM and RSTn stand alone


def compressed_size(buf, kind: str) -> tuple[int, int]:
    """(width, height) a jpeg or png stream declares in its header (PNG IHDR, JPEG SOFn), read
    without decoding pixels. Raises ImageDecodeError when the header is missing or malformed."""
    if kind == "png":
        data = bytes(buf[:24])
        if len(data) < 24 or data[12:16] != b"IHDR":
            raise ImageDecodeError(f"corrupt png data: no IHDR header ({len(buf)} bytes)")
        width, height = struct.unpack(">II", data[16:24])
        return width, height
    pos = 2  # after SOI
    view = memoryview(buf)
    while pos + 4 <= len(view):
        if view[pos] != 0xFF:
            raise ImageDecodeError(f"corrupt jpeg data: no marker at byte {pos} before the frame header")
        marker = view[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _JPEG_NO_LENGTH:
            pos += 2
            continue
        (length,) = struct.unpack(">H", view[pos + 2:pos + 4])
        if marker in _JPEG_SOF:
            if pos + 9 > len(view) or length < 8:
                break
            height, width = struct.unpack(">HH", view[pos + 5:pos + 9])
            return width, height
        if marker in (0xD9, 0xDA):  # end of image or scan data before any frame header
            break
        pos += 2 + length
    raise ImageDecodeError(f"corrupt jpeg data: no frame header (SOF) ({len(buf)} bytes)")


def message_to_rgb(msg, max_pixels: int | None = None) -> np.ndarray:
    """RGB uint8 ``[H, W, 3]`` of an image message: a ``sensor_msgs/CompressedImage`` (has ``format``)
    or a ``sensor_msgs/Image`` (has ``encoding``), from rclpy or from rosbags alike. The size is
    checked against ``max_pixels`` once, before converting or decoding any pixel."""
    if hasattr(msg, "format"):
        return decode_compressed(msg.data, msg.format, max_pixels)
    return image_to_rgb(msg.data, msg.height, msg.width, msg.step, msg.encoding, max_pixels)


def as_rgb_batch(arr):
    """`arr` (numpy or torch) as an RGB batch [B, H, W, 3]: one image [H, W, 3] gains a batch axis.
    Raises ValueError for a wrong rank, channel count or empty images (the dtype is the caller's)."""
    if arr.ndim == 3:
        arr = arr[None]
    elif arr.ndim != 4:
        raise ValueError(f"images must have shape [B,H,W,3] or [H,W,3], got rank {arr.ndim} {tuple(arr.shape)}")
    b, h, w, c = arr.shape
    if c != 3:
        raise ValueError(f"images must be RGB with 3 channels in the last dimension, got shape {tuple(arr.shape)}")
    if b == 0 or h == 0 or w == 0:
        raise ValueError(f"empty images: shape {tuple(arr.shape)}")
    return arr
