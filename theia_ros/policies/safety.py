"""Command safety that does not depend on the policy being good (plain Python, no ROS).

Every action passes through `CommandFilter.filter()` before it reaches a robot: non-finite actions
are rejected (nothing is sent), positions are clamped to the joint limits, and each step's change
is clamped to `max_velocity * dt`. The filter counts what it did, for diagnostics. :func:`step_dt` is the
dt to pass: the time since the last command, never more than one command period, so the first command
after a stale period or a pause steps as far as one period allows, not as far as the whole gap would.
"""
import collections

import numpy as np


def step_dt(last_time, now, period):
    """Seconds the next step may cover: `now - last_time`, at most `period` (one command period); one period
    when nothing was commanded yet (`last_time` None: the step from the measured position) or when the clock
    went back."""
    if last_time is None:
        return float(period)
    dt = float(now) - float(last_time)
    return dt if 0.0 < dt < period else float(period)


class CommandFilter:
    def __init__(self, joint_names, lower=None, upper=None, max_velocity=None, mode="position"):
        n = len(joint_names)
        self.joint_names = list(joint_names)
        self.mode = mode
        self.lower = np.full(n, -np.inf) if lower is None or len(lower) == 0 else np.asarray(lower, float)
        self.upper = np.full(n, np.inf) if upper is None or len(upper) == 0 else np.asarray(upper, float)
        for name, limits in (("lower", self.lower), ("upper", self.upper)):
            if limits.shape != (n,):
                raise ValueError(f"{name} joint limits have {limits.size} values for {n} joints")
        if np.any(self.lower > self.upper):
            raise ValueError(f"lower limits exceed upper limits for joints "
                             f"{[j for j, bad in zip(self.joint_names, self.lower > self.upper) if bad]}")
        self.max_velocity = None if max_velocity is None or max_velocity <= 0 else float(max_velocity)
        self.counts = collections.Counter(rejected_nonfinite=0, rejected_shape=0, clamped_position=0,
                                          clamped_velocity=0, passed=0)

    def filter(self, action, previous=None, dt=None):
        """The safe command for `action`, or None when it must not be sent.

        previous: the last command sent (or the measured position before the first one), for the
        velocity limit in position mode; dt: seconds the step may cover (:func:`step_dt`; 0: no change).
        """
        action = np.asarray(action, dtype=np.float64).reshape(-1)
        if action.shape != (len(self.joint_names),):
            self.counts["rejected_shape"] += 1
            return None
        if not np.all(np.isfinite(action)):
            self.counts["rejected_nonfinite"] += 1
            return None
        command = action
        if self.mode == "velocity" and self.max_velocity is not None:
            limited = np.clip(command, -self.max_velocity, self.max_velocity)
            if not np.array_equal(limited, command):
                self.counts["clamped_velocity"] += 1
            command = limited
        if self.mode == "position" and self.max_velocity is not None and previous is not None and dt is not None:
            previous = np.asarray(previous, dtype=np.float64)
            step = self.max_velocity * max(float(dt), 0.0)
            limited = np.clip(command, previous - step, previous + step)
            if not np.array_equal(limited, command):
                self.counts["clamped_velocity"] += 1
            command = limited
        clamped = np.clip(command, self.lower, self.upper)
        if not np.array_equal(clamped, command):
            self.counts["clamped_position"] += 1
        self.counts["passed"] += 1
        return clamped
