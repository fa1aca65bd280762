"""Stamp alignment of features and joint states into observations: :class:`ObservationBuffer`.

An adapter (the ROS policy node, a replay script, a simulator loop) pushes each camera's features
and each joint state message; the buffer checks every message against the policy's
:class:`~theia_ros.policies.specs.ObservationSpec` as it arrives (shape, dtype, finite values,
increasing stamps) and builds aligned observations from what it kept, which
:meth:`~theia_ros.policies.policy.Policy.act` then trusts.

Clocks: a message may also say when it arrived (``arrival``, on the receiver's clock, the one its
watchdog reads). Then :meth:`ObservationBuffer.age` is never less than the time since the newest
complete set arrived, whatever the stamps say (a camera whose clock runs ahead cannot keep a stalled
stream looking fresh), and a stamp further ahead of its arrival than ``max_future_stamp`` is refused
(:class:`FutureStampError`) before it leaves any trace.
"""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence

import numpy as np

from theia_ros.features import Preprocessing
from theia_ros.policies.errors import ObservationError
from theia_ros.policies.specs import Observation, ObservationSpec, check_finite


class FutureStampError(ObservationError):
    """A message stamped further ahead of the receiver's clock than the buffer tolerates."""


class EncoderMismatchError(ObservationError):
    """Features from another encoder model or other weights than the policy was trained on (the same
    shapes, different features): the message says both."""


class PreprocessingMismatchError(ObservationError):
    """Features preprocessed otherwise than the policy's were trained on (profile, input size or
    position-embedding interpolation): the message says both."""


def check_not_ahead(stamp: float, arrival: float, tolerance: float | None, what: str) -> None:
    """Raise :class:`FutureStampError` when `stamp` lies more than `tolerance` seconds after `arrival`
    (None: any stamp is accepted)."""
    if tolerance is not None and stamp - arrival > tolerance:
        raise FutureStampError(f"{what} stamped t={stamp:.6f}, {stamp - arrival:.3f} s ahead of the receiver's clock "
                               f"(max_future_stamp {tolerance:g} s): treated as not received")


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

    Arrival (the ``arrival`` argument of the push methods, seconds on the receiver's clock; default:
    the stamp itself): :meth:`age` is the larger of the stamp age and the arrival age, and a stamp more
    than `max_future_stamp` seconds (None: no limit) ahead of its arrival is refused.

    Not thread-safe: guard it with a lock if callbacks run concurrently.
    """

    def __init__(self, spec: ObservationSpec, *, max_skew: float = 0.05, proprio_tolerance: float = 0.05,
                 frame_capacity: int | None = None, joint_capacity: int = 1000, max_future_stamp: float | None = None):
        if max_skew < 0 or proprio_tolerance < 0:
            raise ValueError("max_skew and proprio_tolerance must be >= 0")
        if max_future_stamp is not None and max_future_stamp < 0:
            raise ValueError("max_future_stamp must be >= 0 (or None)")
        self.max_future_stamp = None if max_future_stamp is None else float(max_future_stamp)
        self.spec = spec
        self._trained = spec.trained_preprocessing
        self.max_skew = float(max_skew)
        self.proprio_tolerance = float(proprio_tolerance)
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
        self._arrived = {c: -math.inf for c in self._cams}  # arrival of each camera's newest frame
        n = len(self._joints)
        self._j_stamps = np.full(self._joint_capacity, np.nan)
        self._j_pos = np.full((self._joint_capacity, n), np.nan)
        self._j_next = 0  # ring buffer write index
        self._j_count = 0
        self._j_seen = np.zeros(n, dtype=bool)
        self._j_newest = np.full(n, -math.inf)  # per joint
        self._j_arrived = np.full(n, -math.inf)  # per joint: arrival of its newest state
        self._other_joint_names: set[str] = set()

    # ---- input

    def push_features(self, camera: str, stamp: float, array, *, representation: str | None = None,
                      model_id: str | None = None, weights_id: str | None = None,
                      preprocessing: Preprocessing | None = None, arrival: float | None = None) -> None:
        """Add one camera's features (copied as float32). `representation`, `model_id`, `weights_id` and
        `preprocessing` (a :class:`~theia_ros.features.Preprocessing`, e.g.
        :func:`~theia_ros.features.preprocessing_of` the message), when given, are checked against the
        spec (another model or weights: :class:`EncoderMismatchError`, other preprocessing:
        :class:`PreprocessingMismatchError`); `arrival`: when it arrived (see the class)."""
        spec = self.spec
        if camera not in self._frames:
            raise ObservationError(f"unknown camera {camera!r}; the policy observes {self._cams}")
        stamp = _check_stamp(stamp)
        arrival = stamp if arrival is None else _check_stamp(arrival)
        check_not_ahead(stamp, arrival, self.max_future_stamp, f"camera {camera!r}: features")
        if representation is not None and representation != spec.representation:
            raise ObservationError(
                f"camera {camera!r}: representation {representation!r}, the policy needs {spec.representation!r}")
        if weights_id is not None and spec.weights_id is not None:  # the weights decide: a model id may be a path
            if weights_id != spec.weights_id:
                raise EncoderMismatchError(f"camera {camera!r}: features from weights {weights_id!r}, the policy "
                                           f"was trained on features of {spec.weights_id!r}")
        elif model_id is not None and spec.model_id is not None and model_id != spec.model_id:
            raise EncoderMismatchError(f"camera {camera!r}: features from model {model_id!r}, the policy "
                                       f"was trained on {spec.model_id!r}")
        if preprocessing is not None:
            why = self._trained.mismatch(preprocessing)
            if why is not None:
                raise PreprocessingMismatchError(f"camera {camera!r}: {why}")
        x = np.asarray(array)
        if x.shape != spec.feature_shape:
            raise ObservationError(f"camera {camera!r}: features have shape {x.shape}, expected "
                                   f"{spec.feature_shape} ({spec.representation})")
        if x.dtype.kind not in "fiu" and x.dtype.name != "bfloat16":
            raise ObservationError(f"camera {camera!r}: features have non-numeric dtype {x.dtype}")
        x = x.astype(np.float32, copy=True)
        check_finite(x, f"camera {camera!r} features at t={stamp:.6f}")
        frames = self._frames[camera]
        if frames and stamp <= frames[-1][0]:
            raise ObservationError(
                f"camera {camera!r}: stamp {stamp:.6f} is not newer than the previous frame's "
                f"{frames[-1][0]:.6f} (call clear() after a clock jump)")
        frames.append((stamp, x))
        self._arrived[camera] = arrival

    def push_joint_state(self, stamp: float, names: Sequence[str], positions, velocities=None, *,
                         arrival: float | None = None) -> None:
        """Add one joint state message. Only ``spec.proprio_joints`` are kept (positions);
        `velocities` may be empty or None, else its length must match `names`; `arrival`: when it
        arrived (see the class)."""
        stamp = _check_stamp(stamp)
        arrival = stamp if arrival is None else _check_stamp(arrival)
        check_not_ahead(stamp, arrival, self.max_future_stamp, "joint state")
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
        self._j_arrived[present] = np.maximum(self._j_arrived[present], arrival)

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

    def newest_arrival(self) -> float:
        """When the newest complete set arrived: the oldest of the arrivals of each camera's newest
        frame and each proprio joint's newest state (-inf while anything is missing)."""
        arrivals = list(self._arrived.values())
        if self._joints:
            arrivals.append(float(self._j_arrived.min()))
        return min(arrivals)

    def age(self, now: float) -> float:
        """Seconds from the newest complete set to `now` (inf while anything is missing): the larger of
        the age by stamp (:meth:`newest_stamp`) and the age by arrival (:meth:`newest_arrival`), for a
        watchdog that stops the robot when a camera or the joint states stall, whatever their clocks say."""
        now = float(now)
        return max(now - self.newest_stamp(), now - self.newest_arrival())

    # ---- output

    def build(self) -> Observation:
        """The newest aligned observation, checked against the spec (every pushed message was);
        raises :class:`ObservationError` when there is none. Staleness is the caller's watchdog:
        compare :meth:`age` with its limit."""
        h = self.spec.history
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
        proprio = self._proprio_at(step_stamps) if self._joints else None
        return Observation.checked(self.spec, features, proprio, float(step_stamps[-1]), frame_stamps)

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
