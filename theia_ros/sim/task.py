"""The reach task: bring the gripper above a coloured cube whose place on the table is random.

The cube's position is drawn per episode from a seed, so only vision tells where to go (the policy
does not see the simulator's state). Success: the end effector (the point between the finger tips'
bases, site `end_effector`) stays within `success_distance` of the point `target_height` above the
cube's centre for `success_hold` seconds; success is latched for the rest of the episode.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_PLASTIC = 1.32471795724474602596  # R2 sequence (Roberts 2018): low-discrepancy points in the unit square
R2_STEP = (1.0 / _PLASTIC, 1.0 / _PLASTIC ** 2)


@dataclass
class ReachConfig:
    object_x: tuple = (0.38, 0.62)  # m, table frame = robot base frame
    object_y: tuple = (-0.22, 0.22)
    # quasi_random: the cube's (x, y) is point `seed` of the R2 low-discrepancy sequence, so any run of
    # consecutive seeds (a set of demonstrations, an evaluation) covers the area evenly; uniform: drawn
    # from the seeded generator. Either way a seed always gives the same place.
    placement: str = "quasi_random"
    random_yaw: bool = True
    target_height: float = 0.12  # m above the cube's centre
    success_distance: float = 0.05  # m
    success_hold: float = 0.5  # s
    min_distractor_spacing: float = 0.12  # m


class ReachTask:
    name = "reach"

    def __init__(self, config: ReachConfig | None = None):
        self.config = config or ReachConfig()
        self.reset(0.0)

    def sample_object(self, rng: np.random.Generator, seed: int = 0):
        """(x, y, yaw) of the cube for the episode of `seed` (rng: seeded with it)."""
        c = self.config
        if c.placement == "quasi_random":
            u = (0.5 + seed * R2_STEP[0]) % 1.0, (0.5 + seed * R2_STEP[1]) % 1.0
        elif c.placement == "uniform":
            u = rng.uniform(), rng.uniform()
        else:
            raise ValueError(f"placement {c.placement!r}: quasi_random or uniform")
        x = c.object_x[0] + u[0] * (c.object_x[1] - c.object_x[0])
        y = c.object_y[0] + u[1] * (c.object_y[1] - c.object_y[0])
        yaw = rng.uniform(0.0, np.pi / 2) if c.random_yaw else 0.0
        return float(x), float(y), float(yaw)

    def sample_distractors(self, rng, count, cube_xy):
        """Places of `count` distractors, away from the cube and from each other."""
        c = self.config
        placed = [np.asarray(cube_xy)]
        out = []
        for _ in range(count):
            for _attempt in range(100):
                xy = np.array([rng.uniform(c.object_x[0] - 0.05, c.object_x[1] + 0.05),
                               rng.uniform(c.object_y[0] - 0.08, c.object_y[1] + 0.08)])
                if all(np.linalg.norm(xy - p) >= c.min_distractor_spacing for p in placed):
                    break
            placed.append(xy)
            out.append((float(xy[0]), float(xy[1])))
        return out

    def target(self, object_position):
        return np.asarray(object_position, float) + np.array([0.0, 0.0, self.config.target_height])

    def reset(self, start_time: float):
        self.start_time = start_time
        self.within_since = None
        self.success = False
        self.success_time = None
        self.distance = float("inf")

    def update(self, sim_time: float, ee_position, object_position) -> bool:
        """Advance the success test to `sim_time`; returns whether the episode has succeeded."""
        self.distance = float(np.linalg.norm(np.asarray(ee_position) - self.target(object_position)))
        if self.distance <= self.config.success_distance:
            if self.within_since is None:
                self.within_since = sim_time
            if not self.success and sim_time - self.within_since >= self.config.success_hold - 1e-9:
                self.success = True
                self.success_time = sim_time - self.start_time
        else:
            self.within_since = None
        return self.success
