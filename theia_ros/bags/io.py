"""Opening, reading and writing rosbag2 bags without ROS: the pieces every bag tool shares.

Plain Python on top of the pure-Python `rosbags` library (sqlite3 and MCAP storage; reads rosbag2
metadata versions 1 to 9, writes 8 and 9), so it runs on a training server with no ROS installed.

- :func:`open_bag`: ``with open_bag(path, salvage=...) as reader:`` a reader that closes itself and
  reads every message the storage holds (:class:`BagReader`), falling back to
  :mod:`theia_ros.bags.salvage` for damaged bags when asked;
- :func:`make_writer`, :func:`prepare_output`: a new output bag, never clobbering an input;
- :func:`typestore`: the rosbags type store with the Jazzy types and this package's messages,
  :func:`ensure_connection_type` for types only the bag itself defines;
- :func:`deserialize_message`: one message of a connection, read with the definition the bag stores
  for this package's own types (bags written before a message changed stay readable), and
  :func:`upgrade_message` to rewrite such a message in the current definition;
- :func:`decode_camera_message`: a serialized camera message -> (header, RGB), through
  :func:`theia_ros.images.message_to_rgb`, the conversion the encoder node uses too.

Bag timestamps ("receive time", the ``timestamp`` column of rosbag2) and header stamps are
integers in nanoseconds here.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import shutil
from pathlib import Path

from theia_ros.images import ImageDecodeError, message_to_rgb
from theia_ros.resources import package_file

log = logging.getLogger(__name__)

FEATURES_TYPE = "theia_ros/msg/Features"
MULTI_FEATURES_TYPE = "theia_ros/msg/MultiCameraFeatures"
IMAGE_TYPE = "sensor_msgs/msg/Image"
COMPRESSED_IMAGE_TYPE = "sensor_msgs/msg/CompressedImage"
CAMERA_TYPES = (IMAGE_TYPE, COMPRESSED_IMAGE_TYPE)
STORAGES = ("mcap", "sqlite3")
DEFAULT_STORAGE = "mcap"
#: rosbag2 metadata versions rosbags writes: 9 (Jazzy and newer), 8 (Iron; readable by Humble's
#: sqlite3 plugin as far as we know, see docs/bags.md)
BAG_VERSIONS = (9, 8)
DEFAULT_BAG_VERSION = 9
CUSTOM_DATA_KEY = "theia_ros.encode_bag"


class BagError(RuntimeError):
    """A bag cannot be used as asked (missing, not a bag, output exists, no camera topics...)."""


class BagReadError(BagError):
    """The input bag is corrupt or truncated (raised after the readable part was processed)."""


class BagCountError(BagReadError):
    """The storage of a bag held fewer messages of some topic than its metadata.yaml counts (raised by
    :meth:`BagReader.messages` after the last message it found). `shortfalls`: topic -> (read, counted)."""

    def __init__(self, path, shortfalls: dict):
        self.shortfalls = dict(shortfalls)
        parts = "; ".join(f"{topic}: {read} read, {counted} counted in metadata.yaml"
                          for topic, (read, counted) in sorted(self.shortfalls.items()))
        super().__init__(f"bag {path} holds fewer messages than its metadata.yaml counts ({parts})")


# ---------------------------------------------------------------------------------------------
# Types


def msg_definition_text(name: str) -> str:
    """Text of msg/<name>.msg of this package (source tree, else an installed share/theia_ros/msg)."""
    try:
        return package_file(f"msg/{name}.msg").read_text()
    except FileNotFoundError as exc:
        raise BagError(str(exc)) from None


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


def _types_of_definition(msgtype: str, data: str) -> dict:
    """name -> rosbags field definitions of a connection's stored definition (rosbag2's concatenated
    .msg text: the type itself, then one ``MSG: <name>`` section per nested type)."""
    from rosbags.typesys import get_types_from_msg

    sep = "=" * 80 + "\n"
    parts = data.split(sep)
    types = get_types_from_msg(parts[0], msgtype)
    for part in parts[1:]:
        header, _, text = part.partition("\n")
        if header.startswith("MSG: "):
            name = header[5:].strip()
            if "/msg/" not in name:
                name = name.replace("/", "/msg/", 1)
            types.update(get_types_from_msg(text, name))
    return types


def ensure_connection_type(store, conn) -> bool:
    """Register `conn`'s type from the definition stored in the bag when the store lacks it; True when
    the store knows the type."""
    if conn.msgtype in store.types:
        return True
    data = getattr(conn.msgdef, "data", "") or ""
    if not data:
        return False
    try:
        store.register(_types_of_definition(conn.msgtype, data))
    except Exception as exc:  # rosbags raises several parser error types
        log.warning("cannot register type %s from the bag's definition: %s", conn.msgtype, exc)
        return False
    return conn.msgtype in store.types


OWN_PACKAGE_PREFIX = "theia_ros/"


def connection_typestore(conn):
    """The type store that reads `conn`'s messages: :func:`typestore`, except for this package's own
    types stored in the bag with another definition than today's (a bag recorded before a message
    changed, e.g. Features before its preprocessing fields): a store of the bag's own definition."""
    data = getattr(getattr(conn, "msgdef", None), "data", "") or ""
    if not conn.msgtype.startswith(OWN_PACKAGE_PREFIX) or not data:
        return typestore()
    return _store_of_definition(conn.msgtype, data)


@functools.lru_cache(maxsize=16)
def _store_of_definition(msgtype: str, data: str):
    store = typestore()
    try:
        types = _types_of_definition(msgtype, data)
    except Exception as exc:  # rosbags raises several parser error types
        log.warning("cannot parse the bag's definition of %s (%s): reading it with today's", msgtype, exc)
        return store
    own = {name: fields for name, fields in types.items() if name.startswith(OWN_PACKAGE_PREFIX)}
    if all(name in store.fielddefs and store.fielddefs[name][1] == fields[1] for name, fields in own.items()):
        return store  # the same fields (comments and constants do not change the wire format)
    from rosbags.typesys import Stores, get_typestore

    log.info("reading %s with the bag's own (older) definition", msgtype)
    old = get_typestore(Stores.ROS2_JAZZY)
    old.register({name: fields for name, fields in types.items() if name not in old.types})
    return old


def deserialize_message(raw, conn):
    """One serialized message of connection `conn`, read with :func:`connection_typestore`: the fields
    its bag's definition has (a Features message of an older bag lacks the newer fields)."""
    return connection_typestore(conn).deserialize_cdr(raw, conn.msgtype)


def is_current_definition(conn) -> bool:
    """False for this package's own types stored with an older definition (see :func:`connection_typestore`)."""
    return connection_typestore(conn) is typestore()


def upgrade_message(raw, conn) -> bytes:
    """A message of this package's types stored with an older definition, re-serialized in today's: the
    fields it has copied, the newer ones empty (an empty Features.preprocessing means the reference)."""
    store = typestore()
    msg = deserialize_message(raw, conn)
    return store.serialize_cdr(_in_current_definition(store, msg, conn.msgtype), conn.msgtype)


def _in_current_definition(store, msg, msgtype):
    import numpy as np
    from rosbags.interfaces import Nodetype

    values = {}
    for name, (kind, detail) in store.fielddefs[msgtype][1]:
        if not hasattr(msg, name):
            if kind == Nodetype.BASE:
                values[name] = "" if detail[0] == "string" else False if detail[0] == "bool" else 0
            elif kind == Nodetype.SEQUENCE and detail[0][0] == Nodetype.BASE:
                base = detail[0][1][0]
                values[name] = [] if base == "string" else np.empty(0, dtype=_numpy_dtype(base))
            else:
                raise BagError(f"cannot upgrade {msgtype}: no empty value for its new field {name!r}")
            continue
        value = getattr(msg, name)
        if kind == Nodetype.NAME and detail.startswith(OWN_PACKAGE_PREFIX):
            value = _in_current_definition(store, value, detail)
        elif kind in (Nodetype.SEQUENCE, Nodetype.ARRAY) and detail[0][0] == Nodetype.NAME \
                and detail[0][1].startswith(OWN_PACKAGE_PREFIX):
            value = [_in_current_definition(store, item, detail[0][1]) for item in value]
        values[name] = value
    return store.types[msgtype](**values)


def _numpy_dtype(ros_type: str):
    return {"bool": "?", "byte": "u1", "char": "u1", "octet": "u1"}.get(ros_type, ros_type)  # numpy's own names


def deserialize(raw, msgtype: str):
    return typestore().deserialize_cdr(raw, msgtype)


def decode_camera_message(raw, msgtype: str):
    """(header, RGB uint8 [H, W, 3]) of a serialized Image / CompressedImage.

    Raises ImageDecodeError (from theia_ros.images) for anything undecodable.
    """
    try:
        msg = deserialize(raw, msgtype)
    except Exception as exc:
        raise ImageDecodeError(f"undecodable {msgtype.rsplit('/', 1)[-1]} message: {exc}") from None
    return msg.header, message_to_rgb(msg)


# ---------------------------------------------------------------------------------------------
# Opening bags


@contextlib.contextmanager
def open_bag(path, *, salvage=False):
    """``with open_bag(path) as reader:`` an opened reader of a bag directory (a :class:`BagReader`)
    or of a single .mcap / .db3 file (a rosbags Reader), closed when the block ends.

    Every message the storage holds is read, whatever the QoS profiles in metadata.yaml say (see
    :class:`BagReader`); a topic with fewer messages in the storage than metadata.yaml counts ends
    ``reader.messages()`` with :class:`BagCountError`.
    Raises :class:`BagError` with a hint when `path` is not a readable bag, or when a topic is not
    CDR-serialized. With `salvage`, a damaged bag (truncated MCAP without footer, sqlite3 file
    with damaged pages, missing metadata.yaml) is opened with a reader of
    :mod:`theia_ros.bags.salvage` instead, whose ``salvage_reason`` says what is wrong; its
    messages end with an error where the damage starts.
    """
    reader = _open_reader(Path(path), salvage)
    try:
        yield reader
    finally:
        try:
            reader.close()
        except Exception:  # a reader broken by a corrupt file may fail to close as well
            pass


def _open_reader(path: Path, salvage: bool):
    from rosbags.rosbag2 import Reader

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
    if path.is_dir():
        _check_serialization(path, _metadata_topics(path))
    try:
        reader = Reader(path)
        reader.open()
    except Exception as exc:  # rosbags ReaderError, apsw (sqlite3) and yaml errors
        reason = f"cannot read bag {path}: {type(exc).__name__}: {exc}"
        if salvage:
            return _salvage(path, reason, exc)
        raise BagReadError(f"{reason} (corrupt or truncated? `ros2 bag reindex` or `mcap recover` may repair "
                           "it)") from exc
    if path.is_dir():
        try:
            return BagReader(path, reader)
        except BaseException:
            reader.close()
            raise
    try:
        _check_serialization(path, [(c.topic, c.ext.serialization_format) for c in reader.connections])
    except BagError:
        reader.close()
        raise
    return reader


def _metadata_topics(path: Path) -> list:
    """(topic, serialization format) of each topic in `path`/metadata.yaml; [] when unreadable (rosbags
    then says what is wrong with it)."""
    try:
        import yaml

        meta = yaml.safe_load((path / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
        return [(t["topic_metadata"]["name"], t["topic_metadata"]["serialization_format"])
                for t in meta["topics_with_message_count"]]
    except Exception:  # yaml errors, missing keys, wrong shapes
        return []


def _check_serialization(path, topics) -> None:
    """BagError naming the serialization formats other than CDR (the only one rosbags deserializes)."""
    foreign = {}
    for topic, fmt in topics:
        if fmt != "cdr":
            foreign.setdefault(fmt, []).append(topic)
    if foreign:
        what = "; ".join(f"{fmt!r} (topic {', '.join(names)})" for fmt, names in foreign.items())
        raise BagError(f"bag {path} uses an unsupported serialization format: {what}. Only 'cdr' messages can "
                       "be deserialized here (rosbags reads no other); the bag is not damaged")


class BagReader:
    """Reader of a rosbag2 bag directory that yields every message of its storage files.

    rosbags' own directory reader yields a topic's messages only when the QoS profiles (and type
    hash) in metadata.yaml equal those stored in the storage file; rosbag2 writes bags where they
    differ (other encodings of infinite deadline/lifespan durations, no QoS in the storage at all,
    metadata versions before QoS existed), and such a bag reads as empty. This reader matches the
    storage's connections to metadata.yaml's by topic and type only, keeps topics that only the
    storage knows, and after the last message compares the per-topic counts it read with
    metadata.yaml's ``topics_with_message_count``: a shortfall raises :class:`BagCountError`.

    It offers what the bag tools use of a rosbags Reader (``connections``, ``messages()``,
    ``close()``); anything else is the underlying rosbags Reader's (``reader.storage``...).
    """

    def __init__(self, path: Path, reader):
        self.path = Path(path)
        self._reader = reader
        directory = reader.storage
        self.storage_name = "mcap" if any("mcap" in type(s).__name__.lower() for s in directory.storages) else "sqlite3"
        self.connections = list(directory.connections)  # metadata.yaml's, msgcount as counted there
        self.expected_counts: dict[str, int] = {}
        for c in self.connections:
            self.expected_counts[c.topic] = self.expected_counts.get(c.topic, 0) + c.msgcount
        # per storage file: storage connection id -> connection of self.connections
        self._maps: list[dict] = []
        extra: dict[tuple, object] = {}
        for storage in directory.storages:
            mapping = {}
            for sc in storage.connections:
                same = [c for c in self.connections if c.topic == sc.topic and c.msgtype == sc.msgtype]
                conn = next((c for c in same if c.ext == sc.ext), same[0] if same else None)
                if conn is None:  # a topic metadata.yaml does not list: read it too
                    key = (sc.topic, sc.msgtype)
                    if key not in extra:
                        extra[key] = sc._replace(id=len(self.connections) + 1, owner=directory)
                        self.connections.append(extra[key])
                        log.info("%s: topic %s (%s) is in the storage but not in metadata.yaml", self.path,
                                 sc.topic, sc.msgtype)
                    conn = extra[key]
                mapping[sc.id] = conn
            self._maps.append(mapping)

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._reader, name)

    def close(self):
        self._reader.close()

    def messages(self, connections=(), start=None, stop=None):
        """(connection, bag timestamp ns, raw CDR) of every message of `connections` (all when empty),
        storage file by storage file, each in time order; then the count check (without start/stop)."""
        wanted = list(connections) or list(self.connections)
        ids = {c.id for c in wanted}
        directory = self._reader.storage
        per_message = directory.metadata.compression_mode == "message"
        read: dict[str, int] = {}
        for storage, mapping in zip(directory.storages, self._maps):
            conns = [sc for sc in storage.connections if mapping[sc.id].id in ids]
            if not conns:
                continue
            for sc, timestamp, data in storage.messages(conns, start, stop):
                conn = mapping[sc.id]
                read[conn.topic] = read.get(conn.topic, 0) + 1
                yield conn, timestamp, _zstd_decompress(data) if per_message else data
        if start is None and stop is None:
            self._check_counts({c.topic for c in wanted}, read)

    def _check_counts(self, topics, read) -> None:
        short = {}
        for topic in topics:
            counted, got = self.expected_counts.get(topic), read.get(topic, 0)
            if counted is None:
                continue
            if got < counted:
                short[topic] = (got, counted)
            elif got > counted:
                log.info("%s: %s has %d messages, metadata.yaml counts %d", self.path, topic, got, counted)
        if short:
            raise BagCountError(self.path, short)


def _zstd_decompress(data):
    try:
        from compression import zstd  # Python 3.14
    except ImportError:
        from backports import zstd
    return zstd.decompress(data)


def _salvage(path, reason, exc):
    from theia_ros.bags.salvage import SalvageError, open_salvage

    try:
        reader = open_salvage(path)
    except (SalvageError, OSError) as err:
        raise BagReadError(f"{reason}; nothing readable in it either ({err})") from (exc or err)
    if reader is None or not reader.connections:
        raise BagReadError(f"{reason}; no topic could be recovered from it") from exc
    try:
        _check_serialization(path, [(c.topic, c.ext.serialization_format) for c in reader.connections])
    except BagError:
        reader.close()
        raise
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


def check_output_format(storage: str, version: int) -> None:
    """Raise BagError unless rosbags can write `storage` with metadata `version`."""
    if storage not in STORAGES:
        raise BagError(f"unknown storage {storage!r}; use one of {', '.join(STORAGES)}")
    if version not in BAG_VERSIONS:
        raise BagError(f"rosbag2 metadata version {version} cannot be written; use one of {BAG_VERSIONS}")


def make_writer(path: Path, storage: str, version: int):
    """A rosbags Writer (not opened yet) for a new bag at `path`."""
    from rosbags.rosbag2 import StoragePlugin, Writer

    check_output_format(storage, version)
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
