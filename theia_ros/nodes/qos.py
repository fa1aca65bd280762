"""The QoS profiles theia_ros nodes use, in one place.

- ``sensor_data``: best effort, volatile, keep last: camera images in and out (a late frame is worth
  less than the next one).
- ``reliable``: reliable, volatile, keep last: features, commands, joint states from a simulator.
- ``latched``: reliable, transient local, depth 1: state a late subscriber must still get (the
  simulator's episode status).
"""
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

QOS_KINDS = ("sensor_data", "reliable", "latched")


def qos_profile(kind: str, depth: int = 1) -> QoSProfile:
    if kind == "sensor_data":
        return QoSProfile(depth=depth, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.BEST_EFFORT,
                          durability=DurabilityPolicy.VOLATILE)
    if kind == "reliable":
        return QoSProfile(depth=depth, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE,
                          durability=DurabilityPolicy.VOLATILE)
    if kind == "latched":
        return QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE,
                          durability=DurabilityPolicy.TRANSIENT_LOCAL)
    raise ValueError(f"unknown QoS kind {kind!r}; one of {', '.join(QOS_KINDS)}")


def qos_matching_publishers(node, topic: str, depth: int = 100) -> QoSProfile:
    """A QoS every current publisher of `topic` can serve (as `ros2 bag record` adapts): reliable and
    transient local only when all of them offer it."""
    infos = node.get_publishers_info_by_topic(topic)
    reliable = bool(infos) and all(i.qos_profile.reliability == ReliabilityPolicy.RELIABLE for i in infos)
    latched = bool(infos) and all(i.qos_profile.durability == DurabilityPolicy.TRANSIENT_LOCAL for i in infos)
    return QoSProfile(depth=depth, history=HistoryPolicy.KEEP_LAST,
                      reliability=ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT,
                      durability=DurabilityPolicy.TRANSIENT_LOCAL if latched else DurabilityPolicy.VOLATILE)
