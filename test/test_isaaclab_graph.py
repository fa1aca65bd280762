"""Issue 16, the ROS and tool side: features that say how they were made, policies that refuse others.

- the Features message records the preprocessing profile, the position-embedding interpolation, the
  input size and the patch grid; messages (and bags) from before those fields read as "theia" at 224x224;
- checkpoints record the preprocessing of their training features; the policy node refuses features
  made otherwise (counted, logged with both) and never commands from them;
- bags with the old Features definition stay readable (inspect, train-policy, encode-bag's copy);
- encode-bag takes --preprocessing, --input-size, --pos-interpolation;
- over real topics: an Isaac Lab-profile encoder at 120x160 feeds a policy trained on such features,
  which commands, while a theia-profile policy refuses them.
"""
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from feature_bags import train_mlp, write_features_bag
from rosbags.typesys import Stores, get_types_from_msg, get_typestore

from theia_ros.bags import io as bag_io
from theia_ros.cli.main import main
from theia_ros.features import Preprocessing, preprocessing_of, to_features_msg
from theia_ros.policies import ActionSpec, ObservationError, ObservationSpec, PolicyConfigError, make_policy
from theia_ros.policies.buffer import ObservationBuffer, PreprocessingMismatchError

RANDOM_TINY = "random:theia-tiny-patch16-224-cddsv"
ROOT = Path(__file__).resolve().parents[1]
ISAACLAB_120x160 = Preprocessing("isaaclab", (120, 160), "scale_factor")

# msg/Features.msg as it was before the preprocessing fields (bags recorded then hold this definition)
OLD_FEATURES_MSG = """\
# dtype values
uint8 DTYPE_FLOAT32 = 0
uint8 DTYPE_FLOAT16 = 1
uint8 DTYPE_BFLOAT16 = 2

string REPRESENTATION_TOKENS = "tokens"          # patch tokens without CLS, [196, C]
string REPRESENTATION_CLS = "cls"                # CLS token, [C]
string REPRESENTATION_MEAN = "mean"              # mean-pooled patch tokens, [C]
string REPRESENTATION_MAX = "max"                # max-pooled patch tokens, [C]
string REPRESENTATION_ALL_TOKENS = "all_tokens"  # CLS + patch tokens, [197, C]
string REPRESENTATION_SPATIAL = "spatial"        # patch tokens as a map, [C, 14, 14]
string REPRESENTATION_TEACHER_PREFIX = "teacher:"

std_msgs/Header header
string camera
string model_id
string representation
string weights_id
bool random_weights
uint32[] shape
uint8 dtype
uint8[] data
"""
MULTI_MSG = (ROOT / "msg" / "MultiCameraFeatures.msg").read_text()


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------
# the message and its reading


def test_the_names_agree_with_the_preprocessing_core():
    from theia_ros import features, preprocess
    from theia_ros.cli.options import ENCODER_OPTIONS
    from theia_ros.nodes.theia_encoder import ENCODER_PARAMETERS
    from theia_ros.nodes.theia_policy import POLICY_PARAMETERS

    assert features.PREPROCESSING_PROFILES == preprocess.PROFILES
    assert features.POS_INTERPOLATIONS == preprocess.POS_INTERPOLATIONS
    assert features.PATCH_SIZE == preprocess.PATCH_SIZE
    for size in [(224, 224), (239, 239), (240, 240), (224, 239), (120, 160), (480, 640), (16, 16)]:
        assert Preprocessing("theia", size).interpolates == preprocess.pos_interpolation_applies(size), size
    assert ENCODER_OPTIONS["preprocessing"][1]["choices"] == preprocess.PROFILES
    for table in (ENCODER_PARAMETERS, POLICY_PARAMETERS):
        by_name = {p.name: p for p in table}
        assert by_name["preprocessing"].choices == preprocess.PROFILES
        assert by_name["pos_interpolation"].choices == preprocess.POS_INTERPOLATIONS


def test_messages_record_the_preprocessing_and_old_ones_mean_the_reference():
    from rclpy.serialization import deserialize_message, serialize_message

    from theia_ros.msg import Features

    x = np.zeros((70, 192), np.float32)
    msg = to_features_msg(x, camera="wrist", preprocessing="isaaclab", pos_interpolation="scale_factor",
                          input_size=(120, 160))
    msg = deserialize_message(serialize_message(msg), Features)
    assert (msg.preprocessing, msg.pos_interpolation) == ("isaaclab", "scale_factor")
    assert list(msg.input_size) == [120, 160] and list(msg.patch_grid) == [7, 10]
    assert preprocessing_of(msg) == ISAACLAB_120x160 and ISAACLAB_120x160.patch_grid == (7, 10)
    assert Features.PREPROCESSING_ISAACLAB == "isaaclab" and Features.POS_INTERPOLATION_SIZE == "size"
    # a message without the fields set, or without them at all (an old bag's): theia at 224x224
    assert preprocessing_of(to_features_msg(np.zeros((196, 4), np.float32))) == Preprocessing("theia", (224, 224))
    assert preprocessing_of(object()) == Preprocessing("theia", (224, 224), "scale_factor")


def test_which_differences_refuse():
    theia = Preprocessing("theia", (224, 224), "scale_factor")
    assert theia.mismatch(Preprocessing("theia", (224, 224), "size")) is None  # 14x14 square: same tokens
    assert theia.mismatch(Preprocessing("theia", (230, 230), "size")) is not None  # another input size
    why = theia.mismatch(ISAACLAB_120x160)
    assert why == ("features preprocessed isaaclab at 120x160 (pos_interpolation scale_factor), but the policy was "
                   "trained on features preprocessed theia at 224x224")
    assert ISAACLAB_120x160.mismatch(Preprocessing("isaaclab", (120, 160), "size")) is not None  # 7x10: not the same
    assert ISAACLAB_120x160.mismatch(Preprocessing("isaaclab", (120, 160), "scale_factor")) is None
    assert Preprocessing("isaaclab", None).mismatch(ISAACLAB_120x160) is None  # size not recorded: not compared


def _spec(**kw):
    base = dict(cameras=["wrist"], representation="tokens", feature_shape=(70, 192), preprocessing="isaaclab",
                input_size=(120, 160), pos_interpolation="scale_factor")
    base.update(kw)
    return ObservationSpec(**base)


def test_specs_record_the_preprocessing_and_buffers_refuse_other_features():
    spec = _spec()
    assert ObservationSpec.from_dict(spec.to_dict()) == spec
    assert spec.to_dict()["input_size"] == [120, 160] and spec.trained_preprocessing == ISAACLAB_120x160
    with pytest.raises(PolicyConfigError, match="7x10 patch grid"):
        _spec(feature_shape=(196, 192))
    _spec(representation="spatial", feature_shape=(192, 7, 10))
    _spec(representation="all_tokens", feature_shape=(71, 192))
    # a spec without them (an older checkpoint, e.g. config/demo_policy) means theia at 224x224
    demo = make_policy(None, checkpoint=ROOT / "config" / "demo_policy")
    assert demo.observation_spec.trained_preprocessing == Preprocessing("theia", (224, 224), "scale_factor")
    assert "preprocessing" not in demo.observation_spec.to_dict()

    buf = ObservationBuffer(spec)
    x = np.zeros((70, 192), np.float32)
    with pytest.raises(PreprocessingMismatchError) as info:
        buf.push_features("wrist", 1.0, x, preprocessing=Preprocessing("theia", (120, 160)))
    assert "features preprocessed theia at 120x160" in str(info.value)
    assert "trained on features preprocessed isaaclab at 120x160" in str(info.value)
    assert isinstance(info.value, ObservationError) and not buf.ready()  # nothing kept
    buf.push_features("wrist", 1.0, x, preprocessing=ISAACLAB_120x160)
    assert buf.ready()
    old = ObservationBuffer(demo.observation_spec)
    old.push_features("front", 1.0, np.zeros((196, 192), np.float32), preprocessing=preprocessing_of(object()))
    with pytest.raises(PreprocessingMismatchError, match="isaaclab at 224x224"):
        old.push_features("front", 2.0, np.zeros((196, 192), np.float32),
                          preprocessing=Preprocessing("isaaclab", (224, 224)))


# ---------------------------------------------------------------------------------------------
# bags: the old definition stays readable; train-policy records and refuses


def _old_store():
    store = get_typestore(Stores.ROS2_JAZZY)
    types = get_types_from_msg(OLD_FEATURES_MSG, bag_io.FEATURES_TYPE)
    types.update(get_types_from_msg(MULTI_MSG, bag_io.MULTI_FEATURES_TYPE))
    store.register(types)
    return store


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_bags_of_the_old_definition_are_read_by_inspect_and_train_policy(tmp_path, capsys, storage):
    bag = tmp_path / "old"
    arrays = write_features_bag(bag, _old_store(), storage=storage)
    with pytest.raises(Exception):  # today's definition cannot read them: the test needs the bag's own
        with bag_io.open_bag(bag) as reader:
            conn, _, raw = next(reader.messages())
            bag_io.typestore().deserialize_cdr(raw, conn.msgtype)

    from theia_ros.bags.inspect import format_inspect, inspect_bag

    info = inspect_bag(bag)
    assert info["error"] is None
    topics = {t["topic"]: t for t in info["topics"]}
    f = topics["/front/features"]["features"]
    assert f["shape"] == [196, 4] and f["preprocessing"] == "theia" and f["input_size"] is None
    assert "inconsistent" not in f and topics["/front/features"]["count"] == 24
    assert "preprocessing theia at 224x224" in format_inspect(info)

    with bag_io.open_bag(bag) as reader:
        got = {}
        for conn, _, raw in reader.messages():
            got.setdefault(conn.topic, []).append(bag_io.deserialize_message(raw, conn))
    from theia_ros.features import features_to_numpy

    np.testing.assert_array_equal(features_to_numpy(got["/front/features"][3]), arrays[3])
    np.testing.assert_array_equal(features_to_numpy(got["/features/synchronized"][5].cameras[1]), arrays[5])

    out = tmp_path / "ckpt"
    code, printed = train_mlp(bag, out, capsys)
    assert code == 0, printed.err
    assert "preprocessing theia at 224x224" in printed.out
    observation = yaml.safe_load((out / "config.yaml").read_text())["observation"]
    assert (observation["preprocessing"], observation["pos_interpolation"]) == ("theia", "scale_factor")
    assert "input_size" not in observation  # the messages state none: the reference 224x224
    assert make_policy(None, checkpoint=out).observation_spec.trained_preprocessing == Preprocessing()


def test_encode_bag_copies_old_features_in_todays_definition(tmp_path, capsys):
    bag, out = tmp_path / "old", tmp_path / "encoded"
    arrays = write_features_bag(bag, _old_store(), n=6, image=True)
    assert main(["encode-bag", str(bag), str(out), "--model", RANDOM_TINY, "--backend", "torch", "--device", "cpu",
                 "--batch", "2", "--threads", "1", "--no-progress"]) == 0, capsys.readouterr().err
    from theia_ros.bags.inspect import inspect_bag
    from theia_ros.features import features_to_numpy

    info = inspect_bag(out)
    assert info["error"] is None
    topics = {t["topic"]: t for t in info["topics"]}
    assert topics["/front/features"]["count"] == 6 and topics["/cam/features"]["count"] == 6
    assert topics["/front/features"]["features"]["preprocessing"] == "theia"
    with bag_io.open_bag(out) as reader:
        assert all(bag_io.is_current_definition(c) for c in reader.connections)
        got = {}
        for conn, _, raw in reader.messages():  # every message in today's definition now
            got.setdefault(conn.topic, []).append(bag_io.typestore().deserialize_cdr(raw, conn.msgtype))
    old = got["/front/features"][4]
    assert (old.preprocessing, list(old.input_size), list(old.patch_grid)) == ("", [], [])
    np.testing.assert_array_equal(features_to_numpy(old), arrays[4])
    np.testing.assert_array_equal(features_to_numpy(got["/features/synchronized"][2].cameras[0]), arrays[2])
    new = got["/cam/features"][0]
    assert (new.preprocessing, list(new.input_size), list(new.patch_grid)) == ("theia", [224, 224], [14, 14])


def test_train_policy_records_the_isaaclab_preprocessing_and_refuses_mixed_bags(tmp_path, capsys):
    store = bag_io.typestore()
    isaac, theia = tmp_path / "isaac", tmp_path / "theia"
    write_features_bag(isaac, store, shape=(70, 8), preprocessing="isaaclab", pos_interpolation="scale_factor",
                       input_size=[120, 160], patch_grid=[7, 10])
    write_features_bag(theia, store, shape=(70, 8), preprocessing="theia", pos_interpolation="scale_factor",
                       input_size=[120, 160], patch_grid=[7, 10])
    out = tmp_path / "ckpt"
    code, printed = train_mlp(isaac, out, capsys)
    assert code == 0, printed.err
    observation = yaml.safe_load((out / "config.yaml").read_text())["observation"]
    assert {k: observation[k] for k in ("preprocessing", "input_size", "pos_interpolation", "feature_shape")} == {
        "preprocessing": "isaaclab", "input_size": [120, 160], "pos_interpolation": "scale_factor",
        "feature_shape": [70, 8]}
    assert make_policy(None, checkpoint=out).observation_spec.trained_preprocessing == ISAACLAB_120x160

    code, printed = train_mlp([isaac, theia], tmp_path / "mixed", capsys)
    assert code == 1
    assert "preprocessed isaaclab at 120x160 (pos_interpolation scale_factor)" in printed.err
    assert "preprocessed theia at 120x160 (pos_interpolation scale_factor)" in printed.err


def test_encode_bag_takes_the_isaaclab_options(tmp_path, capsys):
    from theia_ros.encoder.model import load_model
    from theia_ros.features import features_to_numpy
    from theia_ros.preprocess import PreprocessConfig

    bag, out = tmp_path / "images", tmp_path / "encoded"
    write_features_bag(bag, bag_io.typestore(), n=3, image=True)
    assert main(["encode-bag", str(bag), str(out), "--cameras", "/cam/image_raw", "--no-copy", "--model", RANDOM_TINY,
                 "--seed", "3", "--backend", "torch", "--device", "cpu", "--threads", "1", "--no-progress",
                 "--preprocessing", "isaaclab", "--input-size", "112", "144", "--pos-interpolation", "size"]) == 0, \
        capsys.readouterr().err
    with bag_io.open_bag(out) as reader:
        msgs = [bag_io.deserialize_message(raw, conn) for conn, _, raw in reader.messages()]
    assert len(msgs) == 3
    m = msgs[0]
    assert (m.preprocessing, m.pos_interpolation, list(m.input_size), list(m.patch_grid), list(m.shape)) == (
        "isaaclab", "size", [112, 144], [7, 9], [63, 192])
    rgb = np.random.default_rng(100).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    want = load_model(RANDOM_TINY, seed=3).forward_feature(
        rgb[None], config=PreprocessConfig(profile="isaaclab", size=(112, 144), pos_interpolation="size"))[0]
    np.testing.assert_allclose(features_to_numpy(m), want.numpy(), atol=1e-4)


# ---------------------------------------------------------------------------------------------
# over real topics


def _policy_checkpoint(path, preprocessing):
    """An mlp policy on wrist tokens [70, 192] of a 120x160 input, trained (as far as the spec goes) on features
    preprocessed `preprocessing`; its action is bounded and non-constant."""
    spec = ObservationSpec(["wrist"], "tokens", (70, 192), preprocessing=preprocessing, input_size=(120, 160),
                           pos_interpolation="scale_factor")
    policy = make_policy("mlp", config={"observation": spec.to_dict(),
                                        "action": ActionSpec(["j1", "j2"], lower=[-5, -5], upper=[5, 5]).to_dict(),
                                        "params": {"seed": 0, "hidden_sizes": [16]}})
    return policy.save_pretrained(path)


@pytest.mark.ros
def test_isaaclab_encoder_feeds_its_policy_and_a_theia_policy_refuses(ros_client, tmp_path):
    from diagnostic_msgs.msg import DiagnosticArray
    from sensor_msgs.msg import Image
    from std_msgs.msg import Float64MultiArray

    from theia_ros.encoder.model import load_model
    from theia_ros.features import features_to_numpy
    from theia_ros.msg import Features
    from theia_ros.preprocess import PreprocessConfig

    from ros_helpers import NodeProcess, diagnostic_values, params_file, wait_until

    isaac_ckpt = _policy_checkpoint(tmp_path / "isaac_policy", "isaaclab")
    theia_ckpt = _policy_checkpoint(tmp_path / "theia_policy", "theia")
    encoder_params = {"model": RANDOM_TINY, "seed": 3, "backend": "torch", "device": "cpu", "qos": "reliable",
                      "torch_threads": 1, "cameras": ["wrist"], "wrist": {"preprocessing": "isaaclab"}}
    policy_common = {"policy": "mlp", "cameras": ["wrist"], "rate": 10.0, "max_observation_age": 3.0,
                     "diagnostics_period": 0.5, "torch_threads": 1}
    feats, fsub = ros_client.collect(Features, "wrist/features")
    isaac_cmds, csub = ros_client.collect(Float64MultiArray, "commands")
    theia_cmds, tsub = ros_client.collect(Float64MultiArray, "refusing/commands")
    diags, dsub = ros_client.collect(DiagnosticArray, "/diagnostics")
    pub = ros_client.publisher(Image, "wrist/image_raw")
    running = True
    sent = []

    def camera():
        k = 0
        while running:
            rgb = np.random.default_rng(k).integers(0, 256, (120, 160, 3), dtype=np.uint8)
            msg = Image(height=120, width=160, encoding="rgb8", step=480)
            msg.header.stamp = ros_client.node.get_clock().now().to_msg()
            msg.data = rgb.tobytes()
            sent.append(((msg.header.stamp.sec, msg.header.stamp.nanosec), rgb))
            pub.publish(msg)
            k += 1
            time.sleep(0.2)

    encoder = NodeProcess("theia_ros.nodes.theia_encoder", "--ros-args", "--params-file",
                          params_file(tmp_path / "encoder.yaml", "theia_encoder", encoder_params))
    isaac_policy = NodeProcess("theia_ros.nodes.theia_policy", "--ros-args", "--params-file", params_file(
        tmp_path / "isaac.yaml", "theia_policy", {**policy_common, "policy_checkpoint": str(isaac_ckpt)}))
    theia_policy = NodeProcess("theia_ros.nodes.theia_policy", "--ros-args", "-r", "__node:=refusing_policy", "-r",
                               "commands:=refusing/commands", "--params-file", params_file(
                                   tmp_path / "theia.yaml", "refusing_policy",
                                   {**policy_common, "policy_checkpoint": str(theia_ckpt)}))
    feeder = threading.Thread(target=camera, daemon=True)
    try:
        with encoder, isaac_policy, theia_policy:
            assert ros_client.wait_for_subscribers(pub, timeout=90), encoder.output()
            feeder.start()
            assert wait_until(lambda: len(isaac_cmds) >= 3, 120), encoder.output() + isaac_policy.output()
            assert wait_until(lambda: (diagnostic_values(diags, "refusing_policy: policy") or {}).get(
                "refused_preprocessing", "0") != "0", 60), theia_policy.output()
            time.sleep(1.5)  # the theia policy has had features for a while by now
            refused = diagnostic_values(diags, "refusing_policy: policy")
            accepted = diagnostic_values(diags, "theia_policy: policy")
            assert theia_cmds == [], theia_policy.output()
            assert refused["commands"] == "0" and int(refused["refused_preprocessing"]) >= 3
            assert accepted["refused_preprocessing"] == "0" and int(accepted["commands"]) >= 3
            out = theia_policy.output()
            assert ("refused features from wrist: camera 'wrist': features preprocessed isaaclab at 120x160 "
                    "(pos_interpolation scale_factor), but the policy was trained on features preprocessed theia at "
                    "120x160 (pos_interpolation scale_factor)") in out, out
            assert "refused features" not in isaac_policy.output()
            # the features the policies saw: the Isaac Lab recipe at the camera's own 120x160
            msg = feats[-1][1]
            assert (msg.preprocessing, msg.pos_interpolation) == ("isaaclab", "scale_factor")
            assert list(msg.input_size) == [120, 160] and list(msg.patch_grid) == [7, 10]
            assert list(msg.shape) == [70, 192]
            rgb = dict(sent)[(msg.header.stamp.sec, msg.header.stamp.nanosec)]
            want = load_model(RANDOM_TINY, seed=3).forward_feature(rgb[None], config=PreprocessConfig(
                profile="isaaclab"))[0].numpy()
            np.testing.assert_allclose(features_to_numpy(msg), want, atol=1e-4)
            assert np.isfinite(isaac_cmds[-1][1].data).all() and len(isaac_cmds[-1][1].data) == 2
    finally:
        running = False
        if feeder.is_alive():
            feeder.join(5)
        for sub in (fsub, csub, tsub, dsub):
            ros_client.node.destroy_subscription(sub)
        ros_client.node.destroy_publisher(pub)


@pytest.mark.ros
def test_the_encoder_refuses_a_bad_per_camera_input_size_at_configure(tmp_path):
    from ros_helpers import NodeProcess, params_file, wait_until

    params = {"model": RANDOM_TINY, "backend": "torch", "device": "cpu", "cameras": ["a", "b"], "torch_threads": 1,
              "preprocessing": "isaaclab", "b": {"input_size": [8, 8]}}
    with NodeProcess("theia_ros.nodes.theia_encoder", "--ros-args", "--params-file",
                     params_file(tmp_path / "encoder.yaml", "theia_encoder", params)) as node:
        assert wait_until(lambda: "configure failed" in node.output(), 60), node.output()
        assert ("configure failed: parameter b.input_size (or input_size)=[8, 8]: needs [height, width], each >= 16"
                in node.output())
        assert node.alive()  # unconfigured, alive: fix the parameters and configure again
