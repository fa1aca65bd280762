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


class ArrivalAccounting:
    """Where the frames one publisher sent to a depth-1 subscription went, told apart honestly.

    A subscription of depth 1 keeps only the newest sample in its DDS reader: while the executor is
    busy (an inference), newer frames replace older ones there before any callback sees them. The
    publication sequence numbers of the frames the callback does take then show gaps, and a gap
    alone cannot say whether the missing frames reached this process or not. DDS can: its
    "sample lost" status (rclpy's message_lost event) counts samples that never reached the reader
    (lost in transport, or dropped by the writer before sending). So, per camera:

    * ``taken``: frames the callback took;
    * ``lost``: frames that never arrived (DDS's count), when the middleware reports it;
    * ``replaced_in_reader``: sequence gaps minus ``lost``: frames that arrived while the node was
      busy and were replaced by a newer one in the reader before the callback could take them;
    * ``arrived``: ``taken + replaced_in_reader``, every frame that reached this process.

    Without the event (a middleware that does not report lost samples) every gap counts as lost:
    an upper bound, as before. Assumes one publisher per topic (sequence numbers are per writer).
    """

    def __init__(self, reports_lost=True):
        self.sequence = SequenceGapCounter()
        self.taken = 0
        self.gaps = 0
        self.reports_lost = reports_lost  # False: the middleware does not report lost samples
        self.lost_reported = 0  # the current subscription's count
        self.lost_before = 0  # earlier subscriptions' (a lifecycle node re-activated)

    def new_subscription(self):
        """A new subscription (re-activation): DDS counts from 0 again, and frames published while
        there was none were not sent to this node (no gap)."""
        self.lost_before += self.lost_reported
        self.lost_reported = 0
        self.sequence = SequenceGapCounter()

    def took(self, sequence):
        """A frame taken by the callback, with its publication sequence number (None if unknown)."""
        self.taken += 1
        self.gaps += self.sequence.observe(sequence)

    def message_lost(self, total_count):
        """DDS's running count of samples that never reached the reader (the message_lost event)."""
        self.lost_reported = int(total_count)

    @property
    def lost(self):
        return self.lost_before + self.lost_reported if self.reports_lost else self.gaps

    @property
    def replaced_in_reader(self):
        # the event can be handled just before the callback that shows the same gap: never negative
        return max(0, self.gaps - self.lost) if self.reports_lost else 0

    @property
    def arrived(self):
        return self.taken + self.replaced_in_reader


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
