"""Counters, rates and latency percentiles for diagnostics (plain Python, no ROS)."""
import collections
import time

import numpy as np


class LatencyWindow:
    """The last `size` samples (seconds); percentiles in milliseconds."""

    def __init__(self, size=300):
        self.samples = collections.deque(maxlen=size)

    def add(self, seconds):
        self.samples.append(seconds)

    def percentiles_ms(self, qs=(50, 99)):
        if not self.samples:
            return {q: float("nan") for q in qs}
        values = np.percentile(np.fromiter(self.samples, float, len(self.samples)), qs) * 1e3
        return dict(zip(qs, values.tolist()))


class RateMeter:
    """Events per second over the last `window` seconds (or since the first event, if sooner)."""

    def __init__(self, window=5.0, clock=time.monotonic):
        self.window = window
        self.clock = clock
        self.times = collections.deque()
        self.first = None

    def tick(self, now=None):
        now = self.clock() if now is None else now
        if self.first is None:
            self.first = now
        self.times.append(now)
        self._trim(now)

    def rate(self, now=None):
        now = self.clock() if now is None else now
        self._trim(now)
        if self.first is None:
            return 0.0
        span = min(self.window, now - self.first)
        return len(self.times) / span if span > 0 else 0.0

    def _trim(self, now):
        while self.times and now - self.times[0] > self.window:
            self.times.popleft()


class SequenceGapCounter:
    """Frames a subscriber never saw, from DDS publication sequence numbers (one publisher)."""

    def __init__(self):
        self.last = None

    def observe(self, sequence):
        """Frames missing between the previous sequence number and this one (0 for None or a restart)."""
        if sequence is None:
            return 0
        gap = 0
        if self.last is not None and sequence > self.last + 1:
            gap = sequence - self.last - 1
        self.last = sequence  # a smaller number means a restarted publisher: start again from it
        return gap


class StageStats:
    """Per-stage latency windows, counters and rates for one source (a camera, a node)."""

    def __init__(self, stages, counters, rates):
        self.latency = {stage: LatencyWindow() for stage in stages}
        self.counts = collections.Counter({name: 0 for name in counters})
        self.rates = {name: RateMeter() for name in rates}

    def summary(self):
        """Flat {name: value} for a diagnostics status or a log line."""
        out = {}
        for name, meter in self.rates.items():
            out[f"{name}_hz"] = round(meter.rate(), 2)
        for stage, window in self.latency.items():
            p = window.percentiles_ms()
            out[f"{stage}_ms_p50"] = round(p[50], 3)
            out[f"{stage}_ms_p99"] = round(p[99], 3)
        out.update(self.counts)
        return out


class LogThrottle:
    """At most one log line per key every `period` seconds, saying how many were held back.

    rclpy's throttle is per call site: one noisy reason (say a camera with a wrong encoding)
    would hide every other. Keyed by (source, reason), each reason gets its own line.
    """

    def __init__(self, period=2.0, clock=time.monotonic):
        self.period = period
        self.clock = clock
        self.last = {}
        self.held = collections.Counter()

    def __call__(self, key):
        """None when this line should be held back, else a suffix noting held-back lines."""
        now = self.clock()
        if key in self.last and now - self.last[key] < self.period:
            self.held[key] += 1
            return None
        self.last[key] = now
        held, self.held[key] = self.held[key], 0
        return f" ({held} more since the last report)" if held else ""
