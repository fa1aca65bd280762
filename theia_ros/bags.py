"""rosbag2 tools without ROS: encode camera topics of a bag into Theia features, inspect bags.

Plain Python on top of the pure-Python `rosbags` library (sqlite3 and MCAP storage, rosbag2
metadata versions 8 and 9), so it runs on a training server with no ROS installed; rclpy is not
imported here.

- :func:`encode_bag`: reads a bag, decodes its camera topics (``sensor_msgs/Image`` raw or
  ``sensor_msgs/CompressedImage``), encodes them in batches and writes a NEW bag holding one
  ``theia_ros/msg/Features`` topic per camera (``/front/image_raw`` -> ``/front/features``),
  stamped like the images, plus (by default) every other topic copied byte for byte.
  Decoding (thread), inference (caller's thread) and writing (thread) overlap.
- :func:`inspect_bag`: topics, types, counts, rates, gaps, and what the feature topics hold.
- :func:`typestore`: the rosbags type store with the Jazzy types and this package's messages.

Bag timestamps ("receive time", the ``timestamp`` column of rosbag2) and header stamps are
integers in nanoseconds here.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import queue
import shutil
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

FEATURES_TYPE = "theia_ros/msg/Features"
MULTI_FEATURES_TYPE = "theia_ros/msg/MultiCameraFeatures"
IMAGE_TYPE = "sensor_msgs/msg/Image"
COMPRESSED_IMAGE_TYPE = "sensor_msgs/msg/CompressedImage"
CAMERA_TYPES = (IMAGE_TYPE, COMPRESSED_IMAGE_TYPE)
STORAGES = ("mcap", "sqlite3")
#: rosbag2 metadata versions rosbags writes: 9 (Jazzy and newer), 8 (Iron; readable by Humble's
#: sqlite3 plugin as far as we know, see docs/bags.md)
BAG_VERSIONS = (9, 8)
DEFAULT_MODEL = "theaiinstitute/theia-tiny-patch16-224-cddsv"
CUSTOM_DATA_KEY = "theia_ros.encode_bag"
# image_transport suffixes stripped before taking a camera topic's namespace
_TRANSPORT_SUFFIXES = ("compressed", "compressedDepth", "theora", "zstd", "ffmpeg", "h264")


class BagError(RuntimeError):
    """A bag cannot be used as asked (missing, not a bag, output exists, no camera topics...)."""


class BagReadError(BagError):
    """The input bag is corrupt or truncated (raised after the readable part was processed)."""


# ---------------------------------------------------------------------------------------------
# Types


def msg_definition_dirs() -> list[Path]:
    """Directories that may hold this package's .msg files, most specific first."""
    here = Path(__file__).resolve().parent
    dirs = [here.parent / "msg", Path(sys.prefix) / "share" / "theia_ros" / "msg"]
    for prefix in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep):
        if prefix:
            dirs.append(Path(prefix) / "share" / "theia_ros" / "msg")
    return dirs


def msg_definition_text(name: str) -> str:
    """Text of msg/<name>.msg (source tree, else the installed share/theia_ros/msg)."""
    for d in msg_definition_dirs():
        path = d / f"{name}.msg"
        if path.is_file():
            return path.read_text()
    raise BagError(f"cannot find {name}.msg of theia_ros (looked in {', '.join(map(str, msg_definition_dirs()))}); "
                   "install the package with colcon or run from the source tree")


@functools.lru_cache(maxsize=1)
def typestore():
    """rosbags type store: ROS 2 Jazzy's standard types plus theia_ros/msg/{Features,MultiCameraFeatures}."""
    from rosbags.typesys import Stores, get_types_from_msg, get_typestore

    store = get_typestore(Stores.ROS2_JAZZY)
    types = {}
    for name in ("Features", "MultiCameraFeatures"):
        types.update(get_types_from_msg(msg_definition_text(name), f"theia_ros/msg/{name}"))
    store.register(types)
    return store


def _ensure_type(store, conn) -> bool:
    """Register `conn`'s type from the definition stored in the bag when the store lacks it."""
    if conn.msgtype in store.types:
        return True
    data = getattr(conn.msgdef, "data", "") or ""
    if not data:
        return False
    from rosbags.typesys import get_types_from_msg

    try:
        sep = "=" * 80 + "\n"
        parts = data.split(sep)
        types = get_types_from_msg(parts[0], conn.msgtype)
        for part in parts[1:]:
            header, _, text = part.partition("\n")
            if header.startswith("MSG: "):
                name = header[5:].strip()
                if "/msg/" not in name:
                    name = name.replace("/", "/msg/", 1)
                types.update(get_types_from_msg(text, name))
        store.register(types)
    except Exception as exc:  # rosbags raises several parser error types
        log.warning("cannot register type %s from the bag's definition: %s", conn.msgtype, exc)
        return False
    return conn.msgtype in store.types


def deserialize(raw, msgtype: str):
    return typestore().deserialize_cdr(raw, msgtype)


def stamp_ns(stamp) -> int:
    """builtin_interfaces/Time (any object with sec, nanosec) -> int nanoseconds."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


# ---------------------------------------------------------------------------------------------
# Opening bags


def open_reader(path, *, salvage=False):
    """An opened rosbags rosbag2 Reader for a bag directory, or a single .mcap / .db3 file.

    Raises :class:`BagError` with a hint when `path` is not a readable bag. With `salvage`, a
    damaged bag (truncated MCAP without footer, sqlite3 file with damaged pages, missing
    metadata.yaml) is opened with a reader of :mod:`theia_ros.bag_salvage` instead, whose
    ``salvage_reason`` says what is wrong; its messages end with an error where the damage starts.
    """
    from rosbags.rosbag2 import Reader

    path = Path(path)
    if not path.exists():
        raise BagError(f"input bag {path} does not exist")
    if path.is_dir() and not (path / "metadata.yaml").exists():
        files = sorted(p.name for p in path.iterdir() if p.suffix in (".mcap", ".db3"))
        if not files:
            raise BagError(f"{path} is not a rosbag2 bag: no metadata.yaml, no .mcap or .db3 file")
        reason = (f"{path} has no metadata.yaml (a recording that was killed leaves none; `ros2 bag reindex` "
                  "restores it)")
        if salvage:
            return _salvage(path, reason, None)
        raise BagError(f"{reason}; it holds {', '.join(files)}: pass that file itself")
    try:
        reader = Reader(path)
        reader.open()
    except Exception as exc:  # rosbags ReaderError, apsw (sqlite3) and yaml errors
        reason = f"cannot read bag {path}: {type(exc).__name__}: {exc}"
        if salvage:
            return _salvage(path, reason, exc)
        raise BagReadError(f"{reason} (corrupt or truncated? `ros2 bag reindex` or `mcap recover` may repair "
                           "it)") from exc
    return reader


def _salvage(path, reason, exc):
    from theia_ros.bag_salvage import SalvageError, open_salvage

    try:
        reader = open_salvage(path)
    except (SalvageError, OSError) as err:
        raise BagReadError(f"{reason}; nothing readable in it either ({err})") from (exc or err)
    if reader is None or not reader.connections:
        raise BagReadError(f"{reason}; no topic could be recovered from it") from exc
    reader.salvage_reason = reason
    log.warning("%s: reading what is readable (%s)", reason,
                f"damage: {reader.damage}" if reader.damage else "file order")
    return reader


def storage_of(reader) -> str:
    """'mcap' or 'sqlite3': the storage plugin of an opened rosbags Reader."""
    if hasattr(reader, "storage_name"):
        return reader.storage_name
    storage = getattr(reader, "storage", None)
    inner = getattr(storage, "storages", None)
    name = type(inner[0] if inner else storage).__name__.lower()
    return "mcap" if "mcap" in name else "sqlite3" if "sqlite" in name else name


def custom_data_of(reader) -> dict:
    """The bag's custom_data (metadata.yaml), {} when none."""
    try:
        return dict(reader.storage.metadata.custom or {})
    except Exception:
        return {}


def _make_writer(path: Path, storage: str, version: int):
    from rosbags.rosbag2 import StoragePlugin, Writer

    if storage not in STORAGES:
        raise BagError(f"unknown storage {storage!r}; use one of {', '.join(STORAGES)}")
    if version not in BAG_VERSIONS:
        raise BagError(f"rosbag2 metadata version {version} cannot be written; use one of {BAG_VERSIONS}")
    plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
    return Writer(path, version=version, storage_plugin=plugin)


def _looks_like_bag_dir(path: Path) -> bool:
    if not path.is_dir():
        return False
    entries = list(path.iterdir())
    if not entries:
        return True
    names = {p.name for p in entries}
    return "metadata.yaml" in names or any(p.suffix in (".mcap", ".db3", ".zstd") for p in entries)


def prepare_output(out: Path, inputs, overwrite: bool) -> None:
    """Refuse to clobber OUT unless `overwrite`; never delete an input or a non-bag directory."""
    out = Path(out)
    for src in inputs:
        src = Path(src).resolve()
        if out.resolve() == src or src.is_relative_to(out.resolve()):
            raise BagError(f"output {out} is (or contains) the input bag {src}")
    if not out.exists() and not out.is_symlink():
        return
    if not overwrite:
        raise BagError(f"output {out} exists; pass --overwrite to replace it")
    if out.is_symlink() or out.is_file():
        raise BagError(f"output {out} exists and is not a bag directory; not replacing it")
    if not _looks_like_bag_dir(out):
        raise BagError(f"output {out} exists and does not look like a rosbag2 bag (no metadata.yaml, .mcap or "
                       ".db3); not deleting it")
    shutil.rmtree(out)


# ---------------------------------------------------------------------------------------------
# Camera topics


def features_topic_for(image_topic: str) -> str:
    """Feature topic of a camera topic: its namespace + '/features'.

    '/front/image_raw' -> '/front/features'; '/front/image_raw/compressed' -> '/front/features';
    '/cam/color/image' -> '/cam/color/features'; '/image' -> '/features'.
    """
    parts = [p for p in image_topic.split("/") if p]
    if len(parts) > 1 and parts[-1] in _TRANSPORT_SUFFIXES:
        parts = parts[:-1]
    return "/" + "/".join(parts[:-1] + ["features"])


def camera_name_for(image_topic: str) -> str:
    """Camera name written into Features.camera: the feature topic's namespace ('front')."""
    ns = features_topic_for(image_topic).rsplit("/", 1)[0].strip("/")
    return ns or "camera"


def select_cameras(connections, cameras=None) -> dict[str, str]:
    """camera topic -> feature topic.

    `cameras`: None (every Image/CompressedImage topic of the bag) or a list of 'TOPIC' or
    'TOPIC=FEATURES_TOPIC' entries.
    """
    by_topic = {}
    for c in connections:
        by_topic.setdefault(c.topic, set()).add(c.msgtype)
    chosen: dict[str, str] = {}
    if cameras:
        for entry in cameras:
            topic, _, target = entry.partition("=")
            topic = topic.strip()
            if not topic.startswith("/"):
                topic = "/" + topic
            if topic not in by_topic:
                image_topics = sorted(t for t, types in by_topic.items() if types & set(CAMERA_TYPES))
                raise BagError(f"camera topic {topic} is not in the bag; its image topics: "
                               f"{', '.join(image_topics) or 'none'}")
            types = by_topic[topic]
            if not types & set(CAMERA_TYPES):
                raise BagError(f"topic {topic} has type {', '.join(sorted(types))}, not "
                               f"{IMAGE_TYPE} or {COMPRESSED_IMAGE_TYPE}")
            target = target.strip() or features_topic_for(topic)
            chosen[topic] = target if target.startswith("/") else "/" + target
    else:
        for topic in sorted(by_topic):
            if by_topic[topic] & set(CAMERA_TYPES):
                chosen[topic] = features_topic_for(topic)
        if not chosen:
            topics = ", ".join(f"{t} ({'/'.join(sorted(v))})" for t, v in sorted(by_topic.items()))
            raise BagError(f"no camera topics ({IMAGE_TYPE} or {COMPRESSED_IMAGE_TYPE}) in the bag; topics: "
                           f"{topics or 'none'}")
    targets = defaultdict(list)
    for topic, target in chosen.items():
        targets[target].append(topic)
    clash = {t: s for t, s in targets.items() if len(s) > 1}
    if clash:
        t, s = next(iter(clash.items()))
        raise BagError(f"camera topics {', '.join(s)} would all write {t}; pick one with --cameras TOPIC, "
                       "or name the outputs with --cameras TOPIC=FEATURES_TOPIC")
    existing = set(by_topic) & set(chosen.values())
    if existing:
        raise BagError(f"the bag already has topic(s) {', '.join(sorted(existing))}; name the outputs with "
                       "--cameras TOPIC=FEATURES_TOPIC")
    return chosen


def decode_camera_message(raw, msgtype: str):
    """(header, RGB uint8 [H, W, 3]) of a serialized Image / CompressedImage.

    Raises ImageDecodeError (from theia_ros.preprocess) for anything undecodable.
    """
    from theia_ros.preprocess import ImageDecodeError, decode_compressed, image_to_rgb

    try:
        msg = deserialize(raw, msgtype)
    except Exception as exc:
        raise ImageDecodeError(f"undecodable {msgtype.rsplit('/', 1)[-1]} message: {exc}") from None
    if msgtype == IMAGE_TYPE:
        rgb = image_to_rgb(msg.data, msg.height, msg.width, msg.step, msg.encoding)
    else:
        rgb = decode_compressed(msg.data, msg.format)
    return msg.header, rgb


# ---------------------------------------------------------------------------------------------
# encode-bag


@functools.lru_cache(maxsize=2)
def _cached_encoder(source, seed, backend, precision, device, max_batch, representation, output_dtype):
    from theia_ros.encoder import FeatureEncoder

    return FeatureEncoder.load(source, seed=seed, backend=backend, precision=precision, device=device,
                               max_batch=max_batch, representation=representation, output_dtype=output_dtype)


def load_encoder(source=DEFAULT_MODEL, *, seed=None, backend="torch", precision="fp32", device="cpu",
                 max_batch=8, representation="tokens", output_dtype="float32"):
    """FeatureEncoder.load, cached per process (repeated CLI calls in one process share the model)."""
    try:
        return _cached_encoder(source, seed, backend, precision, device, int(max_batch), representation,
                               output_dtype)
    except BagError:
        raise
    except Exception as exc:
        raise BagError(f"cannot load the encoder {source!r} ({backend}, {representation}): "
                       f"{type(exc).__name__}: {exc}") from exc


@dataclasses.dataclass
class EncodeResult:
    """What :func:`encode_bag` did."""

    output: Path
    topics: dict[str, str]  # camera topic -> feature topic
    frames: dict[str, int]  # camera topic -> frames encoded
    bad_frames: dict[str, int]  # camera topic -> frames skipped (undecodable)
    copied: int  # other messages copied
    skipped_topics: list[str]  # topics not copied (no definition available)
    seconds: float  # wall time of the pipeline (model loading excluded)
    complete: bool = True
    error: str | None = None

    @property
    def frames_total(self) -> int:
        return sum(self.frames.values())

    @property
    def bad_total(self) -> int:
        return sum(self.bad_frames.values())

    @property
    def frames_per_second(self) -> float:
        return (self.frames_total + self.bad_total) / self.seconds if self.seconds > 0 else float("nan")


@dataclasses.dataclass
class _Frame:
    conn: Any
    timestamp: int
    header: Any = None
    rgb: Any = None
    error: str | None = None


@dataclasses.dataclass
class _Copy:
    conn: Any
    timestamp: int
    raw: Any


class _ReadFailure:
    def __init__(self, exc, messages, last_timestamp):
        self.exc = exc
        self.messages = messages
        self.last_timestamp = last_timestamp


_END = object()


class _Stop(Exception):
    pass


def _put(q, item, stop):
    while True:
        if stop.is_set():
            raise _Stop()
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            continue


def _get(q, stop, alive):
    while True:
        try:
            return q.get(timeout=0.1)
        except queue.Empty:
            if stop.is_set() or not alive():
                raise _Stop() from None


def encode_bag(input_path, output_path, *, model=DEFAULT_MODEL, seed=None, backend="torch", precision="fp32",
               device="cpu", representation="tokens", dtype="float32", cameras=None, batch=8, copy=True,
               overwrite=False, storage="mcap", version=9, threads=None, progress=True, encoder=None,
               queue_chunks=3, max_logged_bad=10) -> EncodeResult:
    """Encode the camera topics of bag `input_path` into a new bag `output_path` (see module doc).

    `cameras`: camera topics ('TOPIC' or 'TOPIC=FEATURES_TOPIC'), None: every image topic.
    `encoder`: a ready FeatureEncoder (else loaded from model/seed/backend/...).
    Raises :class:`BagError` before anything is written (bad arguments, output exists, no camera
    topics), :class:`BagReadError` when the input turns out corrupt or truncated part-way: the
    output then holds everything before the damage and is a complete, readable bag whose
    custom_data says ``complete: false``.
    """
    t_start = time.perf_counter()
    input_path, output_path = Path(input_path), Path(output_path)
    if batch < 1:
        raise BagError(f"batch must be >= 1, got {batch}")
    if storage not in STORAGES:
        raise BagError(f"unknown storage {storage!r}; use one of {', '.join(STORAGES)}")
    if version not in BAG_VERSIONS:
        raise BagError(f"rosbag2 metadata version {version} cannot be written; use one of {BAG_VERSIONS}")
    if not overwrite and (output_path.exists() or output_path.is_symlink()):
        raise BagError(f"output {output_path} exists; pass --overwrite to replace it")
    reader = open_reader(input_path, salvage=True)
    try:
        connections = list(reader.connections)
        topics = select_cameras(connections, cameras)
        if threads:
            import torch

            torch.set_num_threads(int(threads))
        if encoder is None:
            encoder = load_encoder(model, seed=seed, backend=backend, precision=precision, device=device,
                                   max_batch=batch, representation=representation, output_dtype=dtype)
        prepare_output(output_path, [input_path], overwrite)
        t_start = time.perf_counter()  # throughput excludes opening the bag and loading the model
        return _encode(reader, connections, topics, output_path, encoder, batch=batch, copy=copy, storage=storage,
                       version=version, progress=progress, queue_chunks=queue_chunks,
                       max_logged_bad=max_logged_bad, input_path=input_path, t_start=t_start)
    finally:
        try:
            reader.close()
        except Exception:  # a reader broken by a corrupt file may fail to close as well
            pass


def _copy_plan(store, connections, topics, copy):
    """(input connection id -> output key, output key -> add_connection kwargs, skipped topics)."""
    conn_key, specs, skipped = {}, {}, []
    if not copy:
        return conn_key, specs, skipped
    for c in connections:
        if c.topic in topics:
            continue
        key = (c.topic, c.msgtype)
        if key not in specs and c.topic not in skipped:
            msgdef, digest = (c.msgdef.data or None), (c.digest or None)
            if (msgdef is None or digest is None) and _ensure_type(store, c):
                msgdef = msgdef or store.generate_msgdef(c.msgtype, ros_version=2)[0]
                digest = digest or store.hash_rihs01(c.msgtype)
            if not msgdef or not digest:
                log.warning("not copying %s (%s): the bag has no definition of that type", c.topic, c.msgtype)
                skipped.append(c.topic)
                continue
            specs[key] = dict(topic=c.topic, msgtype=c.msgtype, msgdef=msgdef, rihs01=digest,
                              serialization_format=c.ext.serialization_format,
                              offered_qos_profiles=c.ext.offered_qos_profiles)
        if key in specs:
            conn_key[c.id] = key
    return conn_key, specs, skipped


def _encode(reader, connections, topics, output_path, encoder, *, batch, copy, storage, version, progress,
            queue_chunks, max_logged_bad, input_path, t_start):
    try:
        from tqdm import tqdm
    except ImportError:  # progress bar only
        tqdm = _NoProgress
    from theia_ros.features import to_features_msg
    from theia_ros.preprocess import ImageDecodeError

    store = typestore()
    meta = encoder.metadata
    FeaturesMsg = store.types[FEATURES_TYPE]
    camera_conns = [c for c in connections if c.topic in topics and c.msgtype in CAMERA_TYPES]
    conn_key, copy_specs, skipped_topics = _copy_plan(store, connections, topics, copy)
    other_conns = [c for c in connections if c.id in conn_key]
    total_frames = sum(c.msgcount for c in camera_conns)
    cameras = {t: camera_name_for(t) for t in topics}
    # the writer (sqlite3 objects are bound to their thread) is created, used and closed by the writer thread
    writer_obj = _make_writer(output_path, storage, version)

    frames = {t: 0 for t in topics}
    bad = {t: 0 for t in topics}
    counts = {"copied": 0}
    stop = threading.Event()
    writer_ready = threading.Event()
    decoded_q = queue.Queue(maxsize=queue_chunks)
    write_q = queue.Queue(maxsize=queue_chunks)
    errors = {}
    final = {"complete": False}

    def read_loop():
        chunk, n_frames, count, last_ts = [], 0, 0, None
        try:
            it = reader.messages(connections=camera_conns + other_conns)
            while True:
                try:
                    conn, ts, raw = next(it)
                except StopIteration:
                    if getattr(reader, "salvage_reason", None):  # read to the end, but the bag is damaged
                        if chunk:
                            _put(decoded_q, chunk, stop)
                            chunk = []
                        _put(decoded_q, _ReadFailure(BagReadError(reader.salvage_reason), count, last_ts), stop)
                        return
                    break
                except Exception as exc:  # the storage gave up: corrupt or truncated file
                    if chunk:
                        _put(decoded_q, chunk, stop)
                        chunk = []
                    _put(decoded_q, _ReadFailure(exc, count, last_ts), stop)
                    return
                count += 1
                last_ts = ts
                if conn.topic in topics:
                    try:
                        header, rgb = decode_camera_message(raw, conn.msgtype)
                        chunk.append(_Frame(conn, ts, header, rgb))
                    except ImageDecodeError as exc:
                        chunk.append(_Frame(conn, ts, error=str(exc)))
                    n_frames += 1
                    if n_frames >= batch:
                        _put(decoded_q, chunk, stop)
                        chunk, n_frames = [], 0
                else:
                    chunk.append(_Copy(conn, ts, raw))
                    if len(chunk) >= 4 * batch + 64:  # a long stretch without frames: pass it on
                        _put(decoded_q, chunk, stop)
                        chunk, n_frames = [], 0
            if chunk:
                _put(decoded_q, chunk, stop)
            _put(decoded_q, _END, stop)
        except _Stop:
            pass
        except BaseException as exc:  # a bug: report it through the main thread
            errors["reader"] = exc
            stop.set()

    def write_loop():
        writer = None
        try:
            writer_obj.open()
            writer = writer_obj
            out_conns = {t: writer.add_connection(target, FEATURES_TYPE, typestore=store)
                         for t, target in topics.items()}
            copy_out = {key: writer.add_connection(**spec) for key, spec in copy_specs.items()}
            copy_conns = {cid: copy_out[key] for cid, key in conn_key.items()}
            writer_ready.set()
            while True:
                item = _get(write_q, stop, lambda: True)
                if item is _END:
                    return
                chunk, features = item
                k = 0
                for entry in chunk:
                    if isinstance(entry, _Copy):
                        writer.write(copy_conns[entry.conn.id], entry.timestamp, entry.raw)
                        counts["copied"] += 1
                        continue
                    if entry.error is not None:
                        continue
                    topic = entry.conn.topic
                    fields = _Fields()
                    to_features_msg(features[k], msg=fields, header=entry.header, camera=cameras[topic],
                                    model_id=meta["model_id"], representation=meta["representation"],
                                    weights_id=meta["weights_id"], random_weights=meta["random_weights"])
                    k += 1
                    fields = vars(fields)
                    fields["shape"] = np.asarray(fields["shape"], dtype=np.uint32)
                    fields["data"] = np.frombuffer(fields["data"], dtype=np.uint8)
                    writer.write(out_conns[topic], entry.timestamp,
                                 store.serialize_cdr(FeaturesMsg(**fields), FEATURES_TYPE))
                    frames[topic] += 1
        except _Stop:
            pass
        except BaseException as exc:
            errors["writer"] = exc
            stop.set()
        finally:
            if writer is not None:  # close even after errors: what was written stays a valid bag
                try:
                    info = {"source": str(input_path), "topics": topics, **meta, "complete": final["complete"],
                            "frames": sum(frames.values()), "bad_frames": sum(bad.values())}
                    writer.set_custom_data(CUSTOM_DATA_KEY, json.dumps(info, sort_keys=True))
                    writer.close()
                except BaseException as exc:
                    errors.setdefault("writer", exc)
            writer_ready.set()

    reader_thread = threading.Thread(target=read_loop, name="encode-bag-read", daemon=True)
    writer_thread = threading.Thread(target=write_loop, name="encode-bag-write", daemon=True)
    writer_thread.start()
    writer_ready.wait()
    if errors:
        writer_thread.join()
        exc = errors["writer"]
        raise BagError(f"cannot create the output bag {output_path}: {type(exc).__name__}: {exc}") from exc
    bar = tqdm(total=total_frames or None, unit="frame", desc=f"encode {input_path.name}", disable=not progress,
               dynamic_ncols=True, smoothing=0.1, file=sys.stderr)
    reader_thread.start()
    interrupted = None
    read_failure = None
    logged_bad = 0
    try:
        while True:
            item = _get(decoded_q, stop, reader_thread.is_alive)
            if item is _END:
                break
            if isinstance(item, _ReadFailure):
                read_failure = item
                break
            good = [e for e in item if isinstance(e, _Frame) and e.error is None]
            for e in item:
                if isinstance(e, _Frame) and e.error is not None:
                    bad[e.conn.topic] += 1
                    if logged_bad < max_logged_bad:
                        log.warning("skipping frame of %s at t=%d ns: %s", e.conn.topic, e.timestamp, e.error)
                    elif logged_bad == max_logged_bad:
                        log.warning("more bad frames: no longer logged one by one (counted)")
                    logged_bad += 1
            features = encoder.encode([e.rgb for e in good])[0] if good else None
            for e in good:
                e.rgb = None  # free the decoded image early
            _put(write_q, (item, features), stop)
            bar.update(sum(1 for e in item if isinstance(e, _Frame)))
            if logged_bad:
                bar.set_postfix(bad=sum(bad.values()), refresh=False)
        final["complete"] = read_failure is None
        _put(write_q, _END, stop)
    except _Stop:
        pass
    except BaseException as exc:  # KeyboardInterrupt, encoder failure: keep what was written
        interrupted = exc
    finally:
        if interrupted is None and not errors:
            writer_thread.join()  # it drains the queue, then closes the bag
        stop.set()
        reader_thread.join(10)
        writer_thread.join(60)
        bar.close()

    seconds = time.perf_counter() - t_start
    complete = final["complete"] and interrupted is None and not errors
    result = EncodeResult(output_path, dict(topics), frames, bad, counts["copied"], skipped_topics, seconds, complete)
    for t, n in bad.items():
        if n and frames[t] == 0:
            log.warning("no frame of %s could be decoded (%d bad frames): is it a camera topic?", t, n)
    if errors:
        where, exc = next(iter(errors.items()))
        raise BagError(f"encode-bag failed in the {where} thread: {type(exc).__name__}: {exc}; "
                       f"partial output in {output_path} ({result.frames_total} frames)") from exc
    if isinstance(interrupted, Exception):  # e.g. the backend failed (out of memory...)
        raise BagError(f"encoding failed: {type(interrupted).__name__}: {interrupted}; partial output in "
                       f"{output_path} ({result.frames_total} frames, custom_data complete: false)") from interrupted
    if interrupted is not None:  # KeyboardInterrupt, SystemExit
        raise interrupted
    if read_failure is not None:
        exc = read_failure.exc
        last = "" if read_failure.last_timestamp is None else f", last good timestamp {read_failure.last_timestamp} ns"
        result.error = (f"input bag {input_path} is corrupt or truncated: reading stopped after "
                        f"{read_failure.messages} messages{last} ({type(exc).__name__}: {exc}). The output "
                        f"{output_path} is a valid bag with the {result.frames_total} frames encoded before "
                        "that point (custom_data complete: false)")
        err = BagReadError(result.error)
        err.result = result
        raise err from exc
    return result


class _NoProgress:
    def __init__(self, *args, **kwargs):
        pass

    def update(self, n=1):
        pass

    def set_postfix(self, *args, **kwargs):
        pass

    def close(self):
        pass


class _Fields:
    """Attribute holder that to_features_msg fills (becomes the rosbags message's fields)."""


# ---------------------------------------------------------------------------------------------
# inspect


@dataclasses.dataclass
class TopicStats:
    topic: str
    msgtype: str
    count: int
    first: int | None = None  # bag timestamps, ns
    last: int | None = None
    gaps: list = dataclasses.field(default_factory=list)  # [(gap ns, at timestamp ns)] largest first
    features: dict | None = None

    @property
    def rate(self) -> float:
        if self.count < 2 or self.first is None or self.last == self.first:
            return float("nan")
        return (self.count - 1) / ((self.last - self.first) * 1e-9)


def features_summary(msg) -> dict:
    """What one Features message holds (shape, dtype, representation, model, weights)."""
    from theia_ros.features import DTYPE_NAMES

    return {"shape": [int(s) for s in msg.shape], "dtype": DTYPE_NAMES.get(int(msg.dtype), f"code {msg.dtype}"),
            "representation": msg.representation, "model_id": msg.model_id, "weights_id": msg.weights_id,
            "random_weights": bool(msg.random_weights), "camera": msg.camera}


def inspect_bag(path, *, gaps=3) -> dict:
    """Summary of a bag: storage, duration, per topic count/rate/gaps, feature topics' metadata."""
    store = typestore()
    reader = open_reader(path, salvage=True)
    error = getattr(reader, "salvage_reason", None)
    if error:
        error = f"corrupt or truncated bag: {error}"
    try:
        conns = list(reader.connections)
        stats: dict[tuple, TopicStats] = {}
        for c in conns:
            stats.setdefault((c.topic, c.msgtype), TopicStats(c.topic, c.msgtype, 0))
        stamps = defaultdict(list)
        feature_variants = defaultdict(set)
        try:
            for conn, ts, raw in reader.messages(connections=conns):
                key = (conn.topic, conn.msgtype)
                stamps[key].append(ts)
                if conn.msgtype == FEATURES_TYPE:
                    try:
                        msg = deserialize(raw, FEATURES_TYPE)
                        s = features_summary(msg)
                    except Exception as exc:
                        s = {"error": f"undecodable: {exc}"}
                    if stats[key].features is None:
                        stats[key].features = s
                    feature_variants[key].add(json.dumps(s, sort_keys=True))
        except Exception as exc:
            error = f"corrupt or truncated bag: reading stopped ({type(exc).__name__}: {exc})" + (
                f"; {error[len('corrupt or truncated bag: '):]}" if error else "")
        for key, st in stats.items():
            ts = np.asarray(sorted(stamps.get(key, [])), dtype=np.int64)
            st.count = int(ts.size)
            if ts.size:
                st.first, st.last = int(ts[0]), int(ts[-1])
            if ts.size > 1:
                d = np.diff(ts)
                order = np.argsort(d)[::-1][:gaps]
                st.gaps = [(int(d[i]), int(ts[i])) for i in order]
            if st.features is not None and len(feature_variants[key]) > 1:
                st.features["inconsistent"] = len(feature_variants[key])
        custom = custom_data_of(reader)
        all_ts = [t for v in stamps.values() for t in v]
        info = {
            "path": str(path),
            "storage": storage_of(reader),
            "version": _metadata_version(Path(path)),
            "messages": len(all_ts),
            "start_ns": min(all_ts) if all_ts else None,
            "end_ns": max(all_ts) if all_ts else None,
            "duration_s": (max(all_ts) - min(all_ts)) * 1e-9 if all_ts else 0.0,
            "size_bytes": _size(Path(path)),
            "custom_data": custom,
            "topics": [dataclasses.asdict(s) | {"rate_hz": s.rate} for s in sorted(stats.values(),
                                                                               key=lambda s: s.topic)],
            "error": error,
        }
        return info
    finally:
        try:
            reader.close()
        except Exception:
            pass


def _metadata_version(path: Path):
    meta = path / "metadata.yaml"
    if not meta.is_file():
        return None
    try:
        import yaml

        return yaml.safe_load(meta.read_text())["rosbag2_bagfile_information"]["version"]
    except Exception:
        return None


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def format_inspect(info: dict) -> str:
    """Human-readable text of :func:`inspect_bag`."""
    lines = []
    dur = info["duration_s"]
    lines.append(f"bag:       {info['path']}")
    lines.append(f"storage:   {info['storage']}" + (f" (metadata version {info['version']})" if info['version'] else ""))
    lines.append(f"size:      {info['size_bytes'] / 1e6:.1f} MB")
    lines.append(f"duration:  {dur:.3f} s" + (f"  (start {info['start_ns'] * 1e-9:.3f} s)" if info["start_ns"] else ""))
    lines.append(f"messages:  {info['messages']}")
    topics = info["topics"]
    w_topic = max([len("topic")] + [len(t["topic"]) for t in topics])
    w_type = max([len("type")] + [len(t["msgtype"]) for t in topics])
    lines.append("")
    lines.append(f"{'topic':<{w_topic}}  {'type':<{w_type}}  {'count':>7}  {'rate Hz':>8}  largest gaps (s)")
    for t in topics:
        rate = t["rate_hz"]
        gaps = ", ".join(f"{g * 1e-9:.3f}" for g, _ in t["gaps"]) or "-"
        rate_s = f"{rate:8.2f}" if rate == rate else f"{'-':>8}"
        lines.append(f"{t['topic']:<{w_topic}}  {t['msgtype']:<{w_type}}  {t['count']:>7}  {rate_s}  {gaps}")
    feats = [t for t in topics if t["features"]]
    if feats:
        lines.append("")
        lines.append("feature topics:")
        for t in feats:
            f = t["features"]
            if "error" in f:
                lines.append(f"  {t['topic']}: {f['error']}")
                continue
            shape = "x".join(map(str, f["shape"]))
            lines.append(f"  {t['topic']}: camera {f['camera']!r}, shape [{shape}] {f['dtype']}, representation "
                         f"{f['representation']}")
            lines.append(f"    model_id {f['model_id']}, weights {f['weights_id']}")
            if f["random_weights"]:
                lines.append("    RANDOM WEIGHTS: these features carry no learned meaning (tests and demos only)")
            if f.get("inconsistent"):
                lines.append(f"    WARNING: {f['inconsistent']} different shape/model combinations on this topic")
    custom = info.get("custom_data") or {}
    if CUSTOM_DATA_KEY in custom:
        try:
            prov = json.loads(custom[CUSTOM_DATA_KEY])
            lines.append("")
            lines.append(f"encoded by theia-ros encode-bag from {prov.get('source')}: {prov.get('frames')} frames, "
                         f"{prov.get('bad_frames')} bad, complete: {prov.get('complete')}")
        except (TypeError, ValueError):
            pass
    if info.get("error"):
        lines.append("")
        lines.append(f"ERROR: {info['error']}")
    return "\n".join(lines)
