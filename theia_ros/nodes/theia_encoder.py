"""theia_encoder: camera images in, Theia features out (a ROS 2 lifecycle node).

configure: load the model and backend (the heavy work, once) and warm it up.
activate:  subscribe to the cameras, publish features and diagnostics.
deactivate/cleanup: stop subscribing / release the model.
With `autostart` (default true) the node configures and activates itself.

Inference runs on the executor's own thread (a SingleThreadedExecutor): torch ran 1.7x slower
on a MultiThreadedExecutor's pool. Image callbacks only take the newest frame of each camera;
a guard condition then encodes whatever is pending as one batch, so cameras that arrived while
the model was busy share one inference.
"""
import sys
import time

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.lifecycle import LifecycleNode, TransitionCallbackReturn
from rclpy.qos import QoSProfile, ReliabilityPolicy, HistoryPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image

from theia_ros.encoder.pipeline import FeatureEncoder
from theia_ros.nodes.feature_image import tokens_to_rgb
from theia_ros.features import to_features_msg
from theia_ros.stamps import stamp_seconds
from theia_ros.msg import Features, MultiCameraFeatures
from theia_ros.preprocess import PreprocessConfig
from theia_ros.images import SUPPORTED_ENCODINGS, ImageDecodeError, decode_compressed, image_to_rgb
from theia_ros.nodes.runtime import declare, forward_python_logging, run_node
from theia_ros.nodes.stats import LogThrottle, SequenceGapCounter, StageStats
from theia_ros.nodes.sync import FrameSynchronizer

CAMERA_STAGES = ("decode", "preprocess", "inference", "publish", "node_overhead", "age_at_publish")
CAMERA_COUNTERS = ("frames_in", "frames_out", "dropped_superseded", "dropped_lost", "dropped_unmatched",
                   "rejected_bad_input", "errors")


class _Camera:
    """Per-camera state: its subscription, publishers, pending frame and statistics."""

    def __init__(self, name, preprocess_config):
        self.name = name
        self.preprocess_config = preprocess_config
        self.subscription = None
        self.features_pub = None
        self.debug_pub = None
        self.pending = None  # (msg, receive time)
        self.sequence = SequenceGapCounter()
        self.stats = StageStats(CAMERA_STAGES, CAMERA_COUNTERS, ("input", "output"))
        self.last_debug = 0.0


class TheiaEncoderNode(LifecycleNode):
    def __init__(self, **kwargs):
        super().__init__("theia_encoder", **kwargs)
        self._declare_parameters()
        self.encoder = None
        self.cameras = {}
        self.synchronizer = None
        self.multi_pub = None
        self.diag_pub = None
        self.diag_timer = None
        self.node_stats = StageStats(("batch",), ("batches", "errors"), ())
        self._process_guard = None
        self._throttle = LogThrottle(period=2.0)
        forward_python_logging(self, "theia_ros.backends")  # engine builds, cache hits and rebuilds
        if self.get_parameter("torch_threads").value > 0:
            import torch

            torch.set_num_threads(self.get_parameter("torch_threads").value)

    # ------------------------------------------------------------------ parameters
    def _declare(self, name, default, description, *, int_range=None, float_range=None, choices=None):
        if choices:
            description += f" One of: {', '.join(choices)}."
        declare(self, name, default, description, int_range=int_range, float_range=float_range)
        self._choices[name] = choices

    def _declare_parameters(self):
        self._choices = {}
        d = self._declare
        d("model", "theaiinstitute/theia-tiny-patch16-224-cddsv",
          "Checkpoint: a directory with config.json + model.safetensors, a Hugging Face hub id, or "
          "'random:<variant>' for random weights (tests and demos only; every message says so).")
        d("seed", 0, "Seed of random weights (model 'random:...').", int_range=(0, 2**31 - 1))
        d("backend", "auto", "Inference engine; auto: tensorrt where CUDA and torch-tensorrt exist, else torch on "
          "CUDA, else the fastest accurate CPU engine (onnxruntime, built once and cached).",
          choices=("auto", "torch", "onnxruntime", "tensorrt"))
        d("precision", "fp32", "Inference precision.", choices=("fp32", "fp16", "bf16"))
        d("device", "auto", "Device: auto (a CUDA GPU if present, else the CPU), cpu, cuda, cuda:1, ...")
        d("max_batch", 4, "Largest batch one inference takes.", int_range=(1, 64))
        d("engine_cache_dir", "",
          "Where built TensorRT engines and ONNX graphs are kept and reused; empty: $THEIA_ROS_CACHE, else "
          "~/.cache/theia_ros/engines. Use a persistent path: a TensorRT build takes minutes.")
        d("tensorrt.fp32_acc", "auto",
          "TensorRT fp16 only: accumulate matmuls in fp32 (slower). auto: only when the fp16 engine fails the "
          "accuracy gate.", choices=("auto", "on", "off"))
        d("representation", "tokens",
          "What to publish: tokens [196,C], cls [C], mean [C], max [C], all_tokens [197,C], spatial [C,14,14], "
          "or teacher:<teacher id> [H*W,C_teacher].")
        d("output_dtype", "float32", "dtype on the wire.", choices=("float32", "float16"))
        d("cameras", ["camera"],
          "Camera names. Camera <name> is read from <name>/image_raw (or <name>/image_raw/compressed) and its "
          "features go to <name>/features; remap topics as usual.")
        d("image_transport", "raw", "Input message type.", choices=("raw", "compressed"))
        d("mode", "independent",
          "independent: encode and publish each camera as it arrives; synchronized: match frames within sync_slop "
          "and publish them as one MultiCameraFeatures on features/synchronized.",
          choices=("independent", "synchronized"))
        d("sync_slop", 0.02, "Largest stamp difference (s) between frames of one synchronized set.",
          float_range=(0.0, 10.0))
        d("qos", "sensor_data", "Input QoS: sensor_data (best effort) or reliable; depth 1 either way.",
          choices=("sensor_data", "reliable"))
        d("max_image_pixels", 3840 * 2160, "Frames with more pixels are rejected (logged, counted, dropped).",
          int_range=(1, 2**31 - 1))
        d("crop", [0, 0, 0, 0], "Crop (x, y, w, h) applied to every camera before resizing; all zeros: none.")
        d("letterbox", False, "Pad to a square before resizing instead of stretching (off: as the reference).")
        for cam in self.get_parameter("cameras").value:  # per-camera geometry, e.g. `wrist: {crop: [...]}`
            d(f"{cam}.crop", [0, 0, 0, 0], f"Crop (x, y, w, h) of camera {cam}; all zeros: the node-wide crop.")
            d(f"{cam}.letterbox", self.get_parameter("letterbox").value,
              f"Letterbox camera {cam} (default: the node-wide letterbox).")
        d("debug_image", False, "Publish <name>/features_image: the tokens' first 3 principal components as RGB.")
        d("debug_image_rate", 2.0, "Largest rate (Hz) of the debug images.", float_range=(0.01, 30.0))
        d("diagnostics_period", 1.0, "Seconds between /diagnostics messages.", float_range=(0.1, 60.0))
        d("torch_threads", 0, "torch intra-op threads; 0 keeps torch's default.", int_range=(0, 256))
        d("autostart", True, "Configure and activate on start (for users without a lifecycle manager).")

    def _param(self, name):
        value = self.get_parameter(name).value
        choices = self._choices.get(name)
        if choices and value not in choices:
            raise ValueError(f"parameter {name}={value!r}: must be one of {', '.join(choices)}")
        return value

    # ------------------------------------------------------------------ lifecycle
    def on_configure(self, state):
        try:
            t0 = time.monotonic()
            model = self._param("model")
            self.encoder = FeatureEncoder.load(
                model, seed=self._param("seed"), backend=self._param("backend"), precision=self._param("precision"),
                device=self._param("device"), max_batch=self._param("max_batch"),
                representation=self._param("representation"), output_dtype=self._param("output_dtype"),
                cache_dir=self._param("engine_cache_dir") or None, fp32_acc=self._param("tensorrt.fp32_acc"))
            self.encoder.warm_up()
            names = list(self._param("cameras"))
            if not names or len(set(names)) != len(names):
                raise ValueError(f"parameter cameras={names}: needs one or more distinct names")
            self.cameras = {name: _Camera(name, self._preprocess_config(name)) for name in names}
            self.mode = self._param("mode")
            self._max_pixels = self._param("max_image_pixels")  # per-frame values, read once
            self._debug_period = 1.0 / self._param("debug_image_rate")
            self._param("image_transport"), self._param("qos")  # validate now, not on activate
        except Exception as exc:  # a bad checkpoint or parameter must not take the process down
            self.get_logger().error(f"configure failed: {exc}")
            self.encoder = None
            return TransitionCallbackReturn.FAILURE
        meta = self.encoder.metadata
        identity = self.encoder.backend.identity
        msg = (f"configured in {time.monotonic() - t0:.1f} s: {self.encoder.model.variant} "
               f"({meta['weights_id']}), backend {identity['backend']} {identity['precision']} on {identity['device']}, "
               f"representation {meta['representation']}, cameras {', '.join(self.cameras)}, mode {self.mode}"
               + (f", engine {identity['engine']}" if identity.get("engine") else ""))
        if meta["random_weights"]:
            self.get_logger().warning(f"{self._random_tag()}{msg}. RANDOM WEIGHTS: the features mean nothing; "
                                      "every message carries random_weights=true")
        else:
            self.get_logger().info(msg)
        for cam in self.cameras.values():
            cam.features_pub = self.create_lifecycle_publisher(Features, f"{cam.name}/features", 10)
            if self._param("debug_image"):
                cam.debug_pub = self.create_lifecycle_publisher(Image, f"{cam.name}/features_image", 1)
        if self.mode == "synchronized":
            self.synchronizer = FrameSynchronizer(list(self.cameras), self._param("sync_slop"))
            self.multi_pub = self.create_lifecycle_publisher(MultiCameraFeatures, "features/synchronized", 10)
        self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        return TransitionCallbackReturn.SUCCESS

    def _preprocess_config(self, camera):
        crop = list(self._param(f"{camera}.crop")) if any(self._param(f"{camera}.crop")) else list(self._param("crop"))
        return PreprocessConfig(crop=tuple(crop) if any(crop) else None, letterbox=self._param(f"{camera}.letterbox"))

    def on_activate(self, state):
        if self._param("qos") == "reliable":
            qos = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST)
        else:
            qos = QoSProfile(depth=1, reliability=qos_profile_sensor_data.reliability,
                             durability=qos_profile_sensor_data.durability, history=HistoryPolicy.KEEP_LAST)
        compressed = self._param("image_transport") == "compressed"
        self._process_guard = self.create_guard_condition(self._process_pending)
        for cam in self.cameras.values():
            topic = f"{cam.name}/image_raw" + ("/compressed" if compressed else "")
            cam.subscription = self.create_subscription(
                CompressedImage if compressed else Image, topic,
                lambda msg, info, cam=cam: self._on_image(cam, msg, info), qos)
        self.diag_timer = self.create_timer(self._param("diagnostics_period"), self._publish_diagnostics)
        self.get_logger().info(f"{self._random_tag()}active: reading "
                               + ", ".join(c.subscription.topic_name for c in self.cameras.values()))
        return super().on_activate(state)

    def on_deactivate(self, state):
        for cam in self.cameras.values():
            if cam.subscription is not None:
                self.destroy_subscription(cam.subscription)
                cam.subscription = None
            cam.pending = None
        if self._process_guard is not None:
            self.destroy_guard_condition(self._process_guard)
            self._process_guard = None
        if self.diag_timer is not None:
            self.destroy_timer(self.diag_timer)
            self.diag_timer = None
        if self.synchronizer:
            self.synchronizer.reset()
        return super().on_deactivate(state)

    def on_cleanup(self, state):
        for cam in self.cameras.values():
            for pub in (cam.features_pub, cam.debug_pub):
                if pub is not None:
                    self.destroy_lifecycle_publisher(pub)
        for pub in (self.multi_pub,):
            if pub is not None:
                self.destroy_lifecycle_publisher(pub)
        if self.diag_pub is not None:
            self.destroy_publisher(self.diag_pub)
        self.cameras, self.multi_pub, self.diag_pub, self.synchronizer = {}, None, None, None
        self.encoder = None  # releases the model and engine
        self.get_logger().info("cleaned up: model released")
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state):
        self.encoder = None
        return TransitionCallbackReturn.SUCCESS

    # ------------------------------------------------------------------ per frame
    def _on_image(self, cam, msg, info):
        """Keep only the newest frame; the encoding runs from the guard condition."""
        stats = cam.stats
        stats.counts["frames_in"] += 1
        stats.rates["input"].tick()
        stats.counts["dropped_lost"] += cam.sequence.observe(info.get("publication_sequence_number"))
        if cam.pending is not None:
            stats.counts["dropped_superseded"] += 1
        cam.pending = (msg, time.perf_counter())
        self._process_guard.trigger()

    def _process_pending(self):
        ready = [cam for cam in self.cameras.values() if cam.pending is not None]
        if not ready:
            return
        batch = []  # (camera, msg, entry time, rgb)
        for cam in ready:
            msg, entered = cam.pending
            cam.pending = None
            rgb = self._decode(cam, msg)
            if rgb is None:
                continue
            if self.synchronizer is not None:
                matched = self.synchronizer.add(cam.name, stamp_seconds(msg.header.stamp), (cam, msg, entered, rgb))
                for name, dropped in self.synchronizer.dropped.items():
                    self.cameras[name].stats.counts["dropped_unmatched"] = dropped
                if matched:
                    batch = [frame for _, frame in matched.values()]
            else:
                batch.append((cam, msg, entered, rgb))
        if batch:
            try:
                self._encode_and_publish(batch)
            except Exception as exc:  # never let one bad batch stop the node
                self.node_stats.counts["errors"] += 1
                for cam, *_ in batch:
                    cam.stats.counts["errors"] += 1
                self.get_logger().error(f"{self._random_tag()}encoding failed, frames dropped: {exc!r}",
                                        throttle_duration_sec=5.0)

    def _decode(self, cam, msg):
        t0 = time.perf_counter()
        try:
            if isinstance(msg, CompressedImage):
                rgb = decode_compressed(msg.data, msg.format)
            else:
                if msg.encoding not in SUPPORTED_ENCODINGS:
                    raise ImageDecodeError(f"unsupported encoding {msg.encoding!r}; supported: "
                                           f"{', '.join(SUPPORTED_ENCODINGS)}")
                self._check_size(msg.height, msg.width)
                rgb = image_to_rgb(msg.data, msg.height, msg.width, msg.step, msg.encoding)
            self._check_size(rgb.shape[0], rgb.shape[1])
        except ImageDecodeError as exc:
            cam.stats.counts["rejected_bad_input"] += 1
            reason = str(exc)
            suffix = self._throttle((cam.name, reason.split(":")[0]))  # one line per camera and reason
            if suffix is not None:
                self.get_logger().warning(f"{cam.name}: dropped a frame: {reason}{suffix}")
            return None
        cam.stats.latency["decode"].add(time.perf_counter() - t0)
        return rgb

    def _check_size(self, height, width):
        limit = self._max_pixels
        if height * width > limit:
            raise ImageDecodeError(f"{width}x{height} frame exceeds max_image_pixels={limit}")

    def _encode_and_publish(self, batch):
        cams = [b[0] for b in batch]
        features, timings = self.encoder.encode([b[3] for b in batch], [c.preprocess_config for c in cams])
        t_pub = time.perf_counter()
        meta = self.encoder.metadata
        msgs = [to_features_msg(features[i], header=msg.header, camera=cam.name, **meta)
                for i, (cam, msg, _, _) in enumerate(batch)]
        if self.multi_pub is not None:
            multi = MultiCameraFeatures(cameras=msgs)
            stamps = [stamp_seconds(m.header.stamp) for m in msgs]
            newest = int(np.argmax(stamps))
            multi.header.stamp = msgs[newest].header.stamp
            multi.max_stamp_skew = float(max(stamps) - min(stamps))
            self.multi_pub.publish(multi)
        else:
            for cam, msg in zip(cams, msgs):
                cam.features_pub.publish(msg)
        done = time.perf_counter()
        now_wall = time.time()
        n = len(batch)
        # the node's own work per frame: the batch's wall time from the first frame's arrival to the
        # last publish, minus inference, shared by the frames of the batch
        overhead = (done - min(b[2] for b in batch) - timings["inference"]) / n
        for i, (cam, msg, entered, _) in enumerate(batch):
            s = cam.stats
            s.counts["frames_out"] += 1
            s.rates["output"].tick()
            s.latency["preprocess"].add(timings["preprocess"] / n)
            s.latency["inference"].add(timings["inference"])
            s.latency["publish"].add((done - t_pub) / n)
            s.latency["node_overhead"].add(overhead)
            s.latency["age_at_publish"].add(now_wall - stamp_seconds(msg.header.stamp))
            if cam.debug_pub is not None:
                self._maybe_publish_debug(cam, msg, features[i])
        self.node_stats.counts["batches"] += 1
        self.node_stats.latency["batch"].add(done - min(b[2] for b in batch))

    def _maybe_publish_debug(self, cam, msg, tensor):
        now = time.monotonic()
        if now - cam.last_debug < self._debug_period:
            return
        cam.last_debug = now
        rep = self.encoder.representation
        tokens = tensor.float().numpy()
        if rep == "spatial":
            tokens = tokens.reshape(tokens.shape[0], -1).T
        elif rep == "all_tokens":
            tokens = tokens[1:]
        elif rep != "tokens":
            return  # pooled vectors and teacher spaces have no 14x14 token grid to show
        picture = tokens_to_rgb(tokens)
        image = Image(header=msg.header, height=picture.shape[0], width=picture.shape[1], encoding="rgb8",
                      step=picture.shape[1] * 3)
        image.data = picture.tobytes()
        cam.debug_pub.publish(image)

    # ------------------------------------------------------------------ diagnostics
    def _random_tag(self):
        return "[RANDOM WEIGHTS] " if self.encoder is not None and self.encoder.model.random_weights else ""

    def _publish_diagnostics(self):
        array = DiagnosticArray()
        array.header.stamp = self.get_clock().now().to_msg()
        meta = self.encoder.metadata
        node_status = DiagnosticStatus(name=f"{self.get_name()}: encoder", hardware_id=meta["model_id"])
        node_status.level = DiagnosticStatus.WARN if meta["random_weights"] else DiagnosticStatus.OK
        node_status.message = "RANDOM WEIGHTS: features mean nothing" if meta["random_weights"] else "running"
        values = {**self.encoder.backend.identity, **self.node_stats.summary()}
        node_status.values = [KeyValue(key=k, value=str(v)) for k, v in values.items()]
        array.status.append(node_status)
        for cam in self.cameras.values():
            summary = cam.stats.summary()
            status = DiagnosticStatus(name=f"{self.get_name()}: camera {cam.name}", hardware_id=cam.name)
            bad = summary["rejected_bad_input"] + summary["errors"]
            status.level = DiagnosticStatus.WARN if bad or meta["random_weights"] else DiagnosticStatus.OK
            status.message = f"{summary['output_hz']:.1f} Hz out, {bad} bad frames"
            status.values = [KeyValue(key=k, value=str(v)) for k, v in summary.items()]
            array.status.append(status)
        self.diag_pub.publish(array)


def _autostart(node):
    if not node.get_parameter("autostart").value:
        return
    if node.trigger_configure() != TransitionCallbackReturn.SUCCESS:
        node.get_logger().error("autostart: configure failed; staying unconfigured (fix the parameters and "
                                "configure again through the lifecycle services)")
    else:
        node.trigger_activate()


def main(argv=None):
    return run_node(TheiaEncoderNode, argv, on_start=_autostart)


if __name__ == "__main__":
    sys.exit(main())
