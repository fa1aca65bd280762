"""Plain-Python cores of the nodes: frame matching, statistics, log throttling, command safety,
the token picture."""
import numpy as np
import pytest

from theia_ros.nodes.feature_image import tokens_to_rgb
from theia_ros.nodes.stats import LatencyWindow, LogThrottle, RateMeter, SequenceGapCounter
from theia_ros.nodes.sync import FrameSynchronizer
from theia_ros.policies.safety import CommandFilter


def test_synchronizer_matches_within_slop_and_counts_drops():
    sync = FrameSynchronizer(["a", "b"], slop=0.02)
    assert sync.add("a", 1.000, "a1") is None
    assert sync.add("b", 1.010, "b1") == {"a": (1.000, "a1"), "b": (1.010, "b1")}
    assert sync.add("a", 2.000, "a2") is None
    assert sync.add("a", 2.100, "a3") is None  # a2 superseded
    assert sync.dropped == {"a": 1, "b": 0}
    assert sync.add("b", 2.200, "b2") is None  # too far from a3: a3 can never match, dropped
    assert sync.dropped == {"a": 2, "b": 0}
    assert sync.add("a", 2.205, "a4") == {"a": (2.205, "a4"), "b": (2.200, "b2")}
    with pytest.raises(KeyError):
        sync.add("c", 3.0, None)


def test_latency_window_and_rate_meter():
    w = LatencyWindow(size=3)
    for s in (0.001, 0.002, 0.003, 0.010):
        w.add(s)
    assert w.percentiles_ms()[50] == pytest.approx(3.0)  # oldest sample fell out
    clock = iter([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 10.0])
    meter = RateMeter(window=5.0, clock=lambda: next(clock))
    for _ in range(5):
        meter.tick()
    assert meter.rate() == pytest.approx(10.0)  # 5 events in the first 0.5 s
    assert meter.rate() == 0.0  # nothing in the last 5 s


def test_sequence_gaps_count_lost_frames_and_survive_a_restart():
    gaps = SequenceGapCounter()
    assert [gaps.observe(seq) for seq in (1, 2, 5, 6, 1, 2, 4, None)] == [0, 0, 2, 0, 0, 0, 1, 0]


def test_log_throttle_is_per_key_and_reports_held_lines():
    now = [0.0]
    throttle = LogThrottle(period=2.0, clock=lambda: now[0])
    assert throttle(("cam", "empty")) == ""
    assert throttle(("cam", "empty")) is None
    assert throttle(("cam", "bad encoding")) == ""  # another reason is not hidden
    now[0] = 2.5
    assert throttle(("cam", "empty")) == " (1 more since the last report)"


def test_command_filter_rejects_nonfinite_and_clamps():
    f = CommandFilter(["a", "b"], lower=[-1, -1], upper=[1, 1], max_velocity=2.0)
    assert f.filter([np.nan, 0]) is None
    assert f.filter([np.inf, 0]) is None
    assert f.filter([0, 0, 0]) is None
    np.testing.assert_array_equal(f.filter([5.0, -0.5]), [1.0, -0.5])
    # 2 rad/s over 0.1 s: at most 0.2 from the previous command
    np.testing.assert_allclose(f.filter([0.9, 0.0], previous=[0.0, 0.0], dt=0.1), [0.2, 0.0])
    assert dict(f.counts) == {"rejected_nonfinite": 2, "rejected_shape": 1, "clamped_position": 1,
                              "clamped_velocity": 1, "passed": 2}
    with pytest.raises(ValueError, match="lower limits exceed"):
        CommandFilter(["a"], lower=[1], upper=[0])


def test_velocity_mode_clamps_speed():
    f = CommandFilter(["a"], max_velocity=0.5, mode="velocity")
    np.testing.assert_array_equal(f.filter([-3.0]), [-0.5])


def test_token_picture_shows_the_principal_components():
    rng = np.random.default_rng(0)
    tokens = rng.standard_normal((196, 32)).astype(np.float32) * 0.01
    tokens[:98, 0] += 5.0  # top half of the grid differs along one direction
    picture = tokens_to_rgb(tokens)
    assert picture.shape == (224, 224, 3) and picture.dtype == np.uint8
    top, bottom = picture[:112].reshape(-1, 3).mean(0), picture[112:].reshape(-1, 3).mean(0)
    assert abs(top[0] - bottom[0]) > 200  # first component separates the halves
    with pytest.raises(ValueError):
        tokens_to_rgb(np.zeros((10, 4)))


def test_a_stop_hides_only_rclpy_objects_it_interrupted_half_built():
    """A signal can land inside rclpy's Task constructor; the half-built Task then fails in __del__
    ("Exception ignored ... no attribute '_exception'"): hidden after a stop, and only that."""
    import sys
    import types

    from rclpy.task import Future

    from theia_ros.nodes.runtime import StopSignals

    seen = []
    stop = StopSignals()
    stop._default_unraisable = seen.append
    half_built = types.SimpleNamespace(exc_value=AttributeError("'Task' object has no attribute '_exception'"),
                                       object=Future.__del__)
    stop._unraisable(half_built)
    assert seen == [half_built]  # no stop asked for: reported as usual
    stop.requested = 2
    stop._unraisable(half_built)
    ours = types.SimpleNamespace(exc_value=AttributeError("x"),
                                 object=test_sequence_gaps_count_lost_frames_and_survive_a_restart)
    other = types.SimpleNamespace(exc_value=ValueError("y"), object=Future.__del__)
    stop._unraisable(ours)
    stop._unraisable(other)
    assert seen == [half_built, ours, other]  # after a stop only the rclpy AttributeError is hidden
    assert sys.unraisablehook is not stop._unraisable  # install() was not called: nothing global changed
