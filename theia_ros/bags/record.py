"""Record serialized ROS 2 messages into a rosbag2 bag without rosbag2 (`ros2 bag record` needs a ROS
install; this needs rosbags only).

:class:`BagRecorder` (plain Python): a rosbags writer fed with CDR bytes from any source, e.g.
``rclpy.serialization.serialize_message(msg)`` or a raw subscription (the live recorder of
``theia-ros record`` is :mod:`theia_ros.nodes.recorder`). Message definitions come from rosbags'
Jazzy type store, this package's msg/ files, or ``share/<pkg>/msg/<Type>.msg`` of the ament
prefixes (AMENT_PREFIX_PATH, the venv): :func:`ensure_type`.

The writer's storage objects are bound to the thread that created them (sqlite3): open, write
and close a BagRecorder from one thread.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from theia_ros.bags.io import (
    DEFAULT_BAG_VERSION,
    DEFAULT_STORAGE,
    BagError,
    check_output_format,
    make_writer,
    prepare_output,
    typestore,
)

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

    def __init__(self, path, *, storage=DEFAULT_STORAGE, version=DEFAULT_BAG_VERSION, overwrite=False):
        check_output_format(storage, version)  # before prepare_output may delete an old bag
        self.path = Path(path)
        prepare_output(self.path, [], overwrite)
        self._writer = make_writer(self.path, storage, version)
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
