"""`theia-ros bringup`: start the theia_ros graph from a ROS parameters YAML, without `ros2 launch`.

Where ROS 2 is installed, `ros2 launch theia_ros theia_graph.launch.py` starts the same nodes from
the same YAML. This command exists because `launch`/`launch_ros` are not on PyPI: it starts each
node section of the YAML (`synthetic_camera`, `theia_encoder`, `theia_policy`) as its own process
with `--ros-args --params-file`, watches /diagnostics, prints live rates and latencies, and stops
everything cleanly after `--duration` seconds or on Ctrl-C, ending with a summary.
"""
import collections
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

NODE_MODULES = {
    "synthetic_camera": "theia_ros.synthetic_camera_node",
    "theia_encoder": "theia_ros.encoder_node",
    "theia_policy": "theia_ros.policy_node",
    "theia_sim": "theia_ros.sim_node",
}
DEMO_CONFIG = Path(__file__).resolve().parent.parent / "config" / "demo.yaml"


def find_config(name):
    """A config file of the package: the source tree's, else the installed share/ one."""
    path = Path(__file__).resolve().parent.parent / "config" / name
    if path.is_file():
        return path
    from ament_index_python.packages import get_package_share_directory

    return Path(get_package_share_directory("theia_ros")) / "config" / name


class _NoAliasDumper(yaml.SafeDumper):
    def ignore_aliases(self, data):  # rcl's YAML parser refuses anchors and aliases
        return True


def dump_params(params, stream=None):
    """A ROS parameters YAML (no anchors/aliases, which rcl refuses)."""
    return yaml.dump(params, stream, Dumper=_NoAliasDumper, sort_keys=False)


def apply_overrides(params, overrides):
    """`node.param=value` strings (value parsed as YAML) applied to a parameters mapping."""
    for item in overrides:
        key, sep, value = item.partition("=")
        node, dot, name = key.partition(".")
        if not sep or not dot or not node or not name:
            raise ValueError(f"override {item!r}: expected node.parameter=value")
        params.setdefault(node, {}).setdefault("ros__parameters", {})[name] = yaml.safe_load(value)
    return params


class Graph:
    """The node processes of one bring-up."""

    def __init__(self, params, extra_env=None):
        unknown = sorted(set(params) - set(NODE_MODULES))
        if unknown:
            raise ValueError(f"no node to start for sections {unknown}; known: {sorted(NODE_MODULES)}")
        self.params = params
        self.file = tempfile.NamedTemporaryFile("w", prefix="theia_ros_bringup_", suffix=".yaml", delete=False)
        dump_params(params, self.file)
        self.file.close()
        from theia_ros.ros_env import child_environment

        self.env = child_environment(**(extra_env or {}))
        self.procs = {}

    def start(self):
        for name in self.params:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", NODE_MODULES[name], "--ros-args", "--params-file", self.file.name],
                env=self.env, start_new_session=True)

    def dead(self):
        return {name: p.returncode for name, p in self.procs.items() if p.poll() is not None}

    def stop(self, timeout=10.0):
        """SIGINT each node in data-flow order (the YAML's order: camera or simulator, encoder,
        policy), waiting for each: a node then stops while its inputs are already quiet, not in
        the middle of a frame."""
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
                try:
                    p.wait(timeout)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
        os.unlink(self.file.name)
        return {name: p.returncode for name, p in self.procs.items()}


class Monitor:
    """In-process observer: diagnostics, end-to-end feature latency, command counts."""

    def __init__(self, params):
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.context import Context
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import QoSProfile, ReliabilityPolicy

        from theia_ros.msg import Features
        from theia_ros.stats import LatencyWindow, RateMeter

        self.context = Context()
        rclpy.init(context=self.context)
        # with a simulator, stamps are simulation time: measure latency on the same (/clock) clock
        self.sim_time = "theia_sim" in params
        from rclpy.parameter import Parameter

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
        qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diag, 10)
        cameras = params.get("theia_encoder", {}).get("ros__parameters", {}).get("cameras", ["camera"])
        for cam in cameras:
            self.node.create_subscription(Features, f"{cam}/features", self._on_features, qos)
        self.episodes = {}  # simulator episode -> succeeded
        if "theia_sim" in params:
            from std_msgs.msg import String

            self.node.create_subscription(String, "sim/episode", self._on_episode, qos)
        policy = params.get("theia_policy", {}).get("ros__parameters", {})
        if policy:
            from theia_ros.policy_node import COMMAND_FORMATS

            msg_type, topic = COMMAND_FORMATS[policy.get("command_format", "float64_multi_array")]
            self.node.create_subscription(msg_type, topic, self._on_command, qos)

    def _on_diag(self, msg):
        for s in msg.status:
            self.status[s.name] = {kv.key: kv.value for kv in s.values} | {"_message": s.message}

    def _on_episode(self, msg):
        import json

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
        self.e2e.add(now - (msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9))

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
        import rclpy

        self.executor.shutdown()
        self.node.destroy_node()
        rclpy.shutdown(context=self.context)


def summary(monitor, elapsed):
    rows = [("run time", f"{elapsed:.1f} s"), ("features received", monitor.features),
            ("commands received", monitor.commands)]
    p = monitor.e2e.percentiles_ms()
    clock = " (sim time, /clock at 100 Hz)" if monitor.sim_time else ""
    rows.append((f"camera stamp -> features received{clock}", f"p50 {p[50]:.1f} ms, p99 {p[99]:.1f} ms"))
    if monitor.episodes:
        # the last episode is cut short by the end of the run unless it already succeeded
        ended = sorted(monitor.episodes)[:-1] + [e for e in sorted(monitor.episodes)[-1:] if monitor.episodes[e]]
        wins = sum(monitor.episodes[e] for e in ended)
        rate = f"{wins / len(ended):.0%}" if ended else "n/a"
        rows.append(("simulator episodes ended / succeeded / success rate", f"{len(ended)} / {wins} / {rate}"))
    random = False
    for name, values in sorted(monitor.status.items()):
        if name.startswith("theia_sim"):
            rates = ", ".join(f"{k[:-3]} {v} Hz" for k, v in values.items() if k.endswith("_hz"))
            rejected = sum(int(v) for k, v in values.items() if k.startswith("rejected_") and v.isdigit())
            rows.append((f"{name}: cameras / real-time factor / rejected commands",
                         f"{rates} / {values.get('real_time_factor', '?')} / {rejected}"))
        if "camera" in name and name.startswith("theia_encoder"):
            rows.append((f"{name}: frames in / encoded / dropped / bad", " / ".join(
                values.get(k, "?") for k in ("frames_in", "frames_out", "dropped_superseded", "rejected_bad_input"))))
            rows.append((f"{name}: inference / node overhead p50", f"{values.get('inference_ms_p50')} ms / "
                         f"{values.get('node_overhead_ms_p50')} ms"))
        if name.endswith(": encoder"):
            random = random or values.get("random_weights") == "True"
        if name.endswith(": policy"):
            rows.append((f"{name}: commands / rejected / clamped", " / ".join(
                values.get(k, "?") for k in ("commands", "rejected_actions", "clamped_position"))))
            rows.append((f"{name}: act p50", f"{values.get('act_ms_p50')} ms"))
    width = max(len(r[0]) for r in rows)
    lines = ["", "theia_ros bring-up summary" + (" [encoder with RANDOM WEIGHTS]" if random else "")]
    lines += [f"  {k.ljust(width)}  {v}" for k, v in rows]
    return "\n".join(lines)


def run(args):
    from theia_ros.ros_env import use_package_fastdds_profile

    use_package_fastdds_profile()
    path = Path(args.params) if args.params else (find_config("demo.yaml") if args.demo else None)
    if path is None:
        print("bringup: give a parameters YAML or --demo", file=sys.stderr)
        return 2
    params = yaml.safe_load(path.read_text()) or {}
    overrides = list(args.set or [])
    if args.model:
        overrides.append(f"theia_encoder.model={args.model}")
    apply_overrides(params, overrides)
    model = params.get("theia_encoder", {}).get("ros__parameters", {}).get("model", "")
    print(f"[bringup] starting {', '.join(params)} from {path}")
    if str(model).startswith("random:"):
        print(f"[bringup] RANDOM WEIGHTS ({model}): a demo of the plumbing, not of Theia's features. "
              "Pass --model <checkpoint dir or hub id> for real weights.")
    graph = Graph(params)
    monitor = Monitor(params)
    graph.start()
    start = time.monotonic()
    interrupted = False
    failed = {}
    try:
        while args.duration <= 0 or time.monotonic() - start < args.duration:
            monitor.spin_for(min(2.0, max(args.duration - (time.monotonic() - start), 0.05))
                             if args.duration > 0 else 2.0)
            print(f"[bringup {time.monotonic() - start:5.1f} s] {monitor.line()}", flush=True)
            failed = graph.dead()
            if failed:
                print(f"[bringup] node(s) exited early: {failed}", file=sys.stderr)
                break
    except KeyboardInterrupt:
        interrupted = True
    elapsed = time.monotonic() - start
    codes = graph.stop()
    monitor.spin_for(0.2)
    print(summary(monitor, elapsed), flush=True)
    monitor.close()
    bad = {k: v for k, v in codes.items() if v not in (0, -signal.SIGINT)}
    if failed or bad:
        print(f"[bringup] exit codes: {codes}", file=sys.stderr)
        return 1
    return 130 if interrupted else 0


def add_parser(subparsers):
    p = subparsers.add_parser("bringup", help="start the graph (camera, encoder, policy) from a YAML",
                              description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("params", nargs="?", help="ROS parameters YAML with a section per node")
    p.add_argument("--demo", action="store_true", help="use the embedded defaults (config/demo.yaml)")
    p.add_argument("--model", help="checkpoint directory or hub id for the encoder (overrides the YAML)")
    p.add_argument("--set", action="append", metavar="NODE.PARAM=VALUE", help="override a parameter")
    p.add_argument("--duration", type=float, default=0.0, help="seconds to run; 0: until Ctrl-C")
    p.set_defaults(func=run)
