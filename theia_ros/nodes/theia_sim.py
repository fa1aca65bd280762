"""theia_sim: a simulated Franka Panda (MuJoCo, theia_ros.sim) behind the topics of a real robot.

Publishes
  <camera>/image_raw (sensor_msgs/Image rgb8) and <camera>/camera_info per camera, at `camera_rate`
  joint_states (sensor_msgs/JointState: 7 arm joints + 2 fingers; position, velocity, effort)
  /clock (rosgraph_msgs/Clock): simulation time; run the other nodes with use_sim_time:=true
  sim/episode (std_msgs/String, JSON, latched): task, episode, seed, time, success, distance and a
      `privileged` block (object position, ...) for scripted experts and evaluation, never for policies
  /diagnostics: render time, camera rate, real-time factor, accepted and rejected commands
Subscribes
  commands (std_msgs/Float64MultiArray): 7 arm joint positions (a ros2_control forward position
      controller)
  joint_trajectory (trajectory_msgs/JointTrajectory): named joints, points with positions and
      time_from_start, linearly interpolated from the current target, starting on receipt
  Bad commands (wrong length, unknown joints, NaN/inf, beyond the joint limits, bad timing) are
  rejected whole, counted per reason, logged, and never applied.
Services
  ~/reset (std_srvs/Trigger): new episode with the seed in parameter `seed`; `seed` then moves to
      seed + 1, so plain resets walk through seeds. Set `seed` first (`ros2 param set /theia_sim seed
      42`) to pick one. The response's message is the new episode's status JSON.

Physics, rendering and publishing run on this node's own thread, one loop that paces simulation
time against the wall clock (`real_time_factor`; 0 = as fast as possible) and handles callbacks
between steps with a SingleThreadedExecutor (MuJoCo's GL context stays on one thread).
"""
import array
import json
import math
import sys
import time

import rclpy
from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import SetParametersResult
from rclpy.node import Node
from rclpy.parameter import Parameter
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import CameraInfo, Image, JointState
from std_msgs.msg import String
from std_srvs.srv import Trigger

from theia_ros.commands import COMMAND_FORMATS, read_float64_multi_array, trajectory_points
from theia_ros.nodes.diagnostics import diagnostic_array, diagnostic_status
from theia_ros.nodes.parameters import Param, declare_parameters, read_parameters
from theia_ros.nodes.qos import qos_profile
from theia_ros.nodes.runtime import message_class, run_node
from theia_ros.nodes.stats import LatencyWindow, LogThrottle, RateMeter
from theia_ros.stamps import sec_nanosec

STATUS_TOPIC = "sim/episode"
POSITIONS = COMMAND_FORMATS["float64_multi_array"]  # the 7 arm joint positions (a forward position controller)
TRAJECTORY = COMMAND_FORMATS["joint_trajectory"]

SIM_PARAMETERS = (
    Param("cameras", ["front", "wrist"], "Cameras to publish: front (fixed, facing the robot across the table) "
          "and/or wrist (on the hand). Topics <camera>/image_raw and <camera>/camera_info."),
    Param("camera_rate", 15.0, "Frames per second per camera (simulation time).", float_range=(0.1, 120.0)),
    Param("width", 640, "Image width (pixels).", int_range=(16, 1920)),
    Param("height", 480, "Image height (pixels).", int_range=(16, 1080)),
    Param("image_qos", "reliable", "reliable (every subscriber matches) or best_effort.",
          choices=("reliable", "best_effort")),
    Param("start_time", -1.0, "Simulation time (s) at start: -1 (default) starts at the wall-clock time, so stamps "
          "look like a real robot's (and, at real-time factor 1, stay close to it); 0 starts at zero like "
          "Gazebo.", float_range=(-1.0, 1e10)),
    Param("physics_rate", 500.0, "Physics steps per second of simulation time.", float_range=(50.0, 5000.0)),
    Param("real_time_factor", 1.0, "Simulation seconds per wall second the loop aims at; 0: as fast as "
          "possible. Measured value in /diagnostics.", float_range=(0.0, 100.0)),
    Param("joint_state_rate", 100.0, "joint_states messages per second (simulation time).",
          float_range=(1.0, 1000.0)),
    Param("clock_rate", 100.0, "/clock messages per second (simulation time).", float_range=(1.0, 1000.0)),
    Param("status_rate", 2.0, "sim/episode messages per second besides those on reset and success.",
          float_range=(0.1, 100.0)),
    Param("max_joint_speed", 1.0, "Largest speed (rad/s) of the position target the actuators get; commanded "
          "jumps are followed at this speed. 0: no limit.", float_range=(0.0, 100.0)),
    Param("seed", 0, "Seed of the next episode (~/reset); set it, then call ~/reset. Advances by one after "
          "each reset.", int_range=(0, 2**31 - 1), read_only=False),
    Param("episode_timeout", 0.0, "Episode length (s of simulation time) after which `done` is set in the "
          "status; 0: no limit.", float_range=(0.0, 3600.0)),
    Param("auto_reset", False, "Start the next episode (next seed) when one times out."),
    Param("episode_clock", "reset", "When an episode's time starts: reset, or first_command (its first accepted "
          "command or trajectory: a policy still loading does not lose the episode; the arm holds home until "
          "then, sim/episode says waiting_for_command).", choices=("reset", "first_command")),
    Param("home_noise", 0.0, "Uniform noise (rad) on the arm's start pose per episode.", float_range=(0.0, 0.5)),
    Param("distractors", 0, "Extra objects on the table (other colours and shapes), placed per episode.",
          int_range=(0, 4)),
    Param("object_placement", "quasi_random", "Cube place per seed: quasi_random (point `seed` of a "
          "low-discrepancy sequence: consecutive seeds cover the table area evenly) or uniform (random).",
          choices=("quasi_random", "uniform")),
    Param("target_height", 0.12, "Reach target: this far (m) above the cube's centre.", float_range=(0.0, 1.0)),
    Param("success_distance", 0.05, "Success: end effector within this distance (m) of the target ...",
          float_range=(0.001, 1.0)),
    Param("success_hold", 0.5, "... for this long (s).", float_range=(0.0, 60.0)),
    Param("diagnostics_period", 1.0, "Seconds (wall) between /diagnostics messages.", float_range=(0.1, 60.0)),
)


def to_stamp(seconds):
    sec, nanosec = sec_nanosec(seconds)
    return Time(sec=sec, nanosec=nanosec)


def camera_info(width, height, fovy_deg, frame_id):
    """Pinhole CameraInfo of a MuJoCo camera (vertical field of view fovy, square pixels, no distortion)."""
    f = 0.5 * height / math.tan(math.radians(fovy_deg) / 2)
    info = CameraInfo(width=width, height=height, distortion_model="plumb_bob")
    info.header.frame_id = frame_id
    info.d = [0.0] * 5
    info.k = [f, 0.0, width / 2, 0.0, f, height / 2, 0.0, 0.0, 1.0]
    info.r = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    info.p = [f, 0.0, width / 2, 0.0, 0.0, f, height / 2, 0.0, 0.0, 0.0, 1.0, 0.0]
    return info


class TheiaSimNode(Node):
    def __init__(self, **kwargs):
        super().__init__("theia_sim", **kwargs)
        declare_parameters(self, SIM_PARAMETERS)
        # read once; only `seed` changes at run time (set_parameters, ~/reset): _on_reset reads it then
        self.params = p = read_parameters(self, SIM_PARAMETERS)
        from theia_ros.sim import ReachConfig, SceneConfig, SimConfig, Simulation

        width, height = p.width, p.height
        scene = SceneConfig(distractors=p.distractors, max_width=max(width, 64), max_height=max(height, 64))
        task = ReachConfig(placement=p.object_placement, target_height=p.target_height,
                           success_distance=p.success_distance, success_hold=p.success_hold)
        self.sim = Simulation(SimConfig(physics_hz=p.physics_rate, max_joint_speed=p.max_joint_speed,
                                        home_noise=p.home_noise, seed=p.seed, scene=scene, task=task,
                                        episode_clock=p.episode_clock))
        self.time_offset = p.start_time if p.start_time >= 0 else time.time()  # reset when run() starts
        self.set_parameters([Parameter("seed", value=p.seed + 1)])
        self.add_on_set_parameters_callback(self._on_set_parameters)
        names = list(p.cameras)
        unknown = [c for c in names if c not in self.sim.cameras]
        if unknown or len(set(names)) != len(names):
            raise ValueError(f"parameter cameras={names}: distinct names from {self.sim.cameras}")
        self.width, self.height = width, height
        image_qos = qos_profile("sensor_data" if p.image_qos == "best_effort" else "reliable", 2)
        self.cameras = []
        for name in names:
            frame = f"{name}_optical_frame"
            info = camera_info(width, height, float(self.sim.model.camera(name).fovy[0]), frame)
            self.cameras.append({
                "name": name, "frame": frame, "info": info,
                "image_pub": self.create_publisher(Image, f"{name}/image_raw", image_qos),
                "info_pub": self.create_publisher(CameraInfo, f"{name}/camera_info", image_qos),
                "render": LatencyWindow(), "rate": RateMeter(), "frames": 0,
            })
        t0 = time.perf_counter()
        for cam in self.cameras:  # the first render creates the GL context: not inside the timed loop
            self.sim.render(cam["name"], width, height)
        self.gl_seconds = time.perf_counter() - t0
        self.joint_pub = self.create_publisher(JointState, "joint_states", qos_profile("reliable", 10))
        self.clock_pub = self.create_publisher(Clock, "/clock", qos_profile("reliable", 1))
        self.status_pub = self.create_publisher(String, STATUS_TOPIC, qos_profile("latched"))
        self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", qos_profile("reliable", 10))
        self.create_subscription(message_class(POSITIONS.message_type), POSITIONS.topic, self._on_commands,
                                 qos_profile("reliable", 10))
        self.create_subscription(message_class(TRAJECTORY.message_type), TRAJECTORY.topic, self._on_trajectory,
                                 qos_profile("reliable", 10))
        self.create_service(Trigger, "~/reset", self._on_reset)
        self._throttle = LogThrottle(period=2.0)
        self.publish_time = LatencyWindow()
        self.loop_stats = {"overruns": 0}
        self._rtf_window = []  # (wall, sim) samples for the measured real-time factor
        self._last_success = None
        self.get_logger().info(
            f"Franka Panda reach task (MuJoCo, scene loaded in {self.sim.load_seconds:.2f} s, renderer in "
            f"{self.gl_seconds:.2f} s): cameras "
            f"{names} {width}x{height} at {p.camera_rate} Hz, physics {p.physics_rate} Hz, real-time factor "
            f"{p.real_time_factor or 'max'}; commands on {self.resolve_topic_name(POSITIONS.topic)} (joints "
            f"{self.sim.joint_names}), episode {self.sim.episode} seed {self.sim.seed}")

    # ------------------------------------------------------------------ parameters
    def _on_set_parameters(self, params):
        for param in params:
            if param.name == "seed" and (not isinstance(param.value, int) or param.value < 0):
                return SetParametersResult(successful=False, reason="seed must be an integer >= 0")
        return SetParametersResult(successful=True)

    # ------------------------------------------------------------------ inputs
    def _warn(self, key, text):
        suffix = self._throttle(key)
        if suffix is not None:
            self.get_logger().warning(text + suffix)

    def _on_commands(self, msg):
        from theia_ros.sim import CommandError

        try:
            self.sim.command(read_float64_multi_array(msg)[1])
        except CommandError as exc:
            self._warn(("commands", exc.reason), f"rejected command on {POSITIONS.topic} ({exc.reason}): {exc}")

    def _on_trajectory(self, msg):
        from theia_ros.sim import CommandError

        try:
            self.sim.command_trajectory(list(msg.joint_names) or None, trajectory_points(msg))
        except CommandError as exc:
            self._warn(("joint_trajectory", exc.reason), f"rejected trajectory ({exc.reason}): {exc}")

    def _on_reset(self, request, response):
        seed = self.get_parameter("seed").value  # the one parameter that changes at run time
        t = self.sim.task
        self.get_logger().info(
            f"episode {self.sim.episode} (seed {self.sim.seed}) ends after {self.sim.episode_time:.1f} s: "
            + (f"success at {t.success_time:.2f} s" if t.success else f"no success (distance {t.distance:.3f} m)"))
        self.sim.reset(seed)
        status = self._status()
        self.set_parameters([Parameter("seed", value=seed + 1)])
        self._publish_status(status)
        self.get_logger().info(f"episode {status['episode']} (seed {seed}): object at "
                               f"{status['privileged']['object_position']}")
        response.success = True
        response.message = json.dumps(status)
        return response

    # ------------------------------------------------------------------ outputs
    def _status(self):
        status = self.sim.status()
        status["sim_time"] = round(self.time_offset + self.sim.time, 4)  # the /clock time
        return status

    def _publish_status(self, status=None):
        status = status or self._status()
        timeout = self.params.episode_timeout
        status["done"] = bool(timeout > 0 and self.sim.episode_time >= timeout)
        self.status_pub.publish(String(data=json.dumps(status)))
        self._last_success = (status["episode"], status["success"])
        return status

    def _publish_clock(self):
        self.clock_pub.publish(Clock(clock=to_stamp(self.time_offset + self.sim.time)))

    def _publish_joint_states(self):
        names, pos, vel, eff = self.sim.joint_state()
        msg = JointState(name=names, position=pos.tolist(), velocity=vel.tolist(), effort=eff.tolist())
        msg.header.stamp = to_stamp(self.time_offset + self.sim.time)
        self.joint_pub.publish(msg)

    def _publish_cameras(self):
        stamp = to_stamp(self.time_offset + self.sim.time)
        for cam in self.cameras:
            t0 = time.perf_counter()
            rgb = self.sim.render(cam["name"], self.width, self.height)
            t1 = time.perf_counter()
            msg = Image(height=self.height, width=self.width, encoding="rgb8", step=self.width * 3)
            msg.header.stamp = stamp
            msg.header.frame_id = cam["frame"]
            msg.data = array.array("B", rgb.tobytes())
            cam["image_pub"].publish(msg)
            info = cam["info"]
            info.header.stamp = stamp
            cam["info_pub"].publish(info)
            cam["render"].add(t1 - t0)
            self.publish_time.add(time.perf_counter() - t1)
            cam["rate"].tick()
            cam["frames"] += 1

    def _publish_diagnostics(self):
        now = time.monotonic()
        self._rtf_window = [(w, s) for w, s in self._rtf_window if now - w <= 5.0] + [(now, self.sim.time)]
        (w0, s0), (w1, s1) = self._rtf_window[0], self._rtf_window[-1]
        rtf = (s1 - s0) / (w1 - w0) if w1 > w0 else float("nan")
        target = self.params.real_time_factor
        counts = self.sim.counts
        rejected = sum(v for k, v in counts.items() if k.startswith("rejected_"))
        slow = target > 0 and rtf == rtf and rtf < 0.8 * target
        message = (f"real-time factor {rtf:.2f}" + (f" (target {target:g})" if target > 0 else " (max)")
                   + (f", {rejected} commands rejected" if rejected else ""))
        values = {"sim_time": round(self.time_offset + self.sim.time, 3), "real_time_factor": round(rtf, 3),
                  "target_real_time_factor": target, "episode": self.sim.episode, "seed": self.sim.seed,
                  "success": self.sim.task.success, "distance": round(self.sim.task.distance, 4),
                  "publish_ms_p50": round(self.publish_time.percentiles_ms()[50], 3),
                  "overruns": self.loop_stats["overruns"], **counts,
                  "last_rejection": self.sim.last_rejection or ""}
        for cam in self.cameras:
            p = cam["render"].percentiles_ms()
            values[f"{cam['name']}_hz"] = round(cam["rate"].rate(), 2)
            values[f"{cam['name']}_render_ms_p50"] = round(p[50], 3)
            values[f"{cam['name']}_render_ms_p99"] = round(p[99], 3)
            values[f"{cam['name']}_frames"] = cam["frames"]
        status = diagnostic_status(f"{self.get_name()}: simulation", "mujoco franka_panda", warn=bool(slow or rejected),
                                   message=message, values=values)
        self.diag_pub.publish(diagnostic_array(self, [status]))

    # ------------------------------------------------------------------ main loop
    def run(self, executor, running=lambda: True):
        """Step, render and publish on this thread until shutdown or running() is False; callbacks run
        between steps."""
        sim, p = self.sim, self.params
        dt = sim.dt
        period = {"clock": 1.0 / p.clock_rate, "joints": 1.0 / p.joint_state_rate,
                  "cameras": 1.0 / p.camera_rate, "status": 1.0 / p.status_rate}
        due = {k: sim.time for k in period}
        actions = {"clock": self._publish_clock, "joints": self._publish_joint_states,
                   "cameras": self._publish_cameras, "status": self._publish_status}
        if p.start_time < 0:
            self.time_offset = time.time() - sim.time
        wall0, sim0 = time.monotonic(), sim.time
        next_diag = wall0 + p.diagnostics_period
        self._rtf_window = [(wall0, sim0)]
        rtf, timeout = p.real_time_factor, p.episode_timeout
        while running() and rclpy.ok(context=self.context):
            event = min(due.values())
            now = time.monotonic()
            if rtf > 0:
                wall_due = wall0 + (event - sim0) / rtf
                if now < wall_due:  # ahead of the wall clock: serve callbacks while waiting
                    executor.spin_once(timeout_sec=wall_due - now)
                    continue
                if now - wall_due > 0.25:  # too far behind (slow renders): drop the debt, do not sprint
                    wall0, sim0 = now, sim.time
                    self.loop_stats["overruns"] += 1
            executor.spin_once(timeout_sec=0.0)
            if sim.time < event - dt / 2:
                sim.step(max(1, int(round((event - sim.time) / dt))))
            for name in actions:
                if due[name] <= sim.time + dt / 2:
                    actions[name]()
                    due[name] = max(due[name] + period[name], sim.time + dt / 2)
            current = (sim.episode, sim.task.success)
            if current != self._last_success:  # success just reached: say so at once
                self._publish_status()
            if timeout > 0 and sim.episode_time >= timeout and p.auto_reset:
                self._on_reset(Trigger.Request(), Trigger.Response())
            if now >= next_diag:
                self._publish_diagnostics()
                next_diag = now + p.diagnostics_period


def main(argv=None):
    return run_node(TheiaSimNode, argv, spin=lambda node, executor, running: node.run(executor, running),
                    on_exit=lambda node: node.sim.close())


if __name__ == "__main__":
    sys.exit(main())
