"""rosbag2 tools: encode-bag, inspect, recording a live encoder node, train-policy (rosbags, no rosbag2)."""
import json
import os
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from rosbags.rosbag2 import Reader, StoragePlugin, Writer

from theia_ros.bags import io as bag_io
from theia_ros.bags.encode import load_encoder
from theia_ros.cli.main import main
from theia_ros.images import decode_compressed
from theia_ros.stamps import stamp_ns

RANDOM_TINY = "random:theia-tiny-patch16-224-cddsv"
# torch on the CPU (not the default auto backend and device): outputs compared with `encoder` to 1e-5
ENCODE = ["--model", RANDOM_TINY, "--seed", "3", "--backend", "torch", "--device", "cpu", "--batch", "4",
          "--threads", "1", "--no-progress"]
IMAGE, COMPRESSED = bag_io.IMAGE_TYPE, bag_io.COMPRESSED_IMAGE_TYPE


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def encoder():
    # the same cached instance encode-bag uses for these arguments (the model is built once)
    return load_encoder(RANDOM_TINY, seed=3, backend="torch", device="cpu", max_batch=4)


# ---------------------------------------------------------------------------------------------
# bag building with rosbags


def _types():
    t = bag_io.typestore().types
    return {k.rsplit("/", 1)[-1]: v for k, v in t.items()
            if k in ("builtin_interfaces/msg/Time", "std_msgs/msg/Header", IMAGE, COMPRESSED,
                     "sensor_msgs/msg/JointState", "std_msgs/msg/String", "std_msgs/msg/Float64MultiArray",
                     "std_msgs/msg/MultiArrayLayout", "trajectory_msgs/msg/JointTrajectory",
                     "trajectory_msgs/msg/JointTrajectoryPoint", "builtin_interfaces/msg/Duration",
                     bag_io.FEATURES_TYPE)}


T = _types()


def header(t_ns, frame_id="cam"):
    return T["Header"](stamp=T["Time"](sec=t_ns // 10**9, nanosec=t_ns % 10**9), frame_id=frame_id)


def ser(msg, typename):
    return bytes(bag_io.typestore().serialize_cdr(msg, typename))


def image_cdr(rgb, t_ns, frame_id="front_optical", truncate=False):
    h, w, _ = rgb.shape
    data = rgb.reshape(-1)[: (h * w * 3) // 2] if truncate else rgb.reshape(-1)
    return ser(T["Image"](header=header(t_ns, frame_id), height=h, width=w, encoding="rgb8", is_bigendian=0,
                          step=w * 3, data=data), IMAGE)


def jpeg_cdr(rgb, t_ns, frame_id="wrist_optical"):
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(rgb[..., ::-1]))
    return ser(T["CompressedImage"](header=header(t_ns, frame_id), format="jpeg", data=buf.reshape(-1)),
               COMPRESSED), buf.tobytes()


def joint_cdr(t_ns, pos, names=("a", "b")):
    return ser(T["JointState"](header=header(t_ns, "base"), name=list(names), position=np.asarray(pos, float),
                               velocity=np.zeros(0), effort=np.zeros(0)), "sensor_msgs/msg/JointState")


def open_writer(path, storage):
    w = Writer(path, version=9, storage_plugin=StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3)
    w.open()
    return w


def read_bag(path):
    """topic -> [(bag timestamp, raw bytes)], plus the connections and metadata."""
    out = {}
    with Reader(path) as r:
        conns = {c.topic: c for c in r.connections}
        for c, ts, raw in r.messages():
            out.setdefault(c.topic, []).append((ts, bytes(raw)))
    meta = yaml.safe_load((Path(path) / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
    return out, conns, meta


def frame(seed, h=48, w=64):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def make_camera_bag(path, storage, n=6):
    """Raw rgb8 front camera, jpeg wrist camera, joint states, a String topic; one truncated raw frame."""
    w = open_writer(path, storage)
    c_front = w.add_connection("/front/image_raw", IMAGE, typestore=bag_io.typestore())
    c_wrist = w.add_connection("/wrist/image_raw/compressed", COMPRESSED, typestore=bag_io.typestore())
    c_js = w.add_connection("/joint_states", "sensor_msgs/msg/JointState", typestore=bag_io.typestore())
    c_s = w.add_connection("/note", "std_msgs/msg/String", typestore=bag_io.typestore())
    expect = {"front": [], "wrist": [], "copied": {"/joint_states": [], "/note": []}}
    for i in range(n):
        t = 5_000_000_000 + i * 100_000_000
        rgb = frame(i)
        if i == 2:  # undecodable: half of its pixels are missing
            w.write(c_front, t + 1_000, image_cdr(rgb, t, truncate=True))
        else:
            w.write(c_front, t + 1_000, image_cdr(rgb, t))
            expect["front"].append((t + 1_000, t, rgb))
        cdr, jpg = jpeg_cdr(frame(100 + i), t + 3_000_000)
        w.write(c_wrist, t + 4_000_000, cdr)
        expect["wrist"].append((t + 4_000_000, t + 3_000_000, decode_compressed(jpg, "jpeg")))
        for conn, raw, ts in ((c_js, joint_cdr(t, [i, -i]), t + 500),
                              (c_s, ser(T["String"](data=f"note {i}"), "std_msgs/msg/String"), t + 7)):
            w.write(conn, ts, raw)
            expect["copied"][conn.topic].append((ts, raw))
    w.close()
    return expect


# ---------------------------------------------------------------------------------------------
# encode-bag and inspect


@pytest.mark.parametrize("in_storage,out_storage", [("sqlite3", "mcap"), ("mcap", "sqlite3")])
def test_encode_bag_matches_the_encoder_and_copies_other_topics(tmp_path, capsys, caplog, encoder, in_storage,
                                                                out_storage):
    src, out = tmp_path / "in", tmp_path / "out"
    expect = make_camera_bag(src, in_storage)
    assert main(["encode-bag", str(src), str(out), "--storage", out_storage, *ENCODE]) == 0
    printed = capsys.readouterr()
    assert "/front/image_raw -> /front/features: 5 frames, 1 undecodable frames skipped" in printed.out
    assert "/wrist/image_raw/compressed -> /wrist/features: 6 frames" in printed.out
    assert "image data too short" in caplog.text  # the bad frame is logged with its reason

    msgs, conns, meta = read_bag(out)
    assert meta["version"] == 9 and meta["storage_identifier"] == out_storage
    assert conns["/front/features"].msgtype == bag_io.FEATURES_TYPE
    assert conns["/front/features"].digest == "RIHS01_c236b66e3130f6ed48d3dbc0386d5a3735f119fa492b5d18634df8f727dc276b"
    info = json.loads(meta["custom_data"][bag_io.CUSTOM_DATA_KEY])
    assert info["complete"] and info["random_weights"] and info["frames"] == 11 and info["bad_frames"] == 1
    for cam in ("front", "wrist"):
        got = msgs[f"/{cam}/features"]
        assert [ts for ts, _ in got] == [ts for ts, _, _ in expect[cam]]  # receive times = the images'
        want, _ = encoder.encode([rgb for _, _, rgb in expect[cam]])
        for (_, raw), (_, stamp, _), ref in zip(got, expect[cam], want):
            m = bag_io.deserialize(raw, bag_io.FEATURES_TYPE)
            assert stamp_ns(m.header.stamp) == stamp
            assert m.header.frame_id == f"{cam}_optical" and m.camera == cam
            assert m.random_weights and m.weights_id == f"{RANDOM_TINY}:seed=3" and m.model_id == RANDOM_TINY
            assert m.representation == "tokens" and list(m.shape) == [196, 192]
            np.testing.assert_allclose(_array(m), ref.numpy(), atol=1e-5, rtol=0)
    for topic, items in expect["copied"].items():
        assert msgs[topic] == items  # byte-identical, same timestamps
    assert conns["/joint_states"].msgtype == "sensor_msgs/msg/JointState"
    assert conns["/note"].msgtype == "std_msgs/msg/String"
    assert "/front/image_raw" not in msgs

    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    for needle in ("/front/features", "/wrist/features", "/joint_states", "/note", "196x192", "float32",
                   RANDOM_TINY, f"{RANDOM_TINY}:seed=3", "RANDOM WEIGHTS", "tokens", "complete: True"):
        assert needle in text, (needle, text)
    assert any(line.split()[:3] == ["/front/features", bag_io.FEATURES_TYPE, "5"] for line in text.splitlines())
    assert any(line.split()[:4] == ["/note", "std_msgs/msg/String", "6", "10.00"] for line in text.splitlines())


def _array(msg):
    from theia_ros.features import features_to_numpy

    return features_to_numpy(msg)


def test_no_copy_camera_choice_and_overwrite_refusal(tmp_path, capsys, encoder):
    src, out = tmp_path / "in", tmp_path / "out"
    make_camera_bag(src, "mcap", n=3)
    out.mkdir()
    (out / "keep.txt").write_text("not a bag")
    assert main(["encode-bag", str(src), str(out), *ENCODE]) == 1
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main(["encode-bag", str(src), str(out), "--overwrite", *ENCODE]) == 1  # not a bag: never deleted
    assert "does not look like a rosbag2 bag" in capsys.readouterr().err and (out / "keep.txt").exists()
    assert main(["encode-bag", str(src), str(src), "--overwrite", *ENCODE]) == 1  # never the input
    assert "is (or contains) the input" in capsys.readouterr().err

    out2 = tmp_path / "out2"
    args = ["encode-bag", str(src), str(out2), "--cameras", "/wrist/image_raw/compressed=/wrist/theia", "--no-copy",
            "--dtype", "float16", "--bag-version", "8", *ENCODE]
    assert main(args) == 0
    msgs, _, meta = read_bag(out2)
    assert sorted(msgs) == ["/wrist/theia"] and len(msgs["/wrist/theia"]) == 3
    assert meta["version"] == 8  # pre-Jazzy metadata: QoS profiles as a YAML string (see docs/bags.md)
    (topic_meta,) = [t["topic_metadata"] for t in meta["topics_with_message_count"]]
    assert topic_meta["name"] == "/wrist/theia" and isinstance(topic_meta["offered_qos_profiles"], str)
    m = bag_io.deserialize(msgs["/wrist/theia"][0][1], bag_io.FEATURES_TYPE)
    assert _array(m).dtype == np.float16 and m.camera == "wrist"
    assert main(args) == 1  # exists now
    assert "--overwrite" in capsys.readouterr().err
    assert main(args[:3] + ["--overwrite", "--cameras", "/front/image_raw", "--no-copy", *ENCODE]) == 0
    assert sorted(read_bag(out2)[0]) == ["/front/features"]
    assert main(["encode-bag", str(src), str(tmp_path / "o3"), "--cameras", "/nope", *ENCODE]) == 1
    assert "not in the bag" in capsys.readouterr().err


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_truncated_input_gives_a_clear_error_and_a_readable_partial_output(tmp_path, capsys, encoder, storage):
    src, out = tmp_path / "in", tmp_path / "out"
    w = open_writer(src, storage)
    c_img = w.add_connection("/front/image_raw", IMAGE, typestore=bag_io.typestore())
    c_big = w.add_connection("/blob", "std_msgs/msg/String", typestore=bag_io.typestore())
    for i in range(12):  # ~3 MB: several MCAP chunks and sqlite pages
        t = 10**9 + i * 10**8
        w.write(c_img, t, image_cdr(frame(i, 24, 32), t))
        w.write(c_big, t + 1, ser(T["String"](data="x" * 250_000), "std_msgs/msg/String"))
    w.close()
    data_file = next(p for p in src.iterdir() if p.suffix in (".mcap", ".db3"))
    os.truncate(data_file, int(data_file.stat().st_size * 0.6))

    assert main(["encode-bag", str(src), str(out), *ENCODE]) == 1
    err = capsys.readouterr().err
    assert "corrupt or truncated" in err and f"{out} is a valid bag" in err, err
    msgs, _, meta = read_bag(out)  # a complete bag with everything before the damage
    n = len(msgs["/front/features"])
    assert 2 <= n < 12 and len(msgs["/blob"]) >= n - 1
    assert [ts for ts, _ in msgs["/front/features"]] == [10**9 + i * 10**8 for i in range(n)]
    assert json.loads(meta["custom_data"][bag_io.CUSTOM_DATA_KEY])["complete"] is False
    assert main(["inspect", str(out)]) == 0
    assert "complete: False" in capsys.readouterr().out

    assert main(["inspect", str(src)]) == 1  # the damaged input itself: what is readable, and the error
    assert "ERROR: corrupt or truncated" in capsys.readouterr().out
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "metadata.yaml").write_text("rosbag2_bagfile_information: [")
    assert main(["encode-bag", str(tmp_path / "junk"), str(tmp_path / "o"), *ENCODE]) == 1
    assert "error: " in capsys.readouterr().err and not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------
# a live encoder node recorded into a bag


@pytest.mark.ros
def test_features_of_a_live_encoder_node_recorded_and_read_back(ros_client, tmp_path):
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.serialization import deserialize_message, serialize_message
    from sensor_msgs.msg import Image

    from theia_ros.bags.record import BagRecorder
    from theia_ros.msg import Features
    from theia_ros.nodes.recorder import RecorderNode

    from ros_helpers import NodeProcess

    params = tmp_path / "encoder.yaml"
    params.write_text(yaml.safe_dump({"theia_encoder": {"ros__parameters": {
        "model": RANDOM_TINY, "seed": 3, "qos": "reliable", "torch_threads": 1, "cameras": ["bagcam"]}}}))
    received, sub = ros_client.collect(Features, "bagcam/features")
    pub = ros_client.publisher(Image, "bagcam/image_raw")
    # the package's own recorder node, spun here so that its bag is written from this thread
    live = BagRecorder(tmp_path / "live", storage="sqlite3")
    rec = RecorderNode(live, ["/bagcam/features"], context=ros_client.context, node_name="bag_test_recorder")
    executor = SingleThreadedExecutor(context=ros_client.context)
    executor.add_node(rec.node)

    def spin_until(pred, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not pred():
            executor.spin_once(timeout_sec=0.05)
        return pred()

    try:
        with NodeProcess("theia_ros.nodes.theia_encoder", "--ros-args", "--params-file", params) as node:
            assert ros_client.wait_for_subscribers(pub, timeout=60), node.output()
            assert spin_until(lambda: "/bagcam/features" in rec.subscriptions, 30), node.output()
            for i in range(4):
                msg = Image(height=48, width=64, encoding="rgb8", step=192, data=frame(i).tobytes())
                msg.header.stamp.sec, msg.header.stamp.nanosec = 7, i * 1000
                msg.header.frame_id = "bagcam_optical"
                pub.publish(msg)
                assert spin_until(lambda: len(received) > i and rec.received > i, 30), node.output()
    finally:
        executor.remove_node(rec.node)
        executor.shutdown()
        rec.destroy()
        live.close()
        ros_client.node.destroy_subscription(sub)
        ros_client.node.destroy_publisher(pub)

    msgs = [m for _, m in received]
    assert len(msgs) == 4
    serialized = [serialize_message(m) for m in msgs]  # (Fast CDR leaves padding bytes unset: keep these)
    out = tmp_path / "features_bag"
    with BagRecorder(out, storage="mcap") as recorder:
        recorder.add_topic("/bagcam/features", bag_io.FEATURES_TYPE)
        for m, raw in zip(msgs, serialized):
            recorder.write("/bagcam/features", stamp_ns(m.header.stamp), raw)
    got, conns, _ = read_bag(out)
    assert conns["/bagcam/features"].msgtype == bag_io.FEATURES_TYPE
    assert [raw for _, raw in got["/bagcam/features"]] == serialized
    for (ts, raw), m in zip(got["/bagcam/features"], msgs):
        assert ts == stamp_ns(m.header.stamp)
        _assert_same_features(bag_io.deserialize(raw, bag_io.FEATURES_TYPE), m)
    live_msgs, _, meta = read_bag(tmp_path / "live")  # the recorder node's bag: the same messages
    assert meta["storage_identifier"] == "sqlite3" and len(live_msgs["/bagcam/features"]) == 4
    for (_, raw), m in zip(live_msgs["/bagcam/features"], msgs):
        _assert_same_features(bag_io.deserialize(raw, bag_io.FEATURES_TYPE), m)
        assert deserialize_message(raw, Features) == m


def _assert_same_features(b, m):
    """A rosbags-deserialized Features `b` equals the rclpy message `m`."""
    assert stamp_ns(b.header.stamp) == stamp_ns(m.header.stamp)
    assert (b.header.frame_id, b.camera, b.model_id, b.weights_id, b.representation) == (
        m.header.frame_id, m.camera, m.model_id, m.weights_id, m.representation)
    assert b.random_weights and m.random_weights and b.dtype == m.dtype
    assert list(b.shape) == list(m.shape) == [196, 192]
    assert _array(b).tobytes() == bytes(m.data)


# ---------------------------------------------------------------------------------------------
# train-policy


def _features_cdr(t_ns, array, camera="front"):
    from theia_ros.features import encode_array

    shape, code, data = encode_array(np.asarray(array, np.float32))
    return ser(T["Features"](header=header(t_ns, camera), camera=camera, model_id="fake", representation="tokens",
                             weights_id="fake:0", random_weights=False, preprocessing="", pos_interpolation="",
                             input_size=np.zeros(0, np.uint32), patch_grid=np.zeros(0, np.uint32),
                             shape=np.asarray(shape, np.uint32),
                             dtype=code, data=np.frombuffer(data, np.uint8)), bag_io.FEATURES_TYPE)


def test_train_policy_aligns_actions_of_each_kind(tmp_path, capsys):
    from theia_ros.bags.train_policy import TrainError, build_dataset
    from theia_ros.bags.train_policy import read_bag as read_training_bag

    path = tmp_path / "feats"
    w = open_writer(path, "sqlite3")
    store = bag_io.typestore()
    cf = w.add_connection("/front/features", bag_io.FEATURES_TYPE, typestore=store)
    cj = w.add_connection("/joint_states", "sensor_msgs/msg/JointState", typestore=store)
    cc = w.add_connection("/cmd", "std_msgs/msg/Float64MultiArray", typestore=store)
    ct = w.add_connection("/traj", "trajectory_msgs/msg/JointTrajectory", typestore=store)
    stamps = [10**9 + i * 10**8 for i in range(10)] + [5 * 10**9 + i * 10**8 for i in range(10)]  # 2 episodes
    for k, t in enumerate(stamps):
        w.write(cf, t + 20_000_000, _features_cdr(t, np.full((4, 8), k)))
        w.write(cj, t + 10, joint_cdr(t + 2_000_000, [k, 10 * k], names=("b", "a")))  # 2 ms after the frame
        if k != 3:  # one command missing: frame 3 dropped
            cmd = T["Float64MultiArray"](layout=T["MultiArrayLayout"](dim=[], data_offset=0),
                                         data=np.array([k, -k], float))
            w.write(cc, t + 20_000_000 + 5_000_000, ser(cmd, "std_msgs/msg/Float64MultiArray"))
        point = T["JointTrajectoryPoint"](positions=np.array([k, 2.0 * k]), velocities=np.zeros(0),
                                          accelerations=np.zeros(0), effort=np.zeros(0),
                                          time_from_start=T["Duration"](sec=0, nanosec=0))
        w.write(ct, t + 1, ser(T["JointTrajectory"](header=header(0, ""), joint_names=["b", "a"], points=[point]),
                               "trajectory_msgs/msg/JointTrajectory"))
    w.close()

    # sensor_msgs/JointState next-state actions, reordered to --action-joints; proprio from the same topic
    b = read_training_bag(path, action_topic="/joint_states", action_joints=["a", "b"],
                          proprio_topic="/joint_states")
    ds = build_dataset([b], tolerance=0.05, episode_gap=2.0, history=2)
    # each episode: 10 frames, the first lacks history, the last lacks a next state -> 8 samples
    assert len(ds) == 16 and sorted(set(ds.episodes.tolist())) == [0, 1]
    k = np.array([int(ds.features["front"][ds.index["front"][i, -1]][0, 0]) for i in range(len(ds))])
    np.testing.assert_array_equal(ds.actions, np.stack([10 * (k + 1), k + 1], 1))
    np.testing.assert_array_equal(ds.proprio[:, -1], np.stack([k, 10 * k], 1))  # first message order b, a
    np.testing.assert_array_equal(ds.index["front"][:, 0] + 1, ds.index["front"][:, 1])
    assert ds.dropped == {"end of episode (next-state action)": 2, "history before episode start": 2}

    # the same JointState topic taken as commands: positions at the frame's time
    ds = build_dataset([read_training_bag(path, action_topic="/joint_states", action_type="joint_command",
                                          action_joints=["a", "b"])])
    k = np.array([int(ds.features["front"][ds.index["front"][i, 0]][0, 0]) for i in range(len(ds))])
    assert len(ds) == 20 and ds.action_kind == "joint_command"
    np.testing.assert_array_equal(ds.actions, np.stack([10 * k, k], 1))

    # Float64MultiArray commands use receive times: 5 ms after the frame's; outside a 1 ms tolerance
    b = read_training_bag(path, action_topic="/cmd", action_joints=["x", "y"])
    with pytest.raises(TrainError, match="no action within tolerance: 20"):
        build_dataset([b], tolerance=0.001)
    ds = build_dataset([read_training_bag(path, action_topic="/cmd", stamp="receive")], tolerance=0.01)
    assert len(ds) == 19 and ds.action_names == ["joint_0", "joint_1"] and ds.dropped == {
        "no action within tolerance": 1}
    # JointTrajectory with a zero stamp: its receive time (1 ns after the frame's stamp)
    ds = build_dataset([read_training_bag(path, action_topic="/traj")], tolerance=0.01)
    k = np.array([int(ds.features["front"][ds.index["front"][i, 0]][0, 0]) for i in range(len(ds))])
    assert len(ds) == 20 and ds.action_names == ["b", "a"]
    np.testing.assert_array_equal(ds.actions, np.stack([k, 2 * k], 1))

    out = tmp_path / "ckpt"
    args = ["train-policy", str(path), "--policy", "mlp", "--out", str(out), "--action-topic", "/traj",
            "--epochs", "3", "--batch-size", "4", "--param", "hidden_sizes=[16]", "--no-plot", "--threads", "1"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "2 episode(s), 20 samples" in printed and "validation MSE" in printed
    assert main(args) == 1 and "--overwrite" in capsys.readouterr().err
    assert main(args[:6] + ["--action-topic", "/nope"] + args[8:] + ["--overwrite"]) == 1
    assert "action topic /nope not found" in capsys.readouterr().err


def test_train_policy_learns_where_the_bright_square_is(tmp_path, capsys, encoder):
    """Action = position of a bright square in the image; random encoder weights still keep where it is."""
    from theia_ros.bags.train_policy import train_policy
    from theia_ros.policies import make_policy

    src, feats, out = tmp_path / "frames", tmp_path / "features", tmp_path / "policy"
    w = open_writer(src, "mcap")
    store = bag_io.typestore()
    ci = w.add_connection("/front/image_raw", IMAGE, typestore=store)
    ca = w.add_connection("/arm/command", "std_msgs/msg/Float64MultiArray", typestore=store)
    rng = np.random.default_rng(0)
    size, square, n, episodes = 64, 16, 96, 8
    for i in range(n):
        t = 10**9 + i * 10**8 + (i // (n // episodes)) * 5 * 10**9  # 8 episodes, 5 s apart
        x, y = rng.integers(0, size - square + 1, 2)
        rgb = np.full((size, size, 3), 20, np.uint8)
        rgb[y:y + square, x:x + square] = 235
        w.write(ci, t, image_cdr(rgb, t))
        cmd = T["Float64MultiArray"](layout=T["MultiArrayLayout"](dim=[], data_offset=0),
                                     data=np.array([x, y], float) / (size - square))
        w.write(ca, t + 2_000_000, ser(cmd, "std_msgs/msg/Float64MultiArray"))
    w.close()
    assert main(["encode-bag", str(src), str(feats), "--cameras", "/front/image_raw", *ENCODE]) == 0
    capsys.readouterr()

    result = train_policy(feats, policy="theia_head", out=out, action_topic="/arm/command",
                          action_joints=["shoulder", "elbow"], epochs=100, batch_size=32, lr=1e-3, seed=0,
                          params={"channels": 32, "mlp_hidden": [64]}, threads=1)
    printed = capsys.readouterr().out
    assert "validation MSE: policy" in printed and "RANDOM encoder weights" in printed
    assert result.steps == 200 and len(result.val_rows) == 24  # 2 of 8 episodes validate
    assert result.ratio < 0.3, printed
    assert result.val_mse < 0.3 * result.const_mse
    assert (out / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "training_report.json").read_text())
    assert report["val_mse"] == pytest.approx(result.val_mse) and len(report["val_loss"]) == 100

    policy = make_policy(None, checkpoint=out)  # what the policy node loads
    assert policy.name == "theia_head" and policy.action_spec.joint_names == ["shoulder", "elbow"]
    assert policy.observation_spec.cameras == ["front"] and policy.observation_spec.model_id == RANDOM_TINY
    acts = np.stack([policy.act(result.dataset.observation(r)) for r in result.val_rows])
    np.testing.assert_allclose(acts, result.val_predictions, atol=1e-5)
