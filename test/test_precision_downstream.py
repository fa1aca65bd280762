"""The main job's policy keeps its outcomes with a lower-precision encoder (issue 17's downstream check, short form).

The shipped policy (config/demo_policy, trained on fp32 torch features) runs the main job's closed loop in
lock step (theia_ros.sim.closed_loop: camera 15 Hz, policy 10 Hz, simulated time), once per encoder on the
same seeds; at every tick the fp32 encoder's features of the same frame go through the policy too, so the
action difference is measured on identical inputs. The full measurement (10 seeds, 6 s episodes, policies
trained on int8 features) is benchmarks/bench_precision_downstream.py.

Thresholds, measured with margin (theia-tiny random weights seed 0, seeds 1000 and 1005, 2.5 s episodes):
torch bf16: action |diff| max 5.5e-4 rad, feature cosine min 0.99998 -> asserted < 5e-3 and > 0.9998;
openvino int8 (NNCF, the default calibration set): over seeds 1000-1009 (6 s) action |diff| max 1.3e-2 rad,
feature cosine min 0.9917 -> asserted < 3e-2 and >= 0.99 (the issue's per-image int8 gate, kept on sim frames).
"""
import importlib.util
import os

import numpy as np
import pytest

os.environ.setdefault("MUJOCO_GL", "egl")  # before mujoco is first imported (it picks its GL platform then)
pytest.importorskip("mujoco")

from theia_ros.sim.closed_loop import Agent, ClosedLoopConfig, run_episode  # noqa: E402 (mujoco checked above)

MODEL = "random:theia-tiny-patch16-224-cddsv"
SEEDS = (1000, 1005)
CONFIG = ClosedLoopConfig(duration=2.5)  # the shipped policy succeeds within ~1.7 s on these seeds
BF16_MAX_DIFF, BF16_MIN_COSINE = 5e-3, 0.9998
INT8_MAX_DIFF, INT8_MIN_COSINE = 3e-2, 0.99


@pytest.fixture(scope="module")
def sim():
    from theia_ros.sim import Simulation

    s = Simulation()
    yield s
    s.close()


@pytest.fixture(scope="module")
def shipped():
    from theia_ros.policies import make_policy
    from theia_ros.resources import package_file

    return make_policy(None, checkpoint=package_file("config/demo_policy"))


def _encoder(backend="torch", precision="fp32"):
    from theia_ros.backends.factory import create_encoder

    return create_encoder(MODEL, seed=0, representation="tokens", backend=backend, precision=precision, max_batch=1,
                          threads=1)


@pytest.fixture(scope="module")
def reference(one_torch_thread, sim, shipped):
    """The fp32 encoder, and per seed its episode with a second fp32 encoder as the shadow."""
    fp32 = _encoder()
    twin = Agent(_encoder(), shipped, lower=sim.lower, upper=sim.upper)
    agent = Agent(fp32, shipped, lower=sim.lower, upper=sim.upper)
    return fp32, {seed: run_episode(sim, seed, agent, shadow=twin if seed == SEEDS[0] else None, config=CONFIG)
                  for seed in SEEDS}


def test_the_lock_step_loop_is_exact_and_the_shipped_policy_reaches(reference):
    _, runs = reference
    twin = runs[SEEDS[0]]
    # two fp32 encoders on the same frames: bit-identical actions, so any difference below is precision
    assert twin["action_abs_diff_max"] == 0.0 and twin["feature_cosine_min"] == pytest.approx(1.0, abs=1e-12), twin
    assert twin["compared_ticks"] >= 20, twin
    for r in runs.values():
        assert r["idle_ticks"] == 1, r  # only the first tick has no features yet (latency 50 ms)
        assert r["success"] and r["distance"] < 0.05, r  # the shipped policy solves these seeds with fp32


def _check_against_fp32(sim, shipped, reference, encoder, max_diff, min_cosine):
    fp32, runs = reference
    agent = Agent(encoder, shipped, lower=sim.lower, upper=sim.upper)  # accepted: same model_id, other precision
    shadow = Agent(fp32, shipped, lower=sim.lower, upper=sim.upper)
    for seed in SEEDS:
        r = run_episode(sim, seed, agent, shadow=shadow, config=CONFIG)
        assert r["success"] == runs[seed]["success"], (r, runs[seed])
        assert abs(r["distance"] - runs[seed]["distance"]) < 0.02, (r, runs[seed])
        assert r["compared_ticks"] >= 20, r
        assert 0.0 < r["action_abs_diff_max"] < max_diff, r  # > 0: the precision really is another one
        assert r["feature_cosine_min"] >= min_cosine, r


def test_torch_bf16_encoder_keeps_the_shipped_policy_outcomes(sim, shipped, reference):
    _check_against_fp32(sim, shipped, reference, _encoder("torch", "bf16"), BF16_MAX_DIFF, BF16_MIN_COSINE)


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None or importlib.util.find_spec("nncf") is None,
                    reason="openvino int8 needs the openvino and nncf packages (extra 'openvino'), not installed")
def test_openvino_int8_encoder_keeps_the_shipped_policy_outcomes(sim, shipped, reference):
    _check_against_fp32(sim, shipped, reference, _encoder("openvino", "int8"), INT8_MAX_DIFF, INT8_MIN_COSINE)


def test_a_perturbed_encoder_is_caught(sim, shipped, reference):
    """The comparison can fail: features with noise (cosine ~0.989) break the bf16 bounds and the int8 cosine bound
    (the policy is robust: that noise moves its actions ~0.025 rad, under the int8 action bound)."""
    fp32, _ = reference

    class Noisy:
        metadata = fp32.metadata

        def __init__(self):
            self.rng = np.random.default_rng(0)

        def encode(self, frames):
            import torch

            features, timings = fp32.encode(frames)
            scale = 0.15 * features.std()
            return features + scale * torch.from_numpy(self.rng.standard_normal(features.shape, np.float32)), timings

    agent = Agent(Noisy(), shipped, lower=sim.lower, upper=sim.upper)
    r = run_episode(sim, SEEDS[0], agent, shadow=Agent(fp32, shipped, lower=sim.lower, upper=sim.upper),
                    config=ClosedLoopConfig(duration=1.0))
    assert r["feature_cosine_min"] < INT8_MIN_COSINE and r["action_abs_diff_max"] > BF16_MAX_DIFF, r


def test_closed_loop_refuses_bad_set_ups(sim, shipped, reference):
    fp32, _ = reference
    with pytest.raises(ValueError, match="camera_rate"):
        ClosedLoopConfig(camera_rate=0)
    with pytest.raises(ValueError, match="latency"):
        ClosedLoopConfig(latency=-0.1)
    agent = Agent(fp32, shipped, lower=sim.lower, upper=sim.upper)
    with pytest.raises(ValueError, match="observes camera 'front'"):
        run_episode(sim, 0, agent, config=ClosedLoopConfig(camera="wrist"))

    class OtherModel:  # the policy node's identity check holds in the loop too: another model is refused
        metadata = {**fp32.metadata, "model_id": "random:theia-small-patch16-224-cddsv",
                    "weights_id": "random:theia-small-patch16-224-cddsv:seed=0"}
        encode = fp32.encode

    from theia_ros.policies import ObservationError

    with pytest.raises(ObservationError, match="trained on features of 'random:theia-tiny"):
        run_episode(sim, 0, Agent(OtherModel(), shipped), config=ClosedLoopConfig(duration=0.3))
