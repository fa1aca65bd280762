"""Tests of the plain-Python policy layer (theia_ros.policies); no ROS needed."""
import importlib.metadata
import math
import sys
import textwrap

import numpy as np
import pytest
import torch

from theia_ros.policies import (
    ActionSpec,
    Observation,
    ObservationBuffer,
    ObservationError,
    ObservationSpec,
    Policy,
    PolicyConfigError,
    PolicyError,
    UnknownPolicyError,
    available_policies,
    load_policy_class,
    make_policy,
    random_observation,
)
from theia_ros.policies.hold import HoldPolicy
from theia_ros.policies.mlp import PooledMLPPolicy
from theia_ros.policies.theia_head import TheiaHeadPolicy
from theia_ros.representations import feature_shape_for
from theia_ros.weights import CheckpointError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

JOINTS = [f"joint{i}" for i in range(1, 8)]
C = 192  # theia-tiny width


def make_spec(representation="tokens", cameras=("front",), history=1, joints=JOINTS, dim=C):
    return ObservationSpec(list(cameras), representation, feature_shape_for(representation, dim),
                           list(joints), history)


def make_config(obs, action=None, params=None, mode="position"):
    action = action or ActionSpec(JOINTS, mode, [-2.0] * 7, [2.0] * 7)
    return {"observation": obs.to_dict(), "action": action.to_dict(), "params": params or {}}


def perturb_normalization(policy, seed=0):
    """Non-trivial normalisation and BatchNorm statistics, so a round trip has to carry them."""
    rng = np.random.default_rng(seed)
    n_p, n_a = len(policy.observation_spec.proprio_joints), policy.action_spec.dim
    policy.set_normalization(proprio_mean=rng.normal(size=n_p), proprio_std=rng.uniform(0.5, 2, n_p),
                             action_mean=rng.normal(size=n_a) * 0.1, action_std=rng.uniform(0.1, 0.5, n_a))
    for m in policy.module.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)


# ---------------------------------------------------------------------------------- acting

ACT_CASES = [
    ("hold", "tokens", 1, 1, {}),
    ("hold", "cls", 2, 2, {"position": [0.1] * 7}),
    ("mlp", "tokens", 1, 1, {}),
    ("mlp", "tokens", 2, 2, {"activation": "gelu", "hidden_sizes": [64]}),
    ("mlp", "cls", 1, 2, {}),
    ("mlp", "all_tokens", 1, 1, {"pool": "cls"}),
    ("mlp", "spatial", 2, 1, {"pool": "max"}),
    ("theia_head", "tokens", 1, 1, {}),
    ("theia_head", "tokens", 2, 2, {}),
    ("theia_head", "spatial", 1, 2, {}),
    ("theia_head", "all_tokens", 1, 1, {}),
]


@pytest.mark.parametrize("name,rep,n_cams,history,params", ACT_CASES)
def test_builtin_policies_act(name, rep, n_cams, history, params):
    obs_spec = make_spec(rep, cameras=["front", "wrist"][:n_cams], history=history)
    policy = make_policy(name, make_config(obs_spec, params=params))
    policy.reset()
    for seed in range(3):
        action = policy.act(random_observation(obs_spec, seed))
        assert action.shape == (7,)
        assert action.dtype == np.float64
        assert np.isfinite(action).all()
        assert (np.abs(action) <= 2.0).all()


def test_hold_latches_and_velocity_zeros():
    obs_spec = make_spec(joints=list(reversed(JOINTS)))  # proprio order differs from the action order
    hold = HoldPolicy(obs_spec, ActionSpec(JOINTS))
    first = random_observation(obs_spec, 1)
    a1 = hold.act(first)
    np.testing.assert_array_equal(a1, first.proprio[-1][::-1])
    np.testing.assert_array_equal(hold.act(random_observation(obs_spec, 2)), a1)  # latched
    hold.reset()
    second = random_observation(obs_spec, 3)
    np.testing.assert_array_equal(hold.act(second), second.proprio[-1][::-1])
    follow = HoldPolicy(obs_spec, ActionSpec(JOINTS), latch=False)
    follow.act(first)
    np.testing.assert_array_equal(follow.act(second), second.proprio[-1][::-1])
    vel = HoldPolicy(obs_spec, ActionSpec(JOINTS, "velocity"))
    np.testing.assert_array_equal(vel.act(first), np.zeros(7))
    fixed = HoldPolicy(make_spec(joints=[]), ActionSpec(["a", "b"]), position={"b": 2.0, "a": 1.0})
    np.testing.assert_array_equal(fixed.act(random_observation(fixed.observation_spec)), [1.0, 2.0])
    blind = HoldPolicy(make_spec(joints=JOINTS[:3]), ActionSpec(JOINTS))  # starts, but has nothing to hold
    with pytest.raises(PolicyError, match=r"not among the proprio joints .*set the 'position' param"):
        blind.act(random_observation(blind.observation_spec, 4))


def test_act_validates_observation_and_clips():
    obs_spec = make_spec()
    policy = HoldPolicy(obs_spec, ActionSpec(JOINTS, lower=[-0.5] * 7, upper=[0.5] * 7))
    obs = random_observation(obs_spec, 0)
    obs.proprio[-1] = 3.0
    np.testing.assert_array_equal(policy.act(obs), np.full(7, 0.5))
    bad = random_observation(obs_spec, 0)
    bad.features["front"][0, 5, 3] = np.nan
    with pytest.raises(ObservationError, match="NaN"):
        policy.act(bad)
    wrong = Observation({"front": np.zeros((1, 197, C), np.float32)}, np.zeros((1, 7)), 0.0)
    with pytest.raises(ObservationError, match=r"shape \(1, 197, 192\), expected \(1, 196, 192\)"):
        policy.act(wrong)
    with pytest.raises(PolicyConfigError, match="unknown params"):
        HoldPolicy(obs_spec, ActionSpec(JOINTS), gain=2.0)
    with pytest.raises(PolicyConfigError, match="does not fit representation"):
        ObservationSpec(["front"], "tokens", (197, C))
    with pytest.raises(PolicyConfigError, match="needs spatial features"):
        TheiaHeadPolicy(make_spec("cls"), ActionSpec(JOINTS))



@pytest.mark.parametrize("name", ["hold", "mlp"])
def test_observations_are_validated_once(monkeypatch, name):
    """The buffer checks each message as it arrives; act() trusts what it builds and validates the rest."""
    spec = make_spec(history=2, joints=["a", "b"])
    policy = make_policy(name, make_config(spec, action=ActionSpec(["a", "b"]), params={"position": [0.0, 0.0]}
                                           if name == "hold" else {"seed": 0}))
    validated = []
    original = Observation.validate
    monkeypatch.setattr(Observation, "validate", lambda self, s: (validated.append(self), original(self, s)))
    buf = ObservationBuffer(policy.observation_spec)
    for k in range(3):
        buf.push_features("front", 1.0 + 0.1 * k, tokens(k))
        buf.push_joint_state(1.0 + 0.1 * k, ["a", "b"], [0.1 * k, -0.1 * k])
    built = buf.build()
    from_buffer = policy.act(built)
    assert not validated  # every part was checked when pushed
    by_hand = Observation({"front": built.features["front"].copy()}, built.proprio.copy(), built.stamp)
    np.testing.assert_array_equal(policy.act(by_hand), from_buffer)
    assert len(validated) == 1 and validated[0] is by_hand
    by_hand.features["front"][1, 0, 0] = np.inf
    with pytest.raises(ObservationError, match="1 inf"):
        policy.act(by_hand)
    other_spec = make_spec(history=2, joints=["a", "b"])  # equal, but not the spec the buffer checked against
    other = make_policy(name, {**make_config(other_spec, action=ActionSpec(["a", "b"])),
                               "params": policy.params})
    other.act(built)
    assert validated[-1] is built

def test_act_restores_training_mode():
    obs_spec = make_spec()
    policy = TheiaHeadPolicy(obs_spec, ActionSpec(JOINTS), channels=32, mlp_hidden=[32])
    policy.module.train()
    policy.act(random_observation(obs_spec))  # batch of one: works because act() runs in eval mode
    assert policy.module.training


# ---------------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("name,params", [("mlp", {"hidden_sizes": [64, 32]}),
                                         ("theia_head", {"channels": 64, "mlp_hidden": [64]}),
                                         ("hold", {"position": [0.25] * 7})])
def test_save_load_round_trip(tmp_path, name, params):
    obs_spec = make_spec(cameras=["front", "wrist"], history=2)
    policy = make_policy(name, make_config(obs_spec, params=params))
    if name != "hold":
        perturb_normalization(policy)
    observations = [random_observation(obs_spec, s) for s in range(4)]
    before = [policy.act(o) for o in observations]
    policy.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "config.yaml").is_file()
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()
    for loaded in (type(policy).from_pretrained(tmp_path / "ckpt"), make_policy(name, checkpoint=tmp_path / "ckpt"),
                   make_policy(None, checkpoint=tmp_path / "ckpt")):
        assert type(loaded) is type(policy)
        assert loaded.observation_spec == obs_spec and loaded.action_spec == policy.action_spec
        assert loaded.params == policy.params
        for o, a in zip(observations, before):
            np.testing.assert_array_equal(loaded.act(o), a)


def test_from_pretrained_overrides(tmp_path):
    obs_spec = make_spec()
    policy = PooledMLPPolicy(obs_spec, ActionSpec(JOINTS), hidden_sizes=[16], seed=0)
    policy.save_pretrained(tmp_path / "ckpt")
    renamed = make_policy("mlp", {"observation": {"cameras": ["cam0"]}}, checkpoint=tmp_path / "ckpt")
    obs = random_observation(obs_spec, 0)
    moved = Observation({"cam0": obs.features["front"]}, obs.proprio, obs.stamp)
    np.testing.assert_array_equal(renamed.act(moved), policy.act(obs))
    with pytest.raises(CheckpointError, match=r"mis-shaped key\(s\): .*checkpoint 16x.*expected 17x"):
        make_policy("mlp", {"params": {"hidden_sizes": [17]}}, checkpoint=tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="not 'theia_head'"):
        make_policy("theia_head", checkpoint=tmp_path / "ckpt")



def test_the_class_comes_from_the_config_through_make_policy(tmp_path):
    obs_spec = make_spec()
    config = {**make_config(obs_spec, params={"hidden_sizes": [8]}), "policy": "mlp"}
    assert type(make_policy(None, config)) is PooledMLPPolicy
    with pytest.raises(PolicyConfigError, match="Policy is abstract; make_policy"):
        Policy.from_config(config)
    PooledMLPPolicy.from_config(config).save_pretrained(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="TorchPolicy is abstract"):
        load_policy_class("theia_ros.policies.torch_policy:TorchPolicy").from_pretrained(tmp_path / "ckpt")
    loaded = make_policy("theia_ros.policies.torch_policy:TorchPolicy", checkpoint=tmp_path / "ckpt")
    assert type(loaded) is PooledMLPPolicy
    with pytest.raises(CheckpointError, match="'hold' .* is not a TorchPolicy"):
        make_policy("theia_ros.policies.torch_policy:TorchPolicy", {"policy": "hold"}, checkpoint=tmp_path / "ckpt")

def test_seed_makes_weights_reproducible():
    obs_spec = make_spec()
    a = PooledMLPPolicy(obs_spec, ActionSpec(JOINTS), seed=3)
    b = PooledMLPPolicy(obs_spec, ActionSpec(JOINTS), seed=3)
    obs = random_observation(obs_spec)
    np.testing.assert_array_equal(a.act(obs), b.act(obs))


def test_bad_checkpoints_give_clear_errors(tmp_path):
    obs_spec = make_spec()
    policy = PooledMLPPolicy(obs_spec, ActionSpec(JOINTS), hidden_sizes=[16])
    ckpt = policy.save_pretrained(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="does not exist"):
        PooledMLPPolicy.from_pretrained(tmp_path / "nothing")
    (ckpt / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        PooledMLPPolicy.from_pretrained(ckpt)
    (ckpt / "model.safetensors").write_bytes((ckpt / "model.safetensors").read_bytes()[:40])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        PooledMLPPolicy.from_pretrained(ckpt)
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="lacks model.safetensors"):
        PooledMLPPolicy.from_pretrained(ckpt)
    (ckpt / "config.yaml").write_text("observation: [unclosed\n")
    with pytest.raises(CheckpointError, match="not valid YAML"):
        PooledMLPPolicy.from_pretrained(ckpt)
    (ckpt / "config.yaml").unlink()
    with pytest.raises(CheckpointError, match="lacks config.yaml"):
        PooledMLPPolicy.from_pretrained(ckpt)
    # weights of another architecture
    PooledMLPPolicy(obs_spec, ActionSpec(JOINTS), hidden_sizes=[16]).save_pretrained(tmp_path / "a")
    TheiaHeadPolicy(obs_spec, ActionSpec(JOINTS), channels=8, mlp_hidden=[8]).save_pretrained(tmp_path / "b")
    (tmp_path / "a" / "model.safetensors").write_bytes((tmp_path / "b" / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match=r"missing key\(s\): .*unexpected key\(s\)"):
        make_policy(None, checkpoint=tmp_path / "a")


# ---------------------------------------------------------------------------------- registry


def test_registry_finds_builtins_by_entry_point_and_dotted_path():
    names = {ep.name for ep in importlib.metadata.entry_points(group="theia_ros.policies")}
    assert {"hold", "mlp", "theia_head"} <= names
    assert load_policy_class("hold") is HoldPolicy
    assert load_policy_class("mlp") is PooledMLPPolicy
    assert load_policy_class("theia_head") is TheiaHeadPolicy
    assert available_policies()["mlp"] == "theia_ros.policies.mlp:PooledMLPPolicy"
    assert load_policy_class("theia_ros.policies.theia_head:TheiaHeadPolicy") is TheiaHeadPolicy
    assert load_policy_class("theia_ros.policies.hold.HoldPolicy") is HoldPolicy
    assert load_policy_class(f"{__name__}:EchoPolicy") is EchoPolicy
    with pytest.raises(UnknownPolicyError, match=r"unknown policy 'nope'.*\['hold', 'mlp', 'theia_head'"):
        load_policy_class("nope")
    with pytest.raises(UnknownPolicyError, match="cannot import"):
        load_policy_class("no_such_package.module:Policy")
    with pytest.raises(UnknownPolicyError, match="cannot import"):
        load_policy_class("theia_ros.policies.mlp:NoSuchClass")
    with pytest.raises(PolicyError, match="not a subclass"):
        load_policy_class("theia_ros.policies.mlp:PooledMLPNet")


class EchoPolicy(Policy):
    """Commands the newest proprio (a policy defined outside the package, found by dotted path)."""

    name = ""  # unregistered: saved by dotted path

    def _act(self, observation):
        return observation.proprio[-1]


def test_unregistered_policy_saves_by_dotted_path(tmp_path):
    obs_spec = make_spec()
    policy = make_policy(f"{__name__}.EchoPolicy", make_config(obs_spec))
    policy.save_pretrained(tmp_path / "echo")
    loaded = make_policy(None, checkpoint=tmp_path / "echo")
    assert type(loaded) is EchoPolicy
    obs = random_observation(obs_spec)
    np.testing.assert_array_equal(loaded.act(obs), obs.proprio[-1])


def test_third_party_policy_package_via_entry_point(tmp_path, monkeypatch):
    site = tmp_path / "site"
    pkg = site / "acme_theia_policies"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(textwrap.dedent("""
        import numpy as np
        from theia_ros.policies import Policy

        class ConstantPolicy(Policy):
            name = "acme_constant"
            default_params = {"value": 0.5}

            def _act(self, observation):
                return np.full(self.action_spec.dim, self.params["value"])
    """))
    dist = site / "acme_theia_policies-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-theia-policies\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[theia_ros.policies]\nacme_constant = acme_theia_policies:ConstantPolicy\n")
    with pytest.raises(UnknownPolicyError):
        load_policy_class("acme_constant")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, "acme_theia_policies", raising=False)
    try:
        cls = load_policy_class("acme_constant")
        assert cls.__module__ == "acme_theia_policies" and issubclass(cls, Policy)
        assert "acme_constant" in available_policies()
        obs_spec = make_spec()
        policy = make_policy("acme_constant", make_config(obs_spec, params={"value": 0.25}))
        np.testing.assert_array_equal(policy.act(random_observation(obs_spec)), np.full(7, 0.25))
        policy.save_pretrained(tmp_path / "ckpt")
        assert type(make_policy(None, checkpoint=tmp_path / "ckpt")) is cls
    finally:
        sys.modules.pop("acme_theia_policies", None)


# ---------------------------------------------------------------------------------- buffer


def tokens(value, dim=C):
    return np.full((196, dim), value, dtype=np.float32)


def test_buffer_history_order_and_proprio_alignment():
    spec = make_spec(history=3, joints=["a", "b"])
    buf = ObservationBuffer(spec, proprio_tolerance=0.01)
    assert not buf.ready()
    for k in range(5):
        t = 1.0 + 0.1 * k
        buf.push_joint_state(t - 0.004, ["a", "b"], [k, 10 * k])
        buf.push_joint_state(t + 0.05, ["a", "b"], [k + 0.5, 10 * k + 5])  # between frames
        buf.push_features("front", t, tokens(k))
    assert buf.ready()
    obs = buf.build()
    assert obs.features["front"].shape == (3, 196, C)
    assert obs.features["front"].dtype == np.float32
    np.testing.assert_array_equal(obs.features["front"][:, 0, 0], [2, 3, 4])  # oldest first
    np.testing.assert_allclose(obs.frame_stamps["front"], [1.2, 1.3, 1.4])
    assert obs.stamp == pytest.approx(1.4)
    np.testing.assert_array_equal(obs.proprio, [[2, 20], [3, 30], [4, 40]])  # closest in time
    obs.validate(spec)


def test_buffer_reorders_joints_by_name_and_merges_partial_states():
    spec = make_spec(joints=["shoulder", "elbow", "gripper"])
    buf = ObservationBuffer(spec)
    buf.push_features("front", 2.0, tokens(0))
    buf.push_joint_state(2.0, ["elbow", "wheel", "shoulder"], [0.2, 9.0, 0.1], [0.0, 0.0, 0.0])
    assert not buf.ready()
    with pytest.raises(ObservationError, match=r"missing joint\(s\) \['gripper'\].*received other joints: \['wheel'\]"):
        buf.build()
    buf.push_joint_state(2.01, ["gripper"], [0.04], [])  # published separately
    assert buf.ready()
    np.testing.assert_array_equal(buf.build().proprio, [[0.1, 0.2, 0.04]])
    buf.push_features("front", 2.5, tokens(1))
    buf.push_joint_state(2.5, ["elbow", "shoulder"], [0.3, 0.4])
    assert buf.age(3.0) == pytest.approx(0.99)  # the gripper's publisher stalled
    with pytest.raises(ObservationError, match=r"\['gripper'\] within proprio_tolerance"):
        buf.build()


def test_buffer_proprio_tolerance():
    spec = make_spec(joints=["a"])
    buf = ObservationBuffer(spec, proprio_tolerance=0.02)
    buf.push_joint_state(1.0, ["a"], [0.0])
    buf.push_features("front", 1.5, tokens(0))
    with pytest.raises(ObservationError, match=r"no joint state for joint\(s\) \['a'\] within proprio_tolerance=0.02"):
        buf.build()
    buf.push_joint_state(1.49, ["a"], [1.0])
    np.testing.assert_array_equal(buf.build().proprio, [[1.0]])


def test_buffer_camera_skew():
    spec = make_spec(cameras=["front", "wrist"], history=2, joints=[])
    buf = ObservationBuffer(spec, max_skew=0.01)
    for k in range(3):
        buf.push_features("front", 1.0 + 0.1 * k, tokens(k))
        buf.push_features("wrist", 1.0 + 0.1 * k + 0.004, tokens(10 + k))
    buf.push_features("front", 1.3, tokens(3))  # wrist has not caught up: use the newest complete set
    obs = buf.build()
    np.testing.assert_array_equal(obs.features["front"][:, 0, 0], [1, 2])
    np.testing.assert_array_equal(obs.features["wrist"][:, 0, 0], [11, 12])
    assert obs.stamp == pytest.approx(1.204)
    buf.push_features("wrist", 1.35, tokens(13))  # 50 ms off the front camera's newest frame
    with pytest.raises(ObservationError, match=r"cameras out of sync: camera 'wrist' has no frame within "
                       r"max_skew=0.01 s of the frame of camera 'front' at t=1.3"):
        buf.build()
    buf.push_features("wrist", 1.36, tokens(14))
    with pytest.raises(ObservationError, match="out of sync"):
        buf.build()


def test_buffer_rejects_bad_input():
    spec = make_spec(joints=["a"])
    buf = ObservationBuffer(spec)
    bad = tokens(0.0)
    bad[3, 7] = np.nan
    with pytest.raises(ObservationError, match=r"camera 'front' features .* contain non-finite values \(1 NaN"):
        buf.push_features("front", 1.0, bad)
    with pytest.raises(ObservationError, match=r"shape \(197, 192\), expected \(196, 192\)"):
        buf.push_features("front", 1.0, np.zeros((197, C), np.float32))
    with pytest.raises(ObservationError, match="unknown camera 'back'"):
        buf.push_features("back", 1.0, tokens(0))
    with pytest.raises(ObservationError, match="representation 'cls'"):
        buf.push_features("front", 1.0, tokens(0), representation="cls")
    with pytest.raises(ObservationError, match="position is nan"):
        buf.push_joint_state(1.0, ["a"], [np.nan])
    with pytest.raises(ObservationError, match="2 names but 1 positions"):
        buf.push_joint_state(1.0, ["a", "b"], [0.0])
    buf.push_joint_state(1.0, ["a", "b"], [0.0, np.nan])  # NaN of a joint the policy ignores: fine
    buf.push_features("front", 1.0, tokens(0).astype(np.float16))  # float16 messages are accepted
    with pytest.raises(ObservationError, match="not newer"):
        buf.push_features("front", 0.5, tokens(0))
    assert buf.build().features["front"].dtype == np.float32
    buf.clear()
    buf.push_features("front", 0.5, tokens(0))  # after a clock jump


def test_buffer_age_follows_the_stalest_stream():
    spec = make_spec(cameras=["front", "wrist"], joints=["a"])
    buf = ObservationBuffer(spec)
    assert buf.age(10.0) == math.inf
    buf.push_features("front", 1.0, tokens(0))
    buf.push_features("wrist", 1.02, tokens(0))
    assert buf.age(1.5) == math.inf  # no joint state yet
    buf.push_joint_state(1.03, ["a"], [0.0])
    assert buf.age(1.5) == pytest.approx(0.5)  # the laggard camera
    buf.push_features("front", 1.1, tokens(1))
    assert buf.age(1.5) == pytest.approx(0.48)  # the wrist camera is now the oldest stream
    buf.push_features("wrist", 1.12, tokens(1))
    assert buf.age(1.5) == pytest.approx(0.47)  # now the joint state is
    buf.push_joint_state(1.15, ["a"], [0.0])
    assert buf.age(1.5) == pytest.approx(0.4)  # and now the front camera
    assert buf.build().stamp == pytest.approx(1.12)


# ---------------------------------------------------------------------------------- theia head


def test_theia_head_spatial_sizes():
    obs_spec = make_spec(cameras=["front", "wrist"], history=2)
    policy = TheiaHeadPolicy(obs_spec, ActionSpec(JOINTS))
    assert policy.spatial_sizes == (7, 3, 1)
    shapes = {}
    enc = policy.module.net.encoder
    handles = [getattr(enc, n).register_forward_hook(lambda m, i, o, n=n: shapes.__setitem__(n, tuple(o.shape)))
               for n in ("conv1", "conv2", "conv3", "flatten")]
    handles.append(enc.conv1.register_forward_hook(lambda m, i, o: shapes.__setitem__("input", tuple(i[0].shape))))
    policy.act(random_observation(obs_spec))
    for h in handles:
        h.remove()
    assert shapes == {"input": (1, 2 * 2 * C, 14, 14), "conv1": (1, 256, 7, 7), "conv2": (1, 256, 3, 3),
                      "conv3": (1, 256, 1, 1), "flatten": (1, 256)}
    assert isinstance(enc.norm1, torch.nn.LayerNorm) and enc.norm1.normalized_shape == (256, 7, 7)
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in policy.module.net.mlp)


def test_theia_head_token_grid_is_row_major():
    obs_spec = make_spec("tokens", dim=4, joints=[])
    policy = TheiaHeadPolicy(obs_spec, ActionSpec(["x"]), channels=8, mlp_hidden=[8])
    x = torch.arange(196 * 4, dtype=torch.float32).reshape(1, 1, 196, 4)
    grid = policy.module.net.to_map(x)  # [1, 1, 4, 14, 14]
    # token r*14+c, channel k lands at [k, r, c]
    assert grid[0, 0, 2, 3, 5] == x[0, 0, 3 * 14 + 5, 2]
    spatial = TheiaHeadPolicy(make_spec("spatial", dim=4, joints=[]), ActionSpec(["x"]), channels=8, mlp_hidden=[8])
    spatial.module.load_state_dict(policy.module.state_dict())
    obs = random_observation(obs_spec, 0)
    as_map = obs.features["front"].transpose(0, 2, 1).reshape(1, 4, 14, 14)
    np.testing.assert_allclose(policy.act(obs), spatial.act(Observation({"front": as_map}, None, 0.0)), rtol=1e-5)


@pytest.mark.parametrize("name,params", [("theia_head", {"channels": 32, "mlp_hidden": [64]}),
                                         ("mlp", {"hidden_sizes": [64, 64]})])
def test_behaviour_cloning_loop_reduces_loss(name, params):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    n, dim, joints = 256, 16, ["a", "b", "c"]
    obs_spec = ObservationSpec(["front"], "tokens", (196, dim), joints, history=1)
    policy = make_policy(name, {"observation": obs_spec.to_dict(), "action": {"joint_names": ["u", "v"]},
                                "params": {**params, "seed": 0}})
    # features: per-sample channel offsets plus token noise; actions: linear in pooled features and proprio
    offsets = rng.normal(size=(n, dim))
    feats = (offsets[:, None, None, :] + 0.5 * rng.normal(size=(n, 1, 196, dim))).astype(np.float32)
    proprio = rng.normal(1.0, 3.0, size=(n, 1, 3))
    actions = offsets @ rng.normal(size=(dim, 2)) / 4 + proprio[:, 0] @ rng.normal(size=(3, 2)) + 5.0
    policy.set_normalization(proprio_mean=proprio.mean((0, 1)), proprio_std=proprio.std((0, 1)),
                             action_mean=actions.mean(0), action_std=actions.std(0))
    batch_all = {"features": {"front": torch.from_numpy(feats)}, "proprio": torch.from_numpy(proprio).float()}
    target = torch.from_numpy(actions).float()

    def eval_loss():
        policy.module.eval()
        with torch.no_grad():
            return torch.nn.functional.mse_loss(policy.predict_batch(batch_all), target).item()

    initial = eval_loss()
    opt = torch.optim.Adam(policy.module.parameters(), lr=1e-3)
    target_n = policy.normalize_actions(target)
    policy.module.train()
    for step in range(300):
        idx = torch.from_numpy(rng.choice(n, 32, replace=False))
        batch = {"features": {"front": batch_all["features"]["front"][idx]}, "proprio": batch_all["proprio"][idx]}
        loss = torch.nn.functional.mse_loss(policy.predict_batch(batch, normalized=True), target_n[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    final = eval_loss()
    print(f"{name}: eval loss {initial:.4f} -> {final:.5f} ({initial / final:.0f}x)")
    assert final < initial / 10, (initial, final)
    # the trained policy acts through the same path
    obs = Observation({"front": feats[0]}, proprio[0], 0.0)
    np.testing.assert_allclose(policy.act(obs), policy.predict_batch(
        {"features": {"front": batch_all["features"]["front"][:1]}, "proprio": batch_all["proprio"][:1]}
    ).detach().numpy()[0], rtol=1e-4, atol=1e-5)
