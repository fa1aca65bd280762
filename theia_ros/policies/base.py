"""Policy interface of theia_ros: specs, observations, the observation buffer, the registry.

Plain Python (numpy, PyYAML, safetensors); no ROS and no torch imports here, so a ROS node, a
trainer and a unit test all use the same code. Learned policies build on
:class:`theia_ros.policies.torch_policy.TorchPolicy`.

Data flow
---------
The encoder publishes per-camera Theia features (a float array in one *representation*, see
:data:`REPRESENTATIONS`) and the robot publishes joint states. An adapter (the ROS policy node,
a replay script, a simulator loop) pushes both into an :class:`ObservationBuffer`, which aligns
them by stamp and builds an :class:`Observation` matching the policy's
:class:`ObservationSpec`. :meth:`Policy.act` maps the observation to one action for the joints
of its :class:`ActionSpec`::

    policy = make_policy("mlp", checkpoint="runs/pick/ckpt")       # or make_policy("hold", config)
    buffer = ObservationBuffer(policy.observation_spec, max_skew=0.05)
    buffer.push_features("front", stamp, tokens)                   # per camera message
    buffer.push_joint_state(stamp, names, positions, velocities)   # per joint state message
    if buffer.ready():
        action = policy.act(buffer.build(now))                     # np.float64 [n_joints]

Stamps and ``now`` are float seconds on one clock (the ROS clock of the messages).
"""
from __future__ import annotations

import abc
import dataclasses
import importlib
import importlib.metadata
import math
import os
import tempfile
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from theia_ros.representations import REPRESENTATIONS, TEACHER_PREFIX

__all__ = [
    "ENTRY_POINT_GROUP",
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "FORMAT_VERSION",
    "PolicyError",
    "ObservationError",
    "PolicyConfigError",
    "CheckpointError",
    "UnknownPolicyError",
    "ObservationSpec",
    "ActionSpec",
    "Observation",
    "ObservationBuffer",
    "Policy",
    "random_observation",
    "available_policies",
    "load_policy_class",
    "make_policy",
    "read_config",
]

ENTRY_POINT_GROUP = "theia_ros.policies"
CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1



# --------------------------------------------------------------------------------------------
# Errors


class PolicyError(Exception):
    """Base class of the errors raised by the policy layer."""


class ObservationError(PolicyError, ValueError):
    """An observation (or a pushed message) does not fit the observation spec."""


class PolicyConfigError(PolicyError, ValueError):
    """A policy configuration (spec, params, config.yaml) is invalid."""


class CheckpointError(PolicyError):
    """A checkpoint directory is missing, unreadable or does not fit the policy."""


class UnknownPolicyError(PolicyError, LookupError):
    """No policy class of that name is registered or importable."""

    def __str__(self):  # LookupError would repr() the message
        return str(self.args[0]) if self.args else ""


# --------------------------------------------------------------------------------------------
# Specs


def _is_square(n: int) -> bool:
    r = math.isqrt(n)
    return r * r == n


def _check_names(kind: str, names: Sequence[str], allow_empty: bool) -> list[str]:
    if isinstance(names, str):
        raise PolicyConfigError(f"{kind} must be a list of names, got the string {names!r}")
    names = list(names)
    if not names and not allow_empty:
        raise PolicyConfigError(f"{kind} must not be empty")
    for n in names:
        if not isinstance(n, str) or not n:
            raise PolicyConfigError(f"{kind} must be non-empty strings, got {n!r}")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise PolicyConfigError(f"{kind} has duplicates: {dupes}")
    return names


@dataclass
class ObservationSpec:
    """What a policy observes.

    cameras: camera names (the encoder's camera parameter names), in the order policies stack
        them. representation: one of :data:`REPRESENTATIONS` or ``teacher:<id>``.
    feature_shape: per-camera feature shape, e.g. (196, 192) for tiny tokens.
    proprio_joints: joint names whose measured positions form the proprioception, in this order
        (empty: no proprioception). history: number of frames per observation (>= 1).
    model_id: optional encoder model id (e.g. "theaiinstitute/theia-tiny-patch16-224-cddsv");
        when set, features tagged with another model id are rejected (cdiv and cddsv have the
        same shape but different features).
    """

    cameras: list[str]
    representation: str
    feature_shape: tuple[int, ...]
    proprio_joints: list[str] = field(default_factory=list)
    history: int = 1
    model_id: str | None = None

    def __post_init__(self):
        self.cameras = _check_names("cameras", self.cameras, allow_empty=False)
        self.proprio_joints = _check_names("proprio_joints", self.proprio_joints, allow_empty=True)
        try:
            self.feature_shape = tuple(int(d) for d in self.feature_shape)
        except (TypeError, ValueError):
            raise PolicyConfigError(f"feature_shape must be a sequence of ints, got {self.feature_shape!r}") from None
        if not self.feature_shape or any(d <= 0 for d in self.feature_shape):
            raise PolicyConfigError(f"feature_shape must be non-empty and positive, got {self.feature_shape}")
        if isinstance(self.history, bool) or not isinstance(self.history, (int, np.integer)) or self.history < 1:
            raise PolicyConfigError(f"history must be an int >= 1, got {self.history!r}")
        self.history = int(self.history)
        rep, shape = self.representation, self.feature_shape
        if not isinstance(rep, str):
            raise PolicyConfigError(f"representation must be a string, got {rep!r}")
        expected_ndim = {"tokens": 2, "all_tokens": 2, "spatial": 3, "cls": 1, "mean": 1, "max": 1}
        if rep in expected_ndim:
            ok = len(shape) == expected_ndim[rep]
            if ok and rep == "tokens":
                ok = _is_square(shape[0])
            elif ok and rep == "all_tokens":
                ok = _is_square(shape[0] - 1)
            if not ok:
                raise PolicyConfigError(
                    f"feature_shape {shape} does not fit representation {rep!r} ({REPRESENTATIONS[rep]})")
        elif not rep.startswith(TEACHER_PREFIX):
            raise PolicyConfigError(
                f"unknown representation {rep!r}; known: {sorted(REPRESENTATIONS)} or '{TEACHER_PREFIX}<id>'")

    @property
    def feature_dim(self) -> int:
        """Channel count C of one feature vector."""
        return self.feature_shape[0] if self.layout == "map" else self.feature_shape[-1]

    @property
    def layout(self) -> str:
        """'vector' [C], 'tokens' [N, C], 'tokens_cls' [1+N, C] (CLS first) or 'map' [C, H, W]."""
        if self.representation == "all_tokens":
            return "tokens_cls"
        return {1: "vector", 2: "tokens", 3: "map"}.get(len(self.feature_shape), "other")

    def to_dict(self) -> dict:
        d = {
            "cameras": list(self.cameras),
            "representation": self.representation,
            "feature_shape": list(self.feature_shape),
            "proprio_joints": list(self.proprio_joints),
            "history": self.history,
        }
        if self.model_id is not None:
            d["model_id"] = self.model_id
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "ObservationSpec":
        return _dataclass_from_dict(cls, d, "observation")


@dataclass(eq=False)
class ActionSpec:
    """What a policy commands.

    joint_names: commanded joints, in the order of the action vector.
    mode: "position" (rad or m) or "velocity" (rad/s or m/s).
    lower, upper: optional per-joint limits in the units of `mode` (+-inf: unbounded);
        :meth:`Policy.act` clips its output to them.
    """

    joint_names: list[str]
    mode: str = "position"
    lower: np.ndarray | None = None
    upper: np.ndarray | None = None

    MODES: ClassVar[tuple[str, ...]] = ("position", "velocity")

    def __post_init__(self):
        self.joint_names = _check_names("joint_names", self.joint_names, allow_empty=False)
        if self.mode not in self.MODES:
            raise PolicyConfigError(f"action mode must be one of {list(self.MODES)}, got {self.mode!r}")
        n = len(self.joint_names)
        for which in ("lower", "upper"):
            v = getattr(self, which)
            if v is None:
                continue
            try:
                v = np.array(v, dtype=np.float64).reshape(-1)
            except (TypeError, ValueError):
                raise PolicyConfigError(f"action {which} limits must be numbers, got {v!r}") from None
            if v.shape != (n,):
                raise PolicyConfigError(f"action {which} limits have {v.size} values for {n} joints")
            if np.isnan(v).any():
                raise PolicyConfigError(f"action {which} limits contain NaN (use +-inf for unbounded)")
            v.setflags(write=False)
            setattr(self, which, v)
        if self.lower is not None and self.upper is not None and (self.lower > self.upper).any():
            bad = [self.joint_names[i] for i in np.flatnonzero(self.lower > self.upper)]
            raise PolicyConfigError(f"action lower > upper for joints {bad}")

    @property
    def dim(self) -> int:
        return len(self.joint_names)

    def clip(self, action: np.ndarray) -> np.ndarray:
        """`action` clipped to the limits (a new array when limits are set)."""
        if self.lower is None and self.upper is None:
            return action
        return np.clip(action, self.lower, self.upper)

    def __eq__(self, other):
        if not isinstance(other, ActionSpec):
            return NotImplemented

        def same(a, b):
            return (a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))

        return (self.joint_names == other.joint_names and self.mode == other.mode
                and same(self.lower, other.lower) and same(self.upper, other.upper))

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"joint_names": list(self.joint_names), "mode": self.mode}
        if self.lower is not None:
            d["lower"] = [float(x) for x in self.lower]
        if self.upper is not None:
            d["upper"] = [float(x) for x in self.upper]
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "ActionSpec":
        return _dataclass_from_dict(cls, d, "action")


def _dataclass_from_dict(cls, d, what):
    if not isinstance(d, Mapping):
        raise PolicyConfigError(f"'{what}' must be a mapping, got {type(d).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise PolicyConfigError(f"unknown '{what}' keys {unknown}; allowed: {names}")
    try:
        return cls(**d)
    except TypeError as exc:  # missing required field
        raise PolicyConfigError(f"invalid '{what}' section: {exc}") from None


# --------------------------------------------------------------------------------------------
# Observation


@dataclass
class Observation:
    """One aligned observation.

    features: camera name -> float32 array [history, *feature_shape], oldest frame first.
    proprio: float64 [history, len(proprio_joints)] measured joint positions in the spec's joint
        order (row i measured closest to frame i), or None when the spec has no proprio joints.
    stamp: seconds, stamp of the newest frame.
    frame_stamps: camera name -> float64 [history] stamps of the frames used (diagnostics).
    """

    features: dict[str, np.ndarray]
    proprio: np.ndarray | None
    stamp: float
    frame_stamps: dict[str, np.ndarray] = field(default_factory=dict)

    def validate(self, spec: ObservationSpec) -> None:
        """Raise :class:`ObservationError` unless this observation fits `spec` and is finite."""
        if not isinstance(self.stamp, (int, float, np.floating, np.integer)) or not math.isfinite(self.stamp):
            raise ObservationError(f"observation stamp must be a finite number, got {self.stamp!r}")
        expected = (spec.history, *spec.feature_shape)
        for cam in spec.cameras:
            if cam not in self.features:
                raise ObservationError(f"observation lacks camera {cam!r} (has {sorted(self.features)})")
            x = self.features[cam]
            if not isinstance(x, np.ndarray):
                raise ObservationError(f"camera {cam!r}: features must be a numpy array, got {type(x).__name__}")
            if x.shape != expected:
                raise ObservationError(
                    f"camera {cam!r}: features have shape {x.shape}, expected {expected} "
                    f"(history {spec.history} x {spec.representation} {spec.feature_shape})")
            _check_finite(x, f"camera {cam!r} features")
        if spec.proprio_joints:
            if self.proprio is None:
                raise ObservationError(f"observation lacks proprio for joints {spec.proprio_joints}")
            p = np.asarray(self.proprio)
            if p.shape != (spec.history, len(spec.proprio_joints)):
                raise ObservationError(
                    f"proprio has shape {p.shape}, expected ({spec.history}, {len(spec.proprio_joints)})")
            _check_finite(p, "proprio")


def _check_finite(x: np.ndarray, what: str) -> None:
    if x.dtype.kind not in "fiub":
        raise ObservationError(f"{what} have non-numeric dtype {x.dtype}")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        n_nan = int(np.isnan(x).sum())
        n_inf = int(np.isinf(x).sum())
        raise ObservationError(f"{what} contain non-finite values ({n_nan} NaN, {n_inf} inf)")


def random_observation(spec: ObservationSpec, rng: np.random.Generator | int | None = None,
                       stamp: float = 0.0) -> Observation:
    """A random observation fitting `spec` (tests and benchmarks)."""
    rng = np.random.default_rng(rng)
    feats = {c: rng.standard_normal((spec.history, *spec.feature_shape), dtype=np.float32) for c in spec.cameras}
    proprio = rng.uniform(-1, 1, (spec.history, len(spec.proprio_joints))) if spec.proprio_joints else None
    return Observation(feats, proprio, float(stamp))


# --------------------------------------------------------------------------------------------
# Observation buffer


class ObservationBuffer:
    """Collects features and joint states and builds stamp-aligned observations.

    Frames: the newest `frame_capacity` frames per camera (default: enough for `history`);
    stamps must increase per camera. Joint states: the newest `joint_capacity` messages; a
    message may carry any subset of joints (e.g. arm and gripper published separately);
    joints not in ``spec.proprio_joints`` are ignored.

    Alignment (:meth:`build`): the reference camera is the one whose newest frame is the
    oldest (so the newest *complete* set is used; with synchronised cameras this is simply the
    newest frame of each camera). Its last `history` frames are the time base; every other
    camera contributes, for each of them, its frame closest in stamp, which must lie within
    `max_skew` seconds. Frame i's stamp is the newest stamp of its camera set. Proprio row i
    holds, per joint, the position from the joint state closest in time to frame i, which must
    lie within `proprio_tolerance`. Positions are re-ordered by name to ``proprio_joints``.
    History frames are consecutive received frames (no temporal resampling).

    Not thread-safe: guard it with a lock if callbacks run concurrently.
    """

    def __init__(self, spec: ObservationSpec, *, max_skew: float = 0.05, proprio_tolerance: float = 0.05,
                 max_age: float | None = None, frame_capacity: int | None = None, joint_capacity: int = 1000):
        if max_skew < 0 or proprio_tolerance < 0:
            raise ValueError("max_skew and proprio_tolerance must be >= 0")
        self.spec = spec
        self.max_skew = float(max_skew)
        self.proprio_tolerance = float(proprio_tolerance)
        self.max_age = None if max_age is None else float(max_age)
        cap = frame_capacity if frame_capacity is not None else 2 * spec.history + 4
        if cap < spec.history:
            raise ValueError(f"frame_capacity {cap} < history {spec.history}")
        if joint_capacity < 1:
            raise ValueError("joint_capacity must be >= 1")
        self._cams = list(spec.cameras)
        self._frame_capacity = cap
        self._joints = list(spec.proprio_joints)
        self._joint_index = {n: i for i, n in enumerate(self._joints)}
        self._joint_capacity = int(joint_capacity)
        self.clear()

    def clear(self) -> None:
        """Forget everything (call it after a clock jump, e.g. a bag replay restarting)."""
        self._frames: dict[str, deque] = {c: deque(maxlen=self._frame_capacity) for c in self._cams}
        n = len(self._joints)
        self._j_stamps = np.full(self._joint_capacity, np.nan)
        self._j_pos = np.full((self._joint_capacity, n), np.nan)
        self._j_next = 0  # ring buffer write index
        self._j_count = 0
        self._j_seen = np.zeros(n, dtype=bool)
        self._j_newest = np.full(n, -math.inf)  # per joint
        self._other_joint_names: set[str] = set()

    # ---- input

    def push_features(self, camera: str, stamp: float, array, *, representation: str | None = None,
                      model_id: str | None = None) -> None:
        """Add one camera's features (copied as float32). `representation` and `model_id`, when
        given (from the message), are checked against the spec."""
        spec = self.spec
        if camera not in self._frames:
            raise ObservationError(f"unknown camera {camera!r}; the policy observes {self._cams}")
        stamp = _check_stamp(stamp)
        if representation is not None and representation != spec.representation:
            raise ObservationError(
                f"camera {camera!r}: representation {representation!r}, the policy needs {spec.representation!r}")
        if model_id is not None and spec.model_id is not None and model_id != spec.model_id:
            raise ObservationError(f"camera {camera!r}: features from model {model_id!r}, the policy "
                                   f"was trained on {spec.model_id!r}")
        x = np.asarray(array)
        if x.shape != spec.feature_shape:
            raise ObservationError(f"camera {camera!r}: features have shape {x.shape}, expected "
                                   f"{spec.feature_shape} ({spec.representation})")
        if x.dtype.kind not in "fiu" and x.dtype.name != "bfloat16":
            raise ObservationError(f"camera {camera!r}: features have non-numeric dtype {x.dtype}")
        x = x.astype(np.float32, copy=True)
        _check_finite(x, f"camera {camera!r} features at t={stamp:.6f}")
        frames = self._frames[camera]
        if frames and stamp <= frames[-1][0]:
            raise ObservationError(
                f"camera {camera!r}: stamp {stamp:.6f} is not newer than the previous frame's "
                f"{frames[-1][0]:.6f} (call clear() after a clock jump)")
        frames.append((stamp, x))

    def push_joint_state(self, stamp: float, names: Sequence[str], positions, velocities=None) -> None:
        """Add one joint state message. Only ``spec.proprio_joints`` are kept (positions);
        `velocities` may be empty or None, else its length must match `names`."""
        stamp = _check_stamp(stamp)
        names = list(names)
        pos = np.asarray(positions, dtype=np.float64).reshape(-1)
        if len(names) != pos.size:
            raise ObservationError(f"joint state has {len(names)} names but {pos.size} positions")
        if velocities is not None and len(velocities) not in (0, len(names)):
            raise ObservationError(f"joint state has {len(names)} names but {len(velocities)} velocities")
        if len(set(names)) != len(names):
            dupes = sorted({n for n in names if names.count(n) > 1})
            raise ObservationError(f"joint state has duplicate names: {dupes}")
        if not self._joints:
            return
        row = np.full(len(self._joints), np.nan)
        for name, p in zip(names, pos):
            i = self._joint_index.get(name)
            if i is None:
                if len(self._other_joint_names) < 1000:
                    self._other_joint_names.add(name)
                continue
            if not math.isfinite(p):
                raise ObservationError(f"joint {name!r} position is {p} at t={stamp:.6f}")
            row[i] = p
        present = ~np.isnan(row)
        if not present.any():
            return
        k = self._j_next
        self._j_stamps[k] = stamp
        self._j_pos[k] = row
        self._j_next = (k + 1) % self._joint_capacity
        self._j_count = min(self._j_count + 1, self._joint_capacity)
        self._j_seen |= present
        self._j_newest[present] = np.maximum(self._j_newest[present], stamp)

    # ---- state

    def ready(self) -> bool:
        """True when every camera has `history` frames and every proprio joint was received.
        (:meth:`build` may still fail on skew or tolerance.)"""
        return all(len(f) >= self.spec.history for f in self._frames.values()) and bool(self._j_seen.all())

    def newest_stamp(self) -> float:
        """Stamp of the newest complete set: the oldest of the newest stamps of each camera and
        of each proprio joint (-inf while anything is missing)."""
        stamps = [f[-1][0] if f else -math.inf for f in self._frames.values()]
        if self._joints:
            stamps.append(float(self._j_newest.min()))
        return min(stamps)

    def age(self, now: float) -> float:
        """Seconds from :meth:`newest_stamp` to `now` (inf while anything is missing): for a
        watchdog that stops the robot when a camera or the joint states stall."""
        return float(now) - self.newest_stamp()

    # ---- output

    def build(self, now: float | None = None) -> Observation:
        """The newest aligned observation; raises :class:`ObservationError` when there is none.
        With `now` and `max_age` set, an observation older than `max_age` is rejected."""
        spec, h = self.spec, self.spec.history
        for cam, frames in self._frames.items():
            if len(frames) < h:
                raise ObservationError(f"not ready: camera {cam!r} has {len(frames)} of {h} frames")
        # reference camera: the one whose newest frame is the oldest
        ref = min(self._cams, key=lambda c: self._frames[c][-1][0])
        ref_frames = list(self._frames[ref])[-h:]
        ref_stamps = np.array([s for s, _ in ref_frames])
        features, frame_stamps = {}, {}
        step_stamps = ref_stamps.copy()
        for cam in self._cams:
            if cam == ref:
                chosen = ref_frames
            else:
                frames = self._frames[cam]
                stamps = np.array([s for s, _ in frames])
                idx = np.abs(stamps[None, :] - ref_stamps[:, None]).argmin(axis=1)
                for i, j in enumerate(idx):
                    skew = abs(stamps[j] - ref_stamps[i])
                    if skew > self.max_skew:
                        raise ObservationError(
                            f"cameras out of sync: camera {cam!r} has no frame within max_skew="
                            f"{self.max_skew:g} s of the frame of camera {ref!r} at t={ref_stamps[i]:.6f} "
                            f"(closest t={stamps[j]:.6f}, skew {skew * 1e3:.1f} ms)")
                if h > 1 and (np.diff(idx) <= 0).any():
                    raise ObservationError(
                        f"camera {cam!r} lacks distinct frames for the history of {h} around "
                        f"t={ref_stamps[-1]:.6f} (dropped frames?)")
                chosen = [frames[j] for j in idx]
            cam_stamps = np.array([s for s, _ in chosen])
            frame_stamps[cam] = cam_stamps
            step_stamps = np.maximum(step_stamps, cam_stamps)
            features[cam] = np.stack([x for _, x in chosen])
        stamp = float(step_stamps[-1])
        if now is not None and self.max_age is not None and float(now) - stamp > self.max_age:
            raise ObservationError(f"observation is stale: newest frame t={stamp:.6f} is "
                                   f"{float(now) - stamp:.3f} s old (max_age {self.max_age:g} s)")
        proprio = self._proprio_at(step_stamps) if self._joints else None
        return Observation(features, proprio, stamp, frame_stamps)

    def _proprio_at(self, times: np.ndarray) -> np.ndarray:
        if not self._j_seen.all():
            missing = [n for n, s in zip(self._joints, self._j_seen) if not s]
            other = sorted(self._other_joint_names)
            raise ObservationError(f"missing joint(s) {missing}: never received in a joint state"
                                   + (f" (received other joints: {other[:20]})" if other else ""))
        n = self._j_count
        stamps = self._j_stamps[:n] if n < self._joint_capacity else self._j_stamps
        pos = self._j_pos[:n] if n < self._joint_capacity else self._j_pos
        present = ~np.isnan(pos)  # [n, J]
        out = np.empty((len(times), len(self._joints)))
        for i, t in enumerate(times):
            dt = np.where(present, np.abs(stamps - t)[:, None], np.inf)  # [n, J]
            best = dt.argmin(axis=0)
            best_dt = dt[best, np.arange(len(self._joints))]
            bad = best_dt > self.proprio_tolerance
            if bad.any():
                j = int(np.flatnonzero(bad)[0])
                names = [self._joints[k] for k in np.flatnonzero(bad)]
                closest = "none kept" if math.isinf(best_dt[j]) else f"closest {best_dt[j] * 1e3:.1f} ms away"
                raise ObservationError(
                    f"no joint state for joint(s) {names} within proprio_tolerance="
                    f"{self.proprio_tolerance:g} s of frame t={t:.6f} ({closest})")
            out[i] = pos[best, np.arange(len(self._joints))]
        return out


def _check_stamp(stamp) -> float:
    try:
        stamp = float(stamp)
    except (TypeError, ValueError):
        raise ObservationError(f"stamp must be a number of seconds, got {stamp!r}") from None
    if not math.isfinite(stamp):
        raise ObservationError(f"stamp must be finite, got {stamp}")
    return stamp


# --------------------------------------------------------------------------------------------
# Policy


class Policy(abc.ABC):
    """Base class of all policies: observation in, one action out.

    Contract for implementers (subclass, then register an entry point in the group
    ``theia_ros.policies`` of your own package, ``name = "my_policy"``)::

        class MyPolicy(Policy):
            name = "my_policy"                       # the entry point name
            default_params = {"gain": 1.0}           # every accepted param with its default

            def __init__(self, observation_spec, action_spec, params=None, **kw):
                super().__init__(observation_spec, action_spec, params, **kw)
                ...                                  # check the specs, build the model from self.params

            def _act(self, observation):             # -> array-like [action_spec.dim]
                ...

    - :meth:`act` validates the observation against :attr:`observation_spec` (shapes, finite
      values), calls :meth:`_act`, checks its result is a finite float vector of
      ``action_spec.dim`` values, clips it to the action limits and returns float64.
      Policies raise :class:`PolicyError` (or a subclass) for anything they cannot act on.
    - :meth:`reset` clears per-episode state (history, latched targets); called before the
      first episode too. Override it (and call super) when the policy keeps state.
    - Weights: override :meth:`state_tensors` / :meth:`load_state_tensors`; they are stored
      in ``model.safetensors`` (never pickles) next to ``config.yaml``, which holds
      :meth:`to_config` (policy name, specs, params). Policies without tensors need no
      weights file.
    - Construction: ``Cls(observation_spec, action_spec, params)``, ``Cls.from_config(dict)``,
      ``Cls.from_pretrained(dir)`` or, by name, :func:`make_policy`. ``Policy.from_config``
      and ``Policy.from_pretrained`` on the base class pick the class from the config's
      ``policy`` entry.
    """

    #: registry (entry point) name; saved in config.yaml
    name: ClassVar[str] = ""
    #: accepted params and their defaults
    default_params: ClassVar[Mapping[str, Any]] = {}

    def __init__(self, observation_spec: ObservationSpec, action_spec: ActionSpec,
                 params: Mapping[str, Any] | None = None, **overrides: Any):
        if not isinstance(observation_spec, ObservationSpec):
            raise PolicyConfigError(
                f"observation_spec must be an ObservationSpec, got {type(observation_spec).__name__}")
        if not isinstance(action_spec, ActionSpec):
            raise PolicyConfigError(f"action_spec must be an ActionSpec, got {type(action_spec).__name__}")
        self._observation_spec = observation_spec
        self._action_spec = action_spec
        merged = dict(params or {})
        merged.update(overrides)
        unknown = sorted(set(merged) - set(self.default_params))
        if unknown:
            raise PolicyConfigError(
                f"{self._label()}: unknown params {unknown}; accepted: {sorted(self.default_params)}")
        self.params: dict[str, Any] = {**_deepcopy_plain(self.default_params), **merged}

    # ---- interface

    @property
    def observation_spec(self) -> ObservationSpec:
        return self._observation_spec

    @property
    def action_spec(self) -> ActionSpec:
        return self._action_spec

    def reset(self) -> None:
        """Clear per-episode state."""

    def act(self, observation: Observation, *, validate: bool = True) -> np.ndarray:
        """One action, float64 [action_spec.dim], clipped to the action limits."""
        if validate:
            observation.validate(self._observation_spec)
        raw = self._act(observation)
        try:
            action = np.array(raw, dtype=np.float64)  # a copy: never alias policy or observation state
        except (TypeError, ValueError):
            raise PolicyError(f"{self._label()} returned a non-numeric action {type(raw).__name__}") from None
        if action.shape != (self._action_spec.dim,):
            raise PolicyError(f"{self._label()} returned an action of shape {action.shape}, "
                              f"expected ({self._action_spec.dim},)")
        if not np.isfinite(action).all():
            raise PolicyError(f"{self._label()} returned a non-finite action {action.tolist()}")
        return self._action_spec.clip(action)

    @abc.abstractmethod
    def _act(self, observation: Observation):
        """Implementation of :meth:`act` on a validated observation; returns [action_spec.dim]."""

    # ---- weights

    def state_tensors(self) -> dict[str, Any]:
        """Named tensors (numpy arrays or torch tensors) to store in model.safetensors."""
        return {}

    def load_state_tensors(self, tensors: Mapping[str, Any]) -> None:
        """Load what :meth:`state_tensors` returned; raise :class:`CheckpointError` on mismatch."""
        if tensors:
            raise CheckpointError(f"{self._label()} has no weights but the checkpoint holds {sorted(tensors)[:10]}")

    def _read_weights(self, path: Path) -> dict[str, Any]:
        from safetensors.numpy import load_file
        return load_file(str(path))

    def _write_weights(self, path: Path, tensors: dict[str, Any], metadata: dict[str, str]) -> None:
        from safetensors.numpy import save_file
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata=metadata)

    # ---- config and checkpoints

    def to_config(self) -> dict:
        """The dict :meth:`from_config` accepts (plain YAML types)."""
        return {
            "format_version": FORMAT_VERSION,
            "policy": self.name or _dotted(type(self)),
            "class": _dotted(type(self)),
            "observation": self._observation_spec.to_dict(),
            "action": self._action_spec.to_dict(),
            "params": _to_plain(self.params),
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "Policy":
        """Build from ``{"observation": {...}, "action": {...}, "params": {...}}`` (plus the
        optional ``policy`` name, which must name this class)."""
        if not isinstance(config, Mapping):
            raise PolicyConfigError(f"policy config must be a mapping, got {type(config).__name__}")
        target = cls._class_for_config(config)
        allowed = {"format_version", "policy", "class", "observation", "action", "params"}
        unknown = sorted(set(config) - allowed)
        if unknown:
            raise PolicyConfigError(f"unknown policy config keys {unknown}; allowed: {sorted(allowed)}")
        version = config.get("format_version", FORMAT_VERSION)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise PolicyConfigError(f"config format_version {version!r} is newer than this code ({FORMAT_VERSION})")
        for key in ("observation", "action"):
            if key not in config:
                raise PolicyConfigError(f"policy config lacks the '{key}' section")
        params = config.get("params") or {}
        if not isinstance(params, Mapping):
            raise PolicyConfigError(f"'params' must be a mapping, got {type(params).__name__}")
        return target(ObservationSpec.from_dict(config["observation"]), ActionSpec.from_dict(config["action"]),
                      dict(params))

    @classmethod
    def _class_for_config(cls, config: Mapping[str, Any]) -> type["Policy"]:
        name = config.get("policy")
        if cls is Policy or getattr(cls, "__abstractmethods__", None):
            if not name:
                raise PolicyConfigError(f"config has no 'policy' entry; cannot choose a class via {cls.__name__}")
            try:
                target = load_policy_class(name)
            except UnknownPolicyError:
                if not config.get("class"):
                    raise
                target = load_policy_class(config["class"])
            if not issubclass(target, cls):
                raise PolicyConfigError(f"policy {name!r} ({_dotted(target)}) is not a {cls.__name__}")
            return target
        if name is not None and name not in {cls.name, _dotted(cls)} and config.get("class") != _dotted(cls):
            raise PolicyConfigError(f"config is for policy {name!r}, not {cls.name or _dotted(cls)!r}")
        return cls

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write ``config.yaml`` and ``model.safetensors`` into directory `path` (created)."""
        import yaml
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = self.state_tensors()
        meta = {"policy": self.name or _dotted(type(self)), "format_version": str(FORMAT_VERSION)}
        _atomic_write(path / CONFIG_FILE, lambda p: Path(p).write_text(
            yaml.safe_dump(self.to_config(), sort_keys=False, default_flow_style=None)))
        _atomic_write(path / WEIGHTS_FILE, lambda p: self._write_weights(Path(p), tensors, meta))
        return path

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, overrides: Mapping[str, Any] | None = None) -> "Policy":
        """Load a directory written by :meth:`save_pretrained`.

        `overrides` is merged into the stored config before construction (nested mappings are
        merged, e.g. ``{"observation": {"cameras": ["cam0"]}}`` or tighter action limits); the
        weights must still fit exactly. Raises :class:`CheckpointError` for a missing or
        unreadable directory/file and for weights that do not fit."""
        path = Path(path)
        config = read_config(path)
        if overrides:
            config = _deep_merge(config, overrides)
        try:
            target = cls._class_for_config(config)
            policy = target.from_config(config)
        except PolicyConfigError as exc:
            raise CheckpointError(f"{path / CONFIG_FILE}: {exc}") from exc
        weights = path / WEIGHTS_FILE
        if not weights.is_file():
            if policy.state_tensors():
                raise CheckpointError(f"checkpoint {path} lacks {WEIGHTS_FILE} (policy {policy._label()} has weights)")
            return policy
        try:
            tensors = policy._read_weights(weights)
        except Exception as exc:  # safetensors raises its own error type for corrupt files
            raise CheckpointError(f"{weights}: not a readable safetensors file ({type(exc).__name__}: {exc})") from exc
        try:
            policy.load_state_tensors(tensors)
        except CheckpointError as exc:
            raise CheckpointError(f"{weights}: {exc}") from exc
        return policy

    # ---- misc

    def _label(self) -> str:
        return f"policy {self.name or type(self).__name__!r}"

    def __repr__(self) -> str:
        o, a = self._observation_spec, self._action_spec
        return (f"{type(self).__name__}(cameras={o.cameras}, representation={o.representation!r}, "
                f"feature_shape={o.feature_shape}, history={o.history}, proprio={len(o.proprio_joints)}, "
                f"action={a.dim} {a.mode})")


def read_config(path: str | os.PathLike) -> dict:
    """config.yaml of checkpoint directory `path` as a dict (CheckpointError if unreadable)."""
    import yaml
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is not a directory (expected {CONFIG_FILE} + {WEIGHTS_FILE})")
    cfg_path = path / CONFIG_FILE
    if not cfg_path.is_file():
        raise CheckpointError(f"checkpoint {path} lacks {CONFIG_FILE}")
    try:
        config = yaml.safe_load(cfg_path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{cfg_path}: not valid YAML ({exc})") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{cfg_path}: expected a mapping, got {type(config).__name__}")
    return config


def _atomic_write(target: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _deep_merge(base: Mapping, override: Mapping) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def _to_plain(x):
    if isinstance(x, Mapping):
        return {str(k): _to_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_plain(v) for v in x]
    if isinstance(x, np.ndarray):
        return _to_plain(x.tolist())
    if isinstance(x, np.generic):
        return x.item()
    return x


def _deepcopy_plain(x):
    import copy
    return copy.deepcopy(dict(x))


def _dotted(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


# --------------------------------------------------------------------------------------------
# Registry


def available_policies() -> dict[str, str]:
    """Entry point name -> ``module:attr`` of every installed policy (group theia_ros.policies)."""
    found: dict[str, str] = {}
    conflicts: dict[str, set[str]] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in found and found[ep.name] != ep.value:
            conflicts.setdefault(ep.name, {found[ep.name]}).add(ep.value)
        found.setdefault(ep.name, ep.value)
    if conflicts:
        raise PolicyError(f"conflicting '{ENTRY_POINT_GROUP}' entry points: "
                          + "; ".join(f"{n!r} -> {sorted(v)}" for n, v in sorted(conflicts.items())))
    return dict(sorted(found.items()))


def load_policy_class(name: str) -> type[Policy]:
    """The Policy subclass for `name`: an entry point name in the group ``theia_ros.policies``,
    or a dotted path ``package.module:Class`` / ``package.module.Class``."""
    if not isinstance(name, str) or not name:
        raise UnknownPolicyError(f"policy name must be a non-empty string, got {name!r}")
    registered = available_policies()
    if name in registered:
        target = registered[name]
        try:
            obj = _import_dotted(target)
        except (ImportError, AttributeError) as exc:
            raise PolicyError(f"policy entry point {name!r} = {target!r} failed to load: "
                              f"{type(exc).__name__}: {exc}") from exc
        return _check_policy_class(obj, f"entry point {name!r} ({target})")
    if ":" in name or "." in name:
        try:
            obj = _import_dotted(name)
        except (ImportError, AttributeError, ValueError) as exc:
            module_name = name.partition(":")[0] if ":" in name else name.rpartition(".")[0]
            if isinstance(exc, ImportError):
                missing = exc.name if isinstance(exc, ModuleNotFoundError) else None
                if not missing or not (module_name == missing or module_name.startswith(missing + ".")):
                    raise  # the module exists but one of its own imports failed: show that
            raise UnknownPolicyError(
                f"unknown policy {name!r}: cannot import it ({type(exc).__name__}: {exc}); registered "
                f"policies: {sorted(registered) or 'none'}") from exc
        return _check_policy_class(obj, repr(name))
    raise UnknownPolicyError(
        f"unknown policy {name!r}; registered policies ('{ENTRY_POINT_GROUP}' entry points): "
        f"{sorted(registered) or 'none'}; or give a dotted path 'package.module:Class'")


def _import_dotted(path: str):
    if ":" in path:
        module_name, _, attr = path.partition(":")
    else:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"not a dotted path 'package.module:Class': {path!r}")
    obj = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _check_policy_class(obj, what: str) -> type[Policy]:
    if not (isinstance(obj, type) and issubclass(obj, Policy)):
        raise PolicyError(f"{what} is {obj!r}, not a subclass of theia_ros.policies.Policy")
    return obj


def make_policy(name: str | None, config: Mapping[str, Any] | None = None,
                checkpoint: str | os.PathLike | None = None) -> Policy:
    """A policy by registry name or dotted path.

    - checkpoint given: :meth:`Policy.from_pretrained` (`config`, if any, overrides parts of
      the stored config); `name` may be None (taken from the checkpoint) or must match it.
    - no checkpoint: ``from_config(config)``; `config` needs the ``observation`` and ``action``
      sections and may hold ``params``.
    """
    if checkpoint is not None:
        if name is None:
            return Policy.from_pretrained(checkpoint, overrides=config)
        return load_policy_class(name).from_pretrained(checkpoint, overrides=config)
    if name is None:
        if config is None:
            raise PolicyConfigError("make_policy needs a name, a config or a checkpoint")
        return Policy.from_config(config)
    if config is None:
        raise PolicyConfigError(f"policy {name!r} needs a config with 'observation' and 'action' sections "
                                "(or a checkpoint)")
    cls = load_policy_class(name)
    config = dict(config)
    config.setdefault("policy", cls.name or _dotted(cls))
    return cls.from_config(config)
