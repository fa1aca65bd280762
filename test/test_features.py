"""Packing and unpacking of Features messages (rosidl-built message class, no ROS graph)."""
import array

import ml_dtypes
import numpy as np
import pytest
import torch
from rclpy.serialization import deserialize_message, serialize_message
from std_msgs.msg import Header

from theia_ros.features import (
    DTYPE_BFLOAT16,
    DTYPE_FLOAT16,
    DTYPE_FLOAT32,
    FeaturesFormatError,
    decode_array,
    features_to_numpy,
    features_to_torch,
    to_features_msg,
)
from theia_ros.msg import Features, MultiCameraFeatures

NP_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def test_message_constants_match_helpers():
    assert (Features.DTYPE_FLOAT32, Features.DTYPE_FLOAT16, Features.DTYPE_BFLOAT16) == (
        DTYPE_FLOAT32, DTYPE_FLOAT16, DTYPE_BFLOAT16)
    assert Features.REPRESENTATION_TOKENS == "tokens"


def _special_values(dtype):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((196, 192)).astype(np.float32) * 10
    x.flat[:6] = [0.0, -0.0, np.inf, -np.inf, np.nan, 1e-8]
    return x.astype(NP_DTYPES[dtype])


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_numpy_round_trip_is_bit_exact_through_serialisation(dtype):
    x = _special_values(dtype)
    header = Header(frame_id="cam0")
    header.stamp.sec, header.stamp.nanosec = 12, 345
    msg = to_features_msg(x, header=header, camera="front", model_id="m", weights_id="sha256:ab")
    wire = deserialize_message(serialize_message(msg), Features)
    y = features_to_numpy(wire)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert y.view(np.uint8).tobytes() == x.view(np.uint8).tobytes()  # bit-exact, NaN and -0.0 too
    assert (wire.header.stamp.sec, wire.header.stamp.nanosec, wire.header.frame_id) == (12, 345, "cam0")
    assert (wire.camera, wire.model_id, wire.weights_id, wire.random_weights) == ("front", "m", "sha256:ab", False)
    assert list(wire.shape) == [196, 192]
    assert wire.dtype == {"float32": 0, "float16": 1, "bfloat16": 2}[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_torch_round_trip_is_bit_exact(dtype):
    x = torch.randn(2, 196, 192).to(dtype)
    msg = deserialize_message(serialize_message(to_features_msg(x)), Features)
    y = features_to_torch(msg)
    assert y.dtype == dtype and tuple(y.shape) == (2, 196, 192)
    assert torch.equal(y.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       x.view(torch.int16 if dtype != torch.float32 else torch.int32))


def test_cast_on_pack():
    x = np.linspace(-3, 3, 192, dtype=np.float32)
    msg = to_features_msg(x, dtype="float16")
    assert msg.dtype == DTYPE_FLOAT16
    np.testing.assert_array_equal(features_to_numpy(msg), x.astype(np.float16))
    msg = to_features_msg(torch.from_numpy(x), dtype="bfloat16")
    assert msg.dtype == DTYPE_BFLOAT16
    assert torch.equal(features_to_torch(msg), torch.from_numpy(x).bfloat16())


def test_big_endian_input_is_written_little_endian():
    x = np.arange(6, dtype=">f4").reshape(2, 3)
    msg = to_features_msg(x)
    assert bytes(msg.data) == np.arange(6, dtype="<f4").tobytes()
    np.testing.assert_array_equal(features_to_numpy(msg), x)


def test_read_is_zero_copy():
    msg = deserialize_message(serialize_message(to_features_msg(np.zeros((4, 8), np.float32))), Features)
    view = features_to_numpy(msg)
    assert not view.flags.writeable
    msg.data[0:4] = array.array("B", np.float32(2.5).tobytes())  # change the message buffer ...
    assert view[0, 0] == 2.5  # ... and the view sees it: same memory
    tview = features_to_torch(msg)
    msg.data[4:8] = array.array("B", np.float32(-1.0).tobytes())
    assert tview[0, 1].item() == -1.0


@pytest.mark.parametrize("shape,dtype,nbytes,match", [
    ([196, 192], 0, 196 * 192 * 4 - 1, "needs"),          # wrong data length
    ([196, 192], 0, 196 * 192 * 4 + 4, "needs"),
    ([196, 192], 7, 196 * 192 * 4, "unknown dtype"),      # unknown dtype
    ([], 0, 4, "rank-0"),                                  # rank 0
    ([2**32 - 1] * 4, 0, 16, "needs"),                     # product overflows 64 bits: no wrap-around
    ([1] * 9, 0, 4, "rank 9"),
])
def test_inconsistent_messages_raise_clear_errors(shape, dtype, nbytes, match):
    msg = Features()
    msg.shape, msg.dtype, msg.data = shape, dtype, bytes(nbytes)
    with pytest.raises(FeaturesFormatError, match=match):
        features_to_numpy(msg)
    with pytest.raises(FeaturesFormatError, match=match):
        features_to_torch(msg)


def test_pack_rejects_unsupported_tensors():
    with pytest.raises(FeaturesFormatError, match="rank-0"):
        to_features_msg(np.float32(1.0))
    with pytest.raises(FeaturesFormatError, match="unsupported features dtype"):
        to_features_msg(np.zeros(3, np.int64))


def test_empty_dimension_round_trips():
    x = np.zeros((0, 192), np.float32)
    assert features_to_numpy(to_features_msg(x)).shape == (0, 192)
    assert decode_array([0, 192], 0, b"").shape == (0, 192)


def test_multi_camera_message_keeps_each_stamp():
    msgs = []
    for i, cam in enumerate(["left", "right", "wrist"]):
        h = Header(frame_id=f"{cam}_optical")
        h.stamp.sec, h.stamp.nanosec = 100, 1000 * i
        msgs.append(to_features_msg(np.full((196, 4), i, np.float32), header=h, camera=cam))
    multi = MultiCameraFeatures(cameras=msgs, max_stamp_skew=2e-6)
    multi.header.stamp = msgs[-1].header.stamp
    back = deserialize_message(serialize_message(multi), MultiCameraFeatures)
    assert [c.camera for c in back.cameras] == ["left", "right", "wrist"]
    assert [c.header.stamp.nanosec for c in back.cameras] == [0, 1000, 2000]
    assert [float(features_to_numpy(c)[0, 0]) for c in back.cameras] == [0.0, 1.0, 2.0]
