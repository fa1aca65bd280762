"""encode-bag: the camera topics of a bag encoded into Theia features, written as a new bag.

Decoding (thread), inference (caller's thread) and writing (thread) overlap; every other topic is
copied byte for byte unless asked not to (this package's own messages recorded with an older
definition, e.g. Features before its preprocessing fields, are rewritten in today's: a bag holds one
definition per type)."""
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

from theia_ros.bags.io import (
    CAMERA_TYPES,
    COMPRESSED_IMAGE_TYPE,
    CUSTOM_DATA_KEY,
    DEFAULT_BAG_VERSION,
    DEFAULT_STORAGE,
    FEATURES_TYPE,
    IMAGE_TYPE,
    BagCountError,
    BagError,
    BagReadError,
    check_output_format,
    decode_camera_message,
    ensure_connection_type,
    is_current_definition,
    make_writer,
    open_bag,
    prepare_output,
    typestore,
    upgrade_message,
)
from theia_ros.encoder.config import ENCODER_DEFAULTS
from theia_ros.features import DEFAULT_POS_INTERPOLATION, DEFAULT_PREPROCESSING, to_features_msg
from theia_ros.images import ImageDecodeError

log = logging.getLogger(__name__)

#: frames read and encoded per inference (also the encoder's max_batch) unless told otherwise
DEFAULT_BATCH = 8


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


@functools.lru_cache(maxsize=2)
def _cached_encoder(source, seed, backend, precision, device, max_batch, representation, output_dtype, input_size,
                    pos_interpolation):
    from theia_ros.backends.factory import create_encoder

    return create_encoder(source, seed=seed, backend=backend, precision=precision, device=device,
                          max_batch=max_batch, representation=representation, output_dtype=output_dtype,
                          input_size=input_size, pos_interpolation=pos_interpolation)


def load_encoder(source=ENCODER_DEFAULTS["model"], *, seed=ENCODER_DEFAULTS["seed"],
                 backend=ENCODER_DEFAULTS["backend"], precision=ENCODER_DEFAULTS["precision"],
                 device=ENCODER_DEFAULTS["device"], max_batch=ENCODER_DEFAULTS["max_batch"],
                 representation=ENCODER_DEFAULTS["representation"], output_dtype=ENCODER_DEFAULTS["output_dtype"],
                 input_size=None, pos_interpolation=DEFAULT_POS_INTERPOLATION):
    """backends.factory.create_encoder, cached per process (repeated CLI calls in one process share the model).
    `input_size` / `pos_interpolation`: what its first engine is built for (None: 224x224); frames of other
    input sizes get engines of their own on first use."""
    try:
        return _cached_encoder(source, seed, backend, precision, device, int(max_batch), representation,
                               output_dtype, None if input_size is None else tuple(int(v) for v in input_size),
                               pos_interpolation)
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


def encode_bag(input_path, output_path, *, model=ENCODER_DEFAULTS["model"], seed=ENCODER_DEFAULTS["seed"],
               backend=ENCODER_DEFAULTS["backend"], precision=ENCODER_DEFAULTS["precision"],
               device=ENCODER_DEFAULTS["device"], representation=ENCODER_DEFAULTS["representation"],
               dtype=ENCODER_DEFAULTS["output_dtype"], preprocessing=DEFAULT_PREPROCESSING, input_size=None,
               pos_interpolation=DEFAULT_POS_INTERPOLATION, cameras=None, batch=DEFAULT_BATCH, copy=True,
               overwrite=False,
               storage=DEFAULT_STORAGE, version=DEFAULT_BAG_VERSION, threads=ENCODER_DEFAULTS["threads"],
               progress=True, encoder=None, queue_chunks=3, max_logged_bad=10) -> EncodeResult:
    """Encode the camera topics of bag `input_path` into a new bag `output_path` (see module doc).

    `cameras`: camera topics ('TOPIC' or 'TOPIC=FEATURES_TOPIC'), None: every image topic.
    `preprocessing` ("theia" | "isaaclab"), `input_size` ((height, width) the model sees; None: 224x224 for
    theia, each image's own for isaaclab), `pos_interpolation`: as the encoder node's parameters; every
    features message records them.
    `encoder`: a ready FeatureEncoder (else loaded from model/seed/backend/...). `threads`: torch
    intra-op threads, 0 keeps torch's default.
    Raises :class:`BagError` before anything is written (bad arguments, output exists, no camera
    topics), :class:`BagReadError` when the input turns out corrupt or truncated part-way: the
    output then holds everything before the damage and is a complete, readable bag whose
    custom_data says ``complete: false``.
    """
    input_path, output_path = Path(input_path), Path(output_path)
    if batch < 1:
        raise BagError(f"batch must be >= 1, got {batch}")
    from theia_ros.preprocess import PreprocessConfig

    try:
        config = PreprocessConfig(profile=preprocessing, size=None if input_size is None else tuple(input_size),
                                  pos_interpolation=pos_interpolation)
    except (TypeError, ValueError) as exc:
        raise BagError(f"preprocessing: {exc}") from None
    fixed_size = config.size or ((224, 224) if config.profile == "theia" else None)
    check_output_format(storage, version)
    if not overwrite and (output_path.exists() or output_path.is_symlink()):
        raise BagError(f"output {output_path} exists; pass --overwrite to replace it")
    with open_bag(input_path, salvage=True) as reader:
        connections = list(reader.connections)
        topics = select_cameras(connections, cameras)
        if threads:
            import torch

            torch.set_num_threads(int(threads))
        if encoder is None:
            encoder = load_encoder(model, seed=seed, backend=backend, precision=precision, device=device,
                                   max_batch=batch, representation=representation, output_dtype=dtype,
                                   input_size=fixed_size, pos_interpolation=pos_interpolation)
        prepare_output(output_path, [input_path], overwrite)
        t_start = time.perf_counter()  # throughput excludes opening the bag and loading the model
        run = _EncodeRun(reader, connections, topics, output_path, encoder, config, batch=batch, copy=copy,
                         storage=storage, version=version, queue_chunks=queue_chunks,
                         max_logged_bad=max_logged_bad, input_path=input_path)
        return run.run(progress, t_start)


def _copy_plan(store, connections, topics, copy):
    """(input connection id -> output key, output key -> add_connection kwargs, skipped topics, ids of the
    connections whose messages are rewritten in today's definition)."""
    conn_key, specs, skipped, upgrade = {}, {}, [], set()
    if not copy:
        return conn_key, specs, skipped, upgrade
    for c in connections:
        if c.topic in topics:
            continue
        key = (c.topic, c.msgtype)
        if not is_current_definition(c):  # this package's type, recorded with an older definition
            upgrade.add(c.id)
        if key not in specs and c.topic not in skipped:
            msgdef, digest = (c.msgdef.data or None), (c.digest or None)
            if c.id in upgrade:
                msgdef, digest = store.generate_msgdef(c.msgtype, ros_version=2)[0], store.hash_rihs01(c.msgtype)
                log.info("copying %s (%s) in today's definition of the type", c.topic, c.msgtype)
            if (msgdef is None or digest is None) and ensure_connection_type(store, c):
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
    return conn_key, specs, skipped, upgrade


# ---------------------------------------------------------------------------------------------
# The pipeline: a read/decode thread, inference in the caller's thread, a write thread, joined by
# bounded queues of chunks (lists of _Frame and _Copy in bag order).


@dataclasses.dataclass
class _Frame:
    conn: Any
    timestamp: int
    header: Any = None
    rgb: Any = None
    error: str | None = None
    input_size: Any = None  # (height, width) the model saw


@dataclasses.dataclass
class _Copy:
    conn: Any
    timestamp: int
    raw: Any


@dataclasses.dataclass
class _ReadFailure:
    """The reader stopped at damage after `messages` messages (the last at `last_timestamp`)."""

    exc: BaseException
    messages: int
    last_timestamp: int | None


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


def _decode_frame(conn, timestamp, raw) -> _Frame:
    try:
        header, rgb = decode_camera_message(raw, conn.msgtype)
        return _Frame(conn, timestamp, header, rgb)
    except ImageDecodeError as exc:
        return _Frame(conn, timestamp, error=str(exc))


class _EncodeRun:
    """One encode-bag pass (see the module doc); :meth:`run` returns the EncodeResult or raises."""

    def __init__(self, reader, connections, topics, output_path, encoder, config, *, batch, copy, storage, version,
                 queue_chunks, max_logged_bad, input_path):
        self.reader, self.topics, self.encoder, self.batch = reader, topics, encoder, batch
        from theia_ros.preprocess import input_size  # torch: imported when encoding, not with the CLI's parser

        self.config = config  # the preprocessing of every camera
        self.input_size_of = lambda rgb: input_size(config, rgb.shape[:2])
        self.output_path, self.input_path, self.max_logged_bad = output_path, input_path, max_logged_bad
        self.meta = encoder.metadata
        self.store = typestore()
        self.features_cls = self.store.types[FEATURES_TYPE]
        self.camera_conns = [c for c in connections if c.topic in topics and c.msgtype in CAMERA_TYPES]
        self.conn_key, self.copy_specs, self.skipped_topics, self.upgrade = _copy_plan(self.store, connections,
                                                                                        topics, copy)
        self.other_conns = [c for c in connections if c.id in self.conn_key]
        self.cameras = {t: camera_name_for(t) for t in topics}
        # sqlite3 objects are bound to their thread: the writer thread opens, uses and closes the writer
        self.writer = make_writer(output_path, storage, version)

        self.frames = {t: 0 for t in topics}
        self.bad = {t: 0 for t in topics}
        self.copied = 0
        self.logged_bad = 0
        self.stop = threading.Event()
        self.writer_ready = threading.Event()
        self.decoded_q = queue.Queue(maxsize=queue_chunks)
        self.write_q = queue.Queue(maxsize=queue_chunks)
        self.errors = {}  # thread name -> exception (a bug, or the output could not be written)
        self.complete = False  # every message read and handed to the writer
        self.read_failure = None
        self.interrupted = None  # KeyboardInterrupt, or the encoder failed

    def run(self, progress, t_start) -> EncodeResult:
        reader_thread = threading.Thread(target=self.read_loop, name="encode-bag-read", daemon=True)
        writer_thread = threading.Thread(target=self.write_loop, name="encode-bag-write", daemon=True)
        writer_thread.start()
        self.writer_ready.wait()
        if self.errors:
            writer_thread.join()
            exc = self.errors["writer"]
            raise BagError(f"cannot create the output bag {self.output_path}: {type(exc).__name__}: {exc}") from exc
        bar = _progress_bar(sum(c.msgcount for c in self.camera_conns), f"encode {self.input_path.name}", progress)
        reader_thread.start()
        try:
            self.read_failure = self.infer_loop(bar, reader_thread.is_alive)
            self.complete = self.read_failure is None
            _put(self.write_q, _END, self.stop)
        except _Stop:
            pass
        except BaseException as exc:  # KeyboardInterrupt, encoder failure: keep what was written
            self.interrupted = exc
        finally:
            if self.interrupted is None and not self.errors:
                writer_thread.join()  # it drains the queue, then closes the bag
            self.stop.set()
            reader_thread.join(10)
            writer_thread.join(60)
            bar.close()
        return self.report(time.perf_counter() - t_start)

    # -- reader thread: messages in bag order, camera frames decoded, handed on in chunks

    def read_loop(self):
        try:
            self._read()
        except _Stop:
            pass
        except BaseException as exc:  # a bug: report it through the main thread
            self.errors["reader"] = exc
            self.stop.set()

    def _read(self):
        """Chunks of `batch` frames (or a long stretch of copied messages), then _END, or a
        _ReadFailure where the input turns out damaged."""
        chunk, n_frames, count, last_ts = [], 0, 0, None
        messages = self.reader.messages(connections=self.camera_conns + self.other_conns)
        while True:
            try:
                conn, ts, raw = next(messages)
            except StopIteration:
                reason = getattr(self.reader, "salvage_reason", None)  # read to the end, but the bag is damaged
                end = _ReadFailure(BagReadError(reason), count, last_ts) if reason else _END
                break
            except Exception as exc:  # the storage gave up: corrupt or truncated file
                end = _ReadFailure(exc, count, last_ts)
                break
            count += 1
            last_ts = ts
            if conn.topic in self.topics:
                chunk.append(_decode_frame(conn, ts, raw))
                n_frames += 1
                full = n_frames >= self.batch
            else:
                chunk.append(_Copy(conn, ts, raw))
                full = len(chunk) >= 4 * self.batch + 64  # a long stretch without frames: pass it on
            if full:
                _put(self.decoded_q, chunk, self.stop)
                chunk, n_frames = [], 0
        if chunk:
            _put(self.decoded_q, chunk, self.stop)
        _put(self.decoded_q, end, self.stop)

    # -- caller's thread: one inference per chunk

    def infer_loop(self, bar, reader_alive) -> _ReadFailure | None:
        """Encode the good frames of each chunk in one batch and hand the chunk to the writer; returns
        the read failure that ended the input, None at its normal end."""
        while True:
            item = _get(self.decoded_q, self.stop, reader_alive)
            if item is _END:
                return None
            if isinstance(item, _ReadFailure):
                return item
            good = [e for e in item if isinstance(e, _Frame) and e.error is None]
            self._count_bad_frames(item)
            # features: a tensor [B, ...], or per-frame tensors where frames of several patch grids meet
            features = self.encoder.encode([e.rgb for e in good], [self.config] * len(good))[0] if good else None
            for e in good:
                e.input_size = self.input_size_of(e.rgb)
                e.rgb = None  # free the decoded image early
            _put(self.write_q, (item, features), self.stop)
            bar.update(sum(1 for e in item if isinstance(e, _Frame)))
            if self.logged_bad:
                bar.set_postfix(bad=sum(self.bad.values()), refresh=False)

    def _count_bad_frames(self, chunk):
        for e in chunk:
            if isinstance(e, _Frame) and e.error is not None:
                self.bad[e.conn.topic] += 1
                if self.logged_bad < self.max_logged_bad:
                    log.warning("skipping frame of %s at t=%d ns: %s", e.conn.topic, e.timestamp, e.error)
                elif self.logged_bad == self.max_logged_bad:
                    log.warning("more bad frames: no longer logged one by one (counted)")
                self.logged_bad += 1

    # -- writer thread: the output bag, closed with its custom_data even after errors

    def write_loop(self):
        opened = False
        try:
            self.writer.open()
            opened = True
            feature_conns = {t: self.writer.add_connection(target, FEATURES_TYPE, typestore=self.store)
                             for t, target in self.topics.items()}
            copy_out = {key: self.writer.add_connection(**spec) for key, spec in self.copy_specs.items()}
            copy_conns = {cid: copy_out[key] for cid, key in self.conn_key.items()}
            self.writer_ready.set()
            while True:
                item = _get(self.write_q, self.stop, lambda: True)
                if item is _END:
                    return
                chunk, features = item
                self._write_chunk(chunk, features, feature_conns, copy_conns)
        except _Stop:
            pass
        except BaseException as exc:
            self.errors["writer"] = exc
            self.stop.set()
        finally:
            if opened:  # close even after errors: what was written stays a valid bag
                self._close_writer()
            self.writer_ready.set()

    def _write_chunk(self, chunk, features, feature_conns, copy_conns):
        k = 0  # row of `features`: the chunk's good frames in order
        for entry in chunk:
            if isinstance(entry, _Copy):
                raw = upgrade_message(entry.raw, entry.conn) if entry.conn.id in self.upgrade else entry.raw
                self.writer.write(copy_conns[entry.conn.id], entry.timestamp, raw)
                self.copied += 1
            elif entry.error is None:
                topic = entry.conn.topic
                self.writer.write(feature_conns[topic], entry.timestamp, self._features_cdr(features[k], entry))
                k += 1
                self.frames[topic] += 1

    def _features_cdr(self, features, frame: _Frame):
        """The serialized theia_ros/msg/Features of one frame, stamped like its image."""
        fields = _Fields()
        meta = self.meta
        to_features_msg(features, msg=fields, header=frame.header, camera=self.cameras[frame.conn.topic],
                        model_id=meta["model_id"], representation=meta["representation"],
                        weights_id=meta["weights_id"], random_weights=meta["random_weights"],
                        preprocessing=self.config.profile, pos_interpolation=self.config.pos_interpolation,
                        input_size=frame.input_size)
        fields = vars(fields)
        for name in ("shape", "input_size", "patch_grid"):
            fields[name] = np.asarray(fields[name], dtype=np.uint32)
        fields["data"] = np.frombuffer(fields["data"], dtype=np.uint8)
        return self.store.serialize_cdr(self.features_cls(**fields), FEATURES_TYPE)

    def _close_writer(self):
        try:
            info = {"source": str(self.input_path), "topics": self.topics, **self.meta,
                    "preprocessing": self.config.profile, "pos_interpolation": self.config.pos_interpolation,
                    "input_size": None if self.config.size is None else list(self.config.size),
                    "complete": self.complete, "frames": sum(self.frames.values()),
                    "bad_frames": sum(self.bad.values())}
            self.writer.set_custom_data(CUSTOM_DATA_KEY, json.dumps(info, sort_keys=True))
            self.writer.close()
        except BaseException as exc:
            self.errors.setdefault("writer", exc)

    # -- the outcome

    def report(self, seconds) -> EncodeResult:
        """The EncodeResult, or the error that ended the run (BagReadError carries the result)."""
        complete = self.complete and self.interrupted is None and not self.errors
        result = EncodeResult(self.output_path, dict(self.topics), self.frames, self.bad, self.copied,
                              self.skipped_topics, seconds, complete)
        for t, n in self.bad.items():
            if n and self.frames[t] == 0:
                log.warning("no frame of %s could be decoded (%d bad frames): is it a camera topic?", t, n)
        output, interrupted = self.output_path, self.interrupted
        if self.errors:
            where, exc = next(iter(self.errors.items()))
            raise BagError(f"encode-bag failed in the {where} thread: {type(exc).__name__}: {exc}; "
                           f"partial output in {output} ({result.frames_total} frames)") from exc
        if isinstance(interrupted, Exception):  # e.g. the backend failed (out of memory...)
            raise BagError(f"encoding failed: {type(interrupted).__name__}: {interrupted}; partial output in "
                           f"{output} ({result.frames_total} frames, custom_data complete: false)") from interrupted
        if interrupted is not None:  # KeyboardInterrupt, SystemExit
            raise interrupted
        failure = self.read_failure
        if failure is not None:
            exc = failure.exc
            last = "" if failure.last_timestamp is None else f", last good timestamp {failure.last_timestamp} ns"
            if isinstance(exc, BagCountError):  # read to the end, but messages are missing
                result.error = (f"{exc}. The output {output} is a valid bag with the {result.frames_total} frames "
                                f"encoded from the {failure.messages} messages read (custom_data complete: false)")
            else:
                result.error = (f"input bag {self.input_path} is corrupt or truncated: reading stopped after "
                                f"{failure.messages} messages{last} ({type(exc).__name__}: {exc}). The output "
                                f"{output} is a valid bag with the {result.frames_total} frames encoded before "
                                "that point (custom_data complete: false)")
            err = BagReadError(result.error)
            err.result = result
            raise err from exc
        return result


def _progress_bar(total, desc, enabled):
    try:
        from tqdm import tqdm
    except ImportError:  # progress bar only
        return _NoProgress()
    return tqdm(total=total or None, unit="frame", desc=desc, disable=not enabled, dynamic_ncols=True,
                smoothing=0.1, file=sys.stderr)


class _NoProgress:
    def update(self, n=1):
        pass

    def set_postfix(self, *args, **kwargs):
        pass

    def close(self):
        pass


class _Fields:
    """Attribute holder that to_features_msg fills (becomes the rosbags message's fields)."""
