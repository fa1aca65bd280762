"""Camera frames of a bag for the int8 calibration set (``--calibration-bag``, ``openvino.calibration_bag``).

Bag reading lives here, with the other bag tools, so that backends/ reads no bags: the node and the
CLI turn the bag into :class:`~theia_ros.backends.calibration.CalibrationFrames` and hand those to the
backend.
"""
from __future__ import annotations

import logging
import os
from typing import Optional, Sequence

from theia_ros.backends.base import BackendError
from theia_ros.backends.calibration import CalibrationFrames

log = logging.getLogger("theia_ros.bags")

DEFAULT_BAG_FRAMES = 32


def calibration_frames(path, limit: int = DEFAULT_BAG_FRAMES,
                       topics: Optional[Sequence[str]] = None) -> CalibrationFrames:
    """Up to ``limit`` RGB frames spread evenly over the camera topics of bag ``path`` (all Image /
    CompressedImage topics, or ``topics``), decoded with the bag tools' own conversion, with what names
    them (path, bytes, limit). BackendError for a missing bag or one without decodable camera frames."""
    from theia_ros.bags.io import CAMERA_TYPES, BagError, decode_camera_message, open_bag
    from theia_ros.images import ImageDecodeError

    path = os.path.abspath(os.path.expanduser(str(path)))
    if not os.path.exists(path):
        raise BackendError(f"calibration bag {path} does not exist")
    try:
        with open_bag(path) as reader:
            conns = [c for c in reader.connections if c.msgtype in CAMERA_TYPES
                     and (not topics or c.topic in topics)]
            if not conns:
                raise BackendError(f"calibration bag {path}: no camera (Image / CompressedImage) topic"
                                   + (f" among {', '.join(topics)}" if topics else ""))
            total = sum(int(getattr(c, "msgcount", 0) or 0) for c in conns) or limit
            stride = max(1, total // max(1, int(limit)))
            frames, errors = [], 0
            for index, (conn, _stamp, raw) in enumerate(reader.messages(connections=conns)):
                if index % stride:
                    continue
                try:
                    frames.append(decode_camera_message(raw, conn.msgtype)[1])
                except ImageDecodeError:
                    errors += 1
                if len(frames) >= limit:
                    break
    except BagError as exc:
        raise BackendError(f"calibration bag: {exc}") from None
    if not frames:
        raise BackendError(f"calibration bag {path}: no decodable camera frame ({errors} undecodable)")
    if errors:
        log.warning("calibration bag %s: skipped %d undecodable frames", path, errors)
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(path, n) for n in os.listdir(path) if n.endswith((".mcap", ".db3")))
    identity = {"path": path, "bytes": sum(os.path.getsize(f) for f in files), "frames": int(limit)}
    return CalibrationFrames(tuple(frames), identity)
