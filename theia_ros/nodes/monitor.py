"""The bring-up's in-process observer: diagnostics, end-to-end feature latency, command counts."""
import json
import time

import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor
from rclpy.parameter import Parameter
from std_msgs.msg import String

from theia_ros.msg import Features
from theia_ros.nodes.qos import qos_profile
from theia_ros.nodes.stats import LatencyWindow, RateMeter
from theia_ros.stamps import stamp_seconds


class Monitor:
    """In-process observer: diagnostics, end-to-end feature latency, command counts."""

    def __init__(self, params):
        self.context = Context()
        rclpy.init(context=self.context)
        # with a simulator, stamps are simulation time: measure latency on the same (/clock) clock
        self.sim_time = "theia_sim" in params
        self.node = rclpy.create_node("theia_bringup_monitor", context=self.context,
                                      parameter_overrides=[Parameter("use_sim_time", value=self.sim_time)])
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.status = {}
        self.e2e = LatencyWindow(size=100000)
        self.features_rate = RateMeter()
        self.features = 0
        self.commands = 0
        self.command_rate = RateMeter()
        qos = qos_profile("reliable", depth=10)
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diag, 10)
        cameras = params.get("theia_encoder", {}).get("ros__parameters", {}).get("cameras", ["camera"])
        for cam in cameras:
            self.node.create_subscription(Features, f"{cam}/features", self._on_features, qos)
        self.episodes = {}  # simulator episode -> succeeded
        if "theia_sim" in params:
            self.node.create_subscription(String, "sim/episode", self._on_episode, qos)
        policy = params.get("theia_policy", {}).get("ros__parameters", {})
        if policy:
            from theia_ros.commands import COMMAND_FORMATS
            from theia_ros.nodes.runtime import message_class

            command = COMMAND_FORMATS[policy.get("command_format", "float64_multi_array")]
            self.node.create_subscription(message_class(command.message_type), command.topic, self._on_command, qos)

    def _on_diag(self, msg):
        for s in msg.status:
            self.status[s.name] = {kv.key: kv.value for kv in s.values} | {"_message": s.message}

    def _on_episode(self, msg):
        try:
            status = json.loads(msg.data)
            episode = status["episode"]
            self.episodes[episode] = self.episodes.get(episode, False) or bool(status.get("success"))
        except (ValueError, KeyError, TypeError):
            pass

    def _on_features(self, msg):
        self.features += 1
        self.features_rate.tick()
        now = self.node.get_clock().now().nanoseconds * 1e-9 if self.sim_time else time.time()
        self.e2e.add(now - stamp_seconds(msg.header.stamp))

    def _on_command(self, msg):
        self.commands += 1
        self.command_rate.tick()

    def spin_for(self, seconds):
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.executor.spin_once(timeout_sec=min(0.1, max(end - time.monotonic(), 0.0)))

    def line(self):
        enc = next((v for k, v in self.status.items() if k.startswith("theia_encoder: camera")), {})
        pol = next((v for k, v in self.status.items() if k.endswith(": policy")), {})
        p = self.e2e.percentiles_ms()
        return (f"camera->features {self.features_rate.rate():5.1f} Hz, e2e p50 {p[50]:6.1f} ms | encoder in "
                f"{enc.get('input_hz', '-')} Hz, inference p50 {enc.get('inference_ms_p50', '-')} ms | policy "
                f"{self.command_rate.rate():4.1f} Hz, act p50 {pol.get('act_ms_p50', '-')} ms")

    def close(self):
        self.executor.shutdown()
        self.node.destroy_node()
        rclpy.shutdown(context=self.context)
