"""inspect: what a bag holds (topics, types, counts, rates, gaps, and what its feature topics carry)."""
from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from theia_ros.bags.io import (
    CUSTOM_DATA_KEY,
    FEATURES_TYPE,
    BagCountError,
    custom_data_of,
    deserialize_message,
    open_bag,
    storage_of,
)


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
    """What one Features message holds (shape, dtype, representation, model, weights, preprocessing);
    a message from before the preprocessing fields reads as the reference ("theia" at 224x224)."""
    from theia_ros.features import DTYPE_NAMES, preprocessing_of

    pre = preprocessing_of(msg)
    stated = [int(v) for v in getattr(msg, "input_size", ())]  # as the message states it: None when it does not
    grid = [int(v) for v in getattr(msg, "patch_grid", ())]
    return {"shape": [int(s) for s in msg.shape], "dtype": DTYPE_NAMES.get(int(msg.dtype), f"code {msg.dtype}"),
            "representation": msg.representation, "model_id": msg.model_id, "weights_id": msg.weights_id,
            "random_weights": bool(msg.random_weights), "camera": msg.camera, "preprocessing": pre.profile,
            "input_size": stated or None, "pos_interpolation": pre.pos_interpolation, "patch_grid": grid or None}


def summary_preprocessing(summary):
    """The :class:`~theia_ros.features.Preprocessing` of a features summary (no input size stated: the
    reference's 224x224 for the theia profile, as :func:`~theia_ros.features.preprocessing_of`)."""
    from theia_ros.features import preprocessing_of

    return preprocessing_of(SimpleNamespace(preprocessing=summary["preprocessing"],
                                            input_size=summary["input_size"] or (),
                                            pos_interpolation=summary["pos_interpolation"]))


def describe_preprocessing(summary) -> str:
    """e.g. 'isaaclab at 120x160 (pos_interpolation scale_factor), patch grid 7x10' for a features summary."""
    pre = summary_preprocessing(summary)
    grid = summary["patch_grid"] or pre.patch_grid
    return pre.describe() + (f", patch grid {grid[0]}x{grid[1]}" if grid else "")


def inspect_bag(path, *, gaps=3) -> dict:
    """Summary of a bag: storage, duration, per topic count/rate/gaps, feature topics' metadata."""
    with open_bag(path, salvage=True) as reader:
        error = getattr(reader, "salvage_reason", None)
        if error:
            error = f"corrupt or truncated bag: {error}"
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
                        msg = deserialize_message(raw, conn)
                        s = features_summary(msg)
                    except Exception as exc:
                        s = {"error": f"undecodable: {exc}"}
                    if stats[key].features is None:
                        stats[key].features = s
                    feature_variants[key].add(json.dumps(s, sort_keys=True))
        except BagCountError as exc:  # every message was read: fewer than metadata.yaml counts
            error = str(exc)
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
    version = f" (metadata version {info['version']})" if info["version"] else ""
    lines.append(f"storage:   {info['storage']}{version}")
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
            lines.append(f"    preprocessing {describe_preprocessing(f)}")
            if f["random_weights"]:
                lines.append("    RANDOM WEIGHTS: these features carry no learned meaning (tests and demos only)")
            if f.get("inconsistent"):
                lines.append(f"    WARNING: {f['inconsistent']} different shape/model/preprocessing combinations on "
                             "this topic")
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
