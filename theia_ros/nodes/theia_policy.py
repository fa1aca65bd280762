"""theia_policy: Theia features (+ joint states) in, safe joint commands out.

The policy itself is plain Python (theia_ros.policies), chosen by parameter: a registered name
(`hold`, `mlp`, `theia_head`, or a third-party entry point), or a dotted path, with its weights
from `policy_checkpoint`. This node only assembles observations, runs the policy on a fixed-rate
timer, and passes every action through the safety filter:

- no command before the first valid observation;
- non-finite actions rejected, positions clamped to joint limits, each step to max_velocity / rate
  (also the first step after a stale period or a pause, from the last command sent);
- a watchdog: observations older than `max_observation_age` (the encoder or a camera stalled, or
  the encoder process died) stop the commands (`on_stale: stop`) or hold the last one (`hold`);
  they resume when fresh observations return. The age is never less than the time since the
  newest messages arrived (by this node's clock, the one the watchdog reads), and features or joint
  states stamped more than `max_future_stamp` ahead of it are refused (counted, logged), so a clock
  running ahead cannot keep a stalled stream looking fresh;
- `~/enable` (std_srvs/SetBool) switches commanding on and off;
- velocity mode: every way commanding ends (watchdog, ~/enable false, shutdown, a rejected action,
  the safety filter refusing one) first publishes zero velocity for every commanded joint, once: a
  forward velocity controller has no command timeout and would keep the last velocity.
"""
import sys
import time
from types import SimpleNamespace

import numpy as np
import yaml
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.duration import Duration
from rclpy.node import Node
from sensor_msgs.msg import JointState
from std_srvs.srv import SetBool

from theia_ros.commands import COMMAND_FORMATS, EE_DELTA_DIM, CommandTarget
from theia_ros.features import (
    POS_INTERPOLATIONS,
    PREPROCESSING_PROFILES,
    FeaturesFormatError,
    features_to_numpy,
    preprocessing_of,
)
from theia_ros.msg import Features, MultiCameraFeatures
from theia_ros.nodes.diagnostics import diagnostic_array, diagnostic_status
from theia_ros.nodes.parameters import Param, declare_parameters, read_parameters
from theia_ros.nodes.qos import qos_profile
from theia_ros.nodes.runtime import message_class, run_node
from theia_ros.nodes.stats import LatencyWindow, LogThrottle, RateMeter
from theia_ros.policies import ObservationBuffer, ObservationError, PolicyError, make_policy
from theia_ros.policies.buffer import (
    EncoderMismatchError,
    FutureStampError,
    PreprocessingMismatchError,
    check_not_ahead,
)
from theia_ros.policies.safety import CommandFilter, step_dt
from theia_ros.resources import resolve_package_path
from theia_ros.stamps import stamp_seconds

SAME_AS_JOINT_NAMES = "__same_as_joint_names__"  # proprio_joints default: observe the commanded joints
NO_LIMITS = [0.0]  # joint_lower / joint_upper placeholder: the policy's own limits
# features refused before the buffer (same shapes, other meaning): their diagnostics count and why
REFUSALS = {PreprocessingMismatchError: ("refused_preprocessing", "other preprocessing"),
            EncoderMismatchError: ("refused_encoder", "another encoder model or weights")}

POLICY_PARAMETERS = (
    Param("policy", "hold", "Policy: a registered name (hold, mlp, theia_head, or a plugin's entry point) or a "
          "dotted path module:Class."),
    Param("policy_checkpoint", "", "Directory with config.yaml + model.safetensors (from train-policy), or "
          "package://theia_ros/<path> for one shipped with the package; empty: build the policy from the "
          "parameters below."),
    Param("policy_params", "{}", "Policy hyper-parameters as a YAML mapping (no checkpoint only)."),
    Param("cameras", ["camera"], "Cameras observed; features read from <camera>/features."),
    Param("features_input", "per_camera", "per_camera: <camera>/features; synchronized: features/synchronized.",
          choices=("per_camera", "synchronized")),
    Param("representation", "tokens", "Representation the policy observes (no checkpoint only)."),
    Param("feature_shape", [196, 192], "Shape of one camera's features (no checkpoint only)."),
    Param("preprocessing", "theia", "Preprocessing of the features the policy takes (no checkpoint only; a "
          "checkpoint records its own, none recorded: theia at 224x224); features made otherwise are refused "
          "(counted as refused_preprocessing, logged).", choices=PREPROCESSING_PROFILES),
    Param("input_size", [0, 0], "[height, width] the encoder's model saw (no checkpoint only); [0, 0]: 224x224 "
          "for theia, not checked for isaaclab."),
    Param("pos_interpolation", "scale_factor", "Position-embedding interpolation of those features (no checkpoint "
          "only; compared only where it changes them: inputs other than 224x224).", choices=POS_INTERPOLATIONS),
    Param("history", 1, "Frames of history per camera (no checkpoint only).", int_range=(1, 64)),
    Param("joint_names", ["joint1"], "Commanded joints, in command order (no checkpoint only)."),
    Param("proprio_joints", [SAME_AS_JOINT_NAMES], "Joints observed from joint_states (no checkpoint only); "
          "default: the commanded joints; [''] for none."),
    Param("action_mode", "position", "position or velocity (no checkpoint only).", choices=("position", "velocity")),
    Param("rate", 10.0, "Command rate (Hz).", float_range=(0.1, 1000.0)),
    Param("command_format", "float64_multi_array", "; ".join(
        f"{f.name}: {f.message_type} on topic {f.topic}, {f.description}" for f in COMMAND_FORMATS.values()) + ".",
          choices=tuple(COMMAND_FORMATS)),
    Param("ee_frame", "end_effector", "frame_id of ee_delta_pose commands (the frame the step is expressed in)."),
    Param("trajectory_time_from_start", 0.1, "time_from_start of the JointTrajectory point (s).",
          float_range=(0.0, 60.0)),
    Param("joint_lower", NO_LIMITS, "Lower joint limits (empty or [0.0] placeholder: the policy's own)."),
    Param("joint_upper", NO_LIMITS, "Upper joint limits (empty or [0.0] placeholder: the policy's own)."),
    Param("max_velocity", 0.0, "Largest joint speed (rad/s or m/s) a command may ask for: velocities clamped to "
          "it, position steps to max_velocity / rate (also the first step after a stale period or a pause); "
          "0: no limit.", float_range=(0.0, 1000.0)),
    Param("max_observation_age", 0.5, "Watchdog: observations older than this (s), by stamp or by arrival, stop "
          "the commands.", float_range=(0.001, 60.0)),
    Param("max_future_stamp", 0.1, "Features or joint states stamped more than this (s) ahead of this node's clock "
          "are refused (counted as future_stamps, logged) and the stream treated as stale.",
          float_range=(0.0, 60.0)),
    Param("on_stale", "stop", "Watchdog action: stop (send nothing more; in velocity mode one zero velocity "
          "first) or hold (repeat the last position; zero velocity).", choices=("stop", "hold")),
    Param("max_camera_skew", 0.05, "Largest stamp difference between cameras of one observation (s).",
          float_range=(0.0, 10.0)),
    Param("proprio_tolerance", 0.1, "Largest stamp difference between frame and joint state (s).",
          float_range=(0.0, 10.0)),
    Param("enabled_on_start", True, "Command from the start; false: wait for ~/enable."),
    Param("diagnostics_period", 1.0, "Seconds between /diagnostics messages.", float_range=(0.1, 60.0)),
    Param("torch_threads", 1, "torch intra-op threads for the policy; 0 keeps torch's default.",
          int_range=(0, 256)),
)


def read_policy_parameters(node) -> SimpleNamespace:
    """POLICY_PARAMETERS (declared before), read once and resolved: the joint limit placeholders become
    [] (the policy's own limits), the proprio_joints default the commanded joints."""
    p = read_parameters(node, POLICY_PARAMETERS)
    p.joint_lower = [] if list(p.joint_lower) == NO_LIMITS else list(p.joint_lower)
    p.joint_upper = [] if list(p.joint_upper) == NO_LIMITS else list(p.joint_upper)
    proprio = list(p.proprio_joints)
    p.proprio_joints = [j for j in (list(p.joint_names) if proprio == [SAME_AS_JOINT_NAMES] else proprio) if j]
    return p


def build_policy(p: SimpleNamespace):
    """The policy the parameters ask for: from a checkpoint, or by name from the spec parameters."""
    if p.policy_checkpoint:
        return make_policy(p.policy or None, checkpoint=resolve_package_path(p.policy_checkpoint))
    if len(p.input_size) != 2:
        raise ValueError(f"parameter input_size={list(p.input_size)}: needs [height, width] ([0, 0]: the default)")
    config = {
        "observation": {"cameras": list(p.cameras), "representation": p.representation,
                        "feature_shape": list(p.feature_shape), "proprio_joints": p.proprio_joints,
                        "history": p.history, "preprocessing": p.preprocessing,
                        "input_size": list(p.input_size) if any(p.input_size) else None,
                        "pos_interpolation": p.pos_interpolation},
        "action": {"joint_names": list(p.joint_names), "mode": p.action_mode},
        "params": yaml.safe_load(p.policy_params) or {},
    }
    return make_policy(p.policy, config=config)


class TheiaPolicyNode(Node):
    def __init__(self, **kwargs):
        super().__init__("theia_policy", **kwargs)
        declare_parameters(self, POLICY_PARAMETERS)
        self.params = p = read_policy_parameters(self)
        if p.torch_threads > 0:
            import torch

            torch.set_num_threads(p.torch_threads)
        self.policy = build_policy(p)
        spec, action = self.policy.observation_spec, self.policy.action_spec
        command_format = COMMAND_FORMATS[p.command_format]
        if command_format.name == "ee_delta_pose" and action.dim != EE_DELTA_DIM:
            raise ValueError(f"ee_delta_pose needs a 6-value action [dx, dy, dz, droll, dpitch, dyaw]; the policy "
                             f"outputs {action.dim} ({action.joint_names})")
        self.buffer = ObservationBuffer(spec, max_skew=p.max_camera_skew, proprio_tolerance=p.proprio_tolerance,
                                        max_future_stamp=p.max_future_stamp)
        self.safety = CommandFilter(action.joint_names, p.joint_lower or action.lower, p.joint_upper or action.upper,
                                    max_velocity=p.max_velocity, mode=action.mode)
        self.enabled = p.enabled_on_start
        self.last_command = None
        self.last_command_time = None
        self.measured = {}
        self.stale = True
        self.moving = False  # velocity mode: a command was sent and no zero velocity since
        self.random_features = False
        self.counts = {"commands": 0, "observation_errors": 0, "rejected_actions": 0, "stale_ticks": 0,
                       "bad_messages": 0, "future_stamps": 0, "zero_velocity_stops": 0,
                       **{key: 0 for key, _ in REFUSALS.values()}}
        self.act_latency = LatencyWindow()
        self.command_rate = RateMeter()
        self._throttle = LogThrottle(period=2.0)

        self._build_command = self._command_builder(command_format, CommandTarget(
            tuple(action.joint_names), action.mode, p.ee_frame, p.trajectory_time_from_start))
        self.command_pub = self.create_publisher(message_class(command_format.message_type), command_format.topic,
                                                 qos_profile("reliable", 10))
        feature_qos = qos_profile("reliable", 5)
        if p.features_input == "synchronized":
            self.create_subscription(MultiCameraFeatures, "features/synchronized", self._on_multi, feature_qos)
        else:
            for cam in spec.cameras:
                self.create_subscription(Features, f"{cam}/features",
                                         lambda msg, cam=cam: self._on_features(cam, msg), feature_qos)
        self.create_subscription(JointState, "joint_states", self._on_joint_state, qos_profile("sensor_data", 5))
        self.create_service(SetBool, "~/enable", self._on_enable)
        self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", qos_profile("reliable", 10))
        self.create_timer(1.0 / p.rate, self._on_tick)
        self.create_timer(p.diagnostics_period, self._publish_diagnostics)
        self.get_logger().info(
            f"policy {self.policy.name} ({type(self.policy).__name__}): cameras {spec.cameras} "
            f"{spec.representation} {list(spec.feature_shape)} x{spec.history} preprocessed "
            f"{spec.trained_preprocessing.describe()}{encoder_text(spec)}, joints {action.joint_names} "
            f"({action.mode}), {p.command_format} on {self.command_pub.topic_name} at {p.rate} Hz, "
            f"{'enabled' if self.enabled else 'disabled (call ~/enable)'}")

    def _command_builder(self, command_format, target):
        """values -> the command message, chosen once: the per-tick path only fills and stamps it."""
        msg_class = message_class(command_format.message_type)
        nested = {}

        def new_message(type_name):  # nested messages (a trajectory's point)
            if type_name not in nested:
                nested[type_name] = message_class(type_name)
            return nested[type_name]()

        write, clock = command_format.write, self.get_clock()
        if not command_format.stamped:
            return lambda values: write(msg_class(), values, target, new_message)

        def build(values):
            msg = write(msg_class(), values, target, new_message)
            msg.header.stamp = clock.now().to_msg()
            return msg

        return build

    # ------------------------------------------------------------------ inputs
    def _warn(self, key, text):
        suffix = self._throttle(key)
        if suffix is not None:
            self.get_logger().warning(f"{self._tag()}{text}{suffix}")

    def _on_future_stamp(self, source, exc):
        self.counts["future_stamps"] += 1
        hint = " (use_sim_time and no /clock received yet?)" if self.get_clock().now().nanoseconds == 0 else ""
        self._warn(("future", source), f"refused {source}: {exc}{hint}")

    def _on_features(self, camera, msg):
        arrival = self._now()  # on the clock the watchdog reads (sim time under use_sim_time)
        try:
            array = features_to_numpy(msg)
            if msg.random_weights and not self.random_features:
                self.random_features = True
                self.get_logger().warning(f"[RANDOM WEIGHTS] features on {camera} come from random weights "
                                          f"({msg.weights_id}): actions are meaningless")
            self.buffer.push_features(camera, stamp_seconds(msg.header.stamp), array,
                                      representation=msg.representation, model_id=msg.model_id,
                                      weights_id=msg.weights_id, preprocessing=preprocessing_of(msg),
                                      arrival=arrival)
        except FutureStampError as exc:
            self._on_future_stamp(f"features from {camera}", exc)
        except tuple(REFUSALS) as exc:  # never commands from them: they never reach the buffer
            key = REFUSALS[type(exc)][0]
            self.counts[key] += 1
            self._warn((key, camera), f"refused features from {camera}: {exc}")
        except (FeaturesFormatError, ObservationError) as exc:
            self.counts["bad_messages"] += 1
            self._warn(("features", camera, type(exc).__name__), f"dropped features from {camera}: {exc}")

    def _on_multi(self, msg):
        for features in msg.cameras:
            if features.camera in self.policy.observation_spec.cameras:
                self._on_features(features.camera, features)

    def _on_joint_state(self, msg):
        arrival = self._now()
        try:
            if len(msg.position) != len(msg.name):
                raise ObservationError(f"joint_states has {len(msg.name)} names but {len(msg.position)} positions")
            stamp = stamp_seconds(msg.header.stamp)
            check_not_ahead(stamp, arrival, self.params.max_future_stamp, "joint state")  # refused before any use
            if self.policy.observation_spec.proprio_joints:
                self.buffer.push_joint_state(stamp, list(msg.name), list(msg.position), list(msg.velocity) or None,
                                             arrival=arrival)
            self.measured.update(zip(msg.name, msg.position))
        except FutureStampError as exc:
            self._on_future_stamp("joint_states", exc)
        except (ObservationError, ValueError) as exc:
            self.counts["bad_messages"] += 1
            self._warn(("joint_states",), f"dropped joint_states: {exc}")

    def _on_enable(self, request, response):
        if request.data and not self.enabled:
            self.policy.reset()
            self.last_command = None
        if not request.data:
            self.stop_motion("disabled")
        self.enabled = bool(request.data)
        response.success = True
        response.message = "commanding enabled" if self.enabled else "commanding disabled"
        self.get_logger().info(response.message)
        return response

    # ------------------------------------------------------------------ control loop
    def _now(self):
        return self.get_clock().now().nanoseconds * 1e-9

    def _on_tick(self):
        if not self.enabled:
            return
        now = self._now()
        age = self.buffer.age(now)
        if age > self.params.max_observation_age:
            self._on_stale(age)
            return
        try:
            observation = self.buffer.build()
        except ObservationError as exc:
            self.counts["observation_errors"] += 1
            self._warn(("observation",), f"no observation: {exc}")
            self._on_stale(age)
            return
        if self.stale:
            self.stale = False
            if self.last_command is not None:
                self.get_logger().info(f"{self._tag()}observations fresh again (age {age * 1e3:.0f} ms): commanding")
        t0 = time.perf_counter()
        try:
            action = self.policy.act(observation)
        except (PolicyError, ObservationError, ValueError) as exc:
            self.counts["rejected_actions"] += 1
            self._warn(("act", type(exc).__name__), f"action rejected, nothing sent: {exc}")
            self.stop_motion("action rejected")
            return
        finally:
            self.act_latency.add(time.perf_counter() - t0)
        previous = self.last_command
        if previous is None:
            joints = self.policy.action_spec.joint_names
            if all(j in self.measured for j in joints):
                previous = np.array([self.measured[j] for j in joints])
        # at most one command period: after a stale period the first step is one period's, not the gap's
        dt = step_dt(self.last_command_time, now, 1.0 / self.params.rate)
        command = self.safety.filter(action, previous, dt)
        if command is None:
            self.counts["rejected_actions"] += 1
            self._warn(("unsafe",), f"action {np.asarray(action).tolist()} rejected by the safety filter")
            self.stop_motion("action refused by the safety filter")
            return
        self.moving = self.policy.action_spec.mode == "velocity"  # set first: a stop signal may end this callback
        self._send(command)
        self.last_command, self.last_command_time = command, now

    def _on_stale(self, age):
        self.counts["stale_ticks"] += 1
        if not self.stale:
            self.stale = True
            what = "holding the last command" if self.params.on_stale == "hold" else "commands stopped"
            self.get_logger().warning(f"{self._tag()}watchdog: newest observation is {age:.2f} s old "
                                      f"(max_observation_age {self.params.max_observation_age} s): {what}")
        if self.params.on_stale == "hold" and self.last_command is not None:
            if self.policy.action_spec.mode == "velocity":
                self._send(np.zeros_like(self.last_command))
                self.moving = False
            else:
                self._send(self.last_command)
        else:
            self.stop_motion("watchdog")

    def stop_motion(self, why):
        """Velocity mode: zero velocity for every commanded joint, once, when commanding ends (a forward
        velocity controller has no command timeout: the joints would keep the last velocity). Position
        mode: nothing (the last position holds)."""
        if not self.moving:
            return
        self._send(np.zeros(self.policy.action_spec.dim))
        self.moving = False  # after the send: a stop signal ending this callback first leaves it to on_shutdown
        self.counts["zero_velocity_stops"] += 1
        suffix = self._throttle(("zero velocity", why))
        if suffix is not None:
            self.get_logger().info(f"{why}: zero velocity sent to {list(self.policy.action_spec.joint_names)}{suffix}")

    def on_shutdown(self):
        """run_node's last call while the context is valid: zero velocity (velocity mode), delivered."""
        if self.moving:
            self.stop_motion("shutdown")
            self.command_pub.wait_for_all_acked(Duration(seconds=1.0))

    def _send(self, command):
        self.command_pub.publish(self._build_command([float(v) for v in command]))
        self.counts["commands"] += 1
        self.command_rate.tick()

    # ------------------------------------------------------------------ diagnostics
    def _tag(self):
        return "[RANDOM WEIGHTS] " if self.random_features else ""

    def _publish_diagnostics(self):
        message = ("disabled" if not self.enabled else "stale observations: not commanding" if self.stale
                   else "commanding") + (" (features from RANDOM WEIGHTS)" if self.random_features else "") + (
            "".join(f" ({self.counts[key]} features refused: {why})" for key, why in REFUSALS.values()
                    if self.counts[key]))
        p = self.act_latency.percentiles_ms()
        values = {"enabled": self.enabled, "stale": self.stale, "command_hz": round(self.command_rate.rate(), 2),
                  "act_ms_p50": round(p[50], 3), "act_ms_p99": round(p[99], 3),
                  "observation_age_s": round(self.buffer.age(self._now()), 3),
                  "random_weight_features": self.random_features, **self.counts, **self.safety.counts}
        warn = bool(self.random_features or self.stale or self.counts["rejected_actions"]
                    or any(self.counts[key] for key, _ in REFUSALS.values()))
        status = diagnostic_status(f"{self.get_name()}: policy", self.policy.name, warn=warn, message=message,
                                   values=values)
        self.diag_pub.publish(diagnostic_array(self, [status]))


def encoder_text(spec) -> str:
    """The encoder a checkpoint's features must come from, for the start-up line ('' when it names none)."""
    ids = [f"{key} {getattr(spec, key)}" for key in ("model_id", "weights_id") if getattr(spec, key) is not None]
    return f", from encoder {', '.join(ids)}" if ids else ""


def main(argv=None):
    return run_node(TheiaPolicyNode, argv, on_shutdown=lambda node: node.on_shutdown())


if __name__ == "__main__":
    sys.exit(main())
