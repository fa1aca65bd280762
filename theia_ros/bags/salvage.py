"""Read what is readable from a damaged rosbag2 storage file (plain Python).

rosbags refuses an MCAP file without its footer (a recording that was killed or ran out of disk)
and a sqlite3 file whose metadata pages are damaged. These readers go through such a file in
write order and stop, with :class:`SalvageError`, where the damage starts, so that encode-bag can
keep everything before it. They offer the part of the rosbags Reader interface the bag tools use:
``connections`` (rosbags Connection tuples), ``messages(connections)`` and ``close()``.
"""
from __future__ import annotations

import sqlite3
import struct
from pathlib import Path

from rosbags.interfaces import Connection, ConnectionExtRosbag2, MessageDefinition, MessageDefinitionFormat

MCAP_MAGIC = b"\x89MCAP0\r\n"
_FORMATS = {"ros2msg": MessageDefinitionFormat.MSG, "ros2idl": MessageDefinitionFormat.IDL}


class SalvageError(Exception):
    """The file ends or is damaged here; the messages before were delivered."""


def _qos(text):
    from rosbags.rosbag2.metadata import parse_qos

    try:
        return parse_qos(text) if text else []
    except Exception:
        return []


def storage_file(path: Path) -> Path | None:
    """The .mcap or .db3 file of a bag directory (the first one), or `path` itself if it is one."""
    path = Path(path)
    if path.is_file():
        return path if path.suffix in (".mcap", ".db3") else None
    files = sorted(p for p in path.glob("*") if p.suffix in (".mcap", ".db3"))
    return files[0] if files else None


def open_salvage(path):
    """A salvage reader for the storage file of bag `path` (None when there is none)."""
    f = storage_file(path)
    if f is None:
        return None
    return McapSalvageReader(f) if f.suffix == ".mcap" else Sqlite3SalvageReader(f)


# ---------------------------------------------------------------------------------------------
# MCAP


class _Buf:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, n):
        if self.pos + n > len(self.data):
            raise SalvageError(f"record field runs past its record ({n} bytes at {self.pos} of {len(self.data)})")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u16(self):
        return struct.unpack("<H", self.take(2))[0]

    def u32(self):
        return struct.unpack("<I", self.take(4))[0]

    def u64(self):
        return struct.unpack("<Q", self.take(8))[0]

    def string(self):
        return self.take(self.u32()).decode("utf-8", errors="replace")


def _decompress(data: bytes, compression: str, size: int) -> bytes:
    if compression == "":
        return data
    if compression == "zstd":
        try:
            from compression import zstd  # Python 3.14
        except ImportError:
            from backports import zstd
        return zstd.decompress(data)
    if compression == "lz4":
        import lz4.frame

        return lz4.frame.decompress(data)
    raise SalvageError(f"unsupported chunk compression {compression!r}")


class McapSalvageReader:
    """Sequential reader of an MCAP file that may lack its summary and footer, or end mid-record."""

    storage_name = "mcap"

    def __init__(self, path: Path):
        self.path = Path(path)
        self.schemas: dict[int, tuple[str, str, str]] = {}
        self.channels: dict[int, Connection] = {}
        self.counts: dict[int, int] = {}
        self.damage: str | None = None
        self._scan_meta()  # channels and counts; notes where the file breaks
        self.connections = [c._replace(msgcount=self.counts.get(c.id, 0)) for c in self.channels.values()]

    def close(self):
        pass

    def _records(self, f):
        """(opcode, content bytes) of the top-level records; SalvageError where the file breaks."""
        magic = f.read(8)
        if magic != MCAP_MAGIC:
            raise SalvageError("not an MCAP file (bad magic)")
        while True:
            head = f.read(9)
            if not head:
                raise SalvageError("file ends without a footer (truncated)")
            if len(head) < 9:
                raise SalvageError("file ends inside a record header (truncated)")
            op, length = head[0], struct.unpack("<Q", head[1:])[0]
            if op == 0 or length > 1 << 40:
                raise SalvageError(f"corrupt record (opcode {op:#x}, length {length}) at byte {f.tell() - 9}")
            content = f.read(length)
            if len(content) < length:
                raise SalvageError(f"file ends inside a record (opcode {op:#x}, {len(content)} of {length} bytes)")
            yield op, content

    def _inner(self, data):
        buf = _Buf(data)
        while buf.pos < len(data):
            op = buf.take(1)[0]
            length = buf.u64()
            yield op, buf.take(length)

    def _handle(self, op, content, messages):
        if op == 0x03:  # schema
            b = _Buf(content)
            sid = b.u16()
            self.schemas[sid] = (b.string(), b.string(), b.take(b.u32()).decode("utf-8", errors="replace"))
        elif op == 0x04:  # channel
            b = _Buf(content)
            cid, sid, topic, encoding = b.u16(), b.u16(), b.string(), b.string()
            meta, end = {}, b.pos + b.u32()
            while b.pos < end:
                k = b.string()
                meta[k] = b.string()
            name, fmt, text = self.schemas.get(sid, ("", "", ""))
            if cid not in self.channels:
                self.channels[cid] = Connection(
                    cid, topic, name, MessageDefinition(_FORMATS.get(fmt, MessageDefinitionFormat.NONE), text), "", 0,
                    ConnectionExtRosbag2(encoding, _qos(meta.get("offered_qos_profiles", ""))), self)
        elif op == 0x05:  # message
            b = _Buf(content)
            cid, _seq, log_time, _pub = b.u16(), b.u32(), b.u64(), b.u64()
            if messages:
                return [(cid, log_time, content[b.pos:])]
            self.counts[cid] = self.counts.get(cid, 0) + 1
        elif op == 0x06:  # chunk: its records, in order
            b = _Buf(content)
            b.u64(), b.u64()
            size, _crc, compression = b.u64(), b.u32(), b.string()
            data = _decompress(b.take(b.u64()), compression, size)
            out = []
            for iop, icontent in self._inner(data):
                got = self._handle(iop, icontent, messages)
                if got:
                    out.extend(got)
            return out
        return None

    def _scan(self, messages):
        """Generator over the file: with `messages`, yields (channel id, log time, data) and raises
        SalvageError at the damage; without, only records schemas, channels, counts and the damage."""
        with open(self.path, "rb") as f:
            try:
                for op, content in self._records(f):
                    if op in (0x0F, 0x02):  # data end, footer: the file is whole after all
                        return
                    try:
                        got = self._handle(op, content, messages)
                    except SalvageError:
                        raise
                    except Exception as exc:
                        raise SalvageError(f"corrupt record (opcode {op:#x}): {type(exc).__name__}: {exc}") from exc
                    if messages and got:
                        yield from got
            except SalvageError as exc:
                self.damage = str(exc)
                if messages:
                    raise

    def _scan_meta(self):
        for _ in self._scan(False):
            pass

    def messages(self, connections=()):
        wanted = {c.id: c for c in connections} if connections else dict(self.channels)
        for cid, ts, data in self._scan(messages=True):
            conn = wanted.get(cid)
            if conn is not None:
                yield conn, ts, data


# ---------------------------------------------------------------------------------------------
# sqlite3


class Sqlite3SalvageReader:
    """Reads topics and messages (in insertion order) straight from the tables of a .db3 file."""

    storage_name = "sqlite3"

    def __init__(self, path: Path):
        self.path = Path(path)
        self.damage = None
        self._tmp = None
        try:
            cols, rows, defs = self._read_topics(self.path)
        except sqlite3.Error as exc:
            # a truncated file: sqlite refuses it while the header's page count exceeds the file;
            # a page-aligned copy with the count patched reads up to the missing pages
            try:
                cols, rows, defs = self._read_topics(self._patched_copy())
            except (sqlite3.Error, OSError, ValueError) as exc2:
                self.close()
                raise SalvageError(f"cannot read the topics table: {exc}; patched copy: {exc2}") from exc
            self.damage = f"truncated or damaged sqlite3 file ({exc})"
        topic_cols = cols
        counts = {}
        try:
            counts = dict(self.db.execute("SELECT topic_id, COUNT(*) FROM messages GROUP BY topic_id").fetchall())
        except sqlite3.Error as exc:
            self.damage = str(exc)
        self.connections = []
        for row in rows:
            r = dict(zip(topic_cols, row))
            self.connections.append(Connection(
                r["id"], r["name"], r["type"], defs.get(r["type"], MessageDefinition(MessageDefinitionFormat.NONE, "")),
                r.get("type_description_hash") or "", counts.get(r["id"], 0),
                ConnectionExtRosbag2(r.get("serialization_format", "cdr"), _qos(r.get("offered_qos_profiles", ""))),
                self))

    def _read_topics(self, path):
        self.db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        cols = [r[1] for r in self.db.execute("PRAGMA table_info(topics)")]
        if not cols:
            raise sqlite3.DatabaseError("no topics table")
        rows = self.db.execute(f"SELECT {', '.join(cols)} FROM topics ORDER BY id").fetchall()
        defs = {}
        tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "message_definitions" in tables:
            for name, enc, text in self.db.execute(
                    "SELECT topic_type, encoding, encoded_message_definition FROM message_definitions"):
                defs[name] = MessageDefinition(_FORMATS.get(enc, MessageDefinitionFormat.NONE), text)
        return cols, rows, defs

    def _patched_copy(self) -> Path:
        import shutil
        import tempfile

        self.db.close()
        with open(self.path, "rb") as f:
            header = f.read(100)
        if len(header) < 100 or not header.startswith(b"SQLite format 3\x00"):
            raise ValueError("not an sqlite3 file")
        page = struct.unpack(">H", header[16:18])[0]
        page = 65536 if page == 1 else page
        pages = self.path.stat().st_size // page
        self._tmp = tempfile.TemporaryDirectory(prefix="theia_salvage_")
        copy = Path(self._tmp.name) / self.path.name
        with open(self.path, "rb") as src, open(copy, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
            dst.truncate(pages * page)
            dst.seek(28)
            dst.write(struct.pack(">I", pages))
        return copy

    def close(self):
        try:
            self.db.close()
        finally:
            if self._tmp is not None:
                self._tmp.cleanup()
                self._tmp = None

    def messages(self, connections=()):
        wanted = {c.id: c for c in connections} if connections else {c.id: c for c in self.connections}
        try:
            for cid, ts, data in self.db.execute("SELECT topic_id, timestamp, data FROM messages ORDER BY id"):
                conn = wanted.get(cid)
                if conn is not None:
                    yield conn, ts, data
        except sqlite3.Error as exc:
            self.damage = str(exc)
            raise SalvageError(f"sqlite3 file damaged: {exc}") from exc
