"""theia-ros record: an rclpy node that subscribes (raw) to topics with the QoS their publishers offer and
writes each message with its receive time into a bags.record.BagRecorder, as `ros2 bag record` does."""
from __future__ import annotations

import logging
import time

import rclpy
from rclpy.executors import SingleThreadedExecutor

from theia_ros.bags.io import DEFAULT_BAG_VERSION, DEFAULT_STORAGE, BagError
from theia_ros.bags.record import BagRecorder
from theia_ros.nodes.environment import use_package_fastdds_profile
from theia_ros.nodes.qos import qos_matching_publishers
from theia_ros.nodes.runtime import message_class

log = logging.getLogger(__name__)


class RecorderNode:
    """rclpy node that records `topics` into `recorder` as their publishers appear."""

    def __init__(self, recorder: BagRecorder, topics, *, context=None, node_name="theia_bag_recorder"):
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
            try:
                cls = message_class(msgtype)
            except ValueError as exc:
                raise BagError(str(exc)) from None
            self.recorder.add_topic(topic, msgtype)
            self.subscriptions[topic] = self.node.create_subscription(
                cls, topic, lambda data, t=topic: self._on_message(t, data),
                qos_matching_publishers(self.node, topic), raw=True)
            self.node.get_logger().info(f"recording {topic} ({msgtype})")

    def _on_message(self, topic, data):
        self.recorder.write(topic, self.node.get_clock().now().nanoseconds, data)
        self.received += 1

    def destroy(self):
        self.node.destroy_node()


def record(out, topics, *, storage=DEFAULT_STORAGE, version=DEFAULT_BAG_VERSION, duration=None, overwrite=False,
           max_messages=None):
    """Record `topics` into bag `out` until Ctrl-C, `duration` seconds or `max_messages`."""
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
