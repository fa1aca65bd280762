"""The nodes behind `theia-ros collect` (see theia_ros.cli.collect): SimClient (episode status, reset
with a seed, wait for an episode to end), ExpertNode (the scripted expert as a ROS node),
EpisodeRecorder (raw subscriptions into one bag per episode) and collect(), which runs them
against a theia_sim process."""
import json
import struct
import time
from pathlib import Path

import rclpy
from rcl_interfaces.msg import Parameter as ParameterMsg
from rcl_interfaces.msg import ParameterType, ParameterValue
from rcl_interfaces.srv import SetParameters
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor
from rclpy.parameter import Parameter
from std_msgs.msg import Float64MultiArray, String
from std_srvs.srv import Trigger

from theia_ros.bags.record import BagRecorder
from theia_ros.commands import COMMAND_FORMATS
from theia_ros.nodes.environment import use_package_fastdds_profile
from theia_ros.nodes.graph import Graph, apply_overrides
from theia_ros.nodes.qos import qos_profile
from theia_ros.nodes.runtime import message_class
from theia_ros.nodes.theia_sim import STATUS_TOPIC
from theia_ros.sim import ReachExpert, Simulation

ARM_JOINTS = [f"panda_joint{i}" for i in range(1, 8)]
EXPERT_COMMAND_FORMAT = "float64_multi_array"  # the expert commands like a forward position controller client
HEADER_TYPES = {"sensor_msgs/msg/Image", "sensor_msgs/msg/CameraInfo", "sensor_msgs/msg/JointState",
                "sensor_msgs/msg/CompressedImage"}


def cdr_header_stamp_ns(data):
    """Header stamp (ns) of a CDR-serialized message whose first field is std_msgs/Header."""
    little = len(data) > 1 and data[1] & 1
    sec, nanosec = struct.unpack_from("<iI" if little else ">iI", data, 4)
    return sec * 1_000_000_000 + nanosec


def sim_params(*, cameras=("front",), width=224, height=224, camera_rate=15.0, real_time_factor=1.0, seed=0,
               **extra):
    """Parameters of a theia_sim section (bring-up YAML layout)."""
    return {"theia_sim": {"ros__parameters": {"cameras": list(cameras), "width": int(width), "height": int(height),
                                              "camera_rate": float(camera_rate),
                                              "real_time_factor": float(real_time_factor), "seed": int(seed),
                                              **extra}}}


class SimClient:
    """Talks to a running theia_sim from an rclpy node: latest episode status, reset with a seed."""

    def __init__(self, node, executor, sim_node="/theia_sim"):


        self.node, self.executor = node, executor
        self.status = None
        self.status_time = None
        node.create_subscription(String, STATUS_TOPIC, self._on_status, qos_profile("latched"))
        self.reset_client = node.create_client(Trigger, f"{sim_node}/reset")
        self.param_client = node.create_client(SetParameters, f"{sim_node}/set_parameters")

    def _on_status(self, msg):
        self.status = json.loads(msg.data)
        self.status_time = time.monotonic()

    def spin_until(self, predicate, timeout):
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                return False
            self.executor.spin_once(timeout_sec=0.05)
        return True

    def wait_ready(self, timeout=60.0):
        """True once the simulator's status, reset and parameter services are there."""
        return self.spin_until(lambda: self.status is not None and self.reset_client.service_is_ready()
                               and self.param_client.service_is_ready(), timeout)

    def _call(self, client, request, timeout):
        future = client.call_async(request)
        self.executor.spin_until_future_complete(future, timeout_sec=timeout)
        if not future.done():
            raise TimeoutError(f"no answer from {client.srv_name} in {timeout} s")
        return future.result()

    def set_seed(self, seed, timeout=10.0):
        request = SetParameters.Request(parameters=[ParameterMsg(name="seed", value=ParameterValue(
            type=ParameterType.PARAMETER_INTEGER, integer_value=int(seed)))])
        result = self._call(self.param_client, request, timeout).results[0]
        if not result.successful:
            raise RuntimeError(f"cannot set the simulator's seed to {seed}: {result.reason}")

    def reset(self, seed=None, timeout=10.0):
        """Start a new episode (with `seed`, else the simulator's next seed); returns its status."""
        if seed is not None:
            self.set_seed(seed, timeout)
        response = self._call(self.reset_client, Trigger.Request(), timeout)
        if not response.success:
            raise RuntimeError(f"reset failed: {response.message}")
        status = json.loads(response.message)
        self.spin_until(lambda: self.status is not None and self.status["episode"] >= status["episode"], timeout)
        return status

    def sim_time(self):
        """Simulation time (s) from this node's clock (the node must use sim time)."""
        return self.node.get_clock().now().nanoseconds * 1e-9

    def run_episode(self, seed, duration, timeout=None):
        """Reset with `seed`, let `duration` s of simulation time pass; returns the final status."""
        return self.wait_episode(self.reset(seed), duration, timeout)

    def wait_episode(self, start, duration, timeout=None):
        """Wait until the episode of status `start` is `duration` s old; returns its newest status."""
        episode = start["episode"]
        end = start["sim_time"] + duration
        limit = timeout if timeout is not None else 60.0 + 20.0 * duration
        if not self.spin_until(lambda: self.sim_time() >= end, limit):
            raise TimeoutError(f"episode {episode}: simulation time stuck at {self.sim_time():.2f} s "
                               f"(waiting for {end:.2f} s)")
        # the newest status of this episode (published at status_rate and at once on success)
        self.spin_until(lambda: self.status["episode"] == episode and self.status["sim_time"] >= end - 0.6, 5.0)
        return dict(self.status)


class ExpertNode:
    """Scripted expert as a ROS node: episode status (privileged) in, joint targets out on `commands`."""

    def __init__(self, context=None, rate=20.0, topic="commands", node_name="theia_sim_expert"):


        self.node = rclpy.create_node(node_name, context=context,
                                      parameter_overrides=[Parameter("use_sim_time", value=True)])
        self.expert = ReachExpert(Simulation())  # kinematics only (no rendering)
        self.active = True
        self.episode = None
        self.target = None
        self.sent = 0
        self._msg_type = Float64MultiArray
        self.pub = self.node.create_publisher(Float64MultiArray, topic, 10)
        self.node.create_subscription(String, STATUS_TOPIC, self._on_status, qos_profile("latched"))
        self.node.create_timer(1.0 / rate, self._tick)

    def _on_status(self, msg):
        self.follow(json.loads(msg.data))

    def follow(self, status):
        """Aim at the episode of `status` (a reset's answer gives it before the topic does)."""
        if status["episode"] != self.episode:
            self.episode = status["episode"]
            self.target = self.expert.act_from_status(status)

    def _tick(self):
        if self.active and self.target is not None:
            self.pub.publish(self._msg_type(data=[float(v) for v in self.target]))
            self.sent += 1

    def destroy(self):
        self.node.destroy_node()


class EpisodeRecorder:
    """Raw subscriptions to `topics` ({topic: msgtype}); writes into a new BagRecorder per episode.

    Bag time is the node's clock at receipt (simulation time with use_sim_time). Messages with a
    header stamped before the episode's start are left out (frames still in flight at a reset)."""

    def __init__(self, node, topics, storage="mcap", version=9):


        self.node = node
        self.topics = dict(topics)
        self.storage, self.version = storage, version
        self.bag = None
        self.start_ns = 0
        self.dropped_stale = 0
        for topic, msgtype in self.topics.items():
            latched = topic.endswith("sim/episode")
            qos = qos_profile("latched") if latched else qos_profile("reliable", depth=100)
            node.create_subscription(message_class(msgtype), topic,
                                     lambda data, t=topic, m=msgtype: self._on_message(t, m, data), qos, raw=True)

    def start(self, path, start_sim_time, overwrite=False):
        self.bag = BagRecorder(path, storage=self.storage, version=self.version, overwrite=overwrite)
        for topic, msgtype in self.topics.items():
            self.bag.add_topic(topic, msgtype)
        self.start_ns = int(round(start_sim_time * 1e9))
        self.dropped_stale = 0

    def stop(self):
        bag, self.bag = self.bag, None
        if bag is not None:
            bag.close()
            return dict(bag.counts)
        return {}

    def _on_message(self, topic, msgtype, data):
        if self.bag is None:
            return
        if msgtype in HEADER_TYPES and cdr_header_stamp_ns(data) < self.start_ns:
            self.dropped_stale += 1
            return
        self.bag.write(topic, max(self.node.get_clock().now().nanoseconds, self.start_ns), data)


def default_topics(cameras):
    topics = {f"/{cam}/image_raw": "sensor_msgs/msg/Image" for cam in cameras}
    expert = COMMAND_FORMATS[EXPERT_COMMAND_FORMAT]
    topics.update({"/joint_states": "sensor_msgs/msg/JointState", f"/{expert.topic}": expert.message_type,
                   "/sim/episode": "std_msgs/msg/String"})
    return topics


def collect(out, episodes, *, seed=0, duration=4.0, cameras=("front",), width=224, height=224, camera_rate=15.0,
            real_time_factor=1.0, storage="mcap", overrides=(), expert_rate=20.0, overwrite=False,
            start_sim=True, printer=print):
    """Record `episodes` expert episodes (seeds seed, seed+1, ...) into OUT; returns the summary."""
    use_package_fastdds_profile()
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (--overwrite replaces its episode bags)")
    out.mkdir(parents=True, exist_ok=True)
    params = apply_overrides(sim_params(cameras=cameras, width=width, height=height, camera_rate=camera_rate,
                                        real_time_factor=real_time_factor, seed=seed), list(overrides))
    graph = Graph(params) if start_sim else None
    context = Context()
    rclpy.init(context=context)
    node = expert = executor = None
    summary = {"episodes": [], "seed": seed, "duration": duration, "cameras": list(cameras),
               "image_size": [width, height], "camera_rate": camera_rate, "real_time_factor": real_time_factor,
               "sim_parameters": params["theia_sim"]["ros__parameters"], "action_topic": "/commands",
               "action_joints": ARM_JOINTS}
    t_start = time.monotonic()
    try:
        if graph:
            graph.start()
        node = rclpy.create_node("theia_collect", context=context,
                                 parameter_overrides=[Parameter("use_sim_time", value=True)])
        expert = ExpertNode(context=context, rate=expert_rate)
        expert.active = False
        executor = SingleThreadedExecutor(context=context)
        executor.add_node(node)
        executor.add_node(expert.node)
        client = SimClient(node, executor)
        recorder = EpisodeRecorder(node, default_topics(cameras), storage=storage)
        if not client.wait_ready(90.0):
            dead = graph.dead() if graph else {}
            raise RuntimeError("the simulator did not come up in 90 s" + (f" (exited: {dead})" if dead else ""))
        client.spin_until(lambda: False, 0.5)  # let the raw subscriptions match the publishers
        for i in range(episodes):
            s = seed + i
            expert.active = False
            status = client.reset(s)
            path = out / f"episode_{i:03d}_seed_{s}"
            recorder.start(path, status["sim_time"], overwrite=overwrite)
            expert.follow(status)  # never the previous episode's target
            expert.active = True
            final = client.wait_episode(status, duration)
            expert.active = False
            counts = recorder.stop()
            entry = {"episode": i, "seed": s, "bag": str(path), "success": final["success"],
                     "success_time": final["success_time"], "final_distance": final["distance"],
                     "object_position": status["privileged"]["object_position"], "messages": counts,
                     "dropped_before_reset": recorder.dropped_stale}
            summary["episodes"].append(entry)
            frames = ", ".join(f"{counts.get(f'/{c}/image_raw', 0)} {c} frames" for c in cameras)
            printer(f"episode {i} (seed {s}): {'success' if final['success'] else 'FAILED'}"
                    + (f" in {final['success_time']:.2f} s" if final["success"] else
                       f" (distance {final['distance']:.3f} m)")
                    + f"; {frames}, {counts.get('/joint_states', 0)} joint states, {counts.get('/commands', 0)} "
                    f"commands -> {path}")
    finally:
        if expert is not None:
            expert.active = False
        if executor is not None:
            executor.shutdown()
        if node is not None:
            node.destroy_node()
        if expert is not None:
            expert.destroy()
        rclpy.try_shutdown(context=context)
        if graph:
            graph.stop()
    successes = sum(e["success"] for e in summary["episodes"])
    summary.update(successes=successes, seconds=round(time.monotonic() - t_start, 2))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


