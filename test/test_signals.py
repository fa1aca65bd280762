"""Ctrl-C and SIGTERM stop every node: exit code 0, a clean log, nothing published after the signal.

Under `ros2 launch`, Ctrl-C sends SIGINT to the whole process group and launch forwards one more to
each node, so a node gets two signals close together (the second during its teardown); a service
manager sends SIGTERM. The tests send the first signal to the node's process group (the terminal's)
and the next ones to the process (launch's), while the node is busy.
"""
import os
import signal
import threading
import time

import numpy as np
import pytest
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import Float64MultiArray

from theia_ros.features import to_features_msg
from theia_ros.msg import Features

from ros_helpers import NodeProcess, params_file, wait_until

pytestmark = pytest.mark.ros

RANDOM_TINY = "random:theia-tiny-patch16-224-cddsv"
RANDOM_BASE = "random:theia-base-patch16-224-cddsv"  # ~0.5 s or more per frame on one CPU thread
BAD_LINES = ("Traceback", "[ERROR]", "[FATAL]", "RCLError", "KeyboardInterrupt", "context is invalid")
EXIT_WITHIN = 10.0  # s from the first signal: "a few seconds", with a margin for 2 busy cores
IN_FLIGHT = 1.0  # s: a message sent just before the signal may be received this much later


class Feeder:
    """Calls `publish()` at `rate` Hz on a thread of its own until closed."""

    def __init__(self, publish, rate=30.0):
        self.publish = publish
        self.period = 1.0 / rate
        self.running = True
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        while self.running:
            self.publish()
            time.sleep(self.period)

    def close(self):
        self.running = False
        self.thread.join()


def start(tmp_path, node, **params):
    path = params_file(tmp_path / f"{node}.yaml", node, params)
    return NodeProcess(f"theia_ros.nodes.{node}", "--ros-args", "--params-file", path, name=node)


def image_feeder(client, topic, height=120, width=160):
    pub = client.publisher(Image, topic)
    rgb = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)

    def publish():
        msg = Image(height=height, width=width, encoding="rgb8", step=width * 3)
        msg.header.stamp = client.node.get_clock().now().to_msg()
        msg.data = rgb.tobytes()
        pub.publish(msg)

    return pub, Feeder(publish)


def features_feeder(client, camera, joints):
    feat_pub = client.publisher(Features, f"{camera}/features")
    joint_pub = client.publisher(JointState, "joint_states")

    def publish():
        stamp = client.node.get_clock().now().to_msg()
        msg = to_features_msg(np.full(8, 0.25, np.float32), representation="mean", camera=camera)
        msg.header.stamp = stamp
        feat_pub.publish(msg)
        state = JointState(name=joints, position=[0.1] * len(joints))
        state.header.stamp = stamp
        joint_pub.publish(state)

    return [feat_pub, joint_pub], Feeder(publish)


# node -> how to run it busy: (start it, the topic and type it publishes, what to feed it)
def run_camera(client, tmp_path):
    node = start(tmp_path, "synthetic_camera", cameras=["sigcam"], rate=30.0, width=64, height=48, reliable=True)
    return node, (Image, "sigcam/image_raw"), [], None


def run_sim(client, tmp_path):
    node = start(tmp_path, "theia_sim", cameras=["front"], width=96, height=72, camera_rate=10.0,
                 diagnostics_period=0.5)
    return node, (JointState, "joint_states"), [], None


def run_encoder(client, tmp_path, model=RANDOM_TINY, height=120, width=160):
    node = start(tmp_path, "theia_encoder", model=model, seed=0, backend="torch", qos="reliable", torch_threads=1,
                 cameras=["sigenc"], diagnostics_period=0.3)
    pub, feeder = image_feeder(client, "sigenc/image_raw", height, width)
    return node, (Features, "sigenc/features"), [pub], feeder


def run_policy(client, tmp_path):
    joints = ["j1", "j2", "j3"]
    node = start(tmp_path, "theia_policy", policy="hold", cameras=["sigpol"], representation="mean",
                 feature_shape=[8], joint_names=joints, rate=20.0, max_observation_age=0.5, diagnostics_period=0.3)
    pubs, feeder = features_feeder(client, "sigpol", joints)
    return node, (Float64MultiArray, "commands"), pubs, feeder


NODES = {"synthetic_camera": run_camera, "theia_sim": run_sim, "theia_encoder": run_encoder,
         "theia_policy": run_policy}
PATTERNS = {
    "two_sigint_50ms": (signal.SIGINT, signal.SIGINT),  # Ctrl-C under ros2 launch
    "two_sigterm_50ms": (signal.SIGTERM, signal.SIGTERM),
    "five_mixed_50ms": (signal.SIGINT, signal.SIGTERM, signal.SIGINT, signal.SIGINT, signal.SIGTERM),
}


def send(node, signals, gap=0.05):
    """The first signal to the process group (the terminal's Ctrl-C), the others to the process
    (launch forwarding it); returns the time of the first."""
    sent = time.monotonic()
    for i, sig in enumerate(signals):
        if i:
            time.sleep(gap)
        if node.proc.poll() is not None:
            break
        if i == 0:
            os.killpg(node.proc.pid, sig)
        else:
            node.proc.send_signal(sig)
    return sent


def signal_busy_node(ros_client, tmp_path, runner, signals, ready=3, settle=0.0, **kwargs):
    """Start a node, wait until it publishes, send `signals`; returns (exit code, seconds to exit,
    its log, receive times of its messages after the first signal, minus the in-flight margin)."""
    msg_type, topic = None, None
    node, (msg_type, topic), pubs, feeder = runner(ros_client, tmp_path, **kwargs)
    received, sub = ros_client.collect(msg_type, topic)
    try:
        assert wait_until(lambda: len(received) >= ready, 120), node.output()
        time.sleep(settle)
        sent = send(node, signals)
        try:
            node.proc.wait(EXIT_WITHIN + 20)
        except Exception:
            pass
        elapsed = time.monotonic() - sent
        code = node.proc.poll()
        time.sleep(0.3)  # anything still in flight arrives
        late = [t - sent for t, _ in received if t > sent + IN_FLIGHT]
        return code, elapsed, node.output(), late
    finally:
        if feeder is not None:
            feeder.close()
        for pub in pubs:
            ros_client.destroy(pub)
        ros_client.destroy(sub)
        node.kill()
        os.unlink(node.log.name)


def assert_clean(code, elapsed, log, late):
    assert code == 0, f"exit code {code}\n{log}"
    assert elapsed < EXIT_WITHIN, f"took {elapsed:.1f} s to exit\n{log}"
    bad = [line for line in log.splitlines() if any(word in line for word in BAD_LINES)]
    assert not bad, f"unclean shutdown log: {bad}\n{log}"
    assert not late, f"published {len(late)} messages after the signal (last {max(late):.2f} s after)\n{log}"


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("node", NODES)
def test_signals_end_a_busy_node_with_exit_0(ros_client, tmp_path, node, pattern):
    assert_clean(*signal_busy_node(ros_client, tmp_path, NODES[node], PATTERNS[pattern]))


@pytest.mark.parametrize("signals", [(signal.SIGINT,), (signal.SIGTERM,), (signal.SIGINT, signal.SIGINT)],
                         ids=["one_sigint", "one_sigterm", "sigint_and_launchs_sigint"])
def test_signals_during_heavy_inference_end_the_encoder_cleanly(ros_client, tmp_path, signals):
    """Frames arrive faster than a big model on one thread encodes them: the signal lands in inference."""
    result = signal_busy_node(ros_client, tmp_path, run_encoder, signals, ready=1, settle=0.3,
                              model=RANDOM_BASE, height=480, width=640)
    assert_clean(*result)


def test_ctrl_c_while_the_encoder_loads_its_model_ends_it_cleanly(ros_client, tmp_path):
    """The terminal's and launch's SIGINT while the node exists but is still configuring (autostart
    loads a big model): it stops there, without finishing the configure."""
    node = start(tmp_path, "theia_encoder", model=RANDOM_BASE, seed=0, backend="torch", torch_threads=1,
                 cameras=["sigload"])
    try:
        assert wait_until(lambda: "theia_encoder" in ros_client.node.get_node_names() or not node.alive(), 60), \
            node.output()
        sent = send(node, (signal.SIGINT, signal.SIGINT))
        node.proc.wait(EXIT_WITHIN + 20)
        elapsed = time.monotonic() - sent
        log = node.output()
        assert_clean(node.proc.returncode, elapsed, log, [])
        assert "configured in" not in log, "the configure went on after Ctrl-C"
    finally:
        node.kill()
