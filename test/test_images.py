"""ROS image messages -> RGB (theia_ros.images): raw buffers, compressed jpeg/png, the size check made
once per frame before any pixel is converted or decoded, and message_to_rgb on both message kinds."""
import array
import types
import warnings
import zlib

import cv2
import numpy as np
import pytest
import torch

from theia_ros.images import (
    SUPPORTED_ENCODINGS,
    ImageDecodeError,
    compressed_size,
    decode_compressed,
    image_to_rgb,
    message_to_rgb,
)
from theia_ros.preprocess import to_model_input

H, W = 37, 53  # odd sizes so row padding and strides matter


def rng_image(h=H, w=W, c=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8)


def ros_buffer(pixels, pad, kind=bytes):
    """Pack [H, W, C] uint8 as a ROS Image.data with `pad` junk bytes after every row."""
    h, w, c = pixels.shape
    rows = np.full((h, w * c + pad), 0xAB, np.uint8)
    rows[:, : w * c] = pixels.reshape(h, w * c)
    raw = rows.tobytes()
    if kind is bytes:
        return raw, w * c + pad
    if kind is bytearray:
        return bytearray(raw), w * c + pad
    if kind is array.array:
        return array.array("B", raw), w * c + pad
    if kind is memoryview:
        return memoryview(raw), w * c + pad
    return np.frombuffer(raw, np.uint8).copy(), w * c + pad


# reference conversions, written independently of the module (numpy / OpenCV)
REFERENCE = {
    "rgb8": (3, lambda p: p),
    "bgr8": (3, lambda p: cv2.cvtColor(np.ascontiguousarray(p), cv2.COLOR_BGR2RGB)),
    "rgba8": (4, lambda p: p[:, :, :3]),
    "bgra8": (4, lambda p: p[:, :, 2::-1]),
    "mono8": (1, lambda p: np.repeat(p, 3, axis=2)),
}


def test_supported_encodings_constant():
    assert set(SUPPORTED_ENCODINGS) == set(REFERENCE)
    assert issubclass(ImageDecodeError, ValueError)


@pytest.mark.parametrize("encoding", sorted(REFERENCE))
@pytest.mark.parametrize("pad", [0, 5])
@pytest.mark.parametrize("kind", [bytes, bytearray, array.array, memoryview, np.ndarray])
def test_image_to_rgb_bit_exact(encoding, pad, kind):
    channels, reference = REFERENCE[encoding]
    pixels = rng_image(c=channels, seed=channels + pad)
    data, step = ros_buffer(pixels, pad, kind)
    out = image_to_rgb(data, H, W, step, encoding)
    assert out.shape == (H, W, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, reference(pixels))


def test_image_to_rgb_views_and_copies():
    pixels = rng_image()
    data, step = ros_buffer(pixels, 0, bytearray)
    view = image_to_rgb(data, H, W, step, "rgb8")
    assert np.shares_memory(view, np.frombuffer(data, np.uint8))  # zero copies
    bgr = image_to_rgb(data, H, W, step, "bgr8")
    assert not np.shares_memory(bgr, np.frombuffer(data, np.uint8)) and bgr.flags.c_contiguous


def test_image_to_rgb_feeds_the_model_input():
    pixels = rng_image(c=4)
    data, step = ros_buffer(pixels, 3)
    rgb = image_to_rgb(data, H, W, step, "rgba8")  # read-only strided view
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = to_model_input(rgb)
    torch.testing.assert_close(x, to_model_input(np.ascontiguousarray(pixels[:, :, :3])), rtol=0, atol=0)


@pytest.mark.parametrize("encoding,height,width,step,size,match", [
    ("yuv422", H, W, W * 2, H * W * 2, "unsupported image encoding"),
    ("16UC1", H, W, W * 2, H * W * 2, "unsupported image encoding"),
    ("rgb8", H, W, W * 3 - 1, H * W * 3, "step"),
    ("bgra8", H, W, W * 3, H * W * 4, "step"),
    ("rgb8", H, W, W * 3, H * W * 3 - 1, "too short"),
    ("mono8", H, W, W + 4, (W + 4) * H - 2, "too short"),
    ("rgb8", 0, W, W * 3, 0, "empty"),
    ("rgb8", H, 0, 0, 0, "empty"),
])
def test_image_to_rgb_rejects(encoding, height, width, step, size, match):
    with pytest.raises(ImageDecodeError, match=match):
        image_to_rgb(bytes(size), height, width, step, encoding)


def test_image_to_rgb_rejects_non_buffers():
    with pytest.raises(ImageDecodeError):
        image_to_rgb([1, 2, 3], 1, 1, 3, "rgb8")


# ---- compressed -----------------------------------------------------------------------------------

def encode(rgb, ext):
    ok, buf = cv2.imencode(ext, np.ascontiguousarray(rgb[:, :, ::-1]))
    assert ok
    return buf.tobytes()


def test_decode_png_bit_exact():
    rgb = rng_image()
    out = decode_compressed(encode(rgb, ".png"), "png")
    np.testing.assert_array_equal(out, rgb)
    packed = array.array("B", encode(rgb, ".png"))
    np.testing.assert_array_equal(decode_compressed(packed, "bgr8; png compressed bgr8"), rgb)


def test_decode_jpeg_matches_opencv():
    rgb = rng_image(64, 48)
    data = encode(rgb, ".jpg")
    reference = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    for fmt in ("jpeg", "JPEG", "rgb8; jpeg compressed bgr8"):
        out = decode_compressed(data, fmt)
        assert out.shape == (64, 48, 3)
        np.testing.assert_array_equal(out, reference)


def test_decode_gray_png_gives_rgb():
    gray = rng_image(c=1)[:, :, 0]
    ok, buf = cv2.imencode(".png", gray)
    out = decode_compressed(buf.tobytes(), "png")
    np.testing.assert_array_equal(out, np.repeat(gray[:, :, None], 3, axis=2))


@pytest.mark.parametrize("data,fmt", [
    (b"", "jpeg"),
    (b"\x00" * 100, "jpeg"),
    (b"\xff\xd8\xff\xe0" + b"garbage" * 20 + b"\xff\xd9", "jpeg"),
    (b"\x89PNG\r\n\x1a\n" + b"garbage" * 20, "png"),
    (b"not a png at all", "png"),
])
def test_decode_corrupt(data, fmt):
    with pytest.raises(ImageDecodeError):
        decode_compressed(data, fmt)


def test_decode_truncated_jpeg():
    data = encode(rng_image(64, 64), ".jpg")
    with pytest.raises(ImageDecodeError, match="truncated|corrupt"):
        decode_compressed(data[: len(data) // 2], "jpeg")


def test_decode_truncated_png():
    data = encode(rng_image(64, 64), ".png")
    with pytest.raises(ImageDecodeError, match="corrupt"):
        decode_compressed(data[:-20], "png")


def test_decode_unsupported_format():
    with pytest.raises(ImageDecodeError, match="unsupported compressed image format"):
        decode_compressed(encode(rng_image(), ".png"), "tiff")



# ---- the size check, before decoding ----------------------------------------------------------------

MAX_PIXELS = 4000 * 3000


def _jpeg_with_declared_size(width, height):
    """A real jpeg (OpenCV's encoder) whose frame header (SOF0) then claims width x height."""
    data = bytearray(encode(rng_image(48, 64), ".jpg"))
    sof = data.index(b"\xff\xc0")  # marker, length (2), precision (1), height (2), width (2)
    data[sof + 5:sof + 9] = int(height).to_bytes(2, "big") + int(width).to_bytes(2, "big")
    return bytes(data)


def _png_with_declared_size(width, height):
    """A real png whose IHDR then claims width x height (with its CRC recomputed: only the size is wrong)."""
    data = bytearray(encode(rng_image(48, 64), ".png"))
    data[16:24] = int(width).to_bytes(4, "big") + int(height).to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return bytes(data)


@pytest.fixture
def no_decoding(monkeypatch):
    """The decoders (OpenCV's for png, simplejpeg's for jpeg) replaced by a recorder: any decode attempt is seen."""
    import simplejpeg

    calls = []
    monkeypatch.setattr(cv2, "imdecode", lambda *args: calls.append(args))
    monkeypatch.setattr(simplejpeg, "decode_jpeg", lambda *args, **kwargs: calls.append(args))
    return calls


def test_compressed_size_reads_the_headers():
    assert compressed_size(np.frombuffer(encode(rng_image(48, 64), ".jpg"), np.uint8), "jpeg") == (64, 48)
    assert compressed_size(np.frombuffer(encode(rng_image(48, 64), ".png"), np.uint8), "png") == (64, 48)
    assert compressed_size(np.frombuffer(_jpeg_with_declared_size(60000, 50000), np.uint8), "jpeg") == (60000, 50000)
    assert compressed_size(np.frombuffer(_png_with_declared_size(70000, 9), np.uint8), "png") == (70000, 9)
    with pytest.raises(ImageDecodeError, match="no frame header"):
        compressed_size(np.frombuffer(b"\xff\xd8\xff\xd9", np.uint8), "jpeg")


@pytest.mark.parametrize("kind,data,size", [("jpeg", _jpeg_with_declared_size(60000, 50000), "60000x50000"),
                                            ("png", _png_with_declared_size(70000, 60000), "70000x60000")])
def test_oversized_compressed_frames_are_refused_without_decoding(kind, data, size, no_decoding):
    with pytest.raises(ImageDecodeError, match=f"^{size} frame exceeds max_image_pixels={MAX_PIXELS}$"):
        decode_compressed(data, kind, max_pixels=MAX_PIXELS)
    with pytest.raises(ImageDecodeError, match=f"^{size} frame exceeds max_image_pixels={MAX_PIXELS}$"):
        message_to_rgb(types.SimpleNamespace(format=kind, data=data), max_pixels=MAX_PIXELS)
    assert no_decoding == []  # refused from the header alone
    # without a limit the same bytes do reach the decoder (the recorder decodes nothing: refused after it)
    with pytest.raises(ImageDecodeError, match="could not decode"):
        decode_compressed(data, kind)
    assert len(no_decoding) == 1


def test_oversized_raw_frame_is_refused_before_its_buffer_is_read():
    msg = types.SimpleNamespace(encoding="rgb8", height=5000, width=5000, step=15000, data=b"")
    with pytest.raises(ImageDecodeError, match=f"5000x5000 frame exceeds max_image_pixels={MAX_PIXELS}"):
        message_to_rgb(msg, max_pixels=MAX_PIXELS)
    with pytest.raises(ImageDecodeError, match="too short"):  # without the limit the empty buffer is what is wrong
        message_to_rgb(msg)


# ---- message_to_rgb: both message kinds, rclpy or rosbags alike ---------------------------------------

def test_message_to_rgb_on_image_and_compressed_image():
    from sensor_msgs.msg import Image

    rgb = rng_image()
    data, step = ros_buffer(np.ascontiguousarray(rgb[:, :, ::-1]), 3)
    ros_image = Image(height=H, width=W, step=step, encoding="bgr8", data=data)  # a real rclpy message
    np.testing.assert_array_equal(message_to_rgb(ros_image, max_pixels=H * W), rgb)
    bag_image = types.SimpleNamespace(height=H, width=W, step=step, encoding="bgr8",
                                      data=np.frombuffer(data, np.uint8))  # how rosbags hands it over
    np.testing.assert_array_equal(message_to_rgb(bag_image), rgb)
    compressed = types.SimpleNamespace(format="rgb8; png compressed bgr8", data=encode(rgb, ".png"))
    np.testing.assert_array_equal(message_to_rgb(compressed, max_pixels=H * W), rgb)
    with pytest.raises(ImageDecodeError, match="exceeds"):
        message_to_rgb(compressed, max_pixels=H * W - 1)


# ---- input not made by this project -----------------------------------------------------------------

@pytest.mark.parametrize("name,kind", [("grace_hopper.jpg", "jpeg"), ("Minduka_Present_Blue_Pack.png", "png")])
def test_third_party_files_decode_like_pillow_decodes_them(name, kind):
    """A photograph and an RGBA png shipped with matplotlib (other encoders than ours), checked against
    Pillow's independent decoders."""
    cbook = pytest.importorskip("matplotlib.cbook")
    Image = pytest.importorskip("PIL.Image")
    path = cbook.get_sample_data(name, asfileobj=False)
    data = open(path, "rb").read()
    with Image.open(path) as picture:
        reference = np.asarray(picture.convert("RGB"))  # RGBA: the alpha channel is dropped, as OpenCV does
        declared = picture.size
    assert compressed_size(np.frombuffer(data, np.uint8), kind) == declared
    rgb = message_to_rgb(types.SimpleNamespace(format=kind, data=data), max_pixels=declared[0] * declared[1])
    assert rgb.shape == reference.shape and rgb.dtype == np.uint8
    diff = np.abs(rgb.astype(int) - reference.astype(int))
    if kind == "png":
        assert diff.max() == 0
    else:  # two jpeg decoders may round their inverse DCTs differently
        assert diff.mean() < 0.5 and diff.max() <= 8
    with pytest.raises(ImageDecodeError, match="exceeds"):
        message_to_rgb(types.SimpleNamespace(format=kind, data=data), max_pixels=declared[0] * declared[1] - 1)
