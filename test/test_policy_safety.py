"""The policy node must stop a robot: clocks ahead, velocity commands that end with zero, rate limits across
a stale period. Real node processes over real topics, plus unit tests of the plain-Python parts."""
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from theia_ros.commands import COMMAND_FORMATS
from theia_ros.policies import ObservationBuffer, ObservationError, ObservationSpec
from theia_ros.policies.safety import CommandFilter

from ros_helpers import NodeProcess, wait_until

TEST_DIR = Path(__file__).resolve().parent
JOINTS = ["j1", "j2", "j3"]
MAX_AGE = 0.3  # max_observation_age of the nodes started here
MARGIN = 0.35  # scheduling slack on a shared machine (a tick is 50 ms)
AHEAD = 2.0  # seconds a clock runs ahead


def start_policy(tmp_path, name="policy.yaml", **params):
    base = {"cameras": ["cam"], "representation": "mean", "feature_shape": [8], "joint_names": JOINTS,
            "rate": 20.0, "max_observation_age": MAX_AGE, "diagnostics_period": 0.3}
    base.update(params)
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"theia_policy": {"ros__parameters": base}}))
    return NodeProcess("theia_ros.nodes.theia_policy", "--ros-args", "--params-file", path,
                       env={"PYTHONPATH": str(TEST_DIR)})


class Feed:
    """Publishes features (every value `level`) and joint states at 30 Hz, each stream switchable on and off
    and stamped `offset[stream]` seconds ahead of the test's clock; `last[stream]` is when it last published
    (time.monotonic, the clock the received commands are timed on)."""

    def __init__(self, client, level=0.25, positions=(0.1, 0.2, 0.3), joints=True):
        from sensor_msgs.msg import JointState

        from theia_ros.msg import Features

        self.client = client
        self.level = level
        self.positions = list(positions)
        self.on = {"features": True, "joint_states": joints}
        self.offset = {"features": 0.0, "joint_states": 0.0}
        self.last = {"features": None, "joint_states": None}
        self.running = True
        self.pubs = {"features": client.publisher(Features, "cam/features"),
                     "joint_states": client.publisher(JointState, "joint_states")}
        self._joint_state = JointState
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _stamp(self, stream):
        from rclpy.time import Duration

        return (self.client.node.get_clock().now() + Duration(nanoseconds=int(self.offset[stream] * 1e9))).to_msg()

    def _loop(self):
        from theia_ros.features import to_features_msg

        while self.running:
            if self.on["features"]:
                msg = to_features_msg(np.full(8, self.level, np.float32), representation="mean", camera="cam")
                msg.header.stamp = self._stamp("features")
                self.pubs["features"].publish(msg)
                self.last["features"] = time.monotonic()
            if self.on["joint_states"]:
                js = self._joint_state(name=JOINTS, position=self.positions)
                js.header.stamp = self._stamp("joint_states")
                self.pubs["joint_states"].publish(js)
                self.last["joint_states"] = time.monotonic()
            time.sleep(1 / 30)

    def stop(self, stream=None):
        for s in ([stream] if stream else list(self.on)):
            self.on[s] = False
        time.sleep(0.1)  # the loop's current iteration ends

    def close(self):
        self.running = False
        self.thread.join()
        for pub in self.pubs.values():
            self.client.node.destroy_publisher(pub)


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


def diagnostic_value(diags, key):
    for _, array in reversed(diags):
        for s in array.status:
            if s.name == "theia_policy: policy":
                values = {kv.key: kv.value for kv in s.values}
                if key in values:
                    return int(values[key])
    return None


# ---------------------------------------------------------------- plain Python

def spec(joints=("j1",)):
    return ObservationSpec(cameras=("cam",), representation="mean", feature_shape=(4,), proprio_joints=joints)


def test_buffer_age_is_never_less_than_the_time_since_arrival():
    buf = ObservationBuffer(spec(), max_future_stamp=5.0)
    buf.push_features("cam", 102.0, np.zeros(4), arrival=100.0)  # stamped 2 s ahead of the receiver's clock
    buf.push_joint_state(102.0, ["j1"], [0.0], arrival=100.0)
    assert buf.age(100.5) == pytest.approx(0.5)  # not -1.5: half a second since it arrived
    assert buf.age(103.0) == pytest.approx(3.0)
    buf.push_features("cam", 102.9, np.zeros(4), arrival=102.9)
    assert buf.age(103.0) == pytest.approx(3.0), "a stalled joint state stream still ages the observation"
    buf.push_joint_state(102.95, ["j1"], [0.0], arrival=102.95)
    assert buf.age(103.0) == pytest.approx(0.1)
    legacy = ObservationBuffer(spec())  # no arrival given: the stamp is the only clock (bag replays, scripts)
    legacy.push_features("cam", 10.0, np.zeros(4))
    legacy.push_joint_state(10.0, ["j1"], [0.0])
    assert legacy.age(10.25) == pytest.approx(0.25)


@pytest.mark.parametrize("stream", ["features", "joint_states"])
def test_buffer_refuses_stamps_too_far_ahead(stream):
    from theia_ros.policies.buffer import FutureStampError

    buf = ObservationBuffer(spec(), max_future_stamp=0.1)

    def push(stamp, arrival):
        if stream == "features":
            buf.push_features("cam", stamp, np.zeros(4), arrival=arrival)
        else:
            buf.push_joint_state(stamp, ["j1"], [0.0], arrival=arrival)

    push(100.05, 100.0)  # within the tolerance
    with pytest.raises(FutureStampError, match="ahead"):
        push(102.0, 100.1)
    assert issubclass(FutureStampError, ObservationError)
    push(100.2, 100.2)  # the refused message left no trace: the next good one is newer than the last kept


def test_step_dt_is_at_most_one_command_period():
    from theia_ros.policies.safety import step_dt

    assert step_dt(None, 10.0, 0.05) == pytest.approx(0.05)  # no command yet: one period from the measured state
    assert step_dt(9.98, 10.0, 0.05) == pytest.approx(0.02)  # an early tick: its own dt
    assert step_dt(5.0, 10.0, 0.05) == pytest.approx(0.05), "after a stale period the step stays one period's"
    f = CommandFilter(["a"], max_velocity=0.5)
    np.testing.assert_allclose(f.filter([1.25], [0.25], step_dt(5.0, 10.0, 0.05)), [0.275])


def test_velocity_filter_clamps_speed_and_refuses_non_finite():
    f = CommandFilter(["a", "b"], max_velocity=1.0, mode="velocity")
    np.testing.assert_allclose(f.filter([3.0, -0.5]), [1.0, -0.5])
    assert f.filter([np.nan, 0.0]) is None and f.counts["rejected_nonfinite"] == 1


# ---------------------------------------------------------------- clock ahead, over topics

@pytest.mark.ros
@pytest.mark.parametrize("stream", ["features", "joint_states"])
def test_stamps_ahead_but_tolerated_stop_by_arrival_time(ros_client, tmp_path, collect, stream):
    """A stream stamped 2 s ahead (tolerated here) stops: commands end max_observation_age after its last
    message arrived, not 2 s later when its stamps catch up with the clock."""
    from std_msgs.msg import Float64MultiArray

    commands = collect(Float64MultiArray, "commands")
    feed = Feed(ros_client)
    feed.offset[stream] = AHEAD
    try:
        with start_policy(tmp_path, policy="hold", max_future_stamp=5.0, proprio_tolerance=5.0) as node:
            assert wait_until(lambda: len(commands) >= 10, 30), node.output()
            feed.stop(stream)  # the other stream goes on
            time.sleep(AHEAD + 1.5)
            last_message = feed.last[stream]
            after = commands[-1][0] - last_message
            print(f"{stream} {AHEAD} s ahead: last command {after:.2f} s after the stream's last message")
            assert after <= MAX_AGE + MARGIN, (
                f"commands went on {after:.2f} s after the last {stream} message arrived "
                f"(max_observation_age {MAX_AGE} s)")
    finally:
        feed.close()


@pytest.mark.ros
@pytest.mark.parametrize("stream", ["features", "joint_states"])
def test_stamps_ahead_beyond_tolerance_are_counted_logged_and_stale(ros_client, tmp_path, collect, stream):
    """Default max_future_stamp: a stream jumping 2 s ahead is refused (counted, logged) and commands stop as if
    it had stalled."""
    from diagnostic_msgs.msg import DiagnosticArray
    from std_msgs.msg import Float64MultiArray

    commands = collect(Float64MultiArray, "commands")
    diags = collect(DiagnosticArray, "/diagnostics")
    feed = Feed(ros_client)
    try:
        with start_policy(tmp_path, policy="hold", proprio_tolerance=5.0) as node:
            assert wait_until(lambda: len(commands) >= 10, 30), node.output()
            feed.offset[stream] = AHEAD
            shifted = time.monotonic()
            time.sleep(1.5)
            feed.stop()
            time.sleep(AHEAD + 1.0)
            after = commands[-1][0] - shifted
            sent = sum(1 for t, _ in commands if t > shifted + MAX_AGE + MARGIN)
            print(f"{stream} jumped {AHEAD} s ahead: last command {after:.2f} s after the jump, {sent} commands "
                  f"later than {MAX_AGE + MARGIN:.2f} s after it, future_stamps "
                  f"{diagnostic_value(diags, 'future_stamps')}")
            assert after <= MAX_AGE + MARGIN, f"commands went on {after:.2f} s after {stream} jumped {AHEAD} s ahead"
            assert wait_until(lambda: (diagnostic_value(diags, "future_stamps") or 0) >= 20, 5), \
                f"future_stamps: {diagnostic_value(diags, 'future_stamps')}"
            assert "ahead of the receiver's clock" in node.output()
            assert node.alive()
    finally:
        feed.close()


# ---------------------------------------------------------------- velocity commands end with zero

@pytest.mark.ros
@pytest.mark.parametrize("command_format", ["float64_multi_array", "joint_trajectory", "joint_state"])
def test_every_way_velocity_commanding_ends_sends_zero_velocity(ros_client, tmp_path, collect, command_format):
    """Velocity mode: a rejected action, the safety filter refusing one, the watchdog, ~/enable false and the
    node shutting down each publish zero velocity for every joint before commanding stops."""
    from std_srvs.srv import SetBool

    fmt = COMMAND_FORMATS[command_format]
    msg_class = {"float64_multi_array": "std_msgs.msg:Float64MultiArray",
                 "joint_trajectory": "trajectory_msgs.msg:JointTrajectory",
                 "joint_state": "sensor_msgs.msg:JointState"}[command_format]
    module, _, cls = msg_class.partition(":")
    commands = collect(getattr(__import__(module, fromlist=[cls]), cls), fmt.topic)
    enable = ros_client.node.create_client(SetBool, "/theia_policy/enable")
    feed = Feed(ros_client, level=0.25, joints=False)

    def velocities(i):
        names, values = fmt.read(commands[i][1], "velocity")
        assert names in (None, JOINTS)
        return values

    def moving():
        return len(commands) and np.allclose(velocities(-1), 0.25)

    problems, seen = [], {}

    def ends_with_zero(way, start):
        """After `start` (an index), a zero-velocity command for all joints arrives and nothing moves after it;
        returns when it arrived (None: never)."""
        def zero_index():
            for i in range(start, len(commands)):
                if velocities(i).shape == (3,) and not velocities(i).any():
                    return i
            return None

        if not wait_until(lambda: zero_index() is not None, MAX_AGE + 2.0):
            seen[way] = "no zero velocity"
            problems.append(f"{way}: no zero velocity sent; the commands after it: "
                            f"{[velocities(i).tolist() for i in range(start, len(commands))][-3:]}")
            return None
        time.sleep(0.5)
        zero = zero_index()
        later = [velocities(i).tolist() for i in range(zero + 1, len(commands)) if velocities(i).any()]
        seen[way] = f"{len(commands) - zero} zero-velocity message(s)"
        if later:
            problems.append(f"{way}: moving again after the zero velocity: {later}")
        return commands[zero][0]

    try:
        with start_policy(tmp_path, policy="plugin_policies:LevelOrFaultPolicy", action_mode="velocity",
                          proprio_joints=[""], command_format=command_format, max_velocity=1.0) as node:
            assert wait_until(moving, 30), node.output()
            for way, level in (("rejected action", -1.0), ("safety filter refusing", -2.0)):
                n = len(commands)
                feed.level = level
                ends_with_zero(way, n)
                feed.level = 0.25
                assert wait_until(moving, 10), f"{way}: did not resume\n{node.output()}"

            n = len(commands)
            feed.stop()
            stopped = time.monotonic()
            at = ends_with_zero("watchdog", n)
            if at is not None and at - stopped > MAX_AGE + MARGIN:
                problems.append(f"watchdog: zero velocity {at - stopped:.2f} s after the features stopped")
            feed.on["features"] = True
            assert wait_until(moving, 10), node.output()

            assert enable.wait_for_service(timeout_sec=10)
            n = len(commands)
            future = enable.call_async(SetBool.Request(data=False))
            assert wait_until(future.done, 10) and future.result().success
            ends_with_zero("~/enable false", n)
            future = enable.call_async(SetBool.Request(data=True))
            assert wait_until(future.done, 10) and future.result().success
            assert wait_until(moving, 10), node.output()

            n = len(commands)
            assert node.stop() == 0, node.output()
            wait_until(lambda: len(commands) > n, 3)
            seen["shutdown"] = f"last command {velocities(-1).tolist()}"
            if len(commands) == n or velocities(-1).any():
                problems.append(f"shutdown: the last command was {velocities(-1).tolist()}, not zero velocity")
            print(f"{command_format}: {seen}")
            assert not problems, "\n".join(problems) + "\n" + node.output()[-3000:]
    finally:
        feed.close()
        ros_client.node.destroy_client(enable)


@pytest.mark.ros
def test_position_mode_still_sends_nothing_when_it_stops(ros_client, tmp_path, collect):
    """Position mode keeps today's behaviour: the watchdog (on_stale stop) sends nothing, no zero position."""
    from std_msgs.msg import Float64MultiArray

    commands = collect(Float64MultiArray, "commands")
    feed = Feed(ros_client, level=0.25, joints=False)
    try:
        with start_policy(tmp_path, policy="plugin_policies:LevelOrFaultPolicy", proprio_joints=[""]) as node:
            assert wait_until(lambda: len(commands) >= 5, 30), node.output()
            feed.stop()
            time.sleep(MAX_AGE + 1.0)
            assert all(np.allclose(m.data, 0.25) for _, m in commands), "a position command other than the policy's"
    finally:
        feed.close()


# ---------------------------------------------------------------- rate limit across a stale period

@pytest.mark.ros
def test_first_command_after_a_stale_period_is_rate_limited(ros_client, tmp_path, collect):
    """max_velocity 0.5 rad/s at 20 Hz: each step is at most 0.025 rad, also the first one after the features
    stalled for 2 s and came back asking for a position 1 rad away."""
    from std_msgs.msg import Float64MultiArray

    commands = collect(Float64MultiArray, "commands")
    feed = Feed(ros_client, level=0.25, joints=False)
    step = 0.5 / 20.0
    try:
        with start_policy(tmp_path, policy="plugin_policies:LevelOrFaultPolicy", proprio_joints=[""],
                          max_velocity=0.5) as node:
            assert wait_until(lambda: len(commands) >= 5, 30), node.output()
            np.testing.assert_allclose(commands[-1][1].data, [0.25] * 3)
            feed.stop()
            time.sleep(2.0)
            n = len(commands)
            feed.level = 1.25
            feed.on["features"] = True
            assert wait_until(lambda: len(commands) >= n + 5, 10), node.output()
            values = [np.asarray(m.data) for _, m in commands[n - 1:]]
            steps = [float(np.abs(b - a).max()) for a, b in zip(values, values[1:])]
            print(f"first step after a 2 s stale period: {steps[0]:.3f} (limit {step:.3f}); next {steps[1:4]}")
            assert steps[0] <= step + 1e-9, f"the first command after the stale period jumped {steps[0]:.3f}"
            assert max(steps) <= step + 1e-9
            assert values[-1][0] > 0.25, "the command does not move towards the new target"
    finally:
        feed.close()
