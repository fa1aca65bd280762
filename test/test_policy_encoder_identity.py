"""A policy acts only on features of the encoder weights it was trained on.

Features of another model, another revision of its weights, or `random:` weights with another seed have
the same shapes as the training features and mean something else; a policy fed them would still
command. Checkpoints therefore record `weights_id` next to `model_id`, and the buffer (so the policy
node and the closed loop) refuses features of other weights: counted as `refused_encoder`, logged with
both ids, never a command.
"""
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from feature_bags import train_mlp, write_features_bag

from theia_ros.bags import io as bag_io
from theia_ros.policies import ObservationError, ObservationSpec, PolicyConfigError, make_policy
from theia_ros.policies.buffer import EncoderMismatchError, ObservationBuffer

ROOT = Path(__file__).resolve().parents[1]
RANDOM_TINY = "random:theia-tiny-patch16-224-cddsv"
SEED0, SEED1 = f"{RANDOM_TINY}:seed=0", f"{RANDOM_TINY}:seed=1"


def _spec(**ids):
    return ObservationSpec(["front"], "tokens", (196, 8), **ids)


def test_the_spec_keeps_weights_id_and_refuses_empty_or_non_string_ids():
    spec = _spec(model_id=RANDOM_TINY, weights_id=SEED0)
    d = spec.to_dict()
    assert (d["model_id"], d["weights_id"]) == (RANDOM_TINY, SEED0)
    assert ObservationSpec.from_dict(d).weights_id == SEED0
    assert "weights_id" not in _spec(model_id=RANDOM_TINY).to_dict()  # absent: not checked (older checkpoints)
    for bad in ("", 3):
        with pytest.raises(PolicyConfigError, match="weights_id must be a non-empty string"):
            _spec(weights_id=bad)
        with pytest.raises(PolicyConfigError, match="model_id must be a non-empty string"):
            _spec(model_id=bad)


def test_the_buffer_refuses_features_of_other_weights_and_names_both():
    x = np.ones((196, 8), np.float32)
    buffer = ObservationBuffer(_spec(model_id=RANDOM_TINY, weights_id=SEED0))
    buffer.push_features("front", 1.0, x, model_id=RANDOM_TINY, weights_id=SEED0)
    with pytest.raises(EncoderMismatchError) as info:
        buffer.push_features("front", 2.0, 2 * x, model_id=RANDOM_TINY, weights_id=SEED1)
    assert str(info.value) == (f"camera 'front': features from weights '{SEED1}', the policy was trained on "
                               f"features of '{SEED0}'")
    with pytest.raises(EncoderMismatchError, match="weights ''"):  # a message that states no weights
        buffer.push_features("front", 2.0, 2 * x, model_id=RANDOM_TINY, weights_id="")
    with pytest.raises(EncoderMismatchError, match="from model 'random:theia-small"):  # no weights stated: the model
        buffer.push_features("front", 2.0, 2 * x, model_id="random:theia-small-patch16-224-cddsv")
    assert issubclass(EncoderMismatchError, ObservationError)
    assert buffer.newest_stamp() == 1.0  # nothing refused reached the buffer
    # the same weights loaded from a directory (whose path is the model id) on another robot: accepted
    buffer.push_features("front", 3.0, 3 * x, model_id="/opt/models/theia-tiny", weights_id=SEED0)
    assert buffer.newest_stamp() == 3.0
    # a checkpoint without weights_id (older ones) accepts any weights of its model
    ObservationBuffer(_spec(model_id=RANDOM_TINY)).push_features("front", 1.0, x, model_id=RANDOM_TINY,
                                                                  weights_id=SEED1)


def test_the_shipped_policy_states_the_weights_the_demo_encoder_loads():
    from theia_ros.encoder.model import load_model

    policy = make_policy(None, checkpoint=ROOT / "config" / "demo_policy")
    params = yaml.safe_load((ROOT / "config" / "sim_demo.yaml").read_text())["theia_encoder"]["ros__parameters"]
    model = load_model(params["model"], seed=params["seed"])
    assert (policy.observation_spec.model_id, policy.observation_spec.weights_id) == (model.model_id,
                                                                                      model.weights_id)


def test_train_policy_records_the_weights_of_a_foreign_bag_and_refuses_mixed_weights(tmp_path, capsys):
    """Bags written by rosbags' Writer (not our recorder): the checkpoint states their weights_id; bags of
    other weights are not mixed into one training run."""
    store = bag_io.typestore()
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    write_features_bag(a, store, weights_id="sha256:aaaa")
    write_features_bag(b, store, storage="sqlite3", weights_id="sha256:aaaa")
    write_features_bag(c, store, weights_id="sha256:bbbb")
    code, printed = train_mlp([a, b], tmp_path / "ckpt", capsys)
    assert code == 0, printed.err
    observation = yaml.safe_load((tmp_path / "ckpt" / "config.yaml").read_text())["observation"]
    assert (observation["model_id"], observation["weights_id"]) == ("m", "sha256:aaaa")
    assert make_policy(None, checkpoint=tmp_path / "ckpt").observation_spec.weights_id == "sha256:aaaa"

    code, printed = train_mlp([a, c], tmp_path / "mixed", capsys)
    assert code != 0 and not (tmp_path / "mixed" / "config.yaml").exists()
    assert "m (weights sha256:aaaa)" in printed.err and "m (weights sha256:bbbb)" in printed.err, printed.err


@pytest.mark.ros
def test_the_policy_node_refuses_features_of_another_seed_and_commands_on_its_own(ros_client, tmp_path):
    """The shipped policy over real topics: features of random seed 1 are refused (no command, counted,
    logged with both ids); the same node then commands on seed-0 features."""
    from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
    from std_msgs.msg import Float64MultiArray

    from theia_ros.features import to_features_msg
    from theia_ros.msg import Features

    from ros_helpers import NodeProcess, diagnostic_values, params_file, wait_until

    commands, _ = ros_client.collect(Float64MultiArray, "commands")
    diags, _ = ros_client.collect(DiagnosticArray, "/diagnostics")
    pub = ros_client.publisher(Features, "front/features")
    weights = {"id": SEED1}
    running = True

    def camera():
        rng = np.random.default_rng(0)
        while running:
            msg = to_features_msg(rng.standard_normal((196, 192)).astype(np.float32), camera="front",
                                  model_id=RANDOM_TINY, weights_id=weights["id"], random_weights=True)
            msg.header.stamp = ros_client.node.get_clock().now().to_msg()
            pub.publish(msg)
            time.sleep(0.1)

    params = {"policy": "", "policy_checkpoint": str(ROOT / "config" / "demo_policy"), "cameras": ["front"],
              "rate": 10.0, "max_observation_age": 1.0, "diagnostics_period": 0.3, "torch_threads": 1}
    policy = NodeProcess("theia_ros.nodes.theia_policy", "--ros-args", "--params-file",
                         params_file(tmp_path / "policy.yaml", "theia_policy", params))
    feeder = threading.Thread(target=camera, daemon=True)
    try:
        with policy:
            assert ros_client.wait_for_subscribers(pub, timeout=90), policy.output()
            feeder.start()
            assert wait_until(lambda: int((diagnostic_values(diags, "theia_policy: policy") or {}).get(
                "refused_encoder", "0")) >= 5, 60), policy.output()
            values = diagnostic_values(diags, "theia_policy: policy")
            assert commands == [] and values["commands"] == "0", values
            assert any(s.level == DiagnosticStatus.WARN and "another encoder model or weights" in s.message
                       for _, a in diags[-3:] for s in a.status if s.name == "theia_policy: policy")
            out = policy.output()
            assert f"from encoder model_id {RANDOM_TINY}, weights_id {SEED0}, joints" in out, out  # the start-up line
            assert (f"refused features from front: camera 'front': features from weights '{SEED1}', the policy was "
                    f"trained on features of '{SEED0}'") in out, out

            weights["id"] = SEED0  # the encoder it was trained on: it commands
            assert wait_until(lambda: len(commands) >= 3, 30), policy.output()
            assert all(len(m.data) == 7 and np.isfinite(m.data).all() for _, m in commands)
    finally:
        running = False
        if feeder.is_alive():
            feeder.join(timeout=5)
