"""The simulated robot without ROS: MuJoCo physics, position-controlled joints, command checks,
cameras, and the reach task's episodes.

- Physics at `physics_hz` (500 Hz). Each arm joint has a position actuator (the wheel's gains);
  the commanded position reaches the actuator through a speed limit (`max_joint_speed`, rad/s),
  as a real arm's joint controller interpolates, so a far target is approached smoothly.
- Commands: positions of the 7 arm joints (a forward position controller), or a joint trajectory
  (named joints, points with times from start, linearly interpolated). A command is checked before
  anything is applied: wrong length, unknown or repeated joint names, non-finite values, positions
  beyond the joint limits, or badly timed trajectory points reject the WHOLE command, which is
  counted per reason (`counts`) and never reaches the actuators.
- Episodes: `reset(seed)` puts the arm at its home pose and the cube (and distractors) at places
  drawn from the seed; simulation time keeps running (a ROS /clock must not go backwards).
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

# headless rendering (Mesa llvmpipe without a GPU); mujoco picks its GL platform when first imported
_GL_PRESET = "mujoco" in sys.modules
os.environ.setdefault("MUJOCO_GL", "egl")

import mujoco  # noqa: E402 (mujoco must load after MUJOCO_GL is set above)
import numpy as np  # noqa: E402 (mujoco must load after MUJOCO_GL is set above)

from theia_ros.sim.ik import SiteIK  # noqa: E402 (mujoco must load after MUJOCO_GL is set above)
from theia_ros.sim.scene import (  # noqa: E402 (mujoco must load after MUJOCO_GL is set above)
    ARM_JOINTS,
    CUBE_BODY,
    EE_SITE,
    FINGER_JOINTS,
    ROS_JOINT_NAMES,
    TABLE_TOP_Z,
    SceneConfig,
    build_mjcf,
)
from theia_ros.sim.task import ReachConfig, ReachTask  # noqa: E402 (mujoco must load after MUJOCO_GL is set above)

# gripper pointing down above the table (this model's joint 6 is the real Panda's minus pi/2)
HOME = (0.0, -0.785, 0.0, -2.356, 0.0, 0.0, 0.785)
REJECT_REASONS = ("wrong_length", "unknown_joint", "non_finite", "beyond_limits", "bad_trajectory")
EPISODE_CLOCKS = ("reset", "first_command")  # SimConfig.episode_clock


class CommandError(ValueError):
    """A rejected command; `reason` is one of REJECT_REASONS."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class RenderError(RuntimeError):
    pass


@dataclass
class SimConfig:
    physics_hz: float = 500.0
    max_joint_speed: float = 1.0  # rad/s of the commanded position; 0: no limit (steps reach the actuators)
    limit_tolerance: float = 1e-6  # rad: commands this far beyond a limit are still accepted (and clamped)
    home: tuple = HOME
    home_noise: float = 0.0  # rad, uniform noise on the home pose per episode
    seed: int = 0  # seed of the first episode; later resets without a seed use the next integer
    # when an episode's time starts: "reset", or "first_command" (the first accepted command or trajectory
    # after the reset: a policy still loading, e.g. an encoder building its engine, does not lose the episode)
    episode_clock: str = "reset"
    scene: SceneConfig = field(default_factory=SceneConfig)
    task: ReachConfig = field(default_factory=ReachConfig)


class Simulation:
    def __init__(self, config: SimConfig | None = None):
        self.config = config or SimConfig()
        if self.config.episode_clock not in EPISODE_CLOCKS:
            raise ValueError(f"episode_clock {self.config.episode_clock!r}: one of {', '.join(EPISODE_CLOCKS)}")
        self.awaiting_command = False
        t0 = time.perf_counter()
        self.model = mujoco.MjModel.from_xml_string(build_mjcf(self.config.scene))
        self.model.opt.timestep = 1.0 / self.config.physics_hz
        self.data = mujoco.MjData(self.model)
        self.load_seconds = time.perf_counter() - t0
        m = self.model
        self.joint_names = [ROS_JOINT_NAMES[j] for j in ARM_JOINTS]  # commanded joints (ROS names)
        self.state_joint_names = [ROS_JOINT_NAMES[j] for j in ARM_JOINTS + FINGER_JOINTS]
        ids = [m.joint(j).id for j in ARM_JOINTS + FINGER_JOINTS]
        self._qpos = np.array([m.jnt_qposadr[i] for i in ids])
        self._dof = np.array([m.jnt_dofadr[i] for i in ids])
        actuator_of = {m.actuator_trnid[a, 0]: a for a in range(m.nu)}
        self._arm_act = np.array([actuator_of[i] for i in ids[:7]])
        self._finger_act = np.array([actuator_of[i] for i in ids[7:]])
        # limits: the joint range, narrowed by the actuator's control range
        jr = m.jnt_range[ids[:7]]
        cr = m.actuator_ctrlrange[self._arm_act]
        self.lower = np.maximum(jr[:, 0], cr[:, 0])
        self.upper = np.minimum(jr[:, 1], cr[:, 1])
        self._index = {name: i for i, name in enumerate(self.joint_names)}
        self._ee = m.site(EE_SITE).id
        cube = m.body(CUBE_BODY)
        self._cube_body = cube.id
        self._cube_qpos = m.jnt_qposadr[cube.jntadr[0]]
        self._cube_half = float(self.config.scene.cube_size) / 2
        self._distractors = [m.body(f"distractor{i}") for i in range(self.config.scene.distractors)]
        self.cameras = [m.camera(i).name for i in range(m.ncam)]
        self.task = ReachTask(self.config.task)
        self.counts = {"commands_accepted": 0, "trajectories_accepted": 0,
                       **{f"rejected_{r}": 0 for r in REJECT_REASONS}}
        self.last_rejection = None
        self._renderers = {}
        self._scene_option = mujoco.MjvOption()
        self._scene_option.sitegroup[:] = 0  # the end-effector marker is not part of the picture
        self._ik = None
        self.episode = 0
        self.seed = None
        self.target = np.array(self.config.home, float)
        self.setpoint = self.target.copy()
        self._trajectory = None
        self.reset(self.config.seed, _first=True)

    # ------------------------------------------------------------------ state
    @property
    def time(self) -> float:
        return float(self.data.time)

    @property
    def dt(self) -> float:
        return float(self.model.opt.timestep)

    @property
    def episode_time(self) -> float:
        """Simulation seconds since the episode started (0 while it waits for its first command)."""
        return 0.0 if self.awaiting_command else self.time - self.task.start_time

    def joint_state(self):
        """(names, positions, velocities, efforts) of the 7 arm joints and the 2 fingers."""
        d = self.data
        return (self.state_joint_names, d.qpos[self._qpos].copy(), d.qvel[self._dof].copy(),
                d.qfrc_actuator[self._dof].copy())

    def arm_positions(self) -> np.ndarray:
        return self.data.qpos[self._qpos[:7]].copy()

    def ee_position(self) -> np.ndarray:
        return self.data.site_xpos[self._ee].copy()

    def object_position(self) -> np.ndarray:
        return self.data.xpos[self._cube_body].copy()

    @property
    def ik(self) -> SiteIK:
        if self._ik is None:
            self._ik = SiteIK(self.model, EE_SITE, ARM_JOINTS, self.lower, self.upper)
        return self._ik

    # ------------------------------------------------------------------ episodes
    def reset(self, seed: int | None = None, *, _first=False) -> dict:
        """New episode: arm at home, cube (and distractors) placed from `seed` (default: last seed + 1)."""
        if seed is None:
            seed = 0 if self.seed is None else self.seed + 1
        seed = int(seed)
        rng = np.random.default_rng(seed)
        now = self.time if not _first else 0.0
        mujoco.mj_resetData(self.model, self.data)
        self.data.time = now  # simulation time keeps going across episodes
        home = np.array(self.config.home, float)
        if self.config.home_noise > 0:
            home = np.clip(home + rng.uniform(-1, 1, 7) * self.config.home_noise, self.lower, self.upper)
        d = self.data
        d.qpos[self._qpos[:7]] = home
        d.qpos[self._qpos[7:]] = 0.04
        x, y, yaw = self.task.sample_object(rng, seed)
        q = self._cube_qpos
        d.qpos[q:q + 3] = (x, y, TABLE_TOP_Z + self._cube_half)
        d.qpos[q + 3:q + 7] = (np.cos(yaw / 2), 0.0, 0.0, np.sin(yaw / 2))
        for body, (dx, dy) in zip(self._distractors, self.task.sample_distractors(rng, len(self._distractors), (x, y))):
            d.mocap_pos[self.model.body_mocapid[body.id]] = (dx, dy, TABLE_TOP_Z + 0.02)
        self.target = home.copy()
        self.setpoint = home.copy()
        self._trajectory = None
        d.ctrl[self._arm_act] = home
        d.ctrl[self._finger_act] = 0.04
        mujoco.mj_forward(self.model, d)
        self.seed = seed
        self.episode += 0 if _first else 1
        self.task.reset(now)
        self.awaiting_command = self.config.episode_clock == "first_command"
        self.task.update(now, self.ee_position(), self.object_position())
        return self.status()

    def _start_clock(self):
        if self.awaiting_command:  # the episode starts with its first command
            self.awaiting_command = False
            self.task.reset(self.time)
            self.task.update(self.time, self.ee_position(), self.object_position())

    def status(self) -> dict:
        """Episode status; `privileged` holds simulator state a policy must not see (the expert may)."""
        t = self.task
        return {
            "task": t.name, "episode": self.episode, "seed": self.seed,
            "time": round(self.episode_time, 4), "sim_time": round(self.time, 4),
            "waiting_for_command": self.awaiting_command,
            "success": t.success, "success_time": None if t.success_time is None else round(t.success_time, 4),
            "distance": round(t.distance, 4),
            "privileged": {
                "object_position": [round(float(v), 5) for v in self.object_position()],
                "target_position": [round(float(v), 5) for v in t.target(self.object_position())],
                "ee_position": [round(float(v), 5) for v in self.ee_position()],
            },
        }

    # ------------------------------------------------------------------ commands
    def _reject(self, reason, message):
        self.counts[f"rejected_{reason}"] += 1
        self.last_rejection = f"{reason}: {message}"
        raise CommandError(reason, message)

    def _check_positions(self, values, indices, what):
        try:
            values = np.asarray(values, dtype=float).reshape(-1)
        except (TypeError, ValueError) as exc:
            self._reject("non_finite", f"{what}: not numbers ({exc})")
        if values.shape[0] != len(indices):
            self._reject("wrong_length", f"{what}: {values.shape[0]} positions for {len(indices)} joints")
        if not np.all(np.isfinite(values)):
            self._reject("non_finite", f"{what}: non-finite positions {values.tolist()}")
        tol = self.config.limit_tolerance
        lo, hi = self.lower[indices], self.upper[indices]
        bad = np.flatnonzero((values < lo - tol) | (values > hi + tol))
        if bad.size:
            names = [self.joint_names[indices[i]] for i in bad]
            self._reject("beyond_limits", f"{what}: {', '.join(f'{n}={values[i]:.4f}' for n, i in zip(names, bad))} "
                         f"beyond the limits [{', '.join(f'{lo[i]:.4f}..{hi[i]:.4f}' for i in bad)}]")
        return np.clip(values, lo, hi)

    def _indices(self, names):
        if names is None or len(names) == 0:
            return np.arange(7)
        unknown = [n for n in names if n not in self._index]
        if unknown:
            self._reject("unknown_joint", f"unknown joint(s) {unknown}; commandable: {self.joint_names}")
        if len(set(names)) != len(names):
            self._reject("unknown_joint", f"repeated joint names {list(names)}")
        return np.array([self._index[n] for n in names])

    def command(self, positions, names=None) -> np.ndarray:
        """Position targets (all 7 arm joints in order, or the named ones). Raises CommandError."""
        idx = self._indices(names)
        values = self._check_positions(positions, idx, "command")
        self._trajectory = None
        self.target[idx] = values
        self.counts["commands_accepted"] += 1
        self._start_clock()
        return self.target.copy()

    def command_trajectory(self, names, points):
        """`points`: [(time_from_start s, positions)], times increasing; interpolated linearly from the
        current target, starting now. Raises CommandError (nothing applied) if any point is bad."""
        idx = self._indices(names)
        if not points:
            self._reject("bad_trajectory", "trajectory without points")
        times, rows = [], []
        for k, (t, positions) in enumerate(points):
            if not np.isfinite(t) or t < 0 or (times and t <= times[-1]):
                self._reject("bad_trajectory", f"point {k}: time_from_start {t} not increasing and >= 0")
            times.append(float(t))
            rows.append(self._check_positions(positions, idx, f"trajectory point {k}"))
        self._trajectory = (self.time, idx, self.target[idx].copy(), np.array(times), np.array(rows))
        self.counts["trajectories_accepted"] += 1
        self._start_clock()

    def _follow_trajectory(self):
        start, idx, q0, times, rows = self._trajectory
        t = self.time - start
        k = int(np.searchsorted(times, t, side="right"))
        if k >= len(times):
            self.target[idx] = rows[-1]
            self._trajectory = None
            return
        t_prev, q_prev = (0.0, q0) if k == 0 else (times[k - 1], rows[k - 1])
        span = times[k] - t_prev
        a = 1.0 if span <= 0 else (t - t_prev) / span
        self.target[idx] = q_prev + a * (rows[k] - q_prev)

    # ------------------------------------------------------------------ physics
    def step(self, n: int = 1):
        """n physics steps (commanded position -> speed limit -> actuators), each followed by the success test."""
        m, d = self.model, self.data
        limit = self.config.max_joint_speed * self.dt
        for _ in range(int(n)):
            if self._trajectory is not None:
                self._follow_trajectory()
            if limit > 0:
                self.setpoint += np.clip(self.target - self.setpoint, -limit, limit)
            else:
                self.setpoint[:] = self.target
            d.ctrl[self._arm_act] = self.setpoint
            mujoco.mj_step(m, d)
            self.task.update(d.time, d.site_xpos[self._ee], d.xpos[self._cube_body])

    def run(self, seconds: float):
        self.step(max(int(round(seconds / self.dt)), 0))

    # ------------------------------------------------------------------ cameras
    def render(self, camera: str, width: int = 320, height: int = 240) -> np.ndarray:
        """RGB uint8 [height, width, 3] from `camera`."""
        if camera not in self.cameras:
            raise ValueError(f"no camera {camera!r}; cameras: {self.cameras}")
        renderer = self._renderers.get((width, height))
        if renderer is None:
            s = self.config.scene
            if width > s.max_width or height > s.max_height:
                raise ValueError(f"{width}x{height} exceeds the scene's offscreen buffer {s.max_width}x{s.max_height}")
            try:
                renderer = mujoco.Renderer(self.model, height, width)
            except Exception as exc:
                raise RenderError(
                    f"cannot create a MuJoCo renderer with MUJOCO_GL={os.environ.get('MUJOCO_GL')}: {exc}. Headless "
                    "rendering needs EGL (apt: libegl1 libegl-mesa0 libgl1-mesa-dri libopengl0), or set "
                    "MUJOCO_GL=osmesa with libosmesa6"
                    + (". NOTE: mujoco was imported before theia_ros.sim; set MUJOCO_GL before importing it"
                       if _GL_PRESET else "")) from exc
            self._renderers[(width, height)] = renderer
        renderer.update_scene(self.data, camera=camera, scene_option=self._scene_option)
        return renderer.render()

    def close(self):
        for r in self._renderers.values():
            r.close()
        self._renderers.clear()


class ReachExpert:
    """Scripted expert from privileged state: IK (from the home pose, gripper down) to the point above
    the cube; commands that joint target for the whole episode (the simulator's speed limit makes the
    motion smooth). The target depends only on the cube's 2-D position on the table."""

    def __init__(self, sim: Simulation):
        self.ik = sim.ik
        self.home = np.array(sim.config.home, float)
        self.task = sim.task
        _, self.orientation = self.ik.forward(self.home)
        self._cache = {}

    def solve(self, target_position) -> np.ndarray:
        """Joint positions putting the end effector at `target_position`, gripper down (cached)."""
        key = tuple(np.round(np.asarray(target_position, float), 4))
        if key not in self._cache:
            result = self.ik.solve(np.array(key), self.orientation, self.home)
            if not result.converged and result.position_error > 0.01:
                raise RuntimeError(f"IK failed for target {list(key)}: error {result.position_error:.3f} m")
            self._cache[key] = result.q
        return self._cache[key].copy()

    def plan(self, object_position) -> np.ndarray:
        """Joint target for a cube at `object_position`."""
        return self.solve(self.task.target(object_position))

    def act_from_status(self, status: dict) -> np.ndarray:
        """Joint target from an episode status (its privileged target position)."""
        return self.solve(status["privileged"]["target_position"])
