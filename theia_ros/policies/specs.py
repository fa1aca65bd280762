"""What a policy observes and commands: :class:`ObservationSpec`, :class:`ActionSpec`, and one
aligned :class:`Observation` (plain Python and numpy).

An observation is checked against its spec once: :class:`~theia_ros.policies.buffer.ObservationBuffer`
checks every message as it is pushed and builds observations :meth:`Observation.checked` against
its spec; :meth:`~theia_ros.policies.policy.Policy.act` validates any other observation (one built by
hand) before acting on it.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from theia_ros.features import (
    DEFAULT_POS_INTERPOLATION,
    DEFAULT_PREPROCESSING,
    POS_INTERPOLATIONS,
    PREPROCESSING_PROFILES,
    REFERENCE_INPUT_SIZE,
    Preprocessing,
    check_input_size,
)
from theia_ros.policies.errors import ObservationError, PolicyConfigError
from theia_ros.representations import REPRESENTATIONS, TEACHER_PREFIX


def _is_square(n: int) -> bool:
    r = math.isqrt(n)
    return r * r == n


def check_names(kind: str, names: Sequence[str], allow_empty: bool) -> list[str]:
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
    weights_id: optional id of the encoder weights the features came from (the Features message's
        ``weights_id``: ``sha256:<file hash>`` or ``random:<variant>:seed=<n>``); when set, features
        tagged with other weights are rejected (another revision of a model, another random seed) and
        the weights decide instead of `model_id` (the same weights loaded from another directory,
        whose path is their model id, are accepted).
    preprocessing, input_size, pos_interpolation: how the features were made (the Features
        message's fields of those names, see :class:`theia_ros.features.Preprocessing`): features
        made otherwise are refused. None: "theia"; input_size None: 224x224 for "theia", any size
        (not checked) for "isaaclab"; pos_interpolation None: "scale_factor". A spec (a checkpoint)
        without them therefore means the reference preprocessing at 224x224. With input_size,
        feature_shape must fit its patch grid (input_size // 16).
    """

    cameras: list[str]
    representation: str
    feature_shape: tuple[int, ...]
    proprio_joints: list[str] = field(default_factory=list)
    history: int = 1
    model_id: str | None = None
    weights_id: str | None = None
    preprocessing: str | None = None
    input_size: tuple[int, int] | None = None
    pos_interpolation: str | None = None

    def __post_init__(self):
        self.cameras = check_names("cameras", self.cameras, allow_empty=False)
        self.proprio_joints = check_names("proprio_joints", self.proprio_joints, allow_empty=True)
        try:
            self.feature_shape = tuple(int(d) for d in self.feature_shape)
        except (TypeError, ValueError):
            raise PolicyConfigError(f"feature_shape must be a sequence of ints, got {self.feature_shape!r}") from None
        if not self.feature_shape or any(d <= 0 for d in self.feature_shape):
            raise PolicyConfigError(f"feature_shape must be non-empty and positive, got {self.feature_shape}")
        if isinstance(self.history, bool) or not isinstance(self.history, (int, np.integer)) or self.history < 1:
            raise PolicyConfigError(f"history must be an int >= 1, got {self.history!r}")
        self.history = int(self.history)
        for key in ("model_id", "weights_id"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or not value):
                raise PolicyConfigError(f"{key} must be a non-empty string (or absent), got {value!r}")
        if self.preprocessing is not None and self.preprocessing not in PREPROCESSING_PROFILES:
            raise PolicyConfigError(f"preprocessing must be one of {list(PREPROCESSING_PROFILES)}, got "
                                    f"{self.preprocessing!r}")
        if self.pos_interpolation is not None and self.pos_interpolation not in POS_INTERPOLATIONS:
            raise PolicyConfigError(f"pos_interpolation must be one of {list(POS_INTERPOLATIONS)}, got "
                                    f"{self.pos_interpolation!r}")
        if self.input_size is not None:
            try:
                self.input_size = check_input_size(self.input_size)
            except ValueError as exc:
                raise PolicyConfigError(str(exc)) from None
        rep, shape = self.representation, self.feature_shape
        if not isinstance(rep, str):
            raise PolicyConfigError(f"representation must be a string, got {rep!r}")
        expected_ndim = {"tokens": 2, "all_tokens": 2, "spatial": 3, "cls": 1, "mean": 1, "max": 1}
        grid = self.trained_preprocessing.patch_grid if self.input_size is not None else None
        if rep in expected_ndim:
            ok = len(shape) == expected_ndim[rep]
            if ok and grid is not None:  # the recorded input size fixes the patch grid
                ok = {"tokens": shape[0] == grid[0] * grid[1], "all_tokens": shape[0] == 1 + grid[0] * grid[1],
                      "spatial": tuple(shape[1:]) == grid}.get(rep, True)
            elif ok and rep == "tokens" and self.preprocessing != "isaaclab":
                ok = _is_square(shape[0])
            elif ok and rep == "all_tokens" and self.preprocessing != "isaaclab":
                ok = _is_square(shape[0] - 1)
            if not ok:
                grid_text = f" on the {grid[0]}x{grid[1]} patch grid of input_size {self.input_size}" if grid else ""
                raise PolicyConfigError(f"feature_shape {shape} does not fit representation {rep!r} "
                                        f"({REPRESENTATIONS[rep]}){grid_text}")
        elif not rep.startswith(TEACHER_PREFIX):
            raise PolicyConfigError(
                f"unknown representation {rep!r}; known: {sorted(REPRESENTATIONS)} or '{TEACHER_PREFIX}<id>'")

    @property
    def trained_preprocessing(self) -> Preprocessing:
        """The preprocessing of the features this spec accepts (the defaults filled in, see the class)."""
        profile = self.preprocessing or DEFAULT_PREPROCESSING
        size = self.input_size or (REFERENCE_INPUT_SIZE if profile == DEFAULT_PREPROCESSING else None)
        return Preprocessing(profile, size, self.pos_interpolation or DEFAULT_POS_INTERPOLATION)

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
        for key in ("model_id", "weights_id"):  # absent: not checked
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        for key in ("preprocessing", "input_size", "pos_interpolation"):  # absent: the reference (see the class)
            value = getattr(self, key)
            if value is not None:
                d[key] = list(value) if key == "input_size" else value
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
        self.joint_names = check_names("joint_names", self.joint_names, allow_empty=False)
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
    # the spec the builder checked every part against (see checked()); None: not checked yet
    _checked_against: ObservationSpec | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def checked(cls, spec: ObservationSpec, features: dict[str, np.ndarray], proprio: np.ndarray | None,
                stamp: float, frame_stamps: dict[str, np.ndarray] | None = None) -> "Observation":
        """An observation whose parts the caller has already checked against `spec` (shapes, finite
        values), as :class:`~theia_ros.policies.buffer.ObservationBuffer` checks each pushed message:
        :meth:`ensure_valid` with that spec does not check it again."""
        observation = cls(features, proprio, stamp, frame_stamps if frame_stamps is not None else {})
        observation._checked_against = spec
        return observation

    def ensure_valid(self, spec: ObservationSpec) -> None:
        """:meth:`validate` against `spec`, unless this observation was built :meth:`checked` against it."""
        if self._checked_against is not spec:
            self.validate(spec)

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
            check_finite(x, f"camera {cam!r} features")
        if spec.proprio_joints:
            if self.proprio is None:
                raise ObservationError(f"observation lacks proprio for joints {spec.proprio_joints}")
            p = np.asarray(self.proprio)
            if p.shape != (spec.history, len(spec.proprio_joints)):
                raise ObservationError(
                    f"proprio has shape {p.shape}, expected ({spec.history}, {len(spec.proprio_joints)})")
            check_finite(p, "proprio")


def check_finite(x: np.ndarray, what: str) -> None:
    """Raise :class:`ObservationError` unless `x` is numeric and free of NaN and inf."""
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
