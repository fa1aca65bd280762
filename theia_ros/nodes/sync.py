"""Approximate-time matching of camera frames by header stamp (message_filters is not on PyPI)."""


class FrameSynchronizer:
    """Keeps the newest frame of each camera; emits a set once all cameras' newest frames lie
    within `slop` seconds of each other. A frame that can no longer be matched (older than the
    newest frame of another camera by more than the slop) is dropped and counted."""

    def __init__(self, cameras, slop):
        if not cameras:
            raise ValueError("FrameSynchronizer needs at least one camera")
        self.cameras = list(cameras)
        self.slop = float(slop)
        self.pending = {}
        self.dropped = {camera: 0 for camera in self.cameras}

    def add(self, camera, stamp, frame):
        """Offer a frame; returns {camera: (stamp, frame)} for a complete set, else None."""
        if camera not in self.dropped:
            raise KeyError(f"unknown camera {camera!r}; configured: {self.cameras}")
        if camera in self.pending:
            self.dropped[camera] += 1  # superseded before a match: the newest frame wins
        self.pending[camera] = (stamp, frame)
        newest = max(s for s, _ in self.pending.values())
        for other, (s, _) in list(self.pending.items()):
            if newest - s > self.slop:
                del self.pending[other]
                self.dropped[other] += 1
        if len(self.pending) == len(self.cameras):
            matched, self.pending = self.pending, {}
            return {camera: matched[camera] for camera in self.cameras}
        return None

    def reset(self):
        self.pending = {}
