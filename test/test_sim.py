"""The simulated robot: MuJoCo core (no ROS) and the theia_sim node over real DDS."""
import json
import math
import os
import time

import numpy as np
import pytest

os.environ.setdefault("MUJOCO_GL", "egl")  # before the first import of mujoco: it picks its GL then
mujoco = pytest.importorskip("mujoco")

from theia_ros.sim import HOME, CommandError, ReachExpert, Simulation  # noqa: E402 (mujoco must load after MUJOCO_GL is set above)


@pytest.fixture(scope="module")
def sim():
    s = Simulation()
    yield s
    s.close()


# ---------------------------------------------------------------------------------------------- core
def test_scene_loads_the_panda_from_the_wheel_and_holds_still(sim):
    assert sim.joint_names == [f"panda_joint{i}" for i in range(1, 8)]
    assert set(sim.cameras) >= {"front", "wrist"}
    assert sim.dt == pytest.approx(0.002)
    sim.reset(0)
    q0, ee0 = sim.arm_positions(), sim.ee_position()
    np.testing.assert_allclose(q0, HOME)
    sim.run(1.0)  # no command: position control + gravity compensation keep the home pose
    assert np.abs(sim.arm_positions() - q0).max() < 1e-3
    assert np.linalg.norm(sim.ee_position() - ee0) < 1e-3
    assert not sim.status()["success"]  # home is far above every cube place
    assert sim.status()["distance"] > 0.2


def test_renders_change_when_the_object_moves(sim):
    sim.reset(1)
    a = sim.render("front", 160, 120).copy()
    assert a.shape == (120, 160, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, sim.render("front", 160, 120))  # same state, same picture
    sim.reset(2)  # another cube place
    b = sim.render("front", 160, 120).copy()
    changed = np.abs(a.astype(int) - b.astype(int)).sum(-1) > 30
    assert 10 < changed.sum() < 0.1 * changed.size  # the cube moved; the rest of the scene did not
    red = (b[..., 0] > 150) & (b[..., 1] < 80) & (b[..., 2] < 80)
    assert red.sum() > 5  # the red cube is visible to the workspace camera
    w = sim.render("wrist", 160, 120)
    assert w.shape == (120, 160, 3) and w.std() > 5
    sim.reset(1)
    np.testing.assert_array_equal(a, sim.render("front", 160, 120))  # same seed, same picture


def test_reset_with_a_seed_reproduces_the_object_position(sim):
    p5 = sim.reset(5)["privileged"]["object_position"]
    p6 = sim.reset(6)["privileged"]["object_position"]
    assert sim.reset(5)["privileged"]["object_position"] == p5
    assert p5 != p6
    t = sim.time
    sim.reset(7)
    assert sim.time == t  # simulation time never goes back (it is the ROS /clock)
    seeds = [sim.reset(s)["privileged"]["object_position"][:2] for s in range(20)]
    xs, ys = zip(*seeds)
    assert max(xs) - min(xs) > 0.1 and max(ys) - min(ys) > 0.2  # the task varies in 2-D


@pytest.mark.parametrize("seed", [0, 3, 11, 42])
def test_the_scripted_expert_reaches_success(sim, seed):
    expert = ReachExpert(sim)
    status = sim.reset(seed)
    sim.command(expert.act_from_status(status))
    sim.run(4.0)  # one call: the success test runs after every physics step
    status = sim.status()
    assert status["success"], status
    assert 0.5 < status["success_time"] < 3.5
    assert status["distance"] < 0.01


def test_distractors_are_placed_per_seed_and_never_block_the_arm():
    from theia_ros.sim import SceneConfig, SimConfig

    s = Simulation(SimConfig(scene=SceneConfig(distractors=3)))
    expert = ReachExpert(s)
    try:
        for seed in (1, 4):
            s.command(expert.act_from_status(s.reset(seed)))
            s.run(3.0)
            assert s.status()["success"], s.status()
        picture = s.render("front", 160, 120)
        blue = (picture[..., 2] > 150) & (picture[..., 0] < 80)
        assert blue.sum() > 3  # the blue distractor is in view
        a = s.data.mocap_pos.copy()
        s.reset(5)
        assert not np.allclose(a, s.data.mocap_pos)
        s.reset(4)
        np.testing.assert_allclose(a, s.data.mocap_pos)
    finally:
        s.close()


def test_bad_commands_are_rejected_counted_and_never_applied(sim):
    sim.reset(0)
    before = dict(sim.counts)
    target = sim.target.copy()
    bad = {
        "wrong_length": [0.0] * 3,
        "non_finite": [0.0, float("nan"), 0.0, -2.0, 0.0, 0.5, 0.7],
        "beyond_limits": [0.0, 0.0, 0.0, -0.1, 0.0, 0.5, 0.7],  # joint 4's upper limit is -0.4
    }
    for reason, command in bad.items():
        with pytest.raises(CommandError) as err:
            sim.command(command)
        assert err.value.reason == reason
    with pytest.raises(CommandError):
        sim.command([0.0, math.inf, 0.0, -2.0, 0.0, 0.5, 0.7])
    with pytest.raises(CommandError) as err:
        sim.command([0.1], names=["no_such_joint"])
    assert err.value.reason == "unknown_joint"
    with pytest.raises(CommandError) as err:  # times must increase
        sim.command_trajectory(["panda_joint1"], [(0.5, [0.1]), (0.2, [0.2])])
    assert err.value.reason == "bad_trajectory"
    with pytest.raises(CommandError) as err:  # one bad point rejects the whole trajectory
        sim.command_trajectory(["panda_joint1"], [(0.5, [0.1]), (1.0, [9.0])])
    assert err.value.reason == "beyond_limits"
    sim.run(0.5)
    np.testing.assert_array_equal(sim.target, target)
    assert np.abs(sim.arm_positions() - target).max() < 1e-3
    after = sim.counts
    assert after["rejected_wrong_length"] - before["rejected_wrong_length"] == 1
    assert after["rejected_non_finite"] - before["rejected_non_finite"] == 2
    assert after["rejected_beyond_limits"] - before["rejected_beyond_limits"] == 2
    assert after["rejected_unknown_joint"] - before["rejected_unknown_joint"] == 1
    assert after["rejected_bad_trajectory"] - before["rejected_bad_trajectory"] == 1
    assert after["commands_accepted"] == before["commands_accepted"]


def test_position_commands_and_trajectories_are_followed(sim):
    sim.reset(0)
    goal = np.array(HOME) + np.array([0.3, 0.2, -0.2, 0.3, 0.2, 0.3, -0.3])
    sim.command(goal)
    sim.run(0.2)  # the speed limit (1 rad/s) spreads the jump over time
    assert np.abs(sim.arm_positions() - np.array(HOME)).max() <= 0.2 + 1e-3
    sim.run(2.0)
    np.testing.assert_allclose(sim.arm_positions(), goal, atol=2e-3)
    sim.command_trajectory(["panda_joint2", "panda_joint1"], [(0.5, [-0.5, 0.1]), (1.0, [-0.6, 0.0])])
    sim.run(0.5)
    assert sim.target[1] == pytest.approx(-0.5, abs=0.01) and sim.target[0] == pytest.approx(0.1, abs=0.01)
    sim.run(1.5)
    q = sim.arm_positions()
    assert q[0] == pytest.approx(0.0, abs=2e-3) and q[1] == pytest.approx(-0.6, abs=2e-3)
    assert q[2] == pytest.approx(goal[2], abs=2e-3)  # joints not named keep their target


def test_ik_reaches_targets_with_the_gripper_down(sim):
    expert = ReachExpert(sim)
    for target in ([0.4, -0.2, 0.15], [0.6, 0.2, 0.15], [0.5, 0.0, 0.3]):
        q = expert.solve(target)
        pos, rot = sim.ik.forward(q)
        assert np.linalg.norm(pos - target) < 2e-3
        assert rot[:, 2] @ np.array([0.0, 0.0, -1.0]) > 0.99  # approach axis points down
        assert np.all(q >= sim.lower) and np.all(q <= sim.upper)


# ---------------------------------------------------------------------------------------------- node
class SimHarness:
    """Own rclpy context in this thread: SimClient + subscriptions, spun on demand."""

    def __init__(self):
        import rclpy
        from rclpy.context import Context
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.parameter import Parameter

        from theia_ros.nodes.collect import SimClient

        self.context = Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node("theia_sim_test", context=self.context,
                                      parameter_overrides=[Parameter("use_sim_time", value=True)])
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.client = SimClient(self.node, self.executor)

    def collect(self, msg_type, topic, qos=None):
        from ros_helpers import RELIABLE

        received = []
        self.node.create_subscription(msg_type, topic, lambda m: received.append((time.monotonic(), m)),
                                      qos or RELIABLE)
        return received

    def spin(self, seconds):
        self.client.spin_until(lambda: False, seconds)

    def close(self):
        import rclpy

        self.executor.shutdown()
        self.node.destroy_node()
        rclpy.shutdown(context=self.context)


@pytest.fixture(scope="module")
def sim_node():
    from ros_helpers import NodeProcess

    proc = NodeProcess("theia_ros.nodes.theia_sim", "--ros-args", "-p", "width:=96", "-p", "height:=72",
                       "-p", "camera_rate:=10.0", "-p", "seed:=100", "-p", "diagnostics_period:=0.5",
                       name="theia_sim")
    harness = SimHarness()
    try:
        assert harness.client.wait_ready(60), proc.output()
        yield proc, harness
    finally:
        harness.close()
        code = proc.stop()
        assert code == 0, proc.output()


def _diagnostics(harness, received):
    harness.client.spin_until(lambda: bool(received), 5)
    return {kv.key: kv.value for kv in received[-1][1].status[0].values}


@pytest.mark.ros
def test_sim_node_publishes_images_joint_states_clock_and_status(sim_node):
    from diagnostic_msgs.msg import DiagnosticArray
    from rosgraph_msgs.msg import Clock
    from sensor_msgs.msg import CameraInfo, Image, JointState

    proc, h = sim_node
    front, wrist = h.collect(Image, "front/image_raw"), h.collect(Image, "wrist/image_raw")
    info, joints = h.collect(CameraInfo, "front/camera_info"), h.collect(JointState, "joint_states")
    clock, diags = h.collect(Clock, "/clock"), h.collect(DiagnosticArray, "/diagnostics")
    t0 = time.monotonic()
    assert h.client.spin_until(lambda: len(front) >= 15 and len(wrist) >= 15, 30), proc.output()
    wall = time.monotonic() - t0
    img = front[-1][1]
    assert (img.width, img.height, img.encoding, img.step) == (96, 72, "rgb8", 96 * 3)
    assert len(img.data) == 96 * 72 * 3 and img.header.frame_id == "front_optical_frame"
    assert info and info[-1][1].k[0] > 0 and info[-1][1].width == 96
    stamps = [m.header.stamp.sec + m.header.stamp.nanosec * 1e-9 for _, m in front]
    assert np.all(np.diff(stamps) > 0) and np.median(np.diff(stamps)) == pytest.approx(0.1, abs=0.01)
    assert len(front) / wall > 4  # ~10 Hz at real time (loose: 2 busy cores)
    js = joints[-1][1]
    assert list(js.name)[:7] == [f"panda_joint{i}" for i in range(1, 8)] and len(js.position) == 9
    np.testing.assert_allclose(list(js.position)[:7], HOME, atol=1e-3)
    ticks = [c.clock.sec + c.clock.nanosec * 1e-9 for _, c in clock]
    assert len(ticks) > 20 and np.all(np.diff(ticks) > 0)
    status = h.client.status
    assert status["task"] == "reach" and status["success"] is False
    assert set(status["privileged"]) >= {"object_position", "target_position", "ee_position"}
    values = _diagnostics(h, diags)
    assert float(values["real_time_factor"]) > 0.3 and float(values["front_render_ms_p50"]) > 0
    assert h.client.sim_time() > 0  # this node runs on the simulator's clock


@pytest.mark.ros
def test_sim_node_follows_float64_commands_and_trajectories_and_rejects_bad_ones(sim_node):
    from diagnostic_msgs.msg import DiagnosticArray
    from sensor_msgs.msg import JointState
    from std_msgs.msg import Float64MultiArray
    from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

    proc, h = sim_node
    h.client.reset(3)
    joints, diags = h.collect(JointState, "joint_states"), h.collect(DiagnosticArray, "/diagnostics")
    from ros_helpers import RELIABLE

    pub = h.node.create_publisher(Float64MultiArray, "commands", RELIABLE)
    traj_pub = h.node.create_publisher(JointTrajectory, "joint_trajectory", RELIABLE)
    assert h.client.spin_until(lambda: pub.get_subscription_count() and traj_pub.get_subscription_count(), 20)

    def arm():
        return np.array(list(joints[-1][1].position)[:7])

    def settle(goal, timeout=15.0):
        return h.client.spin_until(lambda: joints and np.abs(arm() - goal).max() < 5e-3, timeout)

    goal = np.array(HOME) + np.array([0.3, 0.2, 0.0, 0.2, 0.0, 0.2, 0.0])
    pub.publish(Float64MultiArray(data=goal.tolist()))
    assert settle(goal), (arm(), proc.output())

    before = _diagnostics(h, diags)
    for data in ([0.1] * 3, [float("nan")] * 7, (goal + np.array([0, 0, 0, 2.0, 0, 0, 0])).tolist(),
                 [0.0, 5.0, 0.0, -2.0, 0.0, 0.5, 0.7]):
        pub.publish(Float64MultiArray(data=list(data)))
    h.spin(1.0)
    assert np.abs(arm() - goal).max() < 5e-3  # nothing bad was applied
    diags.clear()
    h.spin(0.7)
    after = _diagnostics(h, diags)
    delta = {k: int(after[k]) - int(before[k]) for k in after if k.startswith("rejected_")}
    assert delta["rejected_wrong_length"] == 1 and delta["rejected_non_finite"] == 1
    assert delta["rejected_beyond_limits"] == 2
    assert "rejected" in proc.output()

    traj = JointTrajectory(joint_names=["panda_joint1", "panda_joint4"])
    for t, (a, b) in ((0.5, (0.0, -2.0)), (1.0, (-0.2, -1.8))):
        point = JointTrajectoryPoint(positions=[a, b])
        point.time_from_start.sec, point.time_from_start.nanosec = int(t), int((t % 1) * 1e9)
        traj.points.append(point)
    traj_pub.publish(traj)
    goal2 = goal.copy()
    goal2[0], goal2[3] = -0.2, -1.8
    assert settle(goal2), (arm(), proc.output())
    bad = JointTrajectory(joint_names=["panda_joint1", "nope"], points=[JointTrajectoryPoint(positions=[0.0, 0.0])])
    traj_pub.publish(bad)
    h.spin(0.5)
    assert np.abs(arm() - goal2).max() < 5e-3


@pytest.mark.ros
def test_sim_node_reset_with_a_seed_reproduces_the_object_position(sim_node):
    proc, h = sim_node
    a = h.client.reset(21)
    b = h.client.reset(22)
    c = h.client.reset(21)
    assert a["seed"] == 21 and c["seed"] == 21 and b["episode"] == a["episode"] + 1
    assert a["privileged"]["object_position"] == c["privileged"]["object_position"]
    assert a["privileged"]["object_position"] != b["privileged"]["object_position"]
    core = Simulation()
    np.testing.assert_allclose(core.reset(21)["privileged"]["object_position"][:2],
                               a["privileged"]["object_position"][:2], atol=1e-4)
    d = h.client.reset()  # no seed: the next one
    assert d["seed"] == 22
    assert h.client.status["episode"] == d["episode"]
    assert json.loads(json.dumps(d))["time"] == pytest.approx(0.0, abs=0.05)
