"""The theia_policy node in its own process: features and joint states in, commands out."""
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from diagnostic_msgs.msg import DiagnosticArray
from sensor_msgs.msg import JointState
from std_msgs.msg import Float64MultiArray
from std_srvs.srv import SetBool
from trajectory_msgs.msg import JointTrajectory

from theia_ros.features import to_features_msg
from theia_ros.msg import Features

from ros_helpers import NodeProcess, wait_until

pytestmark = pytest.mark.ros
TEST_DIR = Path(__file__).resolve().parent
JOINTS = ["j1", "j2", "j3"]


def start_policy(tmp_path, name="policy.yaml", **params):
    base = {"cameras": ["cam"], "representation": "mean", "feature_shape": [8], "joint_names": JOINTS,
            "rate": 20.0, "max_observation_age": 0.5, "diagnostics_period": 0.3}
    base.update(params)
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"theia_policy": {"ros__parameters": base}}))
    return NodeProcess("theia_ros.nodes.theia_policy", "--ros-args", "--params-file", path,
                       env={"PYTHONPATH": str(TEST_DIR)})


class FeedThread:
    """Publishes features (value `level`) and joint states at 30 Hz with current stamps."""

    def __init__(self, client, level=0.25, positions=(0.1, 0.2, 0.3)):
        self.client = client
        self.level = level
        self.positions = list(positions)
        self.running = True
        self.paused = False
        self.feat_pub = client.publisher(Features, "cam/features")
        self.joint_pub = client.publisher(JointState, "joint_states")
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        while self.running:
            if not self.paused:
                stamp = self.client.node.get_clock().now().to_msg()
                msg = to_features_msg(np.full(8, self.level, np.float32), representation="mean", camera="cam")
                msg.header.stamp = stamp
                self.feat_pub.publish(msg)
                js = JointState(name=JOINTS, position=self.positions)
                js.header.stamp = stamp
                self.joint_pub.publish(js)
            time.sleep(1 / 30)

    def close(self):
        self.running = False
        self.thread.join()
        self.client.node.destroy_publisher(self.feat_pub)
        self.client.node.destroy_publisher(self.joint_pub)


@pytest.fixture
def collect(ros_client):
    subs = []

    def _collect(msg_type, topic):
        received, sub = ros_client.collect(msg_type, topic)
        subs.append(sub)
        return received

    yield _collect
    for sub in subs:
        ros_client.node.destroy_subscription(sub)


def test_no_command_before_first_observation_then_hold_latches(ros_client, tmp_path, collect):
    commands = collect(Float64MultiArray, "commands")
    with start_policy(tmp_path, policy="hold") as node:
        time.sleep(3.0)
        assert commands == [], "commanded without any observation"
        assert node.alive(), node.output()
        feed = FeedThread(ros_client)
        try:
            assert wait_until(lambda: len(commands) >= 5, 20), node.output()
            np.testing.assert_allclose(commands[-1][1].data, [0.1, 0.2, 0.3])
            feed.positions = [0.5, 0.5, 0.5]  # hold latched the first measured position
            time.sleep(0.5)
            np.testing.assert_allclose(commands[-1][1].data, [0.1, 0.2, 0.3])
        finally:
            feed.close()


def test_swap_policy_by_parameter_and_command_formats(ros_client, tmp_path, collect):
    traj = collect(JointTrajectory, "joint_trajectory")
    states = collect(JointState, "joint_command")
    feed = FeedThread(ros_client, level=0.25)
    try:
        with start_policy(tmp_path, policy="plugin_policies:SineOrNanPolicy", policy_params="{offset: 1.0}",
                          command_format="joint_trajectory", proprio_joints=[""]) as node:
            assert wait_until(lambda: len(traj) >= 3, 30), node.output()
            msg = traj[-1][1]
            assert list(msg.joint_names) == JOINTS
            np.testing.assert_allclose(msg.points[0].positions, [1.25] * 3)
        with start_policy(tmp_path, policy="hold", policy_params="{position: [0.0, -0.5, 0.5]}",
                          command_format="joint_state") as node:
            assert wait_until(lambda: len(states) >= 3, 30), node.output()
            msg = states[-1][1]
            assert list(msg.name) == JOINTS
            np.testing.assert_allclose(msg.position, [0.0, -0.5, 0.5])
    finally:
        feed.close()


def test_limits_clamp_and_nan_is_never_sent(ros_client, tmp_path, collect):
    commands = collect(Float64MultiArray, "commands")
    diags = collect(DiagnosticArray, "/diagnostics")
    feed = FeedThread(ros_client, level=0.25)
    try:
        with start_policy(tmp_path, policy="plugin_policies:SineOrNanPolicy", policy_params="{offset: 5.0}",
                          joint_lower=[-1.0, -1.0, -1.0], joint_upper=[1.0, 2.0, 10.0]) as node:
            assert wait_until(lambda: len(commands) >= 3, 30), node.output()
            np.testing.assert_allclose(commands[-1][1].data, [1.0, 2.0, 5.25])
        n_before = len(commands)
        with start_policy(tmp_path, policy="plugin_policies:SineOrNanPolicy", policy_params="{nan: true}") as node:

            def rejected():
                for _, array in reversed(diags):
                    for s in array.status:
                        if s.name == "theia_policy: policy":
                            return int({kv.key: kv.value for kv in s.values}["rejected_actions"])
                return 0

            assert wait_until(lambda: rejected() >= 5, 30), node.output()
            assert len(commands) == n_before, "a NaN action reached the command topic"
            assert "non-finite" in node.output()
            assert node.alive()
    finally:
        feed.close()


def test_nan_features_are_dropped_and_never_reach_a_command(ros_client, tmp_path, collect):
    commands = collect(Float64MultiArray, "commands")
    diags = collect(DiagnosticArray, "/diagnostics")
    feed = FeedThread(ros_client, level=float("nan"))

    def bad_messages():
        for _, array in reversed(diags):
            for s in array.status:
                if s.name == "theia_policy: policy":
                    return int({kv.key: kv.value for kv in s.values}["bad_messages"])
        return 0

    try:
        with start_policy(tmp_path, policy="plugin_policies:SineOrNanPolicy", proprio_joints=[""]) as node:
            assert wait_until(lambda: bad_messages() >= 10, 30), node.output()
            assert commands == [], "an observation with NaN features was acted on"
            assert "non-finite" in node.output()
            feed.level = 0.25
            assert wait_until(lambda: len(commands) >= 3, 30), node.output()
            np.testing.assert_allclose(commands[-1][1].data, [0.25] * 3)
    finally:
        feed.close()

def test_watchdog_stops_and_resumes_and_enable_service(ros_client, tmp_path, collect):
    commands = collect(Float64MultiArray, "commands")
    enable = ros_client.node.create_client(SetBool, "/theia_policy/enable")
    feed = FeedThread(ros_client)
    try:
        with start_policy(tmp_path, policy="hold", max_observation_age=0.3) as node:
            assert wait_until(lambda: len(commands) >= 5, 30), node.output()
            feed.paused = True
            paused_at = time.monotonic()
            time.sleep(1.5)
            last = commands[-1][0]
            assert last - paused_at <= 0.3 + 0.1, f"commands went on {last - paused_at:.2f} s after features stopped"
            assert "watchdog" in node.output()
            n = len(commands)
            feed.paused = False
            assert wait_until(lambda: len(commands) >= n + 5, 10), node.output()

            assert enable.wait_for_service(timeout_sec=10)
            future = enable.call_async(SetBool.Request(data=False))
            assert wait_until(future.done, 10) and future.result().success
            time.sleep(0.3)
            n = len(commands)
            time.sleep(1.0)
            assert len(commands) == n, "commanded while disabled"
            future = enable.call_async(SetBool.Request(data=True))
            assert wait_until(future.done, 10) and future.result().success
            assert wait_until(lambda: len(commands) >= n + 5, 10)
    finally:
        feed.close()
        ros_client.node.destroy_client(enable)


def test_bad_policy_configuration_exits_with_a_clear_error(tmp_path):
    with start_policy(tmp_path, policy="no_such_policy") as node:
        assert wait_until(lambda: not node.alive(), 30)
        assert node.proc.returncode == 1
        assert "no_such_policy" in node.output() and "cannot start" in node.output()


def test_cartesian_end_effector_steps_as_pose_stamped(ros_client, tmp_path, collect):
    from geometry_msgs.msg import PoseStamped
    from transforms3d.euler import euler2quat

    poses = collect(PoseStamped, "ee_delta")
    feed = FeedThread(ros_client)
    axes = ["dx", "dy", "dz", "droll", "dpitch", "dyaw"]
    try:
        with start_policy(tmp_path, policy="hold", policy_params="{position: [0.05, -0.01, 0.0, 0.0, 0.0, 0.3]}",
                          joint_names=axes, proprio_joints=[""], command_format="ee_delta_pose",
                          ee_frame="panda_hand", joint_lower=[-0.02] * 3 + [-0.2] * 3,
                          joint_upper=[0.02] * 3 + [0.2] * 3) as node:
            assert wait_until(lambda: len(poses) >= 3, 30), node.output()
            msg = poses[-1][1]
            assert msg.header.frame_id == "panda_hand"
            p, q = msg.pose.position, msg.pose.orientation
            np.testing.assert_allclose([p.x, p.y, p.z], [0.02, -0.01, 0.0])  # step clamped to 2 cm
            np.testing.assert_allclose([q.w, q.x, q.y, q.z], euler2quat(0, 0, 0.2, axes="sxyz"), atol=1e-12)
    finally:
        feed.close()



def as_recorded(msg):
    """An rclpy message as a bag reader returns it: converted field by field to the rosbags type, serialized
    and deserialized by rosbags (rclpy's own serialization leaves bytes rosbags refuses)."""
    from theia_ros.bags.io import deserialize, typestore

    store = typestore()

    def convert(value):
        if hasattr(value, "get_fields_and_field_types"):
            name = f"{type(value).__module__.split('.')[0]}/msg/{type(value).__name__}"
            return store.types[name](**{f: convert(getattr(value, f)) for f in value.get_fields_and_field_types()})
        if isinstance(value, (list, tuple)) and value and hasattr(value[0], "get_fields_and_field_types"):
            return [convert(v) for v in value]
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return list(value)
        if isinstance(value, (list, tuple)) or hasattr(value, "typecode") or isinstance(value, np.ndarray):
            return np.asarray(value, dtype=np.float64)
        return value

    recorded = convert(msg)
    return deserialize(store.serialize_cdr(recorded, recorded.__msgtype__), recorded.__msgtype__)


ROUND_TRIPS = [("float64_multi_array", "position"), ("joint_trajectory", "position"), ("joint_trajectory", "velocity"),
               ("joint_state", "position"), ("joint_state", "velocity"), ("ee_delta_pose", "position")]


@pytest.mark.parametrize("name,mode", ROUND_TRIPS)
def test_command_formats_map_actions_to_rclpy_and_rosbags_messages_and_back(name, mode):
    """The one table (theia_ros.commands): what the node writes, train-policy and the simulator read back."""
    from theia_ros.commands import COMMAND_FORMATS, CommandTarget, time_from_start, trajectory_points
    from theia_ros.nodes.recorder import message_class

    fmt = COMMAND_FORMATS[name]
    values = [0.02, -0.01, 0.03, 0.1, -0.2, 0.3]
    joints = ("dx", "dy", "dz", "droll", "dpitch", "dyaw")
    target = CommandTarget(joints, mode, frame_id="panda_hand", time_from_start=1.25)
    written = fmt.write(message_class(fmt.message_type)(), values, target, lambda t: message_class(t)())
    recorded = as_recorded(written)
    assert type(recorded).__module__.startswith("rosbags") and recorded.__msgtype__ == fmt.message_type
    for msg in (written, recorded):
        names, got = fmt.read(msg, mode)
        np.testing.assert_allclose(got, values, rtol=0, atol=1e-12)
        assert names == (list(joints) if name in ("joint_trajectory", "joint_state") else None)
    if name == "joint_trajectory":
        assert time_from_start(recorded.points[0]) == pytest.approx(1.25)
        other = "positions" if mode == "velocity" else "velocities"
        assert len(getattr(recorded.points[0], other)) == 0
        if mode == "position":
            assert trajectory_points(recorded) == [(pytest.approx(1.25), pytest.approx(values))]
    if name == "ee_delta_pose":
        assert recorded.header.frame_id == "panda_hand"
