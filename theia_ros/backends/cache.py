"""Persistent cache of built engines (TensorRT programs, ONNX graphs), shared by the backends.

Layout: ``<root>/<backend>/<slot>/`` where ``root`` is ``$THEIA_ROS_CACHE`` or
``~/.cache/theia_ros/engines`` (never /tmp: engines take minutes to build and must survive a
reboot).  A slot holds the engine file(s) and ``meta.json``, a sidecar with

* ``key``: what the engine computes (backend, weights digest, variant, representation or
  teacher, precision, batch range, input size, build options).  Its digest is part of the slot
  name, so a different checkpoint, precision or input size lands in a different slot;
* ``environment``: what the engine was built with and for (GPU name and compute capability,
  TensorRT / torch-tensorrt / torch versions ...).  A mismatch makes the engine *stale* (other
  software versions) or *foreign* (other GPU) and it is rebuilt in place;
* ``files``: size and sha256 of every engine file, checked on every load (a truncated or
  overwritten file is *corrupt* and rebuilt);
* ``validation``: the cosine to fp32 torch measured when the engine was built.

The hashes catch a damaged file, not one altered on purpose with the sidecar rewritten to match:
the backends therefore run the accuracy gate (backends.validation) on every engine they load from
here too, and rebuild one that fails it.

The sidecar is written last, so a build that dies half way leaves no loadable entry; a per-slot
lock file keeps two processes from building the same engine at once.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, Mapping, Optional, Sequence

from theia_ros.weights import sha256_file

log = logging.getLogger("theia_ros.backends")

ENV_VAR = "THEIA_ROS_CACHE"
CACHE_FORMAT = 1
SIDECAR = "meta.json"
# environment fields whose mismatch means "built for another machine", not "older software"
FOREIGN_FIELDS = ("gpu_name", "compute_capability", "platform")


def cache_root(root=None) -> Path:
    """The engine cache directory: ``root`` if given, else ``$THEIA_ROS_CACHE``, else
    ``~/.cache/theia_ros/engines`` (``$XDG_CACHE_HOME`` honoured)."""
    if root:
        return Path(os.path.expanduser(str(root)))
    if os.environ.get(ENV_VAR):
        return Path(os.path.expanduser(os.environ[ENV_VAR]))
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "theia_ros" / "engines"


def _canonical(fields: Mapping) -> str:
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)


def key_digest(key: Mapping) -> str:
    """Short stable digest of the key fields (order-independent)."""
    return hashlib.sha256(_canonical(key).encode()).hexdigest()[:16]


def _slug(text, limit=40) -> str:
    return re.sub(r"[^0-9A-Za-z.]+", "-", str(text)).strip("-")[:limit] or "x"


def slot_name(key: Mapping) -> str:
    """Readable, unique directory name of a key: variant, output, precision, batch range, input size
    (when the key has one), digest."""
    parts = [key.get("variant", "model"), key.get("representation", ""), key.get("precision", ""),
             "b{}-{}".format(*key["batch"]) if isinstance(key.get("batch"), (list, tuple)) else key.get("batch", "")]
    if isinstance(key.get("input_size"), (list, tuple)):
        parts.append("{}x{}".format(*key["input_size"]))
    return "_".join(_slug(p) for p in parts if p != "") + "_" + key_digest(key)


def describe_mismatch(field: str, was, now) -> str:
    return f"{field} was {was!r}, now {now!r}"


def check_entry(directory, key: Mapping, environment: Mapping, verify_hashes: bool = True) -> Optional[str]:
    """Why the cached entry in ``directory`` cannot be used, or None when it can.

    Pure apart from reading the slot: no building, no deleting.  Reasons start with one of
    "missing", "corrupt", "foreign", "stale" so that logs and tests can tell them apart.
    """
    directory = Path(directory)
    sidecar = directory / SIDECAR
    if not sidecar.exists():
        return "missing: no engine built yet" if not directory.exists() or not any(directory.iterdir()) \
            else "corrupt: no sidecar (an earlier build did not finish)"
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        return f"corrupt: unreadable sidecar {sidecar} ({exc})"
    if meta.get("format") != CACHE_FORMAT:
        return f"stale: cache format {meta.get('format')!r}, this code writes {CACHE_FORMAT}"
    built_key = meta.get("key")
    if not isinstance(built_key, dict):
        return "corrupt: sidecar has no key"
    for field in sorted(set(key) | set(built_key)):
        if _canonical({"v": built_key.get(field)}) != _canonical({"v": key.get(field)}):
            return "foreign: engine computes something else: " + describe_mismatch(field, built_key.get(field),
                                                                                     key.get(field))
    built_env = meta.get("environment")
    if not isinstance(built_env, dict):
        return "corrupt: sidecar has no environment"
    for field in [f for f in FOREIGN_FIELDS if f in environment] + \
            sorted(f for f in environment if f not in FOREIGN_FIELDS):
        if _canonical({"v": built_env.get(field)}) != _canonical({"v": environment.get(field)}):
            kind = ("foreign: built for another machine" if field in FOREIGN_FIELDS
                    else "stale: built with other software")
            return f"{kind}: " + describe_mismatch(field, built_env.get(field), environment.get(field))
    files = meta.get("files")
    if not isinstance(files, dict) or not files:
        return "corrupt: sidecar lists no files"
    for name, info in sorted(files.items()):
        path = directory / name
        if not path.is_file():
            return f"corrupt: engine file {path} is missing"
        try:
            size, sha = int(info["size"]), str(info["sha256"])
        except (KeyError, TypeError, ValueError):
            return f"corrupt: bad sidecar entry for {name}"
        if path.stat().st_size != size:
            return f"corrupt: {path} has {path.stat().st_size} bytes, the sidecar says {size}"
        # hashed every time, not cached: a corrupt engine must be caught even if its size and mtime look right
        if verify_hashes and sha256_file(path) != sha:
            return f"corrupt: sha256 of {path} differs from the sidecar's"
    return None


def read_sidecar(directory) -> dict:
    return json.loads((Path(directory) / SIDECAR).read_text(encoding="utf-8"))


def write_sidecar(directory, key: Mapping, environment: Mapping, files: Iterable[str], extra: Optional[Mapping] = None):
    """Record a finished build: hashes every file, then writes meta.json atomically."""
    directory = Path(directory)
    meta = {
        "format": CACHE_FORMAT,
        "key": dict(key),
        "environment": dict(environment),
        "files": {name: {"size": (directory / name).stat().st_size, "sha256": sha256_file(directory / name)}
                  for name in files},
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    meta.update(extra or {})
    tmp = directory / (SIDECAR + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, directory / SIDECAR)
    return meta


@contextlib.contextmanager
def slot_lock(directory):
    """Exclusive lock on a slot (another process building the same engine waits here)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    lock_path = directory.parent / (directory.name + ".lock")
    with open(lock_path, "a+") as handle:
        try:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        except ImportError:  # not POSIX: no locking
            pass
        try:
            yield
        finally:
            try:
                import fcntl

                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
            except ImportError:
                pass


class CacheResult:
    """What `get_or_build` did: ``status`` is "hit", "built" or "rebuilt", ``reason`` why."""

    def __init__(self, directory: Path, status: str, reason: str, meta: dict, seconds: float):
        self.directory, self.status, self.reason, self.meta, self.seconds = directory, status, reason, meta, seconds

    def __repr__(self):
        return f"CacheResult({self.status}, {self.directory}, {self.reason!r})"


def clear_slot(directory, keep: Sequence[str] = ()):
    directory = Path(directory)
    if not directory.exists():
        return
    for path in directory.iterdir():
        if path.name in keep:
            continue
        if path.is_dir():
            import shutil

            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def get_or_build(backend: str, key: Mapping, environment: Mapping,
                 build: Callable[[Path], Dict], root=None, rebuild: bool = False,
                 verify_hashes: bool = True) -> CacheResult:
    """Return a usable cache slot for ``key``, building it with ``build(directory)`` if needed.

    ``build`` writes the engine files into ``directory`` and returns
    ``{"files": [names], **extra sidecar fields}``; it raises to refuse the engine (nothing is
    recorded then, and the half-written files are removed).
    """
    directory = cache_root(root) / backend / slot_name(key)
    reason = check_entry(directory, key, environment, verify_hashes) if not rebuild else "rebuild requested"
    if reason is None:
        return CacheResult(directory, "hit", "cache hit", read_sidecar(directory), 0.0)
    with slot_lock(directory):
        if not rebuild:  # someone else may have built it while we waited for the lock
            reason = check_entry(directory, key, environment, verify_hashes)
            if reason is None:
                return CacheResult(directory, "hit", "built by another process", read_sidecar(directory), 0.0)
        existed = (directory / SIDECAR).exists() or not reason.startswith("missing")
        if existed:
            log.warning("%s engine %s cannot be used (%s): rebuilding", backend, directory, reason)
        else:
            log.info("%s engine %s: %s; building it", backend, directory, reason)
        directory.mkdir(parents=True, exist_ok=True)
        clear_slot(directory)
        start = time.perf_counter()
        try:
            result = dict(build(directory))
        except BaseException:
            clear_slot(directory)
            raise
        seconds = time.perf_counter() - start
        files = list(result.pop("files"))
        result.setdefault("build_seconds", round(seconds, 3))
        meta = write_sidecar(directory, key, environment, files, result)
        log.info("%s engine built in %.1f s: %s", backend, seconds, directory)
        return CacheResult(directory, "rebuilt" if existed else "built", reason, meta, seconds)
