"""Bags written by others: every message the storage holds is read, whatever metadata.yaml's QoS says.

rosbag2 writes bags whose metadata.yaml describes a topic's QoS differently from its storage file
(infinite deadline/lifespan durations encoded as {sec: 2147483647, nsec: 4294967295} before metadata
version 9 and {sec: 9223372036, nsec: 854775807} from 9 on; older storage files with no QoS at all;
metadata of versions 4 to 8 with the QoS as a YAML string of integer enums, version 9 as a list with
enum names). rosbags' directory reader yields a topic only when both agree, so such bags read as
empty. The bags here are written with rosbags' Writer (storage: sqlite3 or MCAP) and get a
metadata.yaml shaped like rosbag2's own of the version asked for.
"""
import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import yaml
from rosbags.interfaces import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability, QosTime
from rosbags.rosbag2 import StoragePlugin, Writer

from theia_ros.bags import io as bag_io
from theia_ros.cli.main import main

CAM, CHATTER, FEATURES, CMD = "/cam/image_raw", "/chatter", "/cam/features", "/cmd"
N_CAM, N_CHATTER = 5, 7
ENCODE = ["--model", "random:theia-tiny-patch16-224-cddsv", "--seed", "3", "--backend", "torch", "--device",
          "cpu", "--batch", "4", "--threads", "1", "--no-progress"]

# infinite durations: rmw's legacy encoding (rosbag2 metadata before version 9) and Jazzy's (version 9)
LEGACY_INFINITE, V9_INFINITE = QosTime(2147483647, 4294967295), QosTime(9223372036, 854775807)


def _qos(infinite: QosTime) -> Qos:
    return Qos(QosHistory.KEEP_LAST, 10, QosReliability.RELIABLE, QosDurability.VOLATILE, infinite, infinite,
               QosLiveliness.AUTOMATIC, infinite, False)


def _meta_qos(version: int, infinite: QosTime):
    """offered_qos_profiles as rosbag2 writes it in metadata.yaml of `version`."""
    q = _qos(infinite)
    time = {"sec": infinite.sec, "nsec": infinite.nsec}
    if version >= 9:  # a list, enums by name
        return [{"history": q.history.name.lower(), "depth": q.depth, "reliability": q.reliability.name.lower(),
                 "durability": q.durability.name.lower(), "deadline": time, "lifespan": time,
                 "liveliness": q.liveliness.name.lower(), "liveliness_lease_duration": time,
                 "avoid_ros_namespace_conventions": False}]
    # versions 4 to 8: one YAML string, enums as integers
    return (f"- history: {q.history.value}\n  depth: {q.depth}\n  reliability: {q.reliability.value}\n"
            f"  durability: {q.durability.value}\n  deadline:\n    sec: {infinite.sec}\n    nsec: {infinite.nsec}\n"
            f"  lifespan:\n    sec: {infinite.sec}\n    nsec: {infinite.nsec}\n  liveliness: {q.liveliness.value}\n"
            f"  liveliness_lease_duration:\n    sec: {infinite.sec}\n    nsec: {infinite.nsec}\n"
            "  avoid_ros_namespace_conventions: false")


def _types():
    return bag_io.typestore().types


def _ser(msg, msgtype):
    return bytes(bag_io.typestore().serialize_cdr(msg, msgtype))


def _header(t_ns, frame_id):
    T = _types()
    return T["std_msgs/msg/Header"](stamp=T["builtin_interfaces/msg/Time"](sec=t_ns // 10**9, nanosec=t_ns % 10**9),
                                    frame_id=frame_id)


def _image(t_ns, seed):
    rgb = np.random.default_rng(seed).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    return _ser(_types()[bag_io.IMAGE_TYPE](header=_header(t_ns, "cam"), height=24, width=32, encoding="rgb8",
                                            is_bigendian=0, step=96, data=rgb.reshape(-1)), bag_io.IMAGE_TYPE)


def _string(i):
    return _ser(_types()["std_msgs/msg/String"](data=f"hello {i}"), "std_msgs/msg/String")


def _features(t_ns, k):
    from theia_ros.features import encode_array

    shape, code, data = encode_array(np.full((4, 8), k, np.float32))
    return _ser(_types()[bag_io.FEATURES_TYPE](
        header=_header(t_ns, "cam"), camera="cam", model_id="fake", representation="tokens", weights_id="fake:0",
        random_weights=False, preprocessing="", pos_interpolation="", input_size=np.zeros(0, np.uint32),
        patch_grid=np.zeros(0, np.uint32), shape=np.asarray(shape, np.uint32), dtype=code,
        data=np.frombuffer(data, np.uint8)), bag_io.FEATURES_TYPE)


def _command(k):
    T = _types()
    msg = T["std_msgs/msg/Float64MultiArray"](layout=T["std_msgs/msg/MultiArrayLayout"](dim=[], data_offset=0),
                                              data=np.array([k, -k], float))
    return _ser(msg, "std_msgs/msg/Float64MultiArray")


CAMERA_BAG = {CAM: (bag_io.IMAGE_TYPE, N_CAM, lambda i, t: _image(t, i)),
              CHATTER: ("std_msgs/msg/String", N_CHATTER, lambda i, t: _string(i))}
TRAINING_BAG = {FEATURES: (bag_io.FEATURES_TYPE, 6, lambda i, t: _features(t, i)),
                CMD: ("std_msgs/msg/Float64MultiArray", 6, lambda i, t: _command(i))}


def make_foreign_bag(path, *, storage="sqlite3", version=9, storage_qos="other_encoding", topics=CAMERA_BAG,
                     counted=None, unlisted=(), compression=None, serialization_format="cdr") -> dict:
    """A bag whose storage holds every message of `topics` and whose metadata.yaml (rosbag2's shape for
    `version`) describes the QoS otherwise: `storage_qos` "other_encoding" (the same profile, the
    infinite durations in the other encoding) or "none" (no QoS in the storage). `counted`: topic ->
    message count metadata.yaml claims (default: the true counts); `unlisted`: topics left out of
    metadata.yaml. Returns topic -> number of messages in the storage."""
    path = Path(path)
    meta_infinite = V9_INFINITE if version >= 9 else LEGACY_INFINITE
    stored = [] if storage_qos == "none" else [_qos(LEGACY_INFINITE if version >= 9 else V9_INFINITE)]
    w = Writer(path, version=9, storage_plugin=StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3)
    if compression:
        from rosbags.rosbag2 import CompressionFormat, CompressionMode

        w.set_compression(CompressionMode[compression.upper()], CompressionFormat.ZSTD)
    w.open()
    store = bag_io.typestore()
    conns = {t: w.add_connection(t, msgtype, typestore=store, offered_qos_profiles=stored)
             for t, (msgtype, _, _) in topics.items()}
    counts, stamps = {}, []
    for t, (msgtype, n, make) in topics.items():
        for i in range(n):
            ts = 10**9 + i * 10**8 + len(counts) * 1000
            w.write(conns[t], ts, make(i, ts))
            stamps.append(ts)
        counts[t] = n
    w.close()
    data_file = next(p for p in path.iterdir() if p.suffix in (".db3", ".mcap", ".zstd"))
    if storage == "sqlite3" and storage_qos == "none" and not compression:
        with sqlite3.connect(data_file) as db:  # no QoS stored at all
            db.execute("UPDATE topics SET offered_qos_profiles = ''")
    (path / "metadata.yaml").write_text(yaml.safe_dump(_rosbag2_metadata(
        version, storage, data_file.name, topics, {**counts, **(counted or {})}, stamps, meta_infinite, unlisted,
        compression, serialization_format), sort_keys=False))
    return counts


def _rosbag2_metadata(version, storage, file_name, topics, counted, stamps, infinite, unlisted, compression, fmt):
    """metadata.yaml as rosbag2 writes it: 4 QoS strings and relative paths, 5 `files`, 6 `custom_data`,
    7 `type_description_hash`, 8 `ros_distro`, 9 QoS lists with enum names."""
    store = bag_io.typestore()
    start, duration = min(stamps), max(stamps) - min(stamps)
    entries = []
    for t, (msgtype, _, _) in topics.items():
        if t in unlisted:
            continue
        tm = {"name": t, "type": msgtype, "serialization_format": fmt,
              "offered_qos_profiles": _meta_qos(version, infinite)}
        if version >= 7:
            tm["type_description_hash"] = store.hash_rihs01(msgtype)
        entries.append({"topic_metadata": tm, "message_count": counted[t]})
    info = {"version": version, "storage_identifier": storage, "duration": {"nanoseconds": duration},
            "starting_time": {"nanoseconds_since_epoch": start}, "message_count": sum(counted.values()),
            "topics_with_message_count": entries, "compression_format": "zstd" if compression else "",
            "compression_mode": compression.upper() if compression else "", "relative_file_paths": [file_name]}
    if version >= 5:
        info["files"] = [{"path": file_name, "starting_time": {"nanoseconds_since_epoch": start},
                          "duration": {"nanoseconds": duration}, "message_count": sum(counted.values())}]
    if version >= 6:
        info["custom_data"] = None
    if version >= 8:
        info["ros_distro"] = "jazzy" if version >= 9 else "iron"
    return {"rosbag2_bagfile_information": info}


def _inspect(capsys, path):
    rc = main(["inspect", str(path), "--json"])
    captured = capsys.readouterr()
    return rc, json.loads(captured.out) if captured.out.strip() else None, captured.err


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("storage_qos", ["other_encoding", "none"])
@pytest.mark.parametrize("version", [4, 5, 6, 7, 8, 9])
@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_inspect_counts_every_message_whatever_the_qos_metadata_says(tmp_path, capsys, storage, version,
                                                                      storage_qos):
    counts = make_foreign_bag(tmp_path / "bag", storage=storage, version=version, storage_qos=storage_qos)
    rc, info, err = _inspect(capsys, tmp_path / "bag")
    assert rc == 0, err
    assert info["error"] is None and info["version"] == version and info["storage"] == storage
    assert {t["topic"]: t["count"] for t in info["topics"]} == counts
    assert info["messages"] == N_CAM + N_CHATTER
    with bag_io.open_bag(tmp_path / "bag") as reader:  # every tool's reader: the same messages, in time order
        got = [(c.topic, ts, bytes(raw)) for c, ts, raw in reader.messages()]
    assert len(got) == N_CAM + N_CHATTER and [ts for _, ts, _ in got] == sorted(ts for _, ts, _ in got)
    assert {t: sum(1 for g in got if g[0] == t) for t in counts} == counts


@pytest.mark.parametrize("storage, compression", [("sqlite3", "message"), ("mcap", "file")])
def test_compressed_bags_and_topics_metadata_does_not_list_are_read_whole(tmp_path, capsys, storage, compression):
    counts = make_foreign_bag(tmp_path / "bag", storage=storage, version=9, compression=compression,
                              unlisted=(CHATTER,))
    rc, info, err = _inspect(capsys, tmp_path / "bag")
    assert rc == 0, err
    assert {t["topic"]: t["count"] for t in info["topics"]} == counts
    with bag_io.open_bag(tmp_path / "bag") as reader:
        assert [bytes(raw) for c, _, raw in reader.messages() if c.topic == CHATTER] == [
            _string(i) for i in range(N_CHATTER)]


@pytest.mark.parametrize("storage, version, storage_qos", [("sqlite3", 5, "none"), ("mcap", 9, "other_encoding")])
def test_encode_bag_encodes_every_frame_and_copies_every_message(tmp_path, capsys, storage, version, storage_qos):
    make_foreign_bag(tmp_path / "in", storage=storage, version=version, storage_qos=storage_qos)
    assert main(["encode-bag", str(tmp_path / "in"), str(tmp_path / "out"), *ENCODE]) == 0
    printed = capsys.readouterr().out
    assert f"{CAM} -> /cam/features: {N_CAM} frames" in printed and f"copied {N_CHATTER} other messages" in printed
    with bag_io.open_bag(tmp_path / "out") as reader:
        out = {}
        for c, _, _ in reader.messages():
            out[c.topic] = out.get(c.topic, 0) + 1
    assert out == {"/cam/features": N_CAM, CHATTER: N_CHATTER}


@pytest.mark.parametrize("storage, version, storage_qos", [("sqlite3", 6, "other_encoding"), ("mcap", 9, "none")])
def test_train_policy_reads_every_message(tmp_path, storage, version, storage_qos):
    from theia_ros.bags.train_policy import build_dataset, read_bag

    make_foreign_bag(tmp_path / "bag", storage=storage, version=version, storage_qos=storage_qos,
                     topics=TRAINING_BAG)
    data = read_bag(tmp_path / "bag", action_topic=CMD, stamp="receive")
    stamps, arrays = data.features[FEATURES]
    assert len(stamps) == 6 and [int(a[0, 0]) for a in arrays] == list(range(6))
    assert len(data.actions[0]) == 6 and data.damaged is None
    assert len(build_dataset([data], tolerance=0.01)) == 6


@pytest.mark.parametrize("storage, version, storage_qos", [("sqlite3", 4, "other_encoding"), ("mcap", 7, "none")])
def test_distill_bag_source_indexes_every_frame(tmp_path, storage, version, storage_qos):
    from theia_ros.distill.sources import BagSource

    make_foreign_bag(tmp_path / "bag", storage=storage, version=version, storage_qos=storage_qos)
    source = BagSource(tmp_path / "bag")
    frames = source.frames()
    assert [(topic, n) for topic, n, _ in frames] == [(CAM, n) for n in range(N_CAM)]
    loaded = list(source.load(source.items(0)))
    assert len(loaded) == N_CAM and all(rgb is not None and rgb.shape == (224, 224, 3) for _, rgb in loaded)


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_metadata_counting_more_messages_than_the_storage_holds_is_an_error(tmp_path, capsys, storage):
    from theia_ros.bags.train_policy import TrainError, read_bag
    from theia_ros.distill.sources import BagSource

    bag = tmp_path / "bag"
    make_foreign_bag(bag, storage=storage, version=9, counted={CHATTER: N_CHATTER + 2})
    rc, info, _ = _inspect(capsys, bag)
    assert rc == 1
    assert {t["topic"]: t["count"] for t in info["topics"]} == {CAM: N_CAM, CHATTER: N_CHATTER}
    assert f"{CHATTER}: {N_CHATTER} read, {N_CHATTER + 2} counted in metadata.yaml" in info["error"]
    assert CAM not in info["error"] and "corrupt or truncated" not in info["error"]

    # encode-bag: the error, and a valid output holding everything the storage had
    assert main(["encode-bag", str(bag), str(tmp_path / "out"), *ENCODE]) == 1
    captured = capsys.readouterr()
    assert f"{CHATTER}: {N_CHATTER} read, {N_CHATTER + 2} counted in metadata.yaml" in captured.err
    assert f"{tmp_path / 'out'} is a valid bag" in captured.err
    assert f"{CAM} -> /cam/features: {N_CAM} frames" in captured.out
    rc, out_info, err = _inspect(capsys, tmp_path / "out")
    assert rc == 0, err
    assert {t["topic"]: t["count"] for t in out_info["topics"]} == {"/cam/features": N_CAM, CHATTER: N_CHATTER}
    assert json.loads(out_info["custom_data"][bag_io.CUSTOM_DATA_KEY])["complete"] is False

    # only the topics a tool reads are checked: the camera topic alone is whole
    assert len(BagSource(bag).frames()) == N_CAM
    make_foreign_bag(tmp_path / "short_cam", storage=storage, version=8, counted={CAM: N_CAM + 1})
    with pytest.raises(ValueError, match=f"{CAM}: {N_CAM} read, {N_CAM + 1} counted"):
        BagSource(tmp_path / "short_cam").frames()

    make_foreign_bag(tmp_path / "train", storage=storage, version=9, topics=TRAINING_BAG, counted={CMD: 9})
    with pytest.raises(TrainError, match=f"{CMD}: 6 read, 9 counted in metadata.yaml"):
        read_bag(tmp_path / "train", action_topic=CMD, stamp="receive")


def test_an_unsupported_serialization_format_is_named_not_called_damage(tmp_path, capsys):
    make_foreign_bag(tmp_path / "bag", version=9, serialization_format="wrong_format")
    assert main(["inspect", str(tmp_path / "bag")]) == 1
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "unsupported serialization format: 'wrong_format'" in text and CAM in text
    assert "corrupt" not in text and "truncated" not in text
    assert main(["encode-bag", str(tmp_path / "bag"), str(tmp_path / "out"), *ENCODE]) == 1
    assert "unsupported serialization format: 'wrong_format'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# rosbag2's own test bags (test/data/rosbag2, see its README): 8 of them read as 0 messages before
ROSBAG2_BAGS = Path(__file__).resolve().parent / "data" / "rosbag2"


@pytest.mark.parametrize("bag", sorted(p.parent.relative_to(ROSBAG2_BAGS).as_posix() for p in
                                       ROSBAG2_BAGS.glob("*/*/metadata.yaml") if "wrong_rmw" not in str(p)))
def test_rosbag2s_own_bags_are_read_in_full(tmp_path, capsys, bag):
    import shutil

    copy = shutil.copytree(ROSBAG2_BAGS / bag, tmp_path / "bag")  # sqlite3 may write beside its file
    meta = yaml.safe_load((copy / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
    rc, info, err = _inspect(capsys, copy)
    assert rc == 0 and info["error"] is None, err
    assert info["messages"] == meta["message_count"] > 0
    assert {t["topic"]: t["count"] for t in info["topics"]} == {
        t["topic_metadata"]["name"]: t["message_count"] for t in meta["topics_with_message_count"]}


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_rosbag2s_wrong_format_bag_is_named_as_such(tmp_path, capsys, storage):
    import shutil

    copy = shutil.copytree(ROSBAG2_BAGS / storage / "wrong_rmw_test", tmp_path / "bag")
    assert main(["inspect", str(copy)]) == 1
    text = "".join(capsys.readouterr())
    assert "unsupported serialization format: 'wrong_format'" in text and "corrupt" not in text


@pytest.mark.parametrize("storage,version", [("sqlite3", 8), ("mcap", 9)])
def test_int8_calibration_reads_every_frame_of_a_foreign_bag(tmp_path, storage, version):
    """`--calibration-bag` / `openvino.calibration_bag` on a bag written by rosbags' Writer with rosbag2's
    metadata (QoS encoded otherwise than in the storage): the frames are the images written, in order."""
    from theia_ros.bags.calibration import calibration_frames

    make_foreign_bag(tmp_path / "bag", storage=storage, version=version)
    extra = calibration_frames(tmp_path / "bag", limit=N_CAM)
    expected = [np.random.default_rng(i).integers(0, 256, (24, 32, 3), dtype=np.uint8) for i in range(N_CAM)]
    assert len(extra.frames) == N_CAM
    for got, want in zip(extra.frames, expected):
        np.testing.assert_array_equal(got, want)
    assert extra.identity["path"] == str(tmp_path / "bag") and extra.identity["bytes"] > 0
