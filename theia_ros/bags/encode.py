"""encode-bag: the camera topics of a bag encoded into Theia features, written as a new bag.

Decoding (thread), inference (caller's thread) and writing (thread) overlap; every other topic is
copied byte for byte unless asked not to."""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import queue
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from theia_ros.bags.io import (BAG_VERSIONS, CAMERA_TYPES, COMPRESSED_IMAGE_TYPE, CUSTOM_DATA_KEY, FEATURES_TYPE,
                               IMAGE_TYPE, STORAGES, BagError, BagReadError, _ensure_type, _make_writer,
                               deserialize, open_reader, prepare_output, typestore)

log = logging.getLogger(__name__)

DEFAULT_MODEL = "theaiinstitute/theia-tiny-patch16-224-cddsv"


# image_transport suffixes stripped before taking a camera topic's namespace
_TRANSPORT_SUFFIXES = ("compressed", "compressedDepth", "theora", "zstd", "ffmpeg", "h264")


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
    from theia_ros.images import ImageDecodeError, decode_compressed, image_to_rgb

    try:
        msg = deserialize(raw, msgtype)
    except Exception as exc:
        raise ImageDecodeError(f"undecodable {msgtype.rsplit('/', 1)[-1]} message: {exc}") from None
    if msgtype == IMAGE_TYPE:
        rgb = image_to_rgb(msg.data, msg.height, msg.width, msg.step, msg.encoding)
    else:
        rgb = decode_compressed(msg.data, msg.format)
    return msg.header, rgb


@functools.lru_cache(maxsize=2)
def _cached_encoder(source, seed, backend, precision, device, max_batch, representation, output_dtype):
    from theia_ros.encoder.pipeline import FeatureEncoder

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
    from theia_ros.images import ImageDecodeError

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
