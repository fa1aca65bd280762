"""Image sources for distillation: image folders and rosbag2 camera topics, a deterministic split.

Every image becomes one :class:`ImageItem` with a stable ``key`` (its identity in the feature
cache) and a ``group`` (the unit the train / held-out split is drawn on). Images are decoded to
RGB uint8 and resized straight to 224x224 with the encoder's own resampling (antialiased bilinear
on uint8, :func:`theia_ros.preprocess.to_model_input`'s first step), so the student sees exactly
what the encoder node would feed it, and the teachers start from the same 224x224 image (the
reference resized ImageNet to 224x224 before extracting teacher features).

* Folders: ``*.png``, ``*.jpg``, ``*.jpeg`` (any case), recursively, sorted by relative path;
  key ``img:<folder name>/<relative path>``; each image is its own group.
* Bags: ``sensor_msgs/Image`` and ``sensor_msgs/CompressedImage`` topics (all, or those named),
  every ``stride``-th message per topic; key ``bag:<bag name>:<topic>#<n>@<timestamp ns>``;
  the group is the bag and a ``block_s``-second time block, so near-identical consecutive frames
  (and the other cameras at the same moment) land on the same side of the split.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

__all__ = [
    "IMAGE_SIZE",
    "ImageItem",
    "FolderSource",
    "BagSource",
    "resize_uint8",
    "build_index",
    "split_items",
    "dataset_id",
]

IMAGE_SIZE = 224
IMAGE_SUFFIXES = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg"}


@dataclasses.dataclass(frozen=True)
class ImageItem:
    key: str
    group: str
    source: int  # index of the source in the list given to build_index
    ref: object  # FolderSource: relative path; BagSource: (topic, ordinal)


def resize_uint8(rgb: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """RGB uint8 [H, W, 3] -> [size, size, 3]: antialiased bilinear on uint8 (the encoder's resize)."""
    if rgb.shape[0] == size and rgb.shape[1] == size:
        return np.ascontiguousarray(rgb)
    rgb = np.ascontiguousarray(rgb)
    if not rgb.flags.writeable:  # a view of a message buffer
        rgb = rgb.copy()
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x[0].permute(1, 2, 0).contiguous().numpy()


class FolderSource:
    """Images under a folder (png / jpg), recursively."""

    kind = "folder"

    def __init__(self, root):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist or is not a directory")
        self.name = self.root.resolve().name or "images"
        self._files: Optional[List[Path]] = None

    def files(self) -> List[Path]:
        if self._files is None:
            self._files = sorted((p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                                  and p.is_file()), key=lambda p: p.relative_to(self.root).as_posix())
        return self._files

    def fingerprint(self) -> str:
        h = hashlib.sha1()
        for p in self.files():
            st = p.stat()
            h.update(f"{p.relative_to(self.root).as_posix()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return h.hexdigest()

    def items(self, source_index: int) -> List[ImageItem]:
        out = []
        for p in self.files():
            rel = p.relative_to(self.root).as_posix()
            key = f"img:{self.name}/{rel}"
            out.append(ImageItem(key=key, group=key, source=source_index, ref=rel))
        return out

    def load(self, items: Sequence[ImageItem]) -> Iterator[Tuple[ImageItem, Optional[np.ndarray]]]:
        """(item, RGB uint8 [224, 224, 3] or None when undecodable), in the order given."""
        from theia_ros.images import ImageDecodeError, decode_compressed

        for item in items:
            path = self.root / item.ref
            try:
                rgb = decode_compressed(path.read_bytes(), IMAGE_SUFFIXES[path.suffix.lower()])
                yield item, resize_uint8(rgb)
            except (ImageDecodeError, OSError) as exc:
                log.warning("skipping %s: %s", path, exc)
                yield item, None

    def __repr__(self) -> str:
        return f"FolderSource({str(self.root)!r})"


class BagSource:
    """Camera frames of a rosbag2 bag (directory, .mcap or .db3), read with rosbags (no ROS)."""

    kind = "bag"

    def __init__(self, path, topics: Optional[Sequence[str]] = None, stride: int = 1, block_s: float = 10.0):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"bag {self.path} does not exist")
        if stride < 1:
            raise ValueError(f"bag stride must be >= 1, got {stride}")
        self.name = self.path.resolve().name
        if self.path.is_file():
            self.name = self.path.stem
        self.topics = [t if t.startswith("/") else "/" + t for t in topics] if topics else None
        self.stride = int(stride)
        self.block_ns = max(1, int(block_s * 1e9))
        self._frames: Optional[List[Tuple[str, int, int]]] = None  # (topic, ordinal, timestamp)

    def _camera_connections(self, reader):
        from theia_ros.bags.io import CAMERA_TYPES

        cams = [c for c in reader.connections if c.msgtype in CAMERA_TYPES]
        if self.topics is not None:
            have = {c.topic for c in cams}
            missing = [t for t in self.topics if t not in have]
            if missing:
                raise ValueError(f"bag {self.path}: no camera topic(s) {', '.join(missing)}; camera topics: "
                                 f"{', '.join(sorted(have)) or 'none'}")
            cams = [c for c in cams if c.topic in self.topics]
        if not cams:
            raise ValueError(f"bag {self.path} has no sensor_msgs/Image or CompressedImage topic")
        return cams

    def fingerprint(self) -> str:
        h = hashlib.sha1()
        files = [self.path] if self.path.is_file() else sorted(p for p in self.path.rglob("*") if p.is_file())
        for p in files:
            st = p.stat()
            h.update(f"{p.name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        h.update(json.dumps([self.topics, self.stride]).encode())
        return h.hexdigest()

    def frames(self) -> List[Tuple[str, int, int]]:
        if self._frames is None:
            from theia_ros.bags.io import BagError, open_bag

            try:
                with open_bag(self.path) as reader:  # every message, checked against metadata.yaml's counts
                    cams = self._camera_connections(reader)
                    count: Dict[str, int] = {}
                    frames = []
                    for conn, timestamp, _ in reader.messages(connections=cams):
                        n = count.get(conn.topic, 0)
                        count[conn.topic] = n + 1
                        if n % self.stride == 0:
                            frames.append((conn.topic, n, int(timestamp)))
            except BagError as exc:  # not a bag, damaged, messages missing: a bad input, like the others
                raise ValueError(str(exc)) from exc
            self._frames = frames
        return self._frames

    def items(self, source_index: int) -> List[ImageItem]:
        out = []
        for topic, n, t in self.frames():
            out.append(ImageItem(key=f"bag:{self.name}:{topic}#{n}@{t}", group=f"bag:{self.name}:{t // self.block_ns}",
                                 source=source_index, ref=(topic, n)))
        return out

    def load(self, items: Sequence[ImageItem]) -> Iterator[Tuple[ImageItem, Optional[np.ndarray]]]:
        """One pass through the bag; yields the requested frames in bag order (None: undecodable)."""
        from theia_ros.bags.io import decode_camera_message, open_bag
        from theia_ros.images import ImageDecodeError

        wanted = {item.ref: item for item in items}
        if not wanted:
            return
        with open_bag(self.path) as reader:
            cams = self._camera_connections(reader)
            count: Dict[str, int] = {}
            for conn, _, raw in reader.messages(connections=cams):
                n = count.get(conn.topic, 0)
                count[conn.topic] = n + 1
                item = wanted.pop((conn.topic, n), None)
                if item is None:
                    continue
                try:
                    _, rgb = decode_camera_message(raw, conn.msgtype)
                    yield item, resize_uint8(np.asarray(rgb))
                except ImageDecodeError as exc:
                    log.warning("skipping %s: %s", item.key, exc)
                    yield item, None
                if not wanted:
                    break
        for item in wanted.values():  # the bag changed since it was indexed
            log.warning("frame %s is no longer in %s", item.key, self.path)
            yield item, None

    def __repr__(self) -> str:
        return f"BagSource({str(self.path)!r}, topics={self.topics}, stride={self.stride})"


def build_index(sources: Sequence) -> List[ImageItem]:
    """All items of all sources, in source order (each source's items contiguous)."""
    items: List[ImageItem] = []
    seen = set()
    for i, source in enumerate(sources):
        for item in source.items(i):
            if item.key in seen:  # two folders with the same name: keep keys unique
                item = dataclasses.replace(item, key=f"{item.key}~{i}", group=f"{item.group}~{i}")
            seen.add(item.key)
            items.append(item)
    return items


def _unit(seed: int, group: str) -> float:
    digest = hashlib.sha1(f"{seed}:{group}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def split_items(items: Sequence[ImageItem], holdout: float, seed: int = 0) -> Tuple[List[int], List[int]]:
    """(train indices, held-out indices): a group is held out when hash(seed, group) < holdout.

    Deterministic and stable under adding images (a group's side never changes). With
    ``holdout > 0`` and at least two groups, at least one group is held out and one trained on.
    """
    if not 0.0 <= holdout < 1.0:
        raise ValueError(f"holdout fraction must be in [0, 1), got {holdout}")
    units = {}
    for item in items:
        if item.group not in units:
            units[item.group] = _unit(seed, item.group)
    held_groups = {g for g, u in units.items() if u < holdout}
    if holdout > 0 and len(units) >= 2:
        if not held_groups:
            held_groups = {min(units, key=units.get)}
        if len(held_groups) == len(units):
            held_groups.discard(max(units, key=units.get))
    train = [i for i, item in enumerate(items) if item.group not in held_groups]
    held = [i for i, item in enumerate(items) if item.group in held_groups]
    return train, held


def dataset_id(sources: Sequence, items: Sequence[ImageItem]) -> str:
    """Identity of the indexed images (keys and source contents); names the cache folder."""
    h = hashlib.sha1(f"theia-distill-images-v1|{IMAGE_SIZE}\n".encode())
    for source in sources:
        h.update(f"{source.kind}|{source.fingerprint()}\n".encode())
    for item in items:
        h.update(item.key.encode() + b"\n")
    return h.hexdigest()[:16]


def make_sources(images: Iterable = (), bags: Iterable = (), bag_topics: Optional[Sequence[str]] = None,
                 bag_stride: int = 1, bag_block_s: float = 10.0) -> List:
    sources = [FolderSource(p) for p in images]
    sources += [BagSource(p, topics=bag_topics, stride=bag_stride, block_s=bag_block_s) for p in bags]
    if not sources:
        raise ValueError("no image source: give at least one image folder or bag")
    return sources


def expand_paths(paths: Iterable) -> List[str]:
    """Expand ~ in paths (the CLI passes them through)."""
    return [os.path.expanduser(str(p)) for p in paths]
