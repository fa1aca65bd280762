"""Simulator rates on this CPU, alone and with the encoder and the policy closing the loop.

    python benchmarks/bench_sim.py [--duration 20] [--sizes 640x480 320x240] [--camera-rate 15]

Configurations per image size: the simulator alone as fast as it goes (real_time_factor 0: its
capacity), alone at real time, and at real time with the encoder and policy. Per configuration,
after a warm-up: camera frames/s received, the real-time factor (image stamps over their arrival
times here), the simulator's render time (its /diagnostics), the encoder's inference time and
rate, and the end-to-end latency camera -> command, traced through stamps: each command (a
Float64MultiArray, no header) is matched to the newest features message received before it (the
observation the policy acted on; features copy the image's header stamp), and that stamp to the
wall time the image with that stamp arrived here. Latency = command arrival - image arrival (both
measured in this process, so transport to this process is on both sides); camera -> features
likewise. Prints a markdown table.
Nodes: theia_sim, theia_encoder (theia-tiny, random weights, 1 torch thread), theia_policy
(theia_head, random weights, 10 Hz), every node on the simulator's clock.
"""
import argparse
import bisect
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
os.environ.setdefault("ROS_DOMAIN_ID", str(os.getpid() % 100 + 101))

from theia_ros.nodes.environment import child_environment, use_package_fastdds_profile  # noqa: E402 (after the sys.path and environment set-up above)
from theia_ros.nodes.graph import NODE_MODULES, dump_params  # noqa: E402 (after the sys.path and environment set-up above)

ARM = [f"panda_joint{i}" for i in range(1, 8)]
LOWER = [-2.8973, -1.7628, -2.8973, -3.0718, -2.8973, -1.6573, -2.8973]
UPPER = [2.8973, 1.7628, 2.8973, -0.4, 2.8973, 2.1127, 2.8973]


def graph_params(width, height, rate, with_models, rtf=1.0):
    params = {"theia_sim": {"ros__parameters": {"cameras": ["front"], "width": width, "height": height,
                                                "camera_rate": rate, "real_time_factor": rtf}}}
    if with_models:
        params["theia_encoder"] = {"ros__parameters": {
            "use_sim_time": True, "model": "random:theia-tiny-patch16-224-cddsv", "seed": 0, "cameras": ["front"],
            "representation": "tokens", "torch_threads": 1}}
        params["theia_policy"] = {"ros__parameters": {
            "use_sim_time": True, "policy": "theia_head", "policy_params": "{seed: 0}", "cameras": ["front"],
            "representation": "tokens", "feature_shape": [196, 192], "joint_names": ARM, "proprio_joints": [""],
            "joint_lower": LOWER, "joint_upper": UPPER, "max_velocity": 1.0, "rate": 10.0,
            "command_format": "float64_multi_array", "torch_threads": 1}}
    return params


class Processes:
    def __init__(self, params, log_dir):
        self.file = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
        dump_params(params, self.file)
        self.file.close()
        env = child_environment()
        self.procs = {}
        for name in params:
            log = open(Path(log_dir) / f"{name}.log", "w")
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", NODE_MODULES[name], "--ros-args", "--params-file", self.file.name],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def stop(self):
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in self.procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        os.unlink(self.file.name)


def _stamp(header):
    return header.stamp.sec * 1_000_000_000 + header.stamp.nanosec


def measure(width, height, rate, with_models, duration, warmup, log_dir, rtf=1.0):
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.context import Context
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image
    from std_msgs.msg import Float64MultiArray

    from theia_ros.msg import Features

    procs = Processes(graph_params(width, height, rate, with_models, rtf), log_dir)
    context = Context()
    rclpy.init(context=context)
    node = rclpy.create_node("theia_bench_sim", context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
    rec = {"images": {}, "features": [], "commands": [], "diag": {}, "recording": False}

    def on_image(msg):
        if rec["recording"]:
            rec["images"][_stamp(msg.header)] = time.monotonic()

    def on_features(msg):
        if rec["recording"]:
            rec["features"].append((time.monotonic(), _stamp(msg.header)))

    def on_command(msg):
        if rec["recording"]:
            rec["commands"].append(time.monotonic())

    def on_diag(msg):
        for s in msg.status:
            rec["diag"][s.name] = {kv.key: kv.value for kv in s.values}

    node.create_subscription(Image, "front/image_raw", on_image, qos)
    node.create_subscription(Features, "front/features", on_features, qos)
    node.create_subscription(Float64MultiArray, "commands", on_command, qos)
    node.create_subscription(DiagnosticArray, "/diagnostics", on_diag, 50)

    def spin(seconds):
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            executor.spin_once(timeout_sec=0.05)

    try:
        ready = (lambda: any(k.endswith(": policy") for k in rec["diag"])) if with_models else \
            (lambda: any(k.endswith(": simulation") for k in rec["diag"]))
        end = time.monotonic() + 120
        while not ready() and time.monotonic() < end:
            spin(0.5)
        spin(warmup)
        rec["diag"].clear()
        rec["recording"] = True
        t0 = time.monotonic()
        spin(duration)
        rec["recording"] = False
        elapsed = time.monotonic() - t0
        spin(1.2)  # one more round of diagnostics
    finally:
        executor.shutdown()
        node.destroy_node()
        rclpy.shutdown(context=context)
        procs.stop()

    sim = next((v for k, v in rec["diag"].items() if k.endswith(": simulation")), {})
    enc = next((v for k, v in rec["diag"].items() if "camera front" in k), {})
    what = " + encoder + policy" if with_models else (" (sim alone)" if rtf else " (sim alone, as fast as possible)")
    row = {"config": f"{width}x{height} @ {rate:g} Hz" + what,
           "camera_fps": len(rec["images"]) / elapsed, "rtf": _rtf(rec["images"]),
           "rtf_diagnostics": float(sim.get("real_time_factor", "nan")),
           "render_ms_p50": float(sim.get("front_render_ms_p50", "nan")),
           "render_ms_p99": float(sim.get("front_render_ms_p99", "nan")),
           "inference_ms_p50": float(enc.get("inference_ms_p50", "nan")),
           "features_hz": len(rec["features"]) / elapsed, "commands_hz": len(rec["commands"]) / elapsed}
    img_lat, cmd_lat = [], []
    for arrived, stamp in rec["features"]:
        if stamp in rec["images"]:
            img_lat.append(arrived - rec["images"][stamp])
    feature_times = [t for t, _ in rec["features"]]
    for t in rec["commands"]:
        i = bisect.bisect_right(feature_times, t) - 1
        if i >= 0 and rec["features"][i][1] in rec["images"]:
            cmd_lat.append(t - rec["images"][rec["features"][i][1]])
    for name, values in (("features", img_lat), ("command", cmd_lat)):
        row[f"{name}_ms_p50"] = float(np.percentile(values, 50) * 1e3) if values else float("nan")
        row[f"{name}_ms_p99"] = float(np.percentile(values, 99) * 1e3) if values else float("nan")
    return row


def _rtf(images):
    """Simulation seconds per wall second, from the stamps and arrival times of the images."""
    if len(images) < 2:
        return float("nan")
    stamps = sorted(images)
    arrivals = [images[k] for k in stamps]
    return (stamps[-1] - stamps[0]) * 1e-9 / (max(arrivals) - min(arrivals))


def table(rows):
    head = ("| configuration | camera frames/s | real-time factor | render ms p50 / p99 | encoder inference ms p50 "
            "| features/s | camera -> features ms p50 / p99 | camera -> command ms p50 / p99 | commands/s |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        f = lambda v: "-" if v != v else f"{v:.1f}"  # noqa: E731 (a one-line formatter)
        lines.append(f"| {r['config']} | {f(r['camera_fps'])} | {r['rtf']:.2f} | {f(r['render_ms_p50'])} / "
                     f"{f(r['render_ms_p99'])} | {f(r['inference_ms_p50'])} | {f(r['features_hz'])} | "
                     f"{f(r['features_ms_p50'])} / {f(r['features_ms_p99'])} | {f(r['command_ms_p50'])} / "
                     f"{f(r['command_ms_p99'])} | {f(r['commands_hz'])} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds per configuration")
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--sizes", nargs="+", default=["640x480", "320x240"])
    parser.add_argument("--camera-rate", type=float, default=15.0)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    use_package_fastdds_profile()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_sim_") as logs:
        for size in args.sizes:
            w, h = map(int, size.split("x"))
            for with_models, rtf in ((False, 0.0), (False, 1.0), (True, 1.0)):
                row = measure(w, h, args.camera_rate, with_models, args.duration, args.warmup, logs, rtf)
                print(json.dumps(row), file=sys.stderr, flush=True)
                rows.append(row)
    print(f"\ntheia_sim on {os.cpu_count()} CPU core(s), {args.duration:g} s per configuration "
          f"(encoder/policy RANDOM weights; 1 torch thread each)\n")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
