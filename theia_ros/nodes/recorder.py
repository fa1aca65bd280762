"""theia-ros record: an rclpy node that subscribes (raw) to topics with the QoS their publishers offer and
writes each message with its receive time into a bags.record.BagRecorder, as `ros2 bag record` does."""
from __future__ import annotations

import importlib
import logging
import time

from theia_ros.bags.io import BagError
from theia_ros.bags.record import BagRecorder

log = logging.getLogger(__name__)

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

    from theia_ros.nodes.environment import use_package_fastdds_profile

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
