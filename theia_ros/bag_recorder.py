"""Record serialized ROS 2 messages into a rosbag2 bag without rosbag2 (`ros2 bag record` needs a ROS
install; this needs rosbags, and rclpy only for the live recorder).

- :class:`BagRecorder` (plain Python): a rosbags writer fed with CDR bytes from any source, e.g.
  ``rclpy.serialization.serialize_message(msg)`` or a raw subscription. Message definitions come
  from rosbags' Jazzy type store, this package's msg/ files, or ``share/<pkg>/msg/<Type>.msg`` of
  the ament prefixes (AMENT_PREFIX_PATH, the venv).
- :func:`record` / ``theia-ros record OUT --topics ...``: an rclpy node that subscribes (raw, no
  deserialisation) to the topics, with the QoS their publishers offer, and writes each message
  with its receive time (the node's clock), as ``ros2 bag record`` does.

The writer's storage objects are bound to the thread that created them (sqlite3): open, write
and close a BagRecorder from one thread.
"""
from __future__ import annotations

import importlib
import logging
import os
import sys
import time
from pathlib import Path

from theia_ros.bags import BAG_VERSIONS, STORAGES, BagError, _make_writer, prepare_output, typestore

log = logging.getLogger(__name__)


def _find_msg_file(msgtype: str) -> Path | None:
    pkg, _, name = msgtype.partition("/msg/")
    prefixes = [sys.prefix] + [p for p in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep) if p]
    for prefix in prefixes:
        path = Path(prefix) / "share" / pkg / "msg" / f"{name}.msg"
        if path.is_file():
            return path
    return None


def ensure_type(msgtype: str) -> None:
    """Make `msgtype` ('pkg/msg/Type') known to the rosbags type store, or raise BagError."""
    from rosbags.typesys import get_types_from_msg

    store = typestore()
    if msgtype in store.types:
        return
    path = _find_msg_file(msgtype)
    if path is None:
        raise BagError(f"no message definition for {msgtype}: not a Jazzy standard type and no "
                       f"share/{msgtype.split('/')[0]}/msg/{msgtype.rsplit('/', 1)[-1]}.msg in the ament prefixes")
    try:
        store.register(get_types_from_msg(path.read_text(), msgtype))
        store.generate_msgdef(msgtype, ros_version=2)  # fails when a nested type is unknown
    except Exception as exc:
        raise BagError(f"cannot use the definition of {msgtype} from {path}: {exc}") from exc


class BagRecorder:
    """Writes serialized (CDR) messages into a new rosbag2 bag (see module doc)."""

    def __init__(self, path, *, storage="mcap", version=9, overwrite=False):
        if storage not in STORAGES:
            raise BagError(f"unknown storage {storage!r}; use one of {', '.join(STORAGES)}")
        if version not in BAG_VERSIONS:
            raise BagError(f"rosbag2 metadata version {version} cannot be written; use one of {BAG_VERSIONS}")
        self.path = Path(path)
        prepare_output(self.path, [], overwrite)
        self._writer = _make_writer(self.path, storage, version)
        self._writer.open()
        self._conns = {}
        self.counts = {}

    def add_topic(self, topic: str, msgtype: str, *, msgdef: str | None = None, rihs01: str | None = None,
                  qos=()):
        """Register `topic` of type `msgtype` ('pkg/msg/Type'); returns the rosbags connection."""
        if topic in self._conns:
            if self._conns[topic].msgtype != msgtype:
                raise BagError(f"topic {topic} already recorded as {self._conns[topic].msgtype}, not {msgtype}")
            return self._conns[topic]
        if msgdef is None or rihs01 is None:
            ensure_type(msgtype)
            conn = self._writer.add_connection(topic, msgtype, typestore=typestore(), offered_qos_profiles=qos)
        else:
            conn = self._writer.add_connection(topic, msgtype, msgdef=msgdef, rihs01=rihs01,
                                               offered_qos_profiles=qos)
        self._conns[topic] = conn
        self.counts[topic] = 0
        return conn

    def write(self, topic: str, timestamp_ns: int, data) -> None:
        """Write one serialized message (bytes-like CDR, as serialize_message returns)."""
        conn = self._conns.get(topic)
        if conn is None:
            raise BagError(f"topic {topic} was not added (add_topic first)")
        self._writer.write(conn, int(timestamp_ns), data)
        self.counts[topic] += 1

    def close(self) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            writer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()  # also after an error: what was written stays a readable bag
        return False


# ---------------------------------------------------------------------------------------------
# Live recording (rclpy)


def message_class(msgtype: str):
    """The rosidl Python class of 'pkg/msg/Type'."""
    pkg, _, name = msgtype.partition("/msg/")
    try:
        return getattr(importlib.import_module(f"{pkg}.msg"), name)
    except (ImportError, AttributeError) as exc:
        raise BagError(f"cannot import the message class of {msgtype}: {exc}") from exc


def _qos_for(node, topic):
    """QoS compatible with every publisher of `topic` (as ros2 bag record adapts)."""
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

    infos = node.get_publishers_info_by_topic(topic)
    reliable = bool(infos) and all(i.qos_profile.reliability == ReliabilityPolicy.RELIABLE for i in infos)
    latched = bool(infos) and all(i.qos_profile.durability == DurabilityPolicy.TRANSIENT_LOCAL for i in infos)
    return QoSProfile(depth=100, history=HistoryPolicy.KEEP_LAST,
                      reliability=ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT,
                      durability=DurabilityPolicy.TRANSIENT_LOCAL if latched else DurabilityPolicy.VOLATILE)


class RecorderNode:
    """rclpy node that records `topics` into `recorder` as their publishers appear."""

    def __init__(self, recorder: BagRecorder, topics, *, context=None, node_name="theia_bag_recorder"):
        import rclpy

        self.recorder = recorder
        self.topics = ["/" + t.lstrip("/") for t in topics]
        self.node = rclpy.create_node(node_name, context=context)
        self.subscriptions = {}
        self.received = 0
        self._timer = self.node.create_timer(0.2, self.discover)
        self.discover()

    def discover(self):
        types = dict(self.node.get_topic_names_and_types())
        for topic in self.topics:
            if topic in self.subscriptions or topic not in types or not self.node.count_publishers(topic):
                continue  # subscribe once a publisher exists, so that the QoS can follow it
            msgtype = types[topic][0]
            if len(types[topic]) > 1:
                log.warning("%s has several types %s; recording %s", topic, types[topic], msgtype)
            self.recorder.add_topic(topic, msgtype)
            cls = message_class(msgtype)
            self.subscriptions[topic] = self.node.create_subscription(
                cls, topic, lambda data, t=topic: self._on_message(t, data), _qos_for(self.node, topic), raw=True)
            self.node.get_logger().info(f"recording {topic} ({msgtype})")

    def _on_message(self, topic, data):
        self.recorder.write(topic, self.node.get_clock().now().nanoseconds, data)
        self.received += 1

    def destroy(self):
        self.node.destroy_node()


def record(out, topics, *, storage="mcap", version=9, duration=None, overwrite=False, max_messages=None):
    """Record `topics` into bag `out` until Ctrl-C, `duration` seconds or `max_messages`."""
    import rclpy
    from rclpy.executors import SingleThreadedExecutor

    from theia_ros.ros_env import use_package_fastdds_profile

    use_package_fastdds_profile()
    rclpy.init()
    recorder = BagRecorder(out, storage=storage, version=version, overwrite=overwrite)
    rec = None
    try:
        rec = RecorderNode(recorder, topics)
        executor = SingleThreadedExecutor()
        executor.add_node(rec.node)
        deadline = None if duration is None else time.monotonic() + duration
        while rclpy.ok():
            executor.spin_once(timeout_sec=0.1)
            if deadline is not None and time.monotonic() >= deadline:
                break
            if max_messages is not None and rec.received >= max_messages:
                break
    except KeyboardInterrupt:
        pass
    finally:
        recorder.close()
        if rec is not None:
            rec.destroy()
        if rclpy.ok():
            rclpy.shutdown()
    return recorder.counts
