"""The theia_encoder node in its own process, fed and read over Fast DDS by this test."""
import time

import cv2
import numpy as np
import pytest
import yaml
from diagnostic_msgs.msg import DiagnosticArray
from lifecycle_msgs.msg import State, Transition
from lifecycle_msgs.srv import ChangeState, GetState
from sensor_msgs.msg import CompressedImage, Image

from theia_ros.encoder.model import load_model
from theia_ros.features import features_to_numpy
from theia_ros.msg import Features, MultiCameraFeatures

from ros_helpers import NodeProcess, wait_until

pytestmark = pytest.mark.ros
RANDOM_TINY = "random:theia-tiny-patch16-224-cddsv"


@pytest.fixture(scope="module")
def reference_model():
    return load_model(RANDOM_TINY, seed=3)


def params_file(tmp_path, **params):
    path = tmp_path / "encoder.yaml"
    path.write_text(yaml.safe_dump({"theia_encoder": {"ros__parameters": params}}))
    return path


def start_encoder(tmp_path, **params):
    base = {"model": RANDOM_TINY, "seed": 3, "backend": "torch", "qos": "reliable", "torch_threads": 1,
            "diagnostics_period": 0.3}
    base.update(params)
    return NodeProcess("theia_ros.nodes.theia_encoder", "--ros-args", "--params-file", params_file(tmp_path, **base))


def frame(seed, h=120, w=160):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def image_msg(rgb, stamp_ns, encoding="rgb8", frame_id="cam_optical"):
    msg = Image(height=rgb.shape[0], width=rgb.shape[1], encoding=encoding, step=rgb.shape[1] * rgb.shape[2])
    msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp_ns, 10**9)
    msg.header.frame_id = frame_id
    msg.data = rgb.tobytes()
    return msg


def latest_camera_diag(diags, camera):
    for _, array in reversed(diags):
        for status in array.status:
            if status.name.endswith(f"camera {camera}"):
                return {kv.key: kv.value for kv in status.values}
    return None


def test_raw_camera_features_match_the_model_and_bad_frames_are_dropped(ros_client, tmp_path, reference_model):
    feats, fsub = ros_client.collect(Features, "front/features")
    diags, dsub = ros_client.collect(DiagnosticArray, "/diagnostics")
    pictures, psub = ros_client.collect(Image, "front/features_image")
    pub = ros_client.publisher(Image, "front/image_raw")
    with start_encoder(tmp_path, cameras=["front"], debug_image=True, debug_image_rate=30.0) as node:
        assert ros_client.wait_for_subscribers(pub, timeout=60), node.output()
        assert "RANDOM WEIGHTS" in node.output()

        good = frame(1)
        pub.publish(image_msg(good, 5_000_000_123))
        assert wait_until(lambda: len(feats) >= 1, 30), node.output()
        msg = feats[0][1]
        assert (msg.header.stamp.sec, msg.header.stamp.nanosec, msg.header.frame_id) == (5, 123, "cam_optical")
        assert msg.camera == "front" and msg.representation == "tokens"
        assert msg.random_weights and msg.weights_id == "random:theia-tiny-patch16-224-cddsv:seed=3"
        got = features_to_numpy(msg)
        want = reference_model.forward_feature(good[None])[0].numpy()
        assert got.shape == (196, 192)
        np.testing.assert_allclose(got, want, atol=1e-4)
        assert wait_until(lambda: len(pictures) >= 1, 10), node.output()
        picture = pictures[0][1]
        assert (picture.height, picture.width, picture.encoding) == (224, 224, "rgb8")
        assert picture.header.stamp.sec == 5 and len(picture.data) == 224 * 224 * 3

        bgr = image_msg(good[..., ::-1].copy(), 6_000_000_000, encoding="bgr8")
        pub.publish(bgr)  # same picture as bgr8: same features
        assert wait_until(lambda: len(feats) >= 2, 20), node.output()
        np.testing.assert_allclose(features_to_numpy(feats[1][1]), want, atol=1e-4)

        bad = []
        empty = Image(height=0, width=0, encoding="rgb8", step=0)
        bad.append(empty)
        short_step = image_msg(good, 1)
        short_step.step = 10
        bad.append(short_step)
        truncated = image_msg(good, 2)
        truncated.data = truncated.data[: len(truncated.data) // 2]
        bad.append(truncated)
        bad.append(image_msg(good, 3, encoding="16UC1"))
        huge = Image(height=3000, width=4000, encoding="rgb8", step=12000)
        huge.data = bytes(3000 * 12000)
        bad.append(huge)
        def rejected():
            return int((latest_camera_diag(diags, "front") or {}).get("rejected_bad_input", -1))

        for i, msg in enumerate(bad):
            pub.publish(msg)
            assert wait_until(lambda: rejected() == i + 1, 30), (i, node.output())  # counted and dropped
            pub.publish(image_msg(frame(10 + i), 10_000_000_000 + i))  # the next good frame is encoded
            assert wait_until(lambda: len(feats) >= 3 + i, 30), (i, node.output())
        assert all(m.header.stamp.sec == 10 for _, m in feats[2:])
        assert wait_until(lambda: int(latest_camera_diag(diags, "front")["frames_out"]) == 7, 10)
        d = latest_camera_diag(diags, "front")
        assert int(d["frames_out"]) == 7 and int(d["errors"]) == 0
        assert float(d["inference_ms_p50"]) > 0
        out = node.output()
        for reason in ("4000x3000 frame exceeds max_image_pixels", "unsupported image encoding '16UC1'"):
            assert reason in out, out
        assert node.alive()
    assert node.proc.returncode == 0
    for entity in (fsub, dsub, psub):
        ros_client.node.destroy_subscription(entity)
    ros_client.node.destroy_publisher(pub)


def test_three_compressed_cameras_synchronized_in_one_message(ros_client, tmp_path, reference_model):
    cams = ["left", "right", "wrist"]
    multi, msub = ros_client.collect(MultiCameraFeatures, "features/synchronized")
    pubs = {c: ros_client.publisher(CompressedImage, f"{c}/image_raw/compressed") for c in cams}
    with start_encoder(tmp_path, cameras=cams, mode="synchronized", sync_slop=0.05,
                       image_transport="compressed", representation="mean", output_dtype="float16",
                       right={"crop": [16, 8, 64, 48]}) as node:
        for p in pubs.values():
            assert ros_client.wait_for_subscribers(p, timeout=60), node.output()
        pngs = {c: frame(20 + i, 96, 128) for i, c in enumerate(cams)}

        def send(t0_ns, corrupt=None):
            for i, c in enumerate(cams):
                msg = CompressedImage(format="png")
                msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(t0_ns + i * 5_000_000, 10**9)
                msg.header.frame_id = c
                data = cv2.imencode(".png", pngs[c][..., ::-1])[1].tobytes()
                msg.data = b"\xff\xd8garbage" if c == corrupt else data
                if c == corrupt:
                    msg.format = "jpeg"
                pubs[c].publish(msg)
                time.sleep(0.05)

        send(20_000_000_000)
        assert wait_until(lambda: len(multi) >= 1, 30), node.output()
        m = multi[0][1]
        assert [f.camera for f in m.cameras] == cams
        assert [f.header.stamp.nanosec for f in m.cameras] == [0, 5_000_000, 10_000_000]
        assert m.header.stamp.nanosec == 10_000_000 and abs(m.max_stamp_skew - 0.01) < 1e-9
        for f in m.cameras:
            got = features_to_numpy(f)
            assert got.dtype == np.float16 and got.shape == (192,) and f.representation == "mean"
            image = pngs[f.camera][8:56, 16:80] if f.camera == "right" else pngs[f.camera]  # right: cropped
            want = reference_model.forward_feature(image[None], representation="mean")[0]
            np.testing.assert_allclose(got.astype(np.float32), want.numpy(), rtol=2e-3, atol=2e-3)

        send(21_000_000_000, corrupt="right")  # one camera's frame is corrupt: no set, no crash
        send(22_000_000_000)
        assert wait_until(lambda: len(multi) >= 2, 20), node.output()
        assert multi[1][1].cameras[0].header.stamp.sec == 22
        assert "right: dropped a frame" in node.output() and "jpeg data" in node.output()
        assert node.alive()
    ros_client.node.destroy_subscription(msub)
    for p in pubs.values():
        ros_client.node.destroy_publisher(p)


def _call(client, request, timeout=30.0):
    future = client.call_async(request)
    assert wait_until(future.done, timeout)
    return future.result()


def test_lifecycle_transitions_and_failed_configure(ros_client, tmp_path):
    node_name = "theia_encoder"
    change = ros_client.node.create_client(ChangeState, f"/{node_name}/change_state")
    get = ros_client.node.create_client(GetState, f"/{node_name}/get_state")
    feats, fsub = ros_client.collect(Features, "camera/features")
    pub = ros_client.publisher(Image, "camera/image_raw")

    def state():
        return _call(get, GetState.Request()).current_state.id

    def transition(tid):
        return _call(change, ChangeState.Request(transition=Transition(id=tid))).success

    with start_encoder(tmp_path, autostart=False, model=str(tmp_path / "missing_checkpoint")) as node:
        assert change.wait_for_service(timeout_sec=60), node.output()
        assert state() == State.PRIMARY_STATE_UNCONFIGURED
        assert not transition(Transition.TRANSITION_CONFIGURE)  # missing checkpoint: refused, node alive
        assert state() == State.PRIMARY_STATE_UNCONFIGURED and node.alive()
        assert "configure failed" in node.output() and "missing_checkpoint" in node.output()
    engines = tmp_path / "engines"
    with start_encoder(tmp_path, autostart=False, backend="onnxruntime", engine_cache_dir=str(engines)) as node:
        assert change.wait_for_service(timeout_sec=60), node.output()
        assert state() == State.PRIMARY_STATE_UNCONFIGURED
        assert pub.get_subscription_count() == 0  # nothing subscribed before activation
        assert transition(Transition.TRANSITION_CONFIGURE)
        assert state() == State.PRIMARY_STATE_INACTIVE
        # the engine is built into engine_cache_dir, and the build is told in the node's own log
        slots = list(engines.glob("onnxruntime/*/"))
        assert len(slots) == 1 and list(slots[0].glob("*.onnx")), node.output()
        assert "onnxruntime engine built in" in node.output() and f"engine {slots[0]}" in node.output()
        assert transition(Transition.TRANSITION_ACTIVATE)
        assert ros_client.wait_for_subscribers(pub, timeout=20)
        pub.publish(image_msg(frame(5), 1_000_000_000))
        assert wait_until(lambda: len(feats) == 1, 20), node.output()
        assert transition(Transition.TRANSITION_DEACTIVATE)
        assert wait_until(lambda: pub.get_subscription_count() == 0, 10)
        pub.publish(image_msg(frame(6), 2_000_000_000))
        time.sleep(1.0)
        assert len(feats) == 1  # inactive: nothing encoded
        assert transition(Transition.TRANSITION_CLEANUP)
        assert state() == State.PRIMARY_STATE_UNCONFIGURED
        assert "model released" in node.output()
        assert transition(Transition.TRANSITION_CONFIGURE) and transition(Transition.TRANSITION_ACTIVATE)
        assert "onnxruntime graph loaded from cache" in node.output()  # configured again: not rebuilt
        assert node.output().count("onnxruntime engine built in") == 1
        assert ros_client.wait_for_subscribers(pub, timeout=20)
        pub.publish(image_msg(frame(7), 3_000_000_000))
        assert wait_until(lambda: len(feats) == 2, 20), node.output()
    ros_client.node.destroy_client(change)
    ros_client.node.destroy_client(get)
    ros_client.node.destroy_subscription(fsub)
    ros_client.node.destroy_publisher(pub)
