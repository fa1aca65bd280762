"""Behaviour cloning from bags of Theia features: align, split, train, evaluate, save (no ROS).

Input: one or more bags (one episode each, or several separated by gaps in time) holding
``theia_ros/msg/Features`` topics (from the encoder node or ``theia-ros encode-bag``), an action
topic and optionally a proprioception topic (``sensor_msgs/JointState``).

Actions, by message type of the action topic:

* ``std_msgs/Float64MultiArray`` (``command``): the command vector, e.g. of a
  forward_position_controller; stamped with its bag receive time (it has no header). Joint names
  come from ``--action-joints`` (default joint_0..n-1).
* ``trajectory_msgs/JointTrajectory`` (``trajectory``): the positions of its first point;
  stamped with its header stamp (its receive time when the stamp is zero).
* ``sensor_msgs/JointState`` (``joint_state``): *next-state* targets: the action of the frame at
  time t is the measured position at the time of the next frame of the reference camera.
* ``sensor_msgs/JointState`` as a command (``joint_command``, never chosen by ``auto``): e.g. the
  policy node's ``joint_command`` topic; its positions at the frame's time, like ``trajectory``.

Each sample is one frame of the reference camera (the first feature topic); the other cameras,
the proprioception and the action are the messages nearest in time within ``tolerance``;
frames with anything missing are dropped (and counted). With ``history`` H > 1 a sample stacks
H consecutive frames of one episode, oldest first, as the policy node's ObservationBuffer does.

Every feature topic of every bag must hold the same kind of features: model, representation, shape
and preprocessing (profile, input size, position-embedding interpolation; Features messages from before
those fields mean the reference, "theia" at 224x224); bags that mix them are refused, naming both.
The checkpoint's observation spec records that preprocessing, and the policy node refuses features
made otherwise.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import numpy as np

from theia_ros.bags.inspect import describe_preprocessing, features_summary, summary_preprocessing
from theia_ros.bags.io import FEATURES_TYPE, BagCountError, BagError, deserialize, deserialize_message, open_bag
from theia_ros.commands import COMMAND_FORMATS
from theia_ros.features import features_to_numpy
from theia_ros.stamps import stamp_ns

log = logging.getLogger(__name__)

# action kind (--action-type) -> the command format (theia_ros.commands) whose messages carry it
ACTION_KINDS = {"command": "float64_multi_array", "trajectory": "joint_trajectory", "joint_state": "joint_state",
                "joint_command": "joint_state"}
# message type -> the kind `auto` takes it for (a JointState: measured states, next-state targets)
ACTION_TYPES = {COMMAND_FORMATS[fmt].message_type: kind for kind, fmt in ACTION_KINDS.items()
                if kind != "joint_command"}
JOINT_STATE_TYPE = COMMAND_FORMATS["joint_state"].message_type


class TrainError(BagError):
    """The bags cannot be turned into a training set as asked."""


# ---------------------------------------------------------------------------------------------
# Reading and aligning


@dataclasses.dataclass
class _BagData:
    path: str
    features: dict  # topic -> (stamps int64 [n], list of arrays)
    meta: dict  # topic -> features summary of the first message
    actions: tuple  # (stamps, values [n, A], joint names, action kind)
    proprio: tuple | None  # (stamps, positions [n, J] in proprio joint order, joint names)
    damaged: str | None = None


def _nearest(stamps: np.ndarray, targets: np.ndarray, tolerance_ns: int) -> np.ndarray:
    """Index of the stamp nearest each target within tolerance, -1 where none (stamps sorted)."""
    if stamps.size == 0:
        return np.full(targets.shape, -1, dtype=np.int64)
    pos = np.searchsorted(stamps, targets)
    lo = np.clip(pos - 1, 0, stamps.size - 1)
    hi = np.clip(pos, 0, stamps.size - 1)
    pick = np.where(np.abs(stamps[hi] - targets) < np.abs(stamps[lo] - targets), hi, lo)
    ok = np.abs(stamps[pick] - targets) <= tolerance_ns
    return np.where(ok, pick, -1)


def _sorted(stamps, *values):
    stamps = np.asarray(stamps, dtype=np.int64)
    order = np.argsort(stamps, kind="stable")
    out = [stamps[order]]
    for v in values:
        out.append([v[i] for i in order] if isinstance(v, list) else np.asarray(v)[order])
    return out


def read_bag(path, *, features_topics=None, action_topic, action_type="auto", action_joints=None,
             proprio_topic=None, proprio_joints=None, stamp="header") -> _BagData:
    """Read the feature, action and proprio streams of one bag (see module doc)."""
    with open_bag(path, salvage=True) as reader:
        damaged = getattr(reader, "salvage_reason", None)
        by_topic = {}
        for c in reader.connections:
            by_topic.setdefault(c.topic, []).append(c)
        ftopics = _feature_topics(path, by_topic, features_topics)
        kind = _action_kind(path, by_topic, action_topic, action_type)
        _check_proprio_topic(path, by_topic, proprio_topic)
        streams = _Streams(path, ftopics, action_topic, kind, action_joints, proprio_topic, proprio_joints, stamp)
        wanted = [c for t in set(ftopics) | {action_topic} | ({proprio_topic} if proprio_topic else set())
                  for c in by_topic[t]]
        stopped = streams.read(reader.messages(connections=wanted))
    if isinstance(stopped, BagCountError):  # a whole bag that lacks messages: not a training set as recorded
        raise TrainError(f"{stopped}; not training on it (metadata.yaml or the storage is wrong)") from stopped
    if stopped is not None:
        damaged = f"{damaged + '; ' if damaged else ''}reading stopped: {type(stopped).__name__}: {stopped}"
    if damaged:
        log.warning("%s is damaged (%s): using the messages read before the damage", path, damaged)
    return streams.bag_data(damaged)


def _feature_topics(path, by_topic, features_topics) -> list:
    """The Features topics to read: the ones asked for (which must exist), else every one in the bag."""
    available = sorted(t for t, cs in by_topic.items() if any(c.msgtype == FEATURES_TYPE for c in cs))
    if not features_topics:
        if not available:
            raise TrainError(f"{path}: no {FEATURES_TYPE} topics; run `theia-ros encode-bag` on it first")
        return available
    for t in features_topics:
        if t not in available:
            raise TrainError(f"{path}: features topic {t} not found (feature topics: {', '.join(available)})")
    return list(features_topics)


def _action_kind(path, by_topic, action_topic, action_type) -> str:
    """The kind of action (ACTION_KINDS) the action topic holds, by its type or as `action_type` asks."""
    if action_topic not in by_topic:
        raise TrainError(f"{path}: action topic {action_topic} not found; topics: {', '.join(sorted(by_topic))}")
    atype = by_topic[action_topic][0].msgtype
    kind = ACTION_TYPES.get(atype)
    if action_type == "joint_command" and atype == JOINT_STATE_TYPE:
        kind = "joint_command"  # JointState used as a command: its positions as they are
    elif action_type != "auto" and kind != action_type:
        raise TrainError(f"{path}: action topic {action_topic} has type {atype}, not an action of kind "
                         f"{action_type!r} ({', '.join(f'{k}: {v}' for k, v in ACTION_TYPES.items())})")
    if kind is None:
        raise TrainError(f"{path}: action topic {action_topic} has type {atype}; supported: "
                         f"{', '.join(ACTION_TYPES)}")
    return kind


def _check_proprio_topic(path, by_topic, proprio_topic) -> None:
    if not proprio_topic:
        return
    if proprio_topic not in by_topic:
        raise TrainError(f"{path}: proprio topic {proprio_topic} not found")
    if by_topic[proprio_topic][0].msgtype != JOINT_STATE_TYPE:
        raise TrainError(f"{path}: proprio topic {proprio_topic} is {by_topic[proprio_topic][0].msgtype}, "
                         f"not {JOINT_STATE_TYPE}")


class _Streams:
    """The feature, action and proprio messages of one bag, collected message by message."""

    def __init__(self, path, ftopics, action_topic, kind, action_joints, proprio_topic, proprio_joints, stamp):
        self.path, self.action_topic, self.kind, self.stamp = path, action_topic, kind, stamp
        self.proprio_topic = proprio_topic
        self.action_joints = list(action_joints) if action_joints else None
        self.action_format = COMMAND_FORMATS[ACTION_KINDS[kind]]
        self.feats = {t: ([], []) for t in ftopics}
        self.meta = {}
        self.a_stamps, self.a_values, self.a_names = [], [], None
        self.p_stamps, self.p_values = [], []
        self.p_names = list(proprio_joints) if proprio_joints else None
        self.undecodable = 0

    def _stamp_ns(self, msg, receive_ns):
        return stamp_ns(msg.header.stamp) if self.stamp == "header" else receive_ns

    def read(self, messages):
        """Add every message until the end or the storage gives up; returns the storage's exception or None."""
        stopped = {}
        for conn, ts, raw in _until_error(messages, stopped):
            topic = conn.topic
            try:
                if topic in self.feats and conn.msgtype == FEATURES_TYPE:
                    self._add_features(topic, deserialize_message(raw, conn), ts)
                msg = None
                if topic == self.action_topic:
                    msg = deserialize(raw, conn.msgtype)
                    self._add_action(msg, ts)
                if topic == self.proprio_topic:
                    self._add_proprio(msg if msg is not None else deserialize(raw, conn.msgtype), ts)
            except TrainError:
                raise
            except Exception as exc:  # one undecodable message: skip it
                self.undecodable += 1
                if self.undecodable <= 5:
                    log.warning("%s: skipping an undecodable message on %s at %d ns: %s", self.path, topic, ts, exc)
        return stopped.get("error")

    def _add_features(self, topic, msg, receive_ns):
        s = features_summary(msg)
        first = self.meta.setdefault(topic, s)
        if _features_kind(s) != _features_kind(first):
            raise TrainError(f"{self.path}: {topic} mixes features: {_kind_text(first)}, then {_kind_text(s)}")
        arr = features_to_numpy(msg)
        if arr.dtype not in (np.float16, np.float32):
            arr = arr.astype(np.float32)
        self.feats[topic][0].append(self._stamp_ns(msg, receive_ns))
        self.feats[topic][1].append(np.array(arr))

    def _add_action(self, msg, receive_ns):
        names, values = self.action_format.read(msg)
        if names is None:  # a bare vector (Float64MultiArray, no header): --action-joints names it
            names = self.action_joints or [f"joint_{i}" for i in range(values.size)]
            if len(names) != values.size:
                raise TrainError(f"{self.path}: {self.action_topic} has {values.size} values, --action-joints "
                                 f"names {len(names)}")
            stamp = receive_ns
        else:
            if values.size == 0:  # e.g. a trajectory without points
                return
            values = _pick(names, values, self.action_joints)
            if values is None:
                return
            names = self.action_joints or names
            stamp = self._stamp_ns(msg, receive_ns)
            if self.kind == "trajectory" and not stamp:  # commands are often sent unstamped
                stamp = receive_ns
        self.a_stamps.append(stamp)
        self.a_values.append(values)
        self.a_names = self.a_names or names

    def _add_proprio(self, msg, receive_ns):
        names, positions = COMMAND_FORMATS["joint_state"].read(msg)
        if self.p_names is None:
            self.p_names = names
        values = _pick(names, positions, self.p_names)
        if values is not None:
            self.p_stamps.append(self._stamp_ns(msg, receive_ns))
            self.p_values.append(values)

    def bag_data(self, damaged) -> _BagData:
        """The streams sorted by stamp (a feature frame repeating a camera's stamp is dropped)."""
        features = {}
        for t, (stamps, arrays) in self.feats.items():
            s, a = _sorted(stamps, arrays)
            keep = np.concatenate([[True], np.diff(s) > 0]) if s.size else np.zeros(0, bool)
            features[t] = (s[keep], [x for x, k in zip(a, keep) if k])
        if not self.a_values:
            raise TrainError(f"{self.path}: no usable action on {self.action_topic}")
        s, v = _sorted(self.a_stamps, np.stack(self.a_values))
        proprio = None
        if self.proprio_topic:
            if not self.p_values:
                raise TrainError(f"{self.path}: no joint state on {self.proprio_topic} holds all of {self.p_names}")
            ps, pv = _sorted(self.p_stamps, np.stack(self.p_values))
            proprio = (ps, pv, self.p_names)
        return _BagData(str(self.path), features, self.meta, (s, v, self.a_names, self.kind), proprio, damaged)


def _features_kind(summary) -> tuple:
    """What features of one policy input must share: shape, model, representation and preprocessing (the
    position-embedding interpolation only where it changes the tokens)."""
    pre = summary_preprocessing(summary)
    return (summary["shape"], summary["model_id"], summary["weights_id"], summary["representation"], pre.profile,
            pre.input_size, pre.pos_interpolation if pre.interpolates else None)


def _kind_text(summary) -> str:
    return (f"{summary['model_id']} (weights {summary['weights_id'] or 'not stated'}) "
            f"{summary['representation']} {summary['shape']} preprocessed "
            f"{describe_preprocessing(summary)}")


def _until_error(iterator, holder):
    """Items of `iterator` until it ends or raises; the exception goes into holder["error"]."""
    while True:
        try:
            item = next(iterator)
        except StopIteration:
            return
        except Exception as exc:  # the storage gave up: damaged or truncated file
            holder["error"] = exc
            return
        yield item


def _pick(names, values, wanted):
    """values reordered to `wanted` names (None: as they are); None when a name is missing."""
    if wanted is None:
        return values if len(values) == len(names) else None
    index = {n: i for i, n in enumerate(names)}
    if len(values) != len(names) or any(n not in index for n in wanted):
        return None
    return np.array([values[index[n]] for n in wanted])


@dataclasses.dataclass
class Dataset:
    """Aligned samples of all bags: features are kept once per frame and indexed per sample."""

    cameras: list  # camera names (Features.camera), policy order
    topics: list  # feature topics, same order
    features: dict  # camera -> array [n_frames, *shape] (float16 or float32)
    index: dict  # camera -> int64 [n_samples, history] rows of features[camera]
    proprio: np.ndarray | None  # [n_samples, history, J]
    actions: np.ndarray  # [n_samples, A] float64
    episodes: np.ndarray  # [n_samples] episode id
    stamps: np.ndarray  # [n_samples] stamp of the newest frame, ns
    action_names: list
    action_kind: str
    proprio_names: list
    meta: dict  # features summary (shape, model_id, ...)
    history: int
    dropped: dict  # reason -> frames dropped
    episode_sources: list  # episode id -> (bag path, index within bag)

    def __len__(self):
        return len(self.actions)

    def batch(self, rows, device="cpu"):
        """Batch of samples `rows` for TorchPolicy.predict_batch (float32 tensors)."""
        import torch

        rows = np.asarray(rows)
        out = {"features": {cam: torch.from_numpy(self.features[cam][self.index[cam][rows]].astype(np.float32))
                            .to(device) for cam in self.cameras}}
        if self.proprio is not None:
            out["proprio"] = torch.from_numpy(self.proprio[rows].astype(np.float32)).to(device)
        return out

    def observation(self, row):
        """Sample `row` as a policies.Observation (what the policy node would build)."""
        from theia_ros.policies import Observation

        feats = {cam: self.features[cam][self.index[cam][row]].astype(np.float32) for cam in self.cameras}
        proprio = None if self.proprio is None else self.proprio[row].astype(np.float64)
        return Observation(feats, proprio, float(self.stamps[row]) * 1e-9)


def _cameras_of(first, topics):
    """(features metadata, camera names) of the first bag: every feature topic holds the same kind of features."""
    meta = first.meta.get(topics[0])
    if meta is None:
        raise TrainError(f"{first.path}: no features on {topics[0]}")
    cameras = []
    for t in topics:
        m = first.meta.get(t)
        if m is None:
            raise TrainError(f"{first.path}: no features on {t}")
        if _features_kind(m) != _features_kind(meta):
            raise TrainError(f"feature topics differ: {topics[0]} holds {_kind_text(meta)}, {t} {_kind_text(m)}")
        cameras.append(m["camera"] or t.strip("/").rsplit("/", 1)[0] or t)
    if len(set(cameras)) != len(cameras):
        cameras = [t.strip("/").rsplit("/features", 1)[0] or t for t in topics]
    return meta, cameras


def _check_like_first(b, first, topics, meta):
    """A bag joins the dataset only with the first bag's feature topics, features and actions."""
    if list(b.features) != topics:
        raise TrainError(f"{b.path}: feature topics {list(b.features)} differ from {first.path}'s {topics}")
    for t in topics:
        m = b.meta.get(t)
        if m is None:
            raise TrainError(f"{b.path}: no features on {t}")
        if _features_kind(m) != _features_kind(meta):
            raise TrainError(f"{b.path}: {t} holds {_kind_text(m)}, {first.path} {_kind_text(meta)}")
    if b.actions[2] != first.actions[2] or b.actions[3] != first.actions[3]:
        raise TrainError(f"{b.path}: actions {b.actions[3]} {b.actions[2]} differ from {first.path}'s "
                         f"{first.actions[3]} {first.actions[2]}")


def build_dataset(bags, *, tolerance=0.05, episode_gap=2.0, history=1) -> Dataset:
    """Align the streams of each bag (see module doc) into one Dataset."""
    if history < 1:
        raise TrainError("history must be >= 1")
    tol = int(round(tolerance * 1e9))
    gap = int(round(episode_gap * 1e9))
    first = bags[0]
    topics = list(first.features)
    meta, cameras = _cameras_of(first, topics)
    a_names, a_kind = first.actions[2], first.actions[3]
    p_names = first.proprio[2] if first.proprio else []
    feats = {c: [] for c in cameras}
    n_frames = {c: 0 for c in cameras}
    index = {c: [] for c in cameras}
    proprio, actions, episodes, stamps = [], [], [], []
    dropped = {"camera out of tolerance": 0, "no proprio within tolerance": 0, "no action within tolerance": 0,
               "end of episode (next-state action)": 0, "history before episode start": 0}  # (or a gap in it)
    episode_sources = []
    for b in bags:
        _check_like_first(b, first, topics, meta)
        ref_stamps, _ = b.features[topics[0]]
        n = ref_stamps.size
        if n == 0:
            continue
        cam_rows = {}
        obs_ok = np.ones(n, bool)  # every camera (and the proprio) has a message close to the frame
        cam_ok = np.ones(n, bool)
        for cam, t in zip(cameras, topics):
            s, arrays = b.features[t]
            rows = np.arange(n) if t == topics[0] else _nearest(s, ref_stamps, tol)
            cam_ok &= rows >= 0
            cam_rows[cam] = np.where(rows < 0, 0, rows) + n_frames[cam]
            feats[cam].extend(arrays)
            n_frames[cam] += len(arrays)
        obs_ok &= cam_ok
        # episodes: split at gaps
        ep_local = np.concatenate([[0], np.cumsum(np.diff(ref_stamps) > gap)])
        ep = ep_local + len(episode_sources)
        episode_sources.extend((b.path, int(k)) for k in range(int(ep_local[-1]) + 1))
        pv = None
        prop_ok = np.ones(n, bool)
        if b.proprio is not None:
            if b.proprio[2] != p_names:
                raise TrainError(f"{b.path}: proprio joints {b.proprio[2]} differ from {p_names}")
            prow = _nearest(b.proprio[0], ref_stamps, tol)
            prop_ok = prow >= 0
            obs_ok &= prop_ok
            pv = b.proprio[1][np.where(prow < 0, 0, prow)]
        a_stamps, a_values = b.actions[0], b.actions[1]
        end_ok = np.ones(n, bool)
        if a_kind == "joint_state":  # target: the state at the next frame of the same episode
            end_ok = np.concatenate([ep[1:] == ep[:-1], [False]])
            nxt = np.concatenate([ref_stamps[1:], [ref_stamps[-1]]])
            arow = _nearest(a_stamps, nxt, tol)
        else:
            arow = _nearest(a_stamps, ref_stamps, tol)
        act_ok = arow >= 0
        av = a_values[np.where(arow < 0, 0, arow)]
        for i in range(n):
            lo = i - history + 1
            reason = ("camera out of tolerance" if not cam_ok[i] else
                      "no proprio within tolerance" if not prop_ok[i] else
                      "end of episode (next-state action)" if not end_ok[i] else
                      "no action within tolerance" if not act_ok[i] else
                      "history before episode start" if lo < 0 or ep[lo] != ep[i] or not obs_ok[lo:i + 1].all()
                      else None)
            if reason:
                dropped[reason] += 1
                continue
            hist = np.arange(lo, i + 1)
            for cam in cameras:
                index[cam].append(cam_rows[cam][hist])
            if pv is not None:
                proprio.append(pv[hist])
            actions.append(av[i])
            episodes.append(ep[i])
            stamps.append(ref_stamps[i])
    if not actions:
        raise TrainError("no aligned samples: " + ", ".join(f"{k}: {v}" for k, v in dropped.items() if v)
                         + f" (tolerance {tolerance} s; check the stamps, or try --stamp receive)")
    return Dataset(
        cameras=cameras, topics=topics,
        features={c: np.stack(feats[c]) for c in cameras},
        index={c: np.stack(index[c]) for c in cameras},
        proprio=np.stack(proprio) if proprio else None,
        actions=np.stack(actions).astype(np.float64),
        episodes=np.asarray(episodes), stamps=np.asarray(stamps, dtype=np.int64),
        action_names=list(a_names), action_kind=a_kind, proprio_names=list(p_names), meta=meta,
        history=history, dropped={k: v for k, v in dropped.items() if v}, episode_sources=episode_sources)


def split_episodes(ds: Dataset, val_fraction=0.2, seed=0):
    """(train rows, val rows, val episode ids): whole episodes go to validation; with a single
    episode, its last `val_fraction` (in time) does."""
    eps = np.unique(ds.episodes)
    rows = np.arange(len(ds))
    if len(eps) >= 2:
        n_val = min(len(eps) - 1, max(1, int(round(len(eps) * val_fraction))))
        val_eps = np.sort(np.random.default_rng(seed).choice(eps, n_val, replace=False))
        val = np.isin(ds.episodes, val_eps)
        return rows[~val], rows[val], list(val_eps)
    log.warning("only one episode: validating on its last %.0f%% (record several episodes, or separate them "
                "by gaps longer than --episode-gap)", val_fraction * 100)
    order = rows[np.argsort(ds.stamps)]
    n_val = max(1, int(round(len(rows) * val_fraction)))
    if n_val >= len(rows):
        raise TrainError(f"{len(rows)} samples are too few to split")
    cut = len(rows) - n_val
    train = order[:max(1, cut - ds.history)]  # leave a gap of `history` frames between the parts
    return np.sort(train), np.sort(order[cut:]), list(eps)


# ---------------------------------------------------------------------------------------------
# Training


@dataclasses.dataclass
class TrainResult:
    policy: object
    dataset: Dataset
    train_rows: np.ndarray
    val_rows: np.ndarray
    val_episodes: list
    train_loss: list  # per epoch, normalised MSE
    val_loss: list  # per epoch, normalised MSE
    val_predictions: np.ndarray  # [n_val, A] raw units, final policy (eval mode)
    val_mse: float  # raw units, mean over dims
    const_mse: float  # train-mean predictor, raw units
    val_nmse: float  # normalised by the train std per dim
    const_nmse: float
    steps: int
    seconds: float
    checkpoint: Path | None = None
    plot: Path | None = None

    @property
    def ratio(self) -> float:
        return self.val_nmse / self.const_nmse if self.const_nmse > 0 else float("nan")


def parse_params(items):
    import yaml

    params = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise TrainError(f"--param expects KEY=VALUE, got {item!r}")
        params[key.strip()] = yaml.safe_load(value)
    return params


def train_policy(bags, *, policy="theia_head", out=None, action_topic, action_type="auto", action_joints=None,
                 action_mode="position", features_topics=None, proprio_topic=None, proprio_joints=None,
                 tolerance=0.05, episode_gap=2.0, history=1, stamp="header", epochs=20, batch_size=32, lr=1e-3,
                 weight_decay=1e-4, val_fraction=0.2, seed=0, params=None, max_steps=None, threads=None,
                 plot=True, overwrite=False, printer=print) -> TrainResult:
    """Read `bags`, align, train `policy` by behaviour cloning, evaluate, save to `out` (see module doc)."""
    import torch

    t0 = time.perf_counter()
    if isinstance(bags, (str, Path)):
        bags = [bags]
    if out is not None:
        out = Path(out)
        _check_output_dir(out, overwrite)
    if threads:
        torch.set_num_threads(int(threads))
    data = [read_bag(b, features_topics=features_topics, action_topic=action_topic, action_type=action_type,
                     action_joints=action_joints, proprio_topic=proprio_topic, proprio_joints=proprio_joints,
                     stamp=stamp) for b in bags]
    ds = build_dataset(data, tolerance=tolerance, episode_gap=episode_gap, history=history)
    train_rows, val_rows, val_eps = split_episodes(ds, val_fraction, seed)
    _print_data(printer, ds, len(bags), train_rows, val_rows, val_eps, action_topic, history)
    if len(train_rows) < 2:
        raise TrainError(f"only {len(train_rows)} training samples")
    pol = _build_trainable_policy(policy, ds, history, action_mode, params, seed)
    a_mean, a_std = _set_normalization(pol, ds, train_rows)
    train_loss, val_loss, steps = _fit(pol, ds, train_rows, val_rows, a_std, epochs=epochs, batch_size=batch_size,
                                       lr=lr, weight_decay=weight_decay, max_steps=max_steps, seed=seed,
                                       printer=printer)
    preds = _predict(pol, ds, val_rows)
    err = preds - ds.actions[val_rows]
    const_err = a_mean - ds.actions[val_rows]
    result = TrainResult(
        policy=pol, dataset=ds, train_rows=train_rows, val_rows=val_rows, val_episodes=val_eps,
        train_loss=train_loss, val_loss=val_loss, val_predictions=preds,
        val_mse=float((err ** 2).mean()), const_mse=float((const_err ** 2).mean()),
        val_nmse=float(((err / a_std) ** 2).mean()), const_nmse=float(((const_err / a_std) ** 2).mean()),
        steps=steps, seconds=time.perf_counter() - t0)
    printer(f"validation MSE: policy {result.val_mse:.6g}, constant (train mean) {result.const_mse:.6g} "
            f"(raw units); normalised {result.val_nmse:.4f} vs {result.const_nmse:.4f}: "
            f"ratio {result.ratio:.3f}")
    if out is not None:
        args = {"tolerance": tolerance, "episode_gap": episode_gap, "stamp": stamp, "epochs": epochs,
                "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "seed": seed,
                "params": params or {}}
        _save(result, out, policy=policy, bags=bags, action_topic=action_topic, history=history, args=args,
              plot=plot, printer=printer)
    return result


def _check_output_dir(out: Path, overwrite: bool) -> None:
    if (out / "config.yaml").exists() and not overwrite:
        raise TrainError(f"{out} already holds a checkpoint; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise TrainError(f"{out} exists and is not a directory")


def _print_data(printer, ds: Dataset, n_bags, train_rows, val_rows, val_eps, action_topic, history) -> None:
    meta = ds.meta
    printer(f"data: {n_bags} bag(s), {len(np.unique(ds.episodes))} episode(s), {len(ds)} samples "
            f"(train {len(train_rows)}, validation {len(val_rows)} from episode(s) {[int(e) for e in val_eps]})")
    printer(f"  cameras {ds.cameras} ({', '.join(ds.topics)}): {meta['representation']} {meta['shape']} "
            f"{meta['dtype']}, model {meta['model_id']}, preprocessing {describe_preprocessing(meta)}")
    if meta["random_weights"]:
        printer("  NOTE: the features come from RANDOM encoder weights (tests and demos only)")
    printer(f"  action: {ds.action_kind} on {action_topic}, joints {ds.action_names}; proprio: "
            f"{ds.proprio_names or 'none'}; history {history}")
    if ds.dropped:
        printer("  dropped frames: " + ", ".join(f"{k}: {v}" for k, v in ds.dropped.items()))


def _build_trainable_policy(policy, ds: Dataset, history, action_mode, params, seed):
    """The policy `policy` for the dataset's features, proprio joints and actions (a TorchPolicy)."""
    from theia_ros.policies import ActionSpec, ObservationSpec, PolicyError, make_policy

    meta = ds.meta
    try:
        spec = ObservationSpec(cameras=ds.cameras, representation=meta["representation"],
                               feature_shape=tuple(meta["shape"]), proprio_joints=ds.proprio_names,
                               history=history, model_id=meta["model_id"] or None,
                               weights_id=meta["weights_id"] or None,
                               preprocessing=meta["preprocessing"], input_size=meta["input_size"],
                               pos_interpolation=meta["pos_interpolation"])
        aspec = ActionSpec(joint_names=ds.action_names, mode=action_mode)
        p = dict(params or {})
        p.setdefault("seed", seed)
        pol = make_policy(policy, {"observation": spec.to_dict(), "action": aspec.to_dict(), "params": p})
    except PolicyError as exc:
        raise TrainError(f"cannot build policy {policy!r}: {exc}") from exc
    if not hasattr(pol, "module"):
        raise TrainError(f"policy {policy!r} is not trainable (no torch module)")
    return pol


def _set_normalization(pol, ds: Dataset, train_rows):
    """Set the policy's action (and proprio) statistics from the training rows; returns the action
    mean and std (std 1 where an action does not vary)."""
    y = ds.actions[train_rows]
    a_mean, a_std = y.mean(0), y.std(0)
    a_std = np.where(a_std > 1e-6, a_std, 1.0)
    norm = {"action_mean": a_mean, "action_std": a_std}
    if ds.proprio is not None:
        pr = ds.proprio[train_rows].reshape(-1, ds.proprio.shape[-1])
        p_std = pr.std(0)
        norm.update(proprio_mean=pr.mean(0), proprio_std=np.where(p_std > 1e-6, p_std, 1.0))
    pol.set_normalization(**norm)
    return a_mean, a_std


def _predict(pol, ds: Dataset, rows) -> np.ndarray:
    """The policy's actions [len(rows), A] (float64, raw units) in eval mode."""
    import torch

    pol.module.eval()
    preds = []
    with torch.inference_mode():
        for i in range(0, len(rows), 256):
            preds.append(pol.predict_batch(ds.batch(rows[i:i + 256], pol.device)).cpu())
    return torch.cat(preds).double().numpy()


def _fit(pol, ds: Dataset, train_rows, val_rows, a_std, *, epochs, batch_size, lr, weight_decay, max_steps, seed,
         printer):
    """AdamW on the MSE of normalised actions with a cosine learning rate; returns the train and validation
    loss per epoch and the number of steps."""
    import torch

    module = pol.module
    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = max(1, len(train_rows) // batch_size)  # drop the ragged last batch (BatchNorm)
    total = epochs * steps_per_epoch if max_steps is None else min(max_steps, epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    y = ds.actions
    y_t = torch.from_numpy(y.astype(np.float32))
    gen = np.random.default_rng(seed)
    train_loss, val_loss = [], []
    step = 0
    bs = min(batch_size, len(train_rows))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for epoch in range(epochs):
            module.train()
            perm = gen.permutation(train_rows)
            losses = []
            for k in range(steps_per_epoch):
                if step >= total:
                    break
                rows = perm[k * bs:(k + 1) * bs]
                if len(rows) < 2:
                    continue
                pred = pol.predict_batch(ds.batch(rows, pol.device), normalized=True)
                loss = torch.nn.functional.mse_loss(pred, pol.normalize_actions(y_t[rows]))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                losses.append(loss.item())
            vl = float((((_predict(pol, ds, val_rows) - y[val_rows]) / a_std) ** 2).mean())
            train_loss.append(float(np.mean(losses)) if losses else float("nan"))
            val_loss.append(vl)
            printer(f"epoch {epoch + 1:3d}/{epochs}  step {step:5d}  train loss {train_loss[-1]:.4f}  "
                    f"val loss {vl:.4f}  (MSE of normalised actions)")
            if step >= total:
                break
    module.eval()
    return train_loss, val_loss, step


def _save(result: TrainResult, out: Path, *, policy, bags, action_topic, history, args, plot, printer) -> None:
    """The checkpoint, training_report.json and (with `plot`) training.png in `out`."""
    ds = result.dataset
    result.policy.save_pretrained(out)
    result.checkpoint = out
    report = {
        "policy": policy, "bags": [str(b) for b in bags], "cameras": ds.cameras, "feature_topics": ds.topics,
        "features": ds.meta, "action_topic": action_topic, "action_kind": ds.action_kind,
        "action_joints": ds.action_names, "proprio_joints": ds.proprio_names, "history": history,
        "samples": {"train": int(len(result.train_rows)), "validation": int(len(result.val_rows))},
        "validation_episodes": [ds.episode_sources[int(e)] for e in result.val_episodes], "steps": result.steps,
        "epochs": len(result.train_loss), "train_loss": result.train_loss, "val_loss": result.val_loss,
        "val_mse": result.val_mse, "constant_mse": result.const_mse, "val_nmse": result.val_nmse,
        "constant_nmse": result.const_nmse, "dropped": ds.dropped, "args": args,
    }
    (out / "training_report.json").write_text(json.dumps(report, indent=2, default=_plain))
    printer(f"checkpoint: {out} (load with make_policy(None, checkpoint={str(out)!r}))")
    if plot:
        try:
            result.plot = write_plot(result, out / "training.png")
            printer(f"plot: {result.plot}")
        except ImportError as exc:
            printer(f"no plot: {exc} (pip install matplotlib)")


def _plain(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def write_plot(result: TrainResult, path) -> Path:
    """PNG: loss curves, and predicted vs recorded actions over one validation episode."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    ds = result.dataset
    dims = min(len(ds.action_names), 6)
    fig = Figure(figsize=(10, 3 + 2.2 * dims), constrained_layout=True)
    axes = fig.subplots(1 + dims, 1, squeeze=False)[:, 0]
    ax = axes[0]
    epochs = np.arange(1, len(result.train_loss) + 1)
    ax.plot(epochs, result.train_loss, label="train")
    ax.plot(epochs, result.val_loss, label="validation")
    ax.axhline(result.const_nmse, color="gray", linestyle="--", label="constant (train mean)")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("MSE (normalised)")
    ax.set_title(f"{result.policy.name}: validation MSE {result.val_nmse:.4f} vs constant {result.const_nmse:.4f}")
    ax.legend()
    ep_of_val = ds.episodes[result.val_rows]
    ep = max(set(ep_of_val.tolist()), key=lambda e: int((ep_of_val == e).sum()))
    sel = ep_of_val == ep
    t = (ds.stamps[result.val_rows][sel] - ds.stamps[result.val_rows][sel].min()) * 1e-9
    order = np.argsort(t)
    src = ds.episode_sources[int(ep)]
    for d in range(dims):
        a = axes[1 + d]
        a.plot(t[order], ds.actions[result.val_rows][sel][order, d], label="recorded")
        a.plot(t[order], result.val_predictions[sel][order, d], label="predicted")
        a.set_ylabel(ds.action_names[d])
        if d == 0:
            a.set_title(f"validation episode {int(ep)} ({Path(src[0]).name} #{src[1]})")
            a.legend()
    axes[-1].set_xlabel("time in episode (s)")
    path = Path(path)
    fig.savefig(path, dpi=80)
    return path
