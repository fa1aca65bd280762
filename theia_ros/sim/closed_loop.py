"""The main job's closed loop (camera -> encoder -> policy -> commands) in lock step, without ROS.

The ROS graph (`make demo`) runs theia_sim, theia_encoder and theia_policy on the simulator's clock:
frames at `camera_rate`, the policy's timer at `policy_rate`, each tick acting on the newest features
that have arrived, commands clamped to the joint limits. Here the same happens on simulated time in one
thread, so a run is deterministic: two encoders (fp32 and int8, say) see exactly the same episodes, and
a second "shadow" agent can act on the very same frames at every tick to measure how far its actions
are from the driving agent's (it never moves the robot).

    from theia_ros.sim.closed_loop import Agent, ClosedLoopConfig, run_episode
    agent = Agent(encoder, policy, lower=sim.lower, upper=sim.upper)   # encoder: a FeatureEncoder
    result = run_episode(sim, seed=1000, agent=agent, shadow=Agent(reference_encoder, policy))
    result["success"], result["distance"], result["action_abs_diff_max"], result["feature_cosine_min"]

What differs from the ROS graph: the encoder's latency is a fixed `latency` (seconds of simulated time
from a frame's capture to its features reaching the policy) instead of whatever the encoder's wall
time was, and the timers start in phase (frames at k / camera_rate, ticks at j / policy_rate from the
episode's reset). Both are the same for every agent, which is what a comparison needs.
"""
from __future__ import annotations

import collections
import dataclasses

import numpy as np

from theia_ros.features import Preprocessing
from theia_ros.policies.buffer import ObservationBuffer
from theia_ros.policies.safety import CommandFilter


@dataclasses.dataclass
class ClosedLoopConfig:
    """The main job's rates (config/sim_demo.yaml): camera 15 Hz at 224x224, policy 10 Hz, episodes of 6 s."""

    camera: str = "front"
    width: int = 224
    height: int = 224
    camera_rate: float = 15.0  # frames per second of simulated time
    policy_rate: float = 10.0  # policy ticks per second of simulated time
    duration: float = 6.0  # episode length (s)
    latency: float = 0.05  # s from a frame's capture to its features reaching the policy (encode + transport)
    max_observation_age: float = 1.0  # the policy node's watchdog: older observations command nothing

    def __post_init__(self):
        for name in ("camera_rate", "policy_rate", "duration", "max_observation_age"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not self.latency >= 0:
            raise ValueError(f"latency must be >= 0, got {self.latency!r}")


class Agent:
    """An encoder and a policy, wired as the encoder and policy nodes are: features pushed into the
    policy's :class:`ObservationBuffer` (model id, representation and preprocessing checked as the policy
    node checks them) once they arrive, actions through the node's :class:`CommandFilter` (joint limits)."""

    def __init__(self, encoder, policy, *, lower=None, upper=None, max_observation_age=1.0, name=""):
        self.encoder, self.policy, self.name = encoder, policy, name
        cameras = policy.observation_spec.cameras
        if len(cameras) != 1:
            raise ValueError(f"the closed loop renders one camera; the policy observes {cameras}")
        self.camera = cameras[0]
        action = policy.action_spec
        self.joint_names = list(action.joint_names)
        self.filter = CommandFilter(action.joint_names, lower if lower is not None else action.lower,
                                    upper if upper is not None else action.upper, max_velocity=None, mode=action.mode)
        self.max_observation_age = float(max_observation_age)
        self.buffer = ObservationBuffer(policy.observation_spec)
        self.meta = encoder.metadata
        self.reset()

    def reset(self):
        """A new episode: nothing in flight, nothing seen, nothing commanded."""
        self.buffer.clear()
        self.pending = collections.deque()  # (arrival, stamp, features) in capture order
        self.last_command = None
        self.policy.reset()

    def encode(self, rgb) -> np.ndarray:
        features, _ = self.encoder.encode([rgb])
        return features[0].float().numpy()

    def capture(self, stamp, features, arrival, joint_state=None):
        """Features of the frame taken at `stamp` reach the policy at `arrival`; the joint state measured at
        the frame (names, positions) goes to the buffer when the policy observes joints."""
        self.pending.append((arrival, stamp, features))
        if joint_state is not None and self.policy.observation_spec.proprio_joints:
            self.buffer.push_joint_state(stamp, joint_state[0], joint_state[1])

    def _deliver(self, now):
        while self.pending and self.pending[0][0] <= now + 1e-9:
            arrival, stamp, features = self.pending.popleft()
            self.buffer.push_features(self.camera, stamp, features, representation=self.meta["representation"],
                                      model_id=self.meta["model_id"], weights_id=self.meta["weights_id"],
                                      preprocessing=Preprocessing(),
                                      arrival=arrival)

    def act(self, now, measured=None):
        """The command of the policy tick at `now` (None: no fresh observation yet, nothing is sent);
        `measured`: joint positions for the first command's step, as the node uses."""
        self._deliver(now)
        if not self.buffer.ready() or self.buffer.age(now) > self.max_observation_age:
            return None
        action = self.policy.act(self.buffer.build())
        previous = self.last_command if self.last_command is not None else measured
        command = self.filter.filter(action, previous, 1.0)
        if command is not None:
            self.last_command = command
        return command


def _cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))


def _events(config: ClosedLoopConfig):
    """(time, kind) of one episode, frames before ticks at the same time."""
    out = []
    for kind, rate in (("frame", config.camera_rate), ("tick", config.policy_rate)):
        k = 0
        while k / rate < config.duration - 1e-9:
            out.append((k / rate, 0 if kind == "frame" else 1, kind))
            k += 1
    return [(t, kind) for t, _, kind in sorted(out)]


def run_episode(sim, seed, agent: Agent, *, shadow: Agent | None = None, config: ClosedLoopConfig | None = None,
                record=False) -> dict:
    """One episode of `seed` driven by `agent`; `shadow` (optional) sees the same frames and acts at the same
    ticks without moving the robot. Returns seed, success, success_time, distance (final, m), commands,
    and with a shadow: the absolute difference of the two agents' commands (max and mean over joints and
    the ticks where both commanded) and the cosine of their features per frame (min and mean).
    `record`: also the per-tick commands (and the shadow's) and per-frame cosines."""
    config = config or ClosedLoopConfig()
    agents = [agent] + ([shadow] if shadow is not None else [])
    for a in agents:
        if a.camera != config.camera:
            raise ValueError(f"agent {a.name!r} observes camera {a.camera!r}, the loop renders {config.camera!r}")
    sim.reset(seed)
    for a in agents:
        a.reset()
    start = sim.time
    diffs, cosines, commands, shadow_commands, idle_ticks = [], [], [], [], 0
    for t, kind in _events(config) + [(config.duration, "end")]:
        steps = int(round((start + t - sim.time) / sim.dt))
        if steps > 0:
            sim.step(steps)
        if kind == "end":
            break
        now = start + t
        if kind == "frame":
            rgb = sim.render(config.camera, config.width, config.height)
            names, positions, _, _ = sim.joint_state()
            features = [a.encode(rgb) for a in agents]
            for a, f in zip(agents, features):
                a.capture(now, f, now + config.latency, (names, positions))
            if shadow is not None:
                cosines.append(_cosine(features[0], features[1]))
            continue
        measured = sim.arm_positions()
        command = agent.act(now, measured)
        other = shadow.act(now, measured) if shadow is not None else None
        if command is None:
            idle_ticks += 1
        else:
            sim.command(command, agent.joint_names)
            commands.append(command)
        if command is not None and other is not None:
            diffs.append(np.abs(command - other))
            shadow_commands.append(other)
    status = sim.status()
    result = {"seed": int(seed), "success": bool(status["success"]), "success_time": status["success_time"],
              "distance": float(status["distance"]), "commands": len(commands), "idle_ticks": idle_ticks}
    if shadow is not None:
        d = np.stack(diffs) if diffs else np.zeros((0, len(agent.joint_names)))
        result.update(action_abs_diff_max=float(d.max()) if d.size else float("nan"),
                      action_abs_diff_mean=float(d.mean()) if d.size else float("nan"),
                      compared_ticks=len(diffs),
                      feature_cosine_min=float(min(cosines)) if cosines else float("nan"),
                      feature_cosine_mean=float(np.mean(cosines)) if cosines else float("nan"))
    if record:
        result.update(command_log=[c.tolist() for c in commands], shadow_log=[c.tolist() for c in shadow_commands],
                      cosine_log=cosines)
    return result
