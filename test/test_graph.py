"""The whole graph: synthetic camera -> encoder -> policy, in separate processes."""
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from std_msgs.msg import Float64MultiArray

from theia_ros.nodes.environment import child_environment

from ros_helpers import NodeProcess, wait_until

pytestmark = pytest.mark.ros


def test_bringup_demo_runs_the_graph_and_prints_a_summary(tmp_path):
    summary_json = tmp_path / "summary.json"
    result = subprocess.run([sys.executable, "-m", "theia_ros.cli", "bringup", "--demo", "--duration", "30",
                             "--summary-json", summary_json], capture_output=True, text=True, timeout=120,
                            env=child_environment())
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "RANDOM WEIGHTS" in out and "bring-up summary [encoder with RANDOM WEIGHTS]" in out, out
    summary = json.loads(summary_json.read_text())
    assert summary["random_weights"] is True
    assert summary["features_received"] > 20, summary
    assert summary["commands_received"] > 10, summary
    camera = summary["diagnostics"]["theia_encoder: camera camera"]
    assert int(camera["frames_out"]) > 20 and int(camera["rejected_bad_input"]) == 0, camera
    assert re.search(rf"features received\s+{summary['features_received']}\n", out), out  # the printed summary agrees


def test_watchdog_stops_commands_when_the_encoder_dies_and_resumes(ros_client, tmp_path):
    params = {
        "synthetic_camera": {"ros__parameters": {"cameras": ["camera"], "rate": 15.0, "width": 320, "height": 240}},
        "theia_encoder": {"ros__parameters": {"model": "random:theia-tiny-patch16-224-cddsv", "backend": "torch",
                                              "cameras": ["camera"],
                                              "representation": "mean", "torch_threads": 1}},
        "theia_policy": {"ros__parameters": {"policy": "hold", "policy_params": "{position: [0.1, 0.2]}",
                                             "cameras": ["camera"], "representation": "mean",
                                             "feature_shape": [192], "joint_names": ["a", "b"],
                                             "proprio_joints": [""], "rate": 20.0, "max_observation_age": 0.4}},
    }
    path = tmp_path / "graph.yaml"
    path.write_text(yaml.safe_dump(params))
    commands, sub = ros_client.collect(Float64MultiArray, "commands")

    def node(module):
        return NodeProcess(f"theia_ros.nodes.{module}", "--ros-args", "--params-file", path)

    with node("synthetic_camera") as camera, node("theia_policy") as policy:
        encoder = node("theia_encoder")
        try:
            assert wait_until(lambda: len(commands) >= 10, 90), encoder.output() + policy.output()
            encoder.kill()  # SIGKILL: no goodbye
            killed_at = time.monotonic()
            time.sleep(2.0)
            last = commands[-1][0]
            # the newest features were already up to one frame old when the encoder died
            assert last - killed_at <= 0.4 + 0.1, f"commands went on {last - killed_at:.2f} s after the kill"
            assert "watchdog" in policy.output()
            n = len(commands)
            encoder = node("theia_encoder")  # features return: commands resume
            assert wait_until(lambda: len(commands) >= n + 10, 90), encoder.output() + policy.output()
            assert policy.alive() and camera.alive()
        finally:
            encoder.stop()
    ros_client.node.destroy_subscription(sub)


def test_main_job_closes_the_loop_in_the_simulator(tmp_path):
    """`make demo`'s graph: sim -> encoder -> the shipped trained policy -> sim, with successes."""
    pytest.importorskip("mujoco")
    summary_json = tmp_path / "summary.json"
    result = subprocess.run([sys.executable, "-m", "theia_ros.cli", "bringup", "config/sim_demo.yaml",
                             "--duration", "30", "--summary-json", summary_json], capture_output=True, text=True,
                            timeout=150, env=child_environment(MUJOCO_GL="egl"),
                            cwd=str(Path(__file__).resolve().parents[1]))
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-5000:]
    summary = json.loads(summary_json.read_text())
    episodes = summary["episodes"]
    # the trained policy solves every episode; the first one too: it starts at the policy's first command
    # (episode_clock: first_command), not while the encoder is still configuring
    assert episodes["ended"] >= 3 and episodes["succeeded"] == episodes["ended"], summary
    sim = summary["diagnostics"]["theia_sim: simulation"]
    assert float(sim["front_hz"]) > 10 and int(sim["front_frames"]) > 0, sim
    policy = next(v for k, v in summary["diagnostics"].items() if k.endswith(": policy"))
    assert int(policy["commands"]) > 0 and int(policy["rejected_actions"]) == 0, policy
