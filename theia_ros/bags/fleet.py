"""encode-bags: many bags encoded by Ray workers, each output exactly what encode-bag writes.

Plain Python (no rclpy); Ray is an optional dependency (the ``fleet`` extra) imported inside the
functions, so this module imports without it and :func:`import_ray` says how to install it.

- :func:`expand_inputs`: bag directories, single .mcap/.db3 files, directories of bags, globs and
  manifest files (one path per line) -> the bags, each with its output name;
- :class:`BagWorker`: a Ray actor that loads the encoder once (:func:`theia_ros.bags.encode.load_encoder`)
  and runs :func:`theia_ros.bags.encode.encode_bag` per bag into ``OUT/.partial/<name>.<attempt>/<name>``,
  renamed to ``OUT/<name>`` only when encode_bag returned;
- :func:`encode_bags`: the driver: local Ray or a cluster, one bag per worker at a time (largest
  first), a worker that dies has its bag retried, the manifest ``OUT/encode-bags.jsonl`` (one line
  per bag outcome; a bag whose latest line says finished with today's input, options, encoder and
  output is skipped on the next run), fleet progress on stderr and the summary
  ``OUT/encode-bags-summary.json``.
"""
from __future__ import annotations

import collections
import dataclasses
import glob
import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import threading
import time
from pathlib import Path

from theia_ros.bags.io import CAMERA_TYPES, CUSTOM_DATA_KEY, BagError, BagReadError

log = logging.getLogger(__name__)

MANIFEST_NAME = "encode-bags.jsonl"
SUMMARY_NAME = "encode-bags-summary.json"
PARTIAL_DIR = ".partial"
LOCK_NAME = ".encode-bags.lock"
INSTALL_HINT = "pip install 'theia_ros[fleet]' (or `pip install ray` at the pin of requirements.txt)"
#: encode_bag keyword arguments that change what is written: the options half of the encoder identity
OUTPUT_OPTIONS = ("model", "seed", "backend", "precision", "device", "representation", "dtype", "preprocessing",
                  "input_size", "pos_interpolation", "cameras", "batch", "copy", "storage", "version")
#: bytes read at each end of a storage file for the input identity
IDENTITY_CHUNK = 64 * 1024
#: times Ray restarts a worker that died before it is given up
WORKER_RESTARTS = 3
BAG_SUFFIXES = (".mcap", ".db3")


class FleetError(BagError):
    """encode-bags cannot run as asked (Ray missing, no bags, output names that collide...)."""


def import_ray():
    """The ray module, or FleetError saying how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise FleetError(f"encode-bags runs on Ray, which cannot be imported here ({exc}); install the fleet "
                         f"extra: {INSTALL_HINT}. encode-bag encodes one bag without Ray.") from None
    return ray


# ---------------------------------------------------------------------------------------------
# Inputs


@dataclasses.dataclass
class BagInput:
    path: Path  # resolved
    name: str  # output directory name: the bag directory's name, or a single file's stem


def _is_bag_file(path: Path) -> bool:
    return path.is_file() and path.suffix in BAG_SUFFIXES


def _is_bag_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "metadata.yaml").is_file()
                              or any(p.suffix in BAG_SUFFIXES and p.is_file() for p in path.iterdir()))


def expand_inputs(inputs, out=None) -> tuple[list[BagInput], list[str], list[str]]:
    """(bags, errors, notes) of the INPUTS of encode-bags.

    Each input is a bag (directory with metadata.yaml or storage files, or a .mcap/.db3 file), a directory
    of bags (its bags one level down), a glob (quoted, expanded here) or a manifest file: one path or glob
    per line, relative to the manifest's directory; blank lines and lines starting with '#' are ignored.
    errors: paths that do not exist or hold no bag, unreadable manifests; notes: duplicates (kept once),
    paths inside `out` (skipped: they are outputs).
    """
    out_resolved = Path(out).resolve() if out is not None else None
    bags: dict[Path, BagInput] = {}
    errors, notes = [], []

    def add(path: Path, origin: str):
        resolved = path.resolve()
        if out_resolved is not None and (resolved == out_resolved or resolved.is_relative_to(out_resolved)):
            notes.append(f"{path}{origin}: inside the output directory, skipped")
            return
        if resolved in bags:
            notes.append(f"{path}{origin}: listed more than once, encoded once")
            return
        bags[resolved] = BagInput(resolved, resolved.stem if resolved.is_file() else resolved.name)

    def visit(path: Path, origin: str, from_manifest: bool, matched: bool):
        if not path.exists():
            errors.append(f"{path}{origin}: does not exist")
        elif _is_bag_dir(path) or _is_bag_file(path):
            add(path, origin)
        elif path.is_dir():
            children = sorted(p for p in path.iterdir() if _is_bag_dir(p) or _is_bag_file(p))
            if not children:
                errors.append(f"{path}{origin}: not a bag and holds no bag (no metadata.yaml, .mcap or .db3)")
            for child in children:
                add(child, origin)
        elif matched:  # a glob matched a file that is no bag: not one the user named
            notes.append(f"{path}{origin}: not a bag, skipped")
        elif from_manifest:
            errors.append(f"{path}{origin}: not a bag (a manifest's lines name bags, not further manifests)")
        else:
            read_manifest_file(path)

    def expand(text: str, origin: str, from_manifest: bool, base: Path | None = None):
        path = Path(text).expanduser()
        if base is not None and not path.is_absolute():
            path = base / path
        if glob.has_magic(str(path)):
            matches = sorted(glob.glob(str(path)))
            if not matches:
                errors.append(f"{text}{origin}: no path matches")
            for m in matches:
                visit(Path(m), origin, from_manifest, True)
        else:
            visit(path, origin, from_manifest, False)

    def read_manifest_file(path: Path):
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            errors.append(f"{path}: not a bag, and not readable as a manifest ({type(exc).__name__}: {exc})")
            return
        listed = 0
        for number, line in enumerate(lines, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            listed += 1
            expand(line, f" ({path}:{number})", True, path.parent)
        if not listed:
            errors.append(f"{path}: not a bag, and a manifest listing no bag")

    for item in inputs:
        expand(str(item), "", False)
    return list(bags.values()), errors, notes


def check_names(bags: list[BagInput], out: Path) -> None:
    """FleetError when two inputs would write the same OUT/<name>, or an output would be an input."""
    by_name = collections.defaultdict(list)
    for bag in bags:
        by_name[bag.name].append(bag.path)
    clash = {name: paths for name, paths in by_name.items() if len(paths) > 1}
    if clash:
        lines = "; ".join(f"{name}: {', '.join(map(str, paths))}" for name, paths in sorted(clash.items()))
        raise FleetError(f"inputs with the same name would write the same output OUT/<name>: {lines}. Encode them "
                         "in separate runs (another --out) or rename them")
    for bag in bags:
        target = (out / bag.name).resolve()
        if target == bag.path or bag.path.is_relative_to(target):
            raise FleetError(f"the output {target} of {bag.path} would be the input itself; pick another --out")
    reserved = sorted(set(by_name) & {PARTIAL_DIR, MANIFEST_NAME, SUMMARY_NAME, LOCK_NAME})
    if reserved:
        raise FleetError(f"an input named {reserved[0]} would write over encode-bags' own file in --out; rename it")


def input_identity(path: Path) -> dict:
    """Cheap identity of a bag's content, without reading it whole: a sha256 over each file's name and size,
    the whole of metadata.yaml (and of files up to 128 KiB) and the first and last 64 KiB of each larger
    file. No modification times: a bag copied elsewhere keeps its identity; a bag rewritten (reindexed,
    recorded further, truncated) gets a new one."""
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    digest, total = hashlib.sha256(), 0
    for f in files:
        size = f.stat().st_size
        total += size
        digest.update(f"{f.name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            if f.name == "metadata.yaml" or size <= 2 * IDENTITY_CHUNK:
                digest.update(fh.read())
            else:
                digest.update(fh.read(IDENTITY_CHUNK))
                fh.seek(size - IDENTITY_CHUNK)
                digest.update(fh.read(IDENTITY_CHUNK))
    return {"digest": "sha256:" + digest.hexdigest(), "bytes": total}


def expected_frames(path: Path, cameras=None) -> int | None:
    """Camera frames metadata.yaml counts (the topics encode-bag would pick), None when unknown."""
    meta = path / "metadata.yaml" if path.is_dir() else None
    if meta is None or not meta.is_file():
        return None
    try:
        import yaml

        topics = yaml.safe_load(meta.read_text())["rosbag2_bagfile_information"]["topics_with_message_count"]
        chosen = None if not cameras else {"/" + c.partition("=")[0].strip().lstrip("/") for c in cameras}
        return sum(int(t["message_count"]) for t in topics if t["topic_metadata"]["type"] in CAMERA_TYPES
                   and (chosen is None or t["topic_metadata"]["name"] in chosen))
    except Exception:  # yaml errors, missing keys: the estimate only feeds the ETA
        return None


def _file_digest(path: Path) -> str | None:
    try:
        return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------
# Manifest


def read_manifest(out: Path) -> dict[str, dict]:
    """name -> the latest manifest line of that bag (a line torn by a killed run is ignored)."""
    entries, torn = {}, 0
    path = Path(out) / MANIFEST_NAME
    if not path.exists():
        return entries
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            entries[entry["name"]] = entry
        except (ValueError, KeyError, TypeError):
            torn += 1
    if torn:
        log.warning("%s: %d unreadable line(s) ignored (a run killed while writing?)", path, torn)
    return entries


def _append_manifest(out: Path, entry: dict) -> None:
    with open(Path(out) / MANIFEST_NAME, "a") as fh:
        fh.write(json.dumps(entry, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def options_identity(options: dict) -> dict:
    """encode_bag's OUTPUT_OPTIONS, those not given at encode_bag's defaults (FleetError on others)."""
    import inspect

    from theia_ros.bags.encode import encode_bag

    unknown = set(options) - set(OUTPUT_OPTIONS)
    if unknown:
        raise FleetError(f"unknown encode options {', '.join(sorted(unknown))}; known: {', '.join(OUTPUT_OPTIONS)}")
    params = inspect.signature(encode_bag).parameters
    ident = {k: options[k] if k in options else params[k].default for k in OUTPUT_OPTIONS}
    if ident["input_size"] is not None:
        ident["input_size"] = [int(v) for v in ident["input_size"]]
    if ident["cameras"] is not None:
        ident["cameras"] = list(ident["cameras"])
    return ident


def is_finished(entry: dict | None, bag: BagInput, identity: dict, options: dict, encoder: dict | None,
                out: Path) -> bool:
    """Whether `entry` (the bag's latest manifest line) records today's bag, options and encoder as finished,
    and OUT/<name> still holds the output it recorded (its metadata.yaml unchanged)."""
    if not entry or entry.get("status") != "finished":
        return False
    if entry.get("input", {}).get("digest") != identity["digest"] or entry.get("options") != options:
        return False
    if encoder is not None and entry.get("encoder") != encoder:
        return False
    return entry.get("output_digest") is not None and entry["output_digest"] == _file_digest(
        out / bag.name / "metadata.yaml")


# ---------------------------------------------------------------------------------------------
# The worker (a Ray actor: ray.remote(BagWorker) in encode_bags)


def encoder_identity(encoder) -> dict:
    """What the loaded encoder contributes to the output: model, weights, resolved backend, precision, device."""
    ident = dict(encoder.metadata)
    backend_ident = dict(getattr(encoder.backend, "identity", {}))
    backend_ident.pop("input_size", None)  # engines per input size: the options hold the preprocessing
    ident.update(backend_ident)
    return json.loads(json.dumps(ident, default=str))


def _encoder_args(options: dict) -> dict:
    """load_encoder's arguments for encode_bag's options: the ones encode_bag itself passes (the same cached
    encoder, so the same engine for the same input size)."""
    from theia_ros.preprocess import PreprocessConfig

    size = None if options["input_size"] is None else tuple(options["input_size"])
    config = PreprocessConfig(profile=options["preprocessing"], size=size,
                              pos_interpolation=options["pos_interpolation"])
    fixed_size = config.size or ((224, 224) if config.profile == "theia" else None)
    return dict(seed=options["seed"], backend=options["backend"], precision=options["precision"],
                device=options["device"], max_batch=options["batch"], representation=options["representation"],
                output_dtype=options["dtype"], input_size=fixed_size, pos_interpolation=options["pos_interpolation"])


class _CountingEncoder:
    """The worker's encoder as encode_bag sees it, counting the frames it encodes (fleet progress)."""

    def __init__(self, encoder, worker):
        self._encoder, self._worker = encoder, worker

    def encode(self, frames, *args, **kwargs):
        out = self._encoder.encode(frames, *args, **kwargs)
        self._worker.frames += len(frames)
        return out

    def __getattr__(self, name):
        return getattr(self._encoder, name)


def _custom_source(bag_dir: Path):
    """The input recorded in an encode-bag output's custom_data, None when it is no such output."""
    try:
        import yaml

        meta = yaml.safe_load((bag_dir / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
        return json.loads(meta["custom_data"][CUSTOM_DATA_KEY])["source"]
    except Exception:  # not a bag, not ours
        return None


def _looks_like_bag_dir(path: Path) -> bool:
    names = {p.name for p in path.iterdir()}
    return "metadata.yaml" in names or any(Path(n).suffix in BAG_SUFFIXES for n in names)


class BagWorker:
    """Encodes bags one at a time with one encoder loaded once per process (load_encoder's cache).

    Run as a Ray actor with max_concurrency=2, so :meth:`status` answers while :meth:`encode` runs.
    """

    def __init__(self, options: dict, threads: int):
        self.options, self.threads = dict(options), int(threads)
        self.encoder = None
        self.current, self.frames = None, 0
        self.host, self.pid = socket.gethostname(), os.getpid()
        self._lock = threading.Lock()

    def _load(self):
        with self._lock:
            if self.encoder is None:
                from theia_ros.bags.encode import load_encoder

                if self.threads:
                    import torch

                    torch.set_num_threads(self.threads)
                self.encoder = load_encoder(self.options["model"], **_encoder_args(self.options))
            return self.encoder

    def start(self) -> dict:
        """Load the encoder; where this worker runs and what it encodes with."""
        return {"host": self.host, "pid": self.pid, "encoder": encoder_identity(self._load())}

    def status(self) -> dict:
        return {"host": self.host, "pid": self.pid, "bag": self.current, "frames": self.frames}

    def encode(self, job: dict) -> dict:
        """Encode job["input"] into OUT/<name> (see the module doc); a dict of the outcome, errors included."""
        from theia_ros.bags.encode import encode_bag

        t0 = time.perf_counter()
        name, src, out = job["name"], Path(job["input"]), Path(job["out"])
        final, work = out / name, out / PARTIAL_DIR / f"{name}.{job['attempt']}"
        partial = work / name  # the bag directory keeps its final name (and its storage file names)
        result = {"name": name, "attempt": job["attempt"], "host": self.host, "pid": self.pid, "status": "failed",
                  "error": None, "frames": 0, "bad_frames": 0, "copied": 0, "encode_seconds": 0.0}
        self.current, self.frames = name, 0
        try:
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            (work / "worker.json").write_text(json.dumps({"host": self.host, "pid": self.pid}))
            self._check_replaceable(final, src, job["overwrite"])
            encoder = _CountingEncoder(self._load(), self)
            options = {k: v for k, v in self.options.items() if k in OUTPUT_OPTIONS}
            try:
                res = encode_bag(src, partial, encoder=encoder, threads=self.threads, progress=False,
                                 overwrite=False, **options)
                status = "finished"
            except BagReadError as exc:  # truncated or corrupt part-way: encode-bag's valid partial output
                res = getattr(exc, "result", None)
                if res is None:
                    raise
                status, result["error"] = "incomplete", str(exc).replace(str(partial), str(final))
            self._replace(partial, final, work)
            result.update(status=status, frames=res.frames_total, bad_frames=res.bad_total, copied=res.copied,
                          encode_seconds=res.seconds, topics=res.topics,
                          output_digest=_file_digest(final / "metadata.yaml"), encoder=encoder_identity(self.encoder))
        except BagError as exc:
            result["error"] = str(exc).replace(str(partial), "the discarded partial output")
        except Exception as exc:  # a bug or an unexpected failure: reported with the bag, the others go on
            result["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            shutil.rmtree(work, ignore_errors=True)
            self.current = None
            result["seconds"] = time.perf_counter() - t0
        return result

    @staticmethod
    def _check_replaceable(final: Path, src: Path, overwrite: bool) -> None:
        if not final.exists() and not final.is_symlink():
            return
        if final.is_dir() and not final.is_symlink() and _custom_source(final) == str(src):
            return  # an earlier output of this very input (other options, incomplete, or not recorded)
        if overwrite and final.is_dir() and not final.is_symlink() and _looks_like_bag_dir(final):
            return
        raise BagError(f"output {final} exists and is not an encode-bag output of {src}; pass --overwrite to "
                       "replace it (only a bag directory is replaced)")

    @staticmethod
    def _replace(partial: Path, final: Path, work: Path) -> None:
        """OUT/<name> becomes the finished partial output (the old one, if any, is deleted after the rename)."""
        if final.exists():
            os.rename(final, work / "replaced")
        os.rename(partial, final)


# ---------------------------------------------------------------------------------------------
# The driver


@dataclasses.dataclass
class BagOutcome:
    name: str
    input: str
    status: str = "pending"  # finished | skipped (finished earlier) | incomplete | failed
    frames: int = 0
    bad_frames: int = 0
    seconds: float = 0.0
    attempts: int = 0
    worker: int | None = None
    error: str | None = None


@dataclasses.dataclass
class WorkerStats:
    index: int
    host: str = ""
    pids: list = dataclasses.field(default_factory=list)
    bags: int = 0
    frames: int = 0
    busy_seconds: float = 0.0
    deaths: int = 0
    state: str = "starting"  # starting | ready | busy | gone
    error: str | None = None
    ready_at: float = dataclasses.field(default=0.0, repr=False)  # perf_counter when its encoder was loaded
    available_seconds: float = 0.0  # from then to the end of the run's work

    @property
    def utilisation(self) -> float:
        return self.busy_seconds / self.available_seconds if self.available_seconds > 0 else float("nan")


@dataclasses.dataclass
class FleetReport:
    out: Path
    bags: list[BagOutcome]
    workers: list[WorkerStats]
    input_errors: list[str]
    notes: list[str]
    seconds: float
    encoder: dict | None

    @property
    def ok(self) -> bool:
        return not self.input_errors and all(b.status in ("finished", "skipped") for b in self.bags)

    @property
    def frames(self) -> int:
        return sum(b.frames for b in self.bags if b.status != "skipped")

    @property
    def encoding_seconds(self) -> float:
        """From the first worker ready to the end of the work."""
        return max((w.available_seconds for w in self.workers), default=0.0)

    def to_json(self) -> dict:
        return {"out": str(self.out), "ok": self.ok, "seconds": self.seconds, "frames": self.frames,
                "encoding_seconds": self.encoding_seconds,
                "frames_per_second": self.frames / self.encoding_seconds if self.encoding_seconds > 0 else None,
                "encoder": self.encoder, "input_errors": self.input_errors, "notes": self.notes,
                "bags": [dataclasses.asdict(b) for b in self.bags],
                "workers": [{k: v for k, v in dataclasses.asdict(w).items() if k != "ready_at"}
                            | {"utilisation": None if w.utilisation != w.utilisation else w.utilisation}
                            for w in self.workers]}


def _format_seconds(s: float) -> str:
    if s != s or s == float("inf"):
        return "?"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def format_summary(report: FleetReport) -> str:
    """The end-of-run tables: per bag and per worker."""
    lines = ["| bag | status | frames | seconds | attempts | worker | error |", "|---|---|---:|---:|---:|---:|---|"]
    for b in report.bags:
        err = (b.error or "").replace("|", "/")
        lines.append(f"| {b.name} | {b.status} | {b.frames} | {b.seconds:.1f} | {b.attempts} | "
                     f"{'' if b.worker is None else b.worker} | {err[:160] + ('...' if len(err) > 160 else '')} |")
    lines += ["", "| worker | host | bags | frames | busy s | utilisation | deaths |",
              "|---:|---|---:|---:|---:|---:|---:|"]
    for w in report.workers:
        util = "-" if w.utilisation != w.utilisation else f"{w.utilisation:.0%}"
        lines.append(f"| {w.index} | {w.host} | {w.bags} | {w.frames} | {w.busy_seconds:.1f} | {util} | "
                     f"{w.deaths} |")
    counts = collections.Counter(b.status for b in report.bags)
    encoding = report.encoding_seconds
    rate = report.frames / encoding if encoding > 0 else float("nan")
    lines += ["", f"{len(report.bags)} bags: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
              + f"; {report.frames} frames encoded in {encoding:.1f} s once the workers were ready ({rate:.1f} "
              f"frames/s); {report.seconds:.1f} s in all"]
    return "\n".join(lines)


class _Progress:
    """Fleet progress on stderr: bags done/total, frames, frames/s, ETA; a line every `interval` s."""

    def __init__(self, enabled, total_bags, stream, interval):
        self.enabled, self.total_bags = enabled, total_bags
        self.stream, self.interval = stream, interval
        self.tty = enabled and getattr(stream, "isatty", lambda: False)()
        self.t0 = time.perf_counter()
        self.last = 0.0

    def update(self, done_bags, frames, in_flight_frames, remaining_expected, force=False):
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self.last < self.interval:
            return
        self.last = now
        elapsed = now - self.t0
        frames_now = frames + in_flight_frames
        rate = frames_now / elapsed if elapsed > 0 else 0.0
        eta = (max(remaining_expected - in_flight_frames, 0) / rate) if rate > 0 else float("nan")
        line = (f"encode-bags: {done_bags}/{self.total_bags} bags, {frames_now} frames, {rate:.1f} frames/s, "
                f"ETA {_format_seconds(eta) if done_bags < self.total_bags else '0m00s'}")
        if self.tty:
            self.stream.write("\r" + line.ljust(90))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self):
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _lock(out: Path):
    import fcntl

    fh = open(out / LOCK_NAME, "w")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        raise FleetError(f"another encode-bags run is using {out} (its lock {out / LOCK_NAME} is held)") from None
    return fh


def _init_ray(ray, address, num_cpus):
    """ray.init quietly (no dashboard, no worker logs on the driver, only errors logged: the token-authentication
    note Ray logs at start included; authentication itself stays on); False when Ray was initialised already."""
    if ray.is_initialized():
        return False
    quiet = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    if address:
        ray.init(address=address, **{k: v for k, v in quiet.items() if k != "include_dashboard"})
    else:
        ray.init(num_cpus=num_cpus, object_store_memory=256 * 1024**2, **quiet)
    return True


def encode_bags(inputs, out, options: dict, *, workers=None, threads=0, address=None, retries=2,
                gpus_per_worker=1.0, overwrite=False, progress=True, progress_interval=None,
                stream=None) -> FleetReport:
    """Encode every bag of `inputs` (see :func:`expand_inputs`) into OUT/<name> on Ray workers.

    `options`: encode_bag's keyword arguments of OUTPUT_OPTIONS. `workers`: Ray actors (default: one per
    GPU when the device may be CUDA and the cluster has GPUs, else one per `threads` CPUs). `threads`:
    torch threads and CPUs of each worker (0: 1 CPU). `address`: a Ray cluster ("auto", "ray://host:10001");
    None starts a local Ray in this process (an already initialised Ray is used as is). `retries`: times a
    bag whose worker died is retried. `overwrite`: re-encode finished bags too, and replace an OUT/<name>
    that is not an encode-bag output of its input.
    Raises FleetError before any work (Ray missing, name collisions, no bag, the encoder cannot load).
    """
    ray = import_ray()
    stream = stream if stream is not None else sys.stderr
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FleetError(f"--out {out} exists and is not a directory")
    bags, input_errors, notes = expand_inputs(inputs, out)
    for message in input_errors:
        log.error("%s", message)
    for message in notes:
        log.warning("%s", message)
    if not bags:
        raise FleetError("no bag to encode" + (f": {'; '.join(input_errors)}" if input_errors else ""))
    check_names(bags, out)
    options = options_identity(options)
    out.mkdir(parents=True, exist_ok=True)
    lock = _lock(out)
    try:
        return _Run(ray, bags, out, options, workers=workers, threads=threads, address=address, retries=retries,
                    gpus_per_worker=gpus_per_worker, overwrite=overwrite, progress=progress,
                    progress_interval=progress_interval, stream=stream, input_errors=input_errors,
                    notes=notes).run()
    finally:
        lock.close()


class _Run:
    def __init__(self, ray, bags, out, options, *, workers, threads, address, retries, gpus_per_worker, overwrite,
                 progress, progress_interval, stream, input_errors, notes):
        self.ray, self.bags, self.out, self.options = ray, bags, out, options
        self.n_workers, self.threads, self.address, self.retries = workers, int(threads), address, int(retries)
        self.gpus_per_worker, self.overwrite = float(gpus_per_worker), overwrite
        self.progress_enabled, self.stream = progress, stream
        self.progress_interval = progress_interval
        self.input_errors, self.notes = input_errors, notes
        self.outcomes = {b.name: BagOutcome(b.name, str(b.path)) for b in bags}
        self.by_name = {b.name: b for b in bags}
        self.identities = {}
        self.stats: list[WorkerStats] = []
        self.actors, self.starting, self.started_ray = [], {}, False
        self.encoder = None

    # -- set-up

    def _plan_workers(self):
        ray = self.ray
        cpus = max(1, self.threads)
        if self.address is None and not ray.is_initialized():
            wanted = self.n_workers or max(1, (os.cpu_count() or 1) // cpus)
            self.started_ray = _init_ray(ray, None, max(os.cpu_count() or 1, wanted * cpus))
        else:
            self.started_ray = _init_ray(ray, self.address, None)
        resources = ray.cluster_resources()
        gpus = float(resources.get("GPU", 0)) if str(self.options["device"]).startswith(("auto", "cuda")) else 0.0
        per_gpu = self.gpus_per_worker if gpus else 0.0
        n = self.n_workers
        if not n:
            n = max(1, int(gpus / per_gpu)) if per_gpu else max(1, int(float(resources.get("CPU", 1)) // cpus))
        return n, cpus, per_gpu

    def _start_workers(self):
        n, cpus, per_gpu = self._plan_workers()
        actor_cls = self.ray.remote(BagWorker).options(
            num_cpus=cpus, num_gpus=per_gpu, max_restarts=WORKER_RESTARTS, max_task_retries=0, max_concurrency=2)
        worker_options = dict(self.options)
        self.actors = [actor_cls.remote(worker_options, self.threads or cpus) for _ in range(n)]
        self.stats = [WorkerStats(i) for i in range(n)]
        self.starting = {a.start.remote(): i for i, a in enumerate(self.actors)}
        log.info("encode-bags: %d worker(s), %d CPU(s)%s each", n, cpus, f" and {per_gpu:g} GPU" if per_gpu else "")

    def _handle_start(self, future, index):
        stats = self.stats[index]
        try:
            info = self.ray.get(future)
        except Exception as exc:
            stats.state, stats.error = "gone", _ray_error_text(exc)
            return
        stats.state, stats.host = "ready", info["host"]
        stats.ready_at = time.perf_counter()
        stats.pids.append(info["pid"])
        if self.encoder is None:
            self.encoder = info["encoder"]
        elif info["encoder"] != self.encoder:
            log.warning("worker %d encodes with %s, worker 0 with %s: their outputs differ", index,
                        info["encoder"], self.encoder)

    def _wait_first_worker(self):
        """Block until one worker has loaded the encoder (its identity decides what is finished)."""
        t0, said = time.perf_counter(), False
        while self.encoder is None:
            if not self.starting:
                errors = sorted({s.error for s in self.stats if s.error})
                raise FleetError("no worker could start: " + "; ".join(errors))
            ready, _ = self.ray.wait(list(self.starting), num_returns=1, timeout=5.0)
            for f in ready:
                self._handle_start(f, self.starting.pop(f))
            if not ready and not said and time.perf_counter() - t0 > 60:
                log.warning("encode-bags: no worker started after 60 s (does the cluster have the CPUs/GPUs "
                            "asked for? --workers, --threads, --gpus-per-worker)")
                said = True

    # -- the run

    def run(self) -> FleetReport:
        t_start = time.perf_counter()
        shutil.rmtree(self.out / PARTIAL_DIR, ignore_errors=True)  # what a killed run left: never finished
        manifest = read_manifest(self.out)
        identities = self.identities = {b.name: input_identity(b.path) for b in self.bags}
        expected = {b.name: expected_frames(b.path, self.options["cameras"]) for b in self.bags}
        maybe_done = {b.name for b in self.bags if not self.overwrite and is_finished(
            manifest.get(b.name), b, identities[b.name], self.options, None, self.out)}
        try:
            self._start_workers()
            self._wait_first_worker()
            for b in self.bags:
                if b.name in maybe_done and is_finished(manifest[b.name], b, identities[b.name], self.options,
                                                        self.encoder, self.out):
                    o = self.outcomes[b.name]
                    o.status, o.frames = "skipped", int(manifest[b.name].get("frames", 0))
            todo = sorted((b for b in self.bags if self.outcomes[b.name].status == "pending"),
                          key=lambda b: -identities[b.name]["bytes"])  # largest first: a shorter tail
            known = [v for v in expected.values() if v is not None]
            fallback = sum(known) / len(known) if known else 0
            self.expected = {k: (v if v is not None else fallback) for k, v in expected.items()}
            self._schedule([b.name for b in todo])
        finally:
            for a in self.actors:
                try:
                    self.ray.kill(a)
                except Exception:  # already gone
                    pass
            if self.started_ray:
                self.ray.shutdown()
        shutil.rmtree(self.out / PARTIAL_DIR, ignore_errors=True)  # what workers that died left
        report = FleetReport(self.out, [self.outcomes[b.name] for b in self.bags], self.stats, self.input_errors,
                             self.notes, time.perf_counter() - t_start, self.encoder)
        tmp = self.out / (SUMMARY_NAME + ".tmp")
        tmp.write_text(json.dumps(report.to_json(), indent=2, default=str))
        os.replace(tmp, self.out / SUMMARY_NAME)
        return report

    def _schedule(self, todo):
        ray = self.ray
        pending = collections.deque(todo)  # names
        jobs = {name: {"name": name, "input": str(self.by_name[name].path), "out": str(self.out.resolve()),
                       "attempt": 0, "overwrite": self.overwrite} for name in todo}
        busy = {}  # future -> (worker index, name, t_submit)
        done_bags = sum(1 for o in self.outcomes.values() if o.status != "pending")
        frames_done = 0
        interval = self.progress_interval
        if interval is None:
            interval = 0.5 if getattr(self.stream, "isatty", lambda: False)() else 10.0
        bar = _Progress(self.progress_enabled, len(self.bags), self.stream, interval)
        in_flight, status_futures, last_poll = {}, {}, 0.0
        while pending or busy:
            for i, s in enumerate(self.stats):  # give each idle worker the next bag
                if s.state == "ready" and pending:
                    job = jobs[pending.popleft()]
                    job["attempt"] += 1
                    self.outcomes[job["name"]].attempts = job["attempt"]
                    busy[self.actors[i].encode.remote(dict(job))] = (i, job["name"], time.perf_counter())
                    s.state = "busy"
            if not busy and pending:
                if not self.starting:  # every worker is gone
                    for name in pending:
                        o = self.outcomes[name]
                        o.status = "failed"
                        o.error = "no worker left: " + "; ".join(sorted({s.error for s in self.stats if s.error}))
                    break
            waitable = list(busy) + list(self.starting)
            ready, _ = ray.wait(waitable, num_returns=1, timeout=0.5) if waitable else ([], [])
            for f in ready:
                if f in self.starting:
                    self._handle_start(f, self.starting.pop(f))
                    continue
                index, name, t_submit = busy.pop(f)
                in_flight.pop(index, None)
                if self._handle_result(f, index, name, t_submit, jobs[name], pending):
                    done_bags += 1
                    frames_done += self.outcomes[name].frames
            now = time.perf_counter()
            if self.progress_enabled and now - last_poll >= min(interval, 2.0):
                last_poll = now
                self._poll_status(busy, in_flight, status_futures)
            remaining = sum(self.expected[o.name] for o in self.outcomes.values() if o.status == "pending")
            bar.update(done_bags, frames_done, sum(in_flight.values()), remaining)
        t_end = time.perf_counter()
        for s in self.stats:
            s.busy_seconds = round(s.busy_seconds, 3)
            s.available_seconds = round(t_end - s.ready_at, 3) if s.ready_at else 0.0
        bar.update(done_bags, frames_done, 0, 0, force=True)
        bar.close()

    def _poll_status(self, busy, in_flight, status_futures):
        """Frames of the bags in flight (a worker's status() answers while it encodes)."""
        ray = self.ray
        for index in {i for i, _, _ in busy.values()}:
            if index not in status_futures.values():
                status_futures[self.actors[index].status.remote()] = index
        if not status_futures:
            return
        ready, _ = ray.wait(list(status_futures), num_returns=len(status_futures), timeout=0.05)
        for f in ready:
            index = status_futures.pop(f)
            try:
                st = ray.get(f)
            except Exception:  # a worker that died: its bag's result says so
                continue
            if st.get("bag") is not None:
                in_flight[index] = int(st.get("frames", 0))

    def _handle_result(self, future, index, name, t_submit, job, pending) -> bool:
        """Record one bag's outcome; False when its worker died and the bag goes back in the queue."""
        ray, stats, o = self.ray, self.stats[index], self.outcomes[name]
        try:
            result = ray.get(future)
        except ray.exceptions.RayActorError as exc:  # the worker process died (killed, OOM, segfault, node lost)
            stats.deaths += 1
            stats.busy_seconds += time.perf_counter() - t_submit
            stats.state = "gone" if stats.deaths > WORKER_RESTARTS else "ready"  # Ray restarts it meanwhile
            if stats.state == "gone":
                stats.error = f"died {stats.deaths} times"
            why = _ray_error_text(exc)
            log.warning("worker %d died while encoding %s (attempt %d): %s", index, name, job["attempt"], why)
            shutil.rmtree(self.out / PARTIAL_DIR / f"{name}.{job['attempt']}", ignore_errors=True)  # never taken
            if job["attempt"] <= self.retries:
                pending.appendleft(name)
                return False
            o.status = "failed"
            o.error = f"its worker died on each of {job['attempt']} attempts (last: {why})"
            o.worker = index
            self._record(o, None)
            return True
        except Exception as exc:  # a failure of Ray itself on this task
            stats.state = "ready"
            o.status, o.error, o.worker = "failed", _ray_error_text(exc), index
            self._record(o, None)
            return True
        stats.state = "ready"
        stats.bags += 1
        stats.frames += result["frames"]
        stats.busy_seconds += result["seconds"]
        if result["pid"] not in stats.pids:
            stats.pids.append(result["pid"])
        o.status, o.error, o.worker = result["status"], result["error"], index
        o.frames, o.bad_frames, o.seconds = result["frames"], result["bad_frames"], round(result["seconds"], 3)
        self._record(o, result)
        if o.error:
            log.error("%s: %s", name, o.error)
        return True

    def _record(self, o: BagOutcome, result: dict | None):
        bag = self.by_name[o.name]
        entry = {"name": o.name, "status": o.status, "input": {"path": str(bag.path), **self.identities[o.name]},
                 "options": self.options, "encoder": (result or {}).get("encoder", self.encoder), "frames": o.frames,
                 "bad_frames": o.bad_frames,
                 "output": str(self.out / o.name), "error": o.error, "attempts": o.attempts,
                 "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                 "output_digest": (result or {}).get("output_digest")}
        _append_manifest(self.out, entry)


def _ray_error_text(exc) -> str:
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException) and not type(cause).__module__.startswith("ray"):
        return str(cause)
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
