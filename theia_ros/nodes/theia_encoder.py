"""theia_encoder: camera images in, Theia features out (a ROS 2 lifecycle node).

configure: load the model and backend (the heavy work, once) and warm it up.
activate:  subscribe to the cameras, publish features and diagnostics.
deactivate/cleanup: stop subscribing / release the model.
With `autostart` (default true) the node configures and activates itself.

Inference runs on the executor's own thread (a SingleThreadedExecutor): torch ran 1.7x slower
on a MultiThreadedExecutor's pool. Image callbacks only take the newest frame of each camera;
a guard condition then encodes whatever is pending as one batch, so cameras that arrived while
the model was busy share one inference. With one camera the callback encodes its frame itself.
"""
import sys
import time

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.event_handler import SubscriptionEventCallbacks, UnsupportedEventTypeError
from rclpy.lifecycle import LifecycleNode, TransitionCallbackReturn
from sensor_msgs.msg import CompressedImage, Image

from theia_ros.backends.factory import create_encoder
from theia_ros.encoder.config import BACKEND_CHOICES, ENCODER_DEFAULTS, OUTPUT_DTYPE_CHOICES, PRECISION_CHOICES
from theia_ros.features import to_features_msg
from theia_ros.images import ImageDecodeError, message_to_rgb
from theia_ros.msg import Features, MultiCameraFeatures
from theia_ros.nodes.diagnostics import diagnostic_array, diagnostic_status
from theia_ros.nodes.feature_image import tokens_to_rgb
from theia_ros.nodes.parameters import Param, declare_parameters, read_parameters
from theia_ros.nodes.qos import qos_profile
from theia_ros.nodes.runtime import forward_python_logging, run_node
from theia_ros.nodes.stats import ArrivalAccounting, LogThrottle, StageStats
from theia_ros.nodes.sync import FrameSynchronizer
from theia_ros.preprocess import (
    IMAGE_SIZE,
    PATCH_SIZE,
    POS_INTERPOLATIONS,
    PROFILES,
    PreprocessConfig,
    input_size,
    pos_interpolation_applies,
)
from theia_ros.representations import REPRESENTATIONS
from theia_ros.stamps import stamp_seconds

CAMERA_STAGES = ("decode", "preprocess", "inference", "publish", "node_overhead", "age_at_publish")
CAMERA_COUNTERS = ("frames_in", "frames_out", "dropped_superseded", "dropped_lost", "dropped_unmatched",
                   "rejected_bad_input", "errors")

ENCODER_PARAMETERS = (
    Param("model", ENCODER_DEFAULTS["model"],
          "Checkpoint: a directory with config.json + model.safetensors, a Hugging Face hub id, or "
          "'random:<variant>' for random weights (tests and demos only; every message says so)."),
    Param("seed", ENCODER_DEFAULTS["seed"], "Seed of random weights (model 'random:...').", int_range=(0, 2**31 - 1)),
    Param("backend", ENCODER_DEFAULTS["backend"],
          "Inference engine; auto: tensorrt where CUDA and torch-tensorrt exist, else torch on CUDA, else the "
          "fastest accurate CPU engine (openvino, else onnxruntime; built once and cached).", choices=BACKEND_CHOICES),
    Param("precision", ENCODER_DEFAULTS["precision"], "Inference precision; int8: openvino on the CPU, calibrated on "
          "natural images.", choices=PRECISION_CHOICES),
    Param("device", ENCODER_DEFAULTS["device"], "Device: auto (a CUDA GPU if present, else the CPU), cpu, cuda, "
          "cuda:1, ..."),
    Param("max_batch", ENCODER_DEFAULTS["max_batch"], "Largest batch one inference takes.", int_range=(1, 64)),
    Param("engine_cache_dir", "",
          "Where built TensorRT engines and ONNX graphs are kept and reused; empty: $THEIA_ROS_CACHE, else "
          "~/.cache/theia_ros/engines. Use a persistent path: a TensorRT build takes minutes."),
    Param("tensorrt.fp32_acc", "auto", "TensorRT fp16 only: accumulate matmuls in fp32 (slower). auto: only when "
          "the fp16 engine fails the accuracy gate.", choices=("auto", "on", "off")),
    Param("torch.cuda_graphs", False, "torch on CUDA only (no TensorRT): replay the forward as CUDA graphs, one per "
          "batch bucket (every batch up to 8, then powers of two and max_batch), captured and gated at configure; "
          "removes the per-layer launch cost at small batches. Ignored where auto picks another engine or the CPU."),
    Param("openvino.calibration_bag", "", "OpenVINO int8 only: a bag whose camera frames join the packaged "
          "photographs in the calibration set (as `theia-ros export --calibration-bag`); empty: photographs only."),
    Param("representation", ENCODER_DEFAULTS["representation"],
          "What to publish: " + ", ".join(f"{name} {shape.split(']')[0]}]" for name, shape in REPRESENTATIONS.items())
          + ", or teacher:<teacher id> [H*W,C_teacher]."),
    Param("output_dtype", ENCODER_DEFAULTS["output_dtype"], "dtype on the wire.", choices=OUTPUT_DTYPE_CHOICES),
    Param("cameras", ["camera"],
          "Camera names. Camera <name> is read from <name>/image_raw (or <name>/image_raw/compressed) and its "
          "features go to <name>/features; remap topics as usual."),
    Param("image_transport", "raw", "Input message type.", choices=("raw", "compressed")),
    Param("mode", "independent",
          "independent: encode and publish each camera as it arrives; synchronized: match frames within sync_slop "
          "and publish them as one MultiCameraFeatures on features/synchronized.",
          choices=("independent", "synchronized")),
    Param("sync_slop", 0.02, "Largest stamp difference (s) between frames of one synchronized set.",
          float_range=(0.0, 10.0)),
    Param("qos", "sensor_data", "Input QoS: sensor_data (best effort) or reliable; depth 1 either way.",
          choices=("sensor_data", "reliable")),
    Param("max_image_pixels", 3840 * 2160, "Frames with more pixels are rejected (logged, counted, dropped) before "
          "any pixel is decoded.", int_range=(1, 2**31 - 1)),
    Param("crop", [0, 0, 0, 0], "Crop (x, y, w, h) applied to every camera before resizing; all zeros: none."),
    Param("letterbox", False, "Pad to a square before resizing instead of stretching (off: as the reference)."),
    Param("preprocessing", "theia", "theia: the reference (resize to input_size, [-1, 1]); isaaclab: as Isaac Lab's "
          "image_features observation (the image's own size unless input_size, ImageNet mean/std; docs/isaaclab.md). "
          "Every message records it.", choices=PROFILES),
    Param("input_size", [0, 0], "[height, width] the model sees, each >= 16 (patch grid height//16 x width//16); "
          "[0, 0]: the profile's default, 224x224 for theia, each image's own size (after crop and letterbox) for "
          "isaaclab."),
    Param("pos_interpolation", "scale_factor", "How position embeddings reach a patch grid other than 14x14: "
          "scale_factor as transformers <= 4.44 (the checkpoints' config.json), size as >= 4.45.",
          choices=POS_INTERPOLATIONS),
    Param("debug_image", False, "Publish <name>/features_image: the tokens' first 3 principal components as RGB."),
    Param("debug_image_rate", 2.0, "Largest rate (Hz) of the debug images.", float_range=(0.01, 30.0)),
    Param("diagnostics_period", 1.0, "Seconds between /diagnostics messages.", float_range=(0.1, 60.0)),
    Param("torch_threads", ENCODER_DEFAULTS["threads"], "torch intra-op threads; 0 keeps torch's default.",
          int_range=(0, 256)),
    Param("autostart", True, "Configure and activate on start (for users without a lifecycle manager)."),
)

STARTUP_PARAMETERS = ("cameras", "letterbox", "preprocessing", "input_size", "pos_interpolation", "autostart")


def camera_parameters(camera, defaults):
    """Per-camera preprocessing (e.g. `wrist: {crop: [...], preprocessing: isaaclab}`), declared once the camera
    names are known; `defaults`: the node-wide letterbox, preprocessing, input_size and pos_interpolation."""
    return (
        Param(f"{camera}.crop", [0, 0, 0, 0], f"Crop (x, y, w, h) of camera {camera}; all zeros: the node-wide crop.",
              attr="crop"),
        Param(f"{camera}.letterbox", defaults.letterbox,
              f"Letterbox camera {camera} (default: the node-wide letterbox).", attr="letterbox"),
        Param(f"{camera}.preprocessing", defaults.preprocessing,
              f"Preprocessing profile of camera {camera} (default: the node-wide preprocessing).", choices=PROFILES,
              attr="preprocessing"),
        Param(f"{camera}.input_size", list(defaults.input_size),
              f"[height, width] the model sees for camera {camera}; [0, 0]: the profile's default (default: the "
              "node-wide input_size).", attr="input_size"),
        Param(f"{camera}.pos_interpolation", defaults.pos_interpolation,
              f"Position-embedding interpolation of camera {camera} (default: the node-wide pos_interpolation).",
              choices=POS_INTERPOLATIONS, attr="pos_interpolation"),
    )


def fixed_input_size(config):
    """The input size `config` gives every image (its size, or 224x224 for the theia profile); None where it is
    each image's own (the isaaclab profile without a size)."""
    return config.size or ((IMAGE_SIZE, IMAGE_SIZE) if config.profile == "theia" else None)


def describe_config(config):
    """e.g. 'isaaclab at 120x160, pos_interpolation scale_factor' or 'theia at 224x224'."""
    size = fixed_input_size(config)
    text = f"{config.profile} at " + ("each image's own size" if size is None else f"{size[0]}x{size[1]}")
    if size is None or pos_interpolation_applies(size):
        text += f", pos_interpolation {config.pos_interpolation}"
    return text + (f", crop {list(config.crop)}" if config.crop else "") + (", letterbox" if config.letterbox else "")


def preprocess_config(camera, geometry, node_crop):
    """The PreprocessConfig of one camera from its parameters; ValueError naming the parameter when one is wrong."""
    crop = list(geometry.crop) if any(geometry.crop) else list(node_crop)
    size = [int(v) for v in geometry.input_size]
    if len(size) != 2 or (any(size) and min(size) < PATCH_SIZE):
        raise ValueError(f"parameter {camera}.input_size (or input_size)={size}: needs [height, width], each >= "
                         f"{PATCH_SIZE}, or [0, 0] for the profile's default")
    if len(crop) != 4:
        raise ValueError(f"parameter {camera}.crop (or crop)={crop}: needs four integers [x, y, w, h]")
    return PreprocessConfig(crop=tuple(crop) if any(crop) else None, letterbox=geometry.letterbox,
                            profile=geometry.preprocessing, size=tuple(size) if any(size) else None,
                            pos_interpolation=geometry.pos_interpolation)


class _Camera:
    """Per-camera state: its subscription, publishers, pending frame and statistics."""

    def __init__(self, name, preprocess_config):
        self.name = name
        self.preprocess_config = preprocess_config
        self.subscription = None
        self.features_pub = None
        self.debug_pub = None
        self.pending = None  # (msg, receive time)
        self.arrivals = ArrivalAccounting()  # taken, replaced in the DDS reader, lost before arriving
        self.superseded_in_node = 0  # taken, then replaced by a newer frame before an inference was free
        self.stats = StageStats(CAMERA_STAGES, CAMERA_COUNTERS, ("input", "output"))
        self.last_debug = 0.0


class TheiaEncoderNode(LifecycleNode):
    def __init__(self, **kwargs):
        super().__init__("theia_encoder", **kwargs)
        declare_parameters(self, ENCODER_PARAMETERS)
        # what start-up needs before configure: the cameras' own parameters, and whether to autostart
        self.startup = read_parameters(self, [p for p in ENCODER_PARAMETERS if p.name in STARTUP_PARAMETERS])
        for camera in self.startup.cameras:
            declare_parameters(self, camera_parameters(camera, self.startup))
        self.params = None  # read at configure
        self.encoder = None
        self.cameras = {}
        self.synchronizer = None
        self.multi_pub = None
        self.diag_pub = None
        self.diag_timer = None
        self.node_stats = StageStats(("batch",), ("batches", "errors"), ())
        self._process_guard = None
        self._encode_in_callback = False
        self._throttle = LogThrottle(period=2.0)
        forward_python_logging(self, "theia_ros.backends")  # engine builds, cache hits and rebuilds

    # ------------------------------------------------------------------ lifecycle
    def on_configure(self, state):
        try:
            t0 = time.monotonic()
            p = self.params = read_parameters(self, ENCODER_PARAMETERS)
            names = list(p.cameras)
            if not names or len(set(names)) != len(names):
                raise ValueError(f"parameter cameras={names}: needs one or more distinct names")
            configs = {name: preprocess_config(name, read_parameters(self, camera_parameters(name, p)), p.crop)
                       for name in names}
            if p.torch_threads > 0:
                import torch

                torch.set_num_threads(p.torch_threads)
            # one engine per input size the cameras' parameters fix (an isaaclab camera without input_size: the
            # size of its images, built at its first frame)
            known = {}
            for name in names:
                size = fixed_input_size(configs[name])
                if size is not None:
                    known.setdefault((size, configs[name].pos_interpolation), name)
            (first_size, first_pos), *others = list(known) or [(None, p.pos_interpolation)]
            extra_frames = None
            if p.openvino_calibration_bag and p.precision == "int8":
                from theia_ros.bags.calibration import calibration_frames

                extra_frames = calibration_frames(p.openvino_calibration_bag)
            self.encoder = create_encoder(
                p.model, seed=p.seed, backend=p.backend, precision=p.precision, device=p.device,
                max_batch=p.max_batch, representation=p.representation, output_dtype=p.output_dtype,
                cache_dir=p.engine_cache_dir or None, fp32_acc=p.tensorrt_fp32_acc, cuda_graphs=p.torch_cuda_graphs,
                calibration_frames=extra_frames, input_size=first_size,
                pos_interpolation=first_pos)
            for size, pos in others:
                self.encoder.prepare(size, pos)
            self.encoder.warm_up(shapes=[(size, PreprocessConfig(profile=configs[name].profile, size=size,
                                                                 pos_interpolation=pos))
                                         for (size, pos), name in known.items()] or None)
            self.cameras = {name: _Camera(name, configs[name]) for name in names}
            self.metadata = self.encoder.metadata  # fields every features message carries, fixed until cleanup
            self._debug_period = 1.0 / p.debug_image_rate
        except Exception as exc:  # a bad checkpoint or parameter must not take the process down
            self.get_logger().error(f"configure failed: {exc}")
            self.encoder = None
            return TransitionCallbackReturn.FAILURE
        meta = self.metadata
        identity = self.encoder.backend.identity
        msg = (f"configured in {time.monotonic() - t0:.1f} s: {self.encoder.model.variant} "
               f"({meta['weights_id']}), backend {identity['backend']} {identity['precision']} "
               f"on {identity['device']}, "
               f"representation {meta['representation']}, cameras "
               + ", ".join(f"{c.name} ({describe_config(c.preprocess_config)})" for c in self.cameras.values())
               + f", mode {self.params.mode}"
               + (f", engine {identity['engine']}" if identity.get("engine") else ""))
        if meta["random_weights"]:
            self.get_logger().warning(f"{self._random_tag()}{msg}. RANDOM WEIGHTS: the features mean nothing; "
                                      "every message carries random_weights=true")
        else:
            self.get_logger().info(msg)
        for cam in self.cameras.values():
            cam.features_pub = self.create_lifecycle_publisher(Features, f"{cam.name}/features", 10)
            if self.params.debug_image:
                cam.debug_pub = self.create_lifecycle_publisher(Image, f"{cam.name}/features_image", 1)
        if self.params.mode == "synchronized":
            self.synchronizer = FrameSynchronizer(list(self.cameras), self.params.sync_slop)
            self.multi_pub = self.create_lifecycle_publisher(MultiCameraFeatures, "features/synchronized", 10)
            self._publish_features = self._publish_synchronized
        else:
            self._publish_features = self._publish_independent
        self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state):
        qos = qos_profile(self.params.qos, depth=1)  # the newest frame wins; replaced frames are counted
        compressed = self.params.image_transport == "compressed"
        self._process_guard = self.create_guard_condition(self._process_pending)
        # one camera: nothing to batch with, so its frame is encoded in its own callback (the guard
        # condition's extra executor round cost 0.4-0.7 ms per frame); several: the guard batches them
        self._encode_in_callback = len(self.cameras) == 1
        for cam in self.cameras.values():
            topic = f"{cam.name}/image_raw" + ("/compressed" if compressed else "")
            cam.subscription = self._subscribe_camera(cam, CompressedImage if compressed else Image, topic, qos)
        self.diag_timer = self.create_timer(self.params.diagnostics_period, self._publish_diagnostics)
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
    def _subscribe_camera(self, cam, msg_type, topic, qos):
        """The camera's subscription, with DDS's count of samples that never reached it (message_lost),
        which tells frames lost on the way from frames replaced in the reader while the node was busy."""
        def on_image(msg, info):
            self._on_image(cam, msg, info)

        cam.arrivals.new_subscription()
        events = SubscriptionEventCallbacks(message_lost=lambda status: cam.arrivals.message_lost(status.total_count))
        try:
            return self.create_subscription(msg_type, topic, on_image, qos, event_callbacks=events)
        except UnsupportedEventTypeError:
            cam.arrivals.reports_lost = False
            self.get_logger().warning(f"{cam.name}: this middleware does not report lost samples: dropped_lost "
                                      "counts every sequence gap, frames replaced while the node was busy included")
            return self.create_subscription(msg_type, topic, on_image, qos)

    def _on_image(self, cam, msg, info):
        """Keep only the newest frame; the encoding runs from the guard condition."""
        cam.stats.rates["input"].tick()
        cam.arrivals.took(info.get("publication_sequence_number"))
        if cam.pending is not None:
            cam.superseded_in_node += 1
        cam.pending = (msg, time.perf_counter())
        if self._encode_in_callback:
            self._process_pending()
        else:
            self._process_guard.trigger()

    @staticmethod
    def _count_arrivals(cam):
        """frames_in: every frame that reached the process; dropped_superseded: those skipped because the
        node was busy (replaced in the DDS reader or in the node's pending slot); dropped_lost: those that
        never arrived. frames_in = frames_out + dropped_superseded + rejected_bad_input + dropped_unmatched
        + errors (+ the one pending)."""
        counts, arrivals = cam.stats.counts, cam.arrivals
        counts["frames_in"] = arrivals.arrived
        counts["dropped_superseded"] = cam.superseded_in_node + arrivals.replaced_in_reader
        counts["dropped_lost"] = arrivals.lost

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
            rgb = message_to_rgb(msg, self.params.max_image_pixels)
        except ImageDecodeError as exc:
            cam.stats.counts["rejected_bad_input"] += 1
            reason = str(exc)
            suffix = self._throttle((cam.name, reason.split(":")[0]))  # one line per camera and reason
            if suffix is not None:
                self.get_logger().warning(f"{cam.name}: dropped a frame: {reason}{suffix}")
            return None
        cam.stats.latency["decode"].add(time.perf_counter() - t0)
        return rgb

    def _encode_and_publish(self, batch):
        cams = [b[0] for b in batch]
        features, timings = self.encoder.encode([b[3] for b in batch], [c.preprocess_config for c in cams])
        t_pub = time.perf_counter()  # features: a tensor [B, ...], or per-frame tensors (several patch grids)
        sizes = [input_size(cam.preprocess_config, rgb.shape[:2]) for cam, _, _, rgb in batch]
        msgs = [to_features_msg(features[i], header=msg.header, camera=cam.name, **self.metadata,
                                preprocessing=cam.preprocess_config.profile,
                                pos_interpolation=cam.preprocess_config.pos_interpolation, input_size=sizes[i])
                for i, (cam, msg, _, _) in enumerate(batch)]
        self._publish_features(cams, msgs)
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
                self._maybe_publish_debug(cam, msg, features[i], (sizes[i][0] // PATCH_SIZE, sizes[i][1] // PATCH_SIZE))
        self.node_stats.counts["batches"] += 1
        self.node_stats.latency["batch"].add(done - min(b[2] for b in batch))

    def _publish_independent(self, cams, msgs):
        for cam, msg in zip(cams, msgs):
            cam.features_pub.publish(msg)

    def _publish_synchronized(self, cams, msgs):
        multi = MultiCameraFeatures(cameras=msgs)
        stamps = [stamp_seconds(m.header.stamp) for m in msgs]
        multi.header.stamp = msgs[int(np.argmax(stamps))].header.stamp
        multi.max_stamp_skew = float(max(stamps) - min(stamps))
        self.multi_pub.publish(multi)

    def _maybe_publish_debug(self, cam, msg, tensor, grid):
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
            return  # pooled vectors and teacher spaces have no token grid to show
        picture = tokens_to_rgb(tokens, grid)
        image = Image(header=msg.header, height=picture.shape[0], width=picture.shape[1], encoding="rgb8",
                      step=picture.shape[1] * 3)
        image.data = picture.tobytes()
        cam.debug_pub.publish(image)

    # ------------------------------------------------------------------ diagnostics
    def _random_tag(self):
        return "[RANDOM WEIGHTS] " if self.encoder is not None and self.encoder.model.random_weights else ""

    def _publish_diagnostics(self):
        meta = self.metadata
        random = meta["random_weights"]
        statuses = [diagnostic_status(f"{self.get_name()}: encoder", meta["model_id"], warn=random,
                                      message="RANDOM WEIGHTS: features mean nothing" if random else "running",
                                      values={**self.encoder.backend.identity, **self.node_stats.summary()})]
        for cam in self.cameras.values():
            self._count_arrivals(cam)
            summary = cam.stats.summary()
            bad = summary["rejected_bad_input"] + summary["errors"]
            statuses.append(diagnostic_status(f"{self.get_name()}: camera {cam.name}", cam.name,
                                              warn=bool(bad or random), values=summary,
                                              message=f"{summary['output_hz']:.1f} Hz out, {bad} bad frames"))
        self.diag_pub.publish(diagnostic_array(self, statuses))


def _autostart(node):
    if not node.startup.autostart:
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
