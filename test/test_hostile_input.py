"""Hostile input (issue 15): corrupt and oversized images refused by the one decoding function, in the
encoder node and in encode-bag, and encoder counters that say what happened to every frame.

The node tests run theia_encoder in its own process and talk to it over Fast DDS."""
import os
import signal
import struct
import time
import zlib

import cv2
import numpy as np
import pytest
import yaml
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image

from theia_ros.images import ImageDecodeError, decode_compressed
from theia_ros.msg import Features

from ros_helpers import NodeProcess, wait_until

RANDOM_TINY = "random:theia-tiny-patch16-224-cddsv"


# ---- hostile files, made here -------------------------------------------------------------------

def camera_picture(h=120, w=160, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) % 256], axis=-1).astype(np.float64)
    return np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)


def jpeg(rgb, quality=90):
    return cv2.imencode(".jpg", np.ascontiguousarray(rgb[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()


def png(rgb):
    return cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))[1].tobytes()


def jpeg_with_noise_scan(rgb, seed=0):
    """A real JPEG whose entropy-coded data is replaced by random bytes of the same length; every marker
    (SOI, tables, SOF, SOS, EOI) stays intact (0xFF in the noise is byte-stuffed as JPEG requires)."""
    data = jpeg(rgb)
    sos = data.index(b"\xff\xda")
    start = sos + 2 + int.from_bytes(data[sos + 2:sos + 4], "big")
    end = data.rindex(b"\xff\xd9")
    noise = bytearray(np.random.default_rng(seed).integers(0, 256, end - start, dtype=np.uint8).tobytes())
    scan = noise.replace(b"\xff", b"\xff\x00")[:end - start]
    if scan.endswith(b"\xff"):
        scan[-1] = 0
    return data[:start] + bytes(scan) + data[end:]


def png_chunk(kind, payload):
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_with_bad_ancillary_crc(rgb):
    """A real PNG with a tEXt chunk whose CRC is wrong: libpng only warns ("tEXt: CRC error") and decodes."""
    data = png(rgb)
    text = bytearray(png_chunk(b"tEXt", b"Comment\x00camera 3"))
    text[-1] ^= 0x01
    return data[:33] + bytes(text) + data[33:]  # after the 8-byte signature and the 25-byte IHDR chunk


def png_with_bad_idat_crc(rgb):
    data = bytearray(png(rgb))
    pos = data.index(b"IDAT") - 4
    length = int.from_bytes(data[pos:pos + 4], "big")
    data[pos + 8 + length] ^= 0x01  # first byte of its CRC
    return bytes(data)


def big_jpeg(width=12000, height=9000):
    """A real (valid) JPEG of width x height, ~2 MB: a gray ramp with a noisy row every 500 rows."""
    ramp = (np.arange(width, dtype=np.uint32) * 255 // width).astype(np.uint8)
    img = np.ascontiguousarray(np.broadcast_to(ramp, (height, width)))
    img[::500] = np.random.default_rng(0).integers(0, 256, (len(range(0, height, 500)), width), dtype=np.uint8)
    data = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 80])[1].tobytes()
    del img
    return data


# ---- the one decoding function -------------------------------------------------------------------

def test_corrupt_jpeg_that_libjpeg_only_warns_about_is_refused():
    rgb = camera_picture()
    bad = jpeg_with_noise_scan(rgb)
    # what made it dangerous: OpenCV hands back a full-size picture of garbage without a word to Python
    garbage = cv2.imdecode(np.frombuffer(bad, np.uint8), cv2.IMREAD_COLOR)
    assert garbage is not None and garbage.shape == (120, 160, 3)
    with pytest.raises(ImageDecodeError, match=r"^corrupt jpeg data \(\d+ bytes\): Corrupt JPEG data"):
        decode_compressed(bad, "jpeg")
    good = jpeg(rgb)
    np.testing.assert_array_equal(decode_compressed(good, "jpeg"),
                                  cv2.imdecode(np.frombuffer(good, np.uint8), cv2.IMREAD_COLOR_RGB))
    half = good[:len(good) // 2]
    for stump in (half, half + b"\xff\xd9"):  # cut short, without or with an end-of-image marker after it
        with pytest.raises(ImageDecodeError, match="truncated jpeg data|Corrupt JPEG data|Premature end"):
            decode_compressed(stump, "jpeg")


@pytest.mark.parametrize("make,chunk", [(png_with_bad_ancillary_crc, "tEXt"), (png_with_bad_idat_crc, "IDAT")])
def test_png_with_a_crc_error_is_refused(make, chunk):
    rgb = camera_picture(seed=1)
    bad = make(rgb)
    with pytest.raises(ImageDecodeError, match=f"^corrupt png data: CRC error in chunk {chunk} at byte"):
        decode_compressed(bad, "png")
    np.testing.assert_array_equal(decode_compressed(png(rgb), "png"), rgb)


def test_a_bad_ancillary_crc_is_what_opencv_decodes_without_a_word():
    rgb = camera_picture(seed=1)
    decoded = cv2.imdecode(np.frombuffer(png_with_bad_ancillary_crc(rgb), np.uint8), cv2.IMREAD_COLOR_RGB)
    np.testing.assert_array_equal(decoded, rgb)  # the input is the hostile kind: accepted by the old path


# ---- every bag tool: encode-bag through the same function -----------------------------------------

def test_encode_bag_skips_corrupt_jpeg_and_png_frames(tmp_path, caplog):
    from rosbags.rosbag2 import StoragePlugin, Writer

    from theia_ros.bags import io as bag_io
    from theia_ros.cli.main import main

    store = bag_io.typestore()
    types = store.types
    src, out = tmp_path / "in", tmp_path / "out"
    writer = Writer(src, version=9, storage_plugin=StoragePlugin.MCAP)
    writer.open()
    conn = writer.add_connection("/wrist/image_raw/compressed", bag_io.COMPRESSED_IMAGE_TYPE, typestore=store)
    payloads = [("jpeg", jpeg(camera_picture(seed=0))), ("jpeg", jpeg_with_noise_scan(camera_picture(seed=1))),
                ("png", png(camera_picture(seed=2))), ("png", png_with_bad_ancillary_crc(camera_picture(seed=3))),
                ("jpeg", jpeg(camera_picture(seed=4)))]
    for i, (fmt, data) in enumerate(payloads):
        t = 1_000_000_000 + i * 100_000_000
        header = types["std_msgs/msg/Header"](stamp=types["builtin_interfaces/msg/Time"](sec=1, nanosec=i),
                                               frame_id="wrist")
        msg = types[bag_io.COMPRESSED_IMAGE_TYPE](header=header, format=fmt, data=np.frombuffer(data, np.uint8))
        writer.write(conn, t, bytes(store.serialize_cdr(msg, bag_io.COMPRESSED_IMAGE_TYPE)))
    writer.close()
    code = main(["encode-bag", str(src), str(out), "--model", RANDOM_TINY, "--seed", "3", "--backend", "torch",
                 "--device", "cpu", "--batch", "2", "--threads", "1", "--no-progress"])
    assert code == 0
    assert "Corrupt JPEG data" in caplog.text and "CRC error in chunk tEXt" in caplog.text
    from rosbags.rosbag2 import Reader

    with Reader(out) as reader:
        stamps = [bag_io.deserialize(raw, bag_io.FEATURES_TYPE).header.stamp.nanosec
                  for c, _, raw in reader.messages() if c.topic == "/wrist/features"]
    assert stamps == [0, 2, 4]  # the two damaged frames skipped, the others encoded


# ---- the encoder node ----------------------------------------------------------------------------

def start_encoder(tmp_path, **params):
    base = {"model": RANDOM_TINY, "seed": 3, "backend": "torch", "torch_threads": 1, "diagnostics_period": 0.3,
            "cameras": ["cam"]}
    base.update(params)
    path = tmp_path / "encoder.yaml"
    path.write_text(yaml.safe_dump({"theia_encoder": {"ros__parameters": base}}))
    return NodeProcess("theia_ros.nodes.theia_encoder", "--ros-args", "--params-file", path)


def camera_counters(diags):
    for _, array in reversed(diags):
        for status in array.status:
            if status.name.endswith("camera cam"):
                return {kv.key: kv.value for kv in status.values}
    return {}


def counter(diags, name):
    return int(camera_counters(diags).get(name, -1))


def peak_rss_mb(pid):
    """VmHWM: the peak resident set size of process `pid` so far, in MB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc/<pid>/status")


def compressed(data, fmt, stamp_ns):
    msg = CompressedImage(format=fmt)
    msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp_ns, 10**9)
    msg.header.frame_id = "cam_optical"
    msg.data = data
    return msg


def stamp_of(features_msg):
    return features_msg.header.stamp.sec * 10**9 + features_msg.header.stamp.nanosec


def oversized_frame_run(ros_client, tmp_path, max_image_pixels=None):
    """A node fed good frames, corrupt ones and a 12000x9000 JPEG over compressed transport. Returns what
    was measured (also used by hand with the limit off, to see what decoding it in full costs)."""
    feats, fsub = ros_client.collect(Features, "cam/features")
    diags, dsub = ros_client.collect(DiagnosticArray, "/diagnostics")
    pub = ros_client.publisher(CompressedImage, "cam/image_raw/compressed")
    params = {"image_transport": "compressed", "qos": "reliable"}
    if max_image_pixels is not None:
        params["max_image_pixels"] = max_image_pixels
    big = big_jpeg()
    # a good frame of about the same message size first, so DDS's buffers for it are already there
    warm = jpeg(np.random.default_rng(9).integers(0, 256, (960, 1280, 3), dtype=np.uint8), quality=85)
    result = {"big_bytes": len(big)}
    try:
        with start_encoder(tmp_path, **params) as node:
            assert ros_client.wait_for_subscribers(pub, timeout=60), node.output()
            stamp = [1_000_000_000]

            def send(data, fmt="jpeg"):
                stamp[0] += 1
                pub.publish(compressed(data, fmt, stamp[0]))
                return stamp[0]

            def encoded(t, timeout=30):
                return wait_until(lambda: any(stamp_of(m) == t for _, m in feats), timeout)

            def latency(data):
                t0 = time.monotonic()
                t = send(data)
                assert encoded(t), node.output()
                return next(r for r, m in feats if stamp_of(m) == t) - t0

            for _ in range(2):
                assert encoded(send(warm)), node.output()
            result["good_latency_s"] = [latency(jpeg(camera_picture(seed=s))) for s in range(3)]

            for i, (data, fmt) in enumerate([(jpeg_with_noise_scan(camera_picture()), "jpeg"),
                                             (png_with_bad_ancillary_crc(camera_picture()), "png"),
                                             (png_with_bad_idat_crc(camera_picture()), "png")]):
                t_bad = send(data, fmt)
                assert wait_until(lambda: counter(diags, "rejected_bad_input") == i + 1, 30), node.output()
                assert encoded(send(jpeg(camera_picture(seed=10 + i)))), node.output()  # the next good frame
                assert not any(stamp_of(m) == t_bad for _, m in feats)
            result["log"] = node.output()

            result["rss_before_mb"] = peak_rss_mb(node.proc.pid)
            t_big = send(big)
            time.sleep(0.3)  # taken and judged by now; the node is idle otherwise
            t0 = time.monotonic()
            t_next = send(jpeg(camera_picture(seed=20)))
            assert encoded(t_next, 60), node.output()
            result["next_after_big_s"] = next(r for r, m in feats if stamp_of(m) == t_next) - t0
            result["rss_after_mb"] = peak_rss_mb(node.proc.pid)
            result["big_encoded"] = any(stamp_of(m) == t_big for _, m in feats)
            wait_until(lambda: counter(diags, "frames_out") >= len(feats), 10)
            result["counters"] = camera_counters(diags)
            result["log"] = node.output()
            assert node.alive()
        result["exit_code"] = node.proc.returncode
    finally:
        ros_client.node.destroy_subscription(fsub)
        ros_client.node.destroy_subscription(dsub)
        ros_client.node.destroy_publisher(pub)
    return result


@pytest.mark.ros
def test_node_refuses_corrupt_and_oversized_compressed_frames(ros_client, tmp_path):
    r = oversized_frame_run(ros_client, tmp_path)
    log = r["log"]
    assert "cam: dropped a frame: corrupt jpeg data" in log and "Corrupt JPEG data" in log, log
    assert "CRC error in chunk tEXt" in log, log  # (the IDAT one: same reason, within 2 s: held back)
    assert "12000x9000 frame exceeds max_image_pixels=8294400" in log, log
    assert 1.0e6 < r["big_bytes"] < 4.0e6
    assert not r["big_encoded"]
    # refused from its header: the node's peak RSS hardly moves (decoding it: +324 MB of pixels alone)
    assert r["rss_after_mb"] - r["rss_before_mb"] < 16, r
    # and the next good frame is not held up (decoding 12000x9000 takes ~1 s here)
    assert r["next_after_big_s"] < 2 * max(r["good_latency_s"]) + 0.25, r
    c = r["counters"]
    assert int(c["rejected_bad_input"]) == 4 and int(c["errors"]) == 0, c
    assert r["exit_code"] == 0


# ---- counters: superseded while busy vs lost before arriving ---------------------------------------

def test_arrival_accounting_splits_sequence_gaps_with_what_dds_reports_lost():
    from theia_ros.nodes.stats import ArrivalAccounting

    a = ArrivalAccounting()
    for seq in (1, 2, 5, 6, 10):  # 2 + 3 frames missing between the ones taken
        a.took(seq)
    assert (a.taken, a.gaps, a.lost, a.replaced_in_reader, a.arrived) == (5, 5, 0, 5, 10)
    a.message_lost(2)  # DDS: 2 of them never reached the reader
    assert (a.lost, a.replaced_in_reader, a.arrived) == (2, 3, 8)
    a.message_lost(7)  # reported before the callback that shows the gap: never negative meanwhile
    assert (a.lost, a.replaced_in_reader, a.arrived) == (7, 0, 5)
    a.took(16)
    assert (a.lost, a.replaced_in_reader, a.arrived, a.arrived + a.lost) == (7, 3, 9, 16)
    blind = ArrivalAccounting(reports_lost=False)  # a middleware without the event: gaps are all it has
    for seq in (1, 4):
        blind.took(seq)
    assert (blind.lost, blind.replaced_in_reader, blind.arrived) == (2, 0, 2)


PASSIVE = QoSProfile(depth=1000, reliability=ReliabilityPolicy.BEST_EFFORT, history=HistoryPolicy.KEEP_LAST)
FAST = QoSProfile(depth=10, reliability=ReliabilityPolicy.BEST_EFFORT, history=HistoryPolicy.KEEP_LAST)


def raw_image(rgb, seq):
    msg = Image(height=rgb.shape[0], width=rgb.shape[1], encoding="rgb8", step=rgb.shape[1] * 3)
    msg.header.stamp.sec, msg.header.stamp.nanosec = 100, seq
    msg.header.frame_id = "cam_optical"
    msg.data = rgb.tobytes()
    return msg


@pytest.mark.ros
def test_counters_tell_frames_skipped_while_busy_from_frames_that_never_arrived(ros_client, tmp_path):
    """A 100 Hz camera and a model that takes longer than 10 ms: most frames are skipped because the node
    is busy, none is lost (a passive subscriber of the same topic receives all of them). Then the node's
    process is frozen (SIGSTOP) for 0.8 s while 80 frames of 0.9 MB keep coming: what the shared-memory
    transport can hold for it (a 16 MB segment, config/fastdds.xml: ~17 frames) arrives when it wakes,
    the rest never reaches it and is lost."""
    passive, psub = ros_client.collect(Image, "cam/image_raw", PASSIVE)
    diags, dsub = ros_client.collect(DiagnosticArray, "/diagnostics")
    feats, fsub = ros_client.collect(Features, "cam/features")
    pub = ros_client.publisher(Image, "cam/image_raw", FAST)
    frames = [np.random.default_rng(s).integers(0, 256, (480, 640, 3), dtype=np.uint8) for s in range(4)]
    sent = 0

    def publish(n, period=0.01, during=None):
        nonlocal sent
        next_t = time.monotonic()
        for i in range(n):
            if during is not None:
                during(i)
            pub.publish(raw_image(frames[sent % 4], sent))
            sent += 1
            next_t += period
            time.sleep(max(0.0, next_t - time.monotonic()))

    def settled(total):
        c = camera_counters(diags)
        return int(c.get("frames_in", -1)) + int(c.get("dropped_lost", -1)) == total and \
            int(c["frames_out"]) + int(c["dropped_superseded"]) + int(c["rejected_bad_input"]) == int(c["frames_in"])

    try:
        with start_encoder(tmp_path, qos="sensor_data", max_batch=1) as node:
            assert ros_client.wait_for_subscribers(pub, count=2, timeout=60), node.output()
            time.sleep(1.0)
            publish(200)
            assert wait_until(lambda: len(passive) >= 200, 20)
            assert wait_until(lambda: settled(200), 20), (camera_counters(diags), node.output())
            busy = camera_counters(diags)
            assert len(passive) == 200  # every frame reached this process
            assert int(busy["dropped_lost"]) == 0, busy  # so none was lost in DDS
            assert int(busy["frames_in"]) == 200, busy  # the node saw every one arrive ...
            assert int(busy["dropped_superseded"]) > 50, busy  # ... and skipped most because it was busy
            assert int(busy["frames_out"]) + int(busy["dropped_superseded"]) == 200, busy
            assert int(busy["frames_out"]) == len(feats) > 0

            def freeze(i):
                if i == 10:
                    os.kill(node.proc.pid, signal.SIGSTOP)
                elif i == 90:
                    os.kill(node.proc.pid, signal.SIGCONT)

            try:
                publish(100, during=freeze)
            finally:
                os.kill(node.proc.pid, signal.SIGCONT)
            assert wait_until(lambda: len(passive) >= 300, 20)
            assert wait_until(lambda: settled(300), 20), (camera_counters(diags), node.output())
            frozen = camera_counters(diags)
            assert len(passive) == 300
            lost = int(frozen["dropped_lost"])
            assert 0 < lost <= 80, frozen  # only frames sent while it was frozen can have failed to arrive
            assert int(frozen["frames_in"]) == 300 - lost, frozen
            assert int(frozen["frames_out"]) + int(frozen["dropped_superseded"]) == int(frozen["frames_in"]), frozen
            assert int(frozen["rejected_bad_input"]) == 0 and int(frozen["errors"]) == 0
            assert node.alive()
        assert node.proc.returncode == 0
    finally:
        for sub in (psub, dsub, fsub):
            ros_client.node.destroy_subscription(sub)
        ros_client.node.destroy_publisher(pub)
