"""OpenVINO backend: fp32 and bf16 on Intel / AMD CPUs, calibrated int8 (NNCF), fp16 on an Intel GPU.

Conversion: ``ov.convert_model`` of the model's own export module (backends.base.export_module; the
same module ONNX and TensorRT start from) with a dynamic batch 1..64 and the input size fixed.  That
is measured as fast as converting the lean graph (17.1 vs 17.5 ms, theia-tiny batch 1, 2 threads) and
exact (cosine 1.0 in f32); the ONNX graph the onnxruntime backend caches is not used: it holds ONNX
Runtime's own fused operators (com.microsoft), which OpenVINO does not read.

int8: post-training static quantization with NNCF (``nncf.quantize``, ``ModelType.TRANSFORMER``:
LayerNorm / softmax / GELU kept in floating point, symmetric activations) calibrated on natural
photographs shipped in packages, plus frames of a bag the user names (backends.calibration).  Should
that engine fail the gate, it is quantized again with SmoothQuant, then with asymmetric activations
and the first (patch embedding) and last layers in floating point (:func:`quantize`'s recipes); if
all fail it is refused with the measured worst case.

The IR (model.xml + model.bin, weights kept in f32: never ``compress_to_fp16``) lives in the engine
cache keyed by weights, output, precision, input size, batch range and, for int8, the calibration set's
identity; the environment holds the openvino / nncf / torch versions.  Every engine passes the accuracy
gate (backends.validation.gate: synthetic input, and natural held-out photographs below fp32) when
built AND when loaded from the cache; a cached engine that fails it is rebuilt once.

Runtime: ``INFERENCE_PRECISION_HINT`` is always set (OpenVINO defaults to bf16 on CPUs with native
bf16: fp32 must say f32); bf16 only where the CPU has native bf16 (AVX512-BF16 / AMX), else refused.
Threads: ``threads`` (default: torch's intra-op threads, i.e. the node's torch_threads), one stream,
LATENCY hint, no CPU pinning (pinned OpenVINO threads would fight torch's for the same cores).

Speed (measured, theia-tiny, 480x640 frame in, interleaved with eager torch; see benchmarks/bench_backends.py):
- batch 1 runs a second compilation of the same IR reshaped to a static [1, 3, H, W] (the CPU plugin
  picks its static-shape kernels: 4-6% faster than the dynamic-batch compilation); batches of 2 and more
  run the dynamic one (batching is 10-25% faster per image than a loop), compiled only when
  max_batch > 1 (it holds a second copy of the packed weights: +350 MiB for theia-base fp32).  Both are
  gated.  Inputs are handed over without a copy (``share_inputs``): 1-2%.
- int8: the layers NNCF keeps in floating point (LayerNorm, softmax, the attention's scaling, GELU,
  residual adds) run in bf16 on CPUs with native bf16 (``int8_float="auto"``), else f32: 3-6% faster at
  the same measured accuracy (theia-tiny worst per-image cosine 0.99945 vs 0.99946); part of the cache key.
- measured and left: CPU pinning, THROUGHPUT hint with one stream, CPU_DENORMALS_OPTIMIZATION,
  TBB_PARTITIONER, SNIPPETS_MODE DISABLE (int8 10% slower), converting via torch.export, a fused QKV
  projection, the patch embedding as a MatMul (all within +-2% or slower).
  fp32 is compute bound (PERF_COUNT, theia-tiny 2.5 GFLOP per image): its FullyConnected layers, 72% of
  the time, run at 184 GFLOP/s on two Zen 4 cores and 96 on one, what torch reaches on a 2048^2 fp32 GEMM
  (173 / 90); attention 22%, the rest under 6%.
"""
from __future__ import annotations

import copy
import importlib.util
import logging
import threading
import time
import warnings

import numpy as np
import torch

from theia_ros.backends import cache
from theia_ros.backends.base import (
    DEFAULT_INPUT_SIZE,
    BackendError,
    InferenceBackend,
    canonical_representation,
    engine_size_fields,
    export_module,
)

log = logging.getLogger("theia_ros.backends")

MAX_OPENVINO_BATCH = 64
IR_FILE = "model.xml"
WEIGHTS_FILE = "model.bin"
PRECISIONS = ("fp32", "bf16", "fp16", "int8")
_HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16", "int8": "f32"}
#: int8 recipes, tried in order until one passes the gate
INT8_RECIPES = ("plain", "smoothquant", "keep-ends")
#: int8 engines: the precision of the layers left in floating point ("auto": bf16 on CPUs with native bf16)
INT8_FLOAT_CHOICES = ("auto", "f32", "bf16")

_core = None
_core_lock = threading.Lock()


def openvino_available() -> bool:
    return importlib.util.find_spec("openvino") is not None


def nncf_available() -> bool:
    return importlib.util.find_spec("nncf") is not None


def core():
    """One OpenVINO Core per process."""
    global _core
    with _core_lock:
        if _core is None:
            import openvino as ov

            _core = ov.Core()
        return _core


def cpu_has_native_bf16() -> bool:
    """Native bf16 on this CPU (the probe auto uses, backends.torch_backend.cpu_has_fast_bf16) and
    OpenVINO agreeing it runs bf16 there."""
    from theia_ros.backends.torch_backend import cpu_has_fast_bf16

    if not cpu_has_fast_bf16():
        return False
    try:
        return "BF16" in core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:  # broad on purpose: a failing probe means "no"
        return False


def intel_gpus() -> list:
    """OpenVINO's GPU device names here (Intel GPUs with their driver), e.g. ["GPU"] or ["GPU.0", "GPU.1"]."""
    try:
        return [d for d in core().available_devices if d.startswith("GPU")]
    except Exception:  # broad on purpose: no runtime, no GPU
        return []


def _versions(precision) -> dict:
    import openvino

    env = {"openvino": openvino.__version__, "torch": torch.__version__}
    if precision == "int8":
        import nncf

        env["nncf"] = nncf.__version__
    return env


def engine_key(model, representation, precision="fp32", input_size=DEFAULT_INPUT_SIZE,
               pos_interpolation="scale_factor", calibration=None, int8_float="f32") -> dict:
    key = {
        **engine_size_fields(input_size, pos_interpolation),
        "backend": "openvino",
        "variant": model.variant,
        "weights_id": model.weights_id,
        "representation": canonical_representation(model, representation),
        "precision": precision,
        "batch": [1, MAX_OPENVINO_BATCH],
        "source": "export_module",
    }
    if precision == "int8":
        key["calibration"] = dict(calibration or {})
        if int8_float != "f32":  # the recipe is chosen by the gate run at this precision
            key["int8_float"] = int8_float
    return key


def convert(model, representation, input_size=DEFAULT_INPUT_SIZE, pos_interpolation="scale_factor"):
    """ov.Model of ``representation`` for [1..64, 3, H, W] pixels (the batch dynamic)."""
    import openvino as ov

    from theia_ros.backends.onnxruntime_backend import quiet_exporters

    height, width = (int(v) for v in input_size)
    module = export_module(model, representation, (height, width), pos_interpolation).eval()
    with quiet_exporters(), warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # the tracer's TracerWarnings about shape checks in the module
        converted = ov.convert_model(module, example_input=torch.zeros(1, 3, height, width),
                                     input=[(ov.Dimension(1, MAX_OPENVINO_BATCH), 3, height, width)])
    return converted


def quantize(ov_model, pixels, recipe=INT8_RECIPES[0]):
    """NNCF post-training static int8 quantization of ``ov_model`` calibrated on ``pixels`` [N, 3, H, W].

    Recipes (all ``ModelType.TRANSFORMER``: LayerNorm, softmax, GELU stay in floating point):
    "plain": symmetric activations (PERFORMANCE preset), no SmoothQuant: the most accurate measured
    (theia-tiny cls, held-out photographs: worst cosine 0.9977 vs 0.982 with SmoothQuant);
    "smoothquant": NNCF's default SmoothQuant, for weights with activation outliers;
    "keep-ends": MIXED preset (asymmetric activations), no SmoothQuant, the patch embedding and the
    last MatMul in floating point."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

    from theia_ros.backends.onnxruntime_backend import quiet_exporters

    if recipe not in INT8_RECIPES:
        raise BackendError(f"openvino backend: unknown int8 recipe {recipe!r}; use one of {', '.join(INT8_RECIPES)}")
    dataset = nncf.Dataset([pixels[i:i + 1].numpy() for i in range(len(pixels))])
    no_smoothquant = AdvancedQuantizationParameters(smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=-1))
    kwargs = {"preset": nncf.QuantizationPreset.PERFORMANCE}
    if recipe in ("plain", "keep-ends"):
        kwargs["advanced_parameters"] = no_smoothquant
    if recipe == "keep-ends":
        ops = [op for op in ov_model.get_ordered_ops() if op.get_type_name() in ("Convolution", "MatMul")]
        names = [ops[0].get_friendly_name(), ops[-1].get_friendly_name()] if ops else []
        kwargs.update(preset=nncf.QuantizationPreset.MIXED,
                      ignored_scope=nncf.IgnoredScope(names=names, validate=False))
    logging.getLogger("nncf").setLevel(logging.ERROR)
    with quiet_exporters():
        return nncf.quantize(ov_model, dataset, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(pixels),
                             fast_bias_correction=True, **kwargs)


class OpenVINOBackend(InferenceBackend):
    name = "openvino"

    def __init__(self, model, representation="tokens", precision="fp32", device="cpu", max_batch=4,
                 threads=None, cache_dir=None, rebuild=False, calibration_frames=None, calibration_size=None,
                 input_size=None, pos_interpolation="scale_factor", int8_float="auto"):
        if str(device).startswith("gpu"):  # torch has no "gpu" device: say what to pass
            raise BackendError(f"openvino backend: device {device!r}: use 'xpu' (or 'xpu:N') for an Intel GPU, "
                               "'cpu' for the CPU")
        super().__init__(model, representation, precision, device, max_batch, input_size, pos_interpolation)
        if not openvino_available():
            raise BackendError("openvino backend: the openvino package is not installed "
                               "(pip install 'theia_ros[openvino]')")
        if precision not in PRECISIONS:
            raise BackendError(f"openvino backend: unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
        if self.device.type not in ("cpu", "xpu"):
            raise BackendError(f"openvino backend: runs on the CPU ('cpu') or an Intel GPU ('xpu'), got {device!r}")
        self.ov_device = "CPU"
        if self.device.type == "xpu":
            gpus = intel_gpus()
            if not gpus:
                raise BackendError("openvino backend: device 'xpu' asked for, but OpenVINO sees no Intel GPU here "
                                   "(devices: " + ", ".join(core().available_devices) + ")")
            self.ov_device = "GPU" if self.device.index is None else f"GPU.{self.device.index}"
            if self.ov_device not in gpus and not (self.ov_device == "GPU" and gpus):
                raise BackendError(f"openvino backend: no {self.ov_device} here; OpenVINO sees {', '.join(gpus)}")
        if precision == "fp16" and self.ov_device == "CPU":
            raise BackendError("openvino backend: fp16 runs on an Intel GPU only (device 'xpu'); on the CPU use "
                               "fp32, bf16 (native bf16 CPUs) or int8")
        if precision == "bf16" and self.ov_device == "CPU" and not cpu_has_native_bf16():
            raise BackendError("openvino backend: bf16 needs a CPU with native bf16 (AVX512-BF16 or AMX); this one "
                               "would emulate it, slower than fp32: use fp32 or int8")
        if precision == "int8" and not nncf_available():
            raise BackendError("openvino backend: int8 needs the nncf package (pip install 'theia_ros[openvino]')")
        if not 1 <= self.max_batch <= MAX_OPENVINO_BATCH:
            raise BackendError(f"openvino backend: max_batch must be 1..{MAX_OPENVINO_BATCH}, got {max_batch}")
        if int8_float not in INT8_FLOAT_CHOICES:
            raise BackendError(f"openvino backend: int8_float must be one of {', '.join(INT8_FLOAT_CHOICES)}, "
                               f"got {int8_float!r}")
        self.int8_float = None
        if precision == "int8":
            native = self.ov_device == "CPU" and cpu_has_native_bf16()
            if int8_float == "bf16" and not native:
                raise BackendError("openvino backend: int8_float bf16 needs a CPU with native bf16 (AVX512-BF16 or "
                                   "AMX); use f32 or auto")
            self.int8_float = ("bf16" if native else "f32") if int8_float == "auto" else int8_float
        if calibration_frames is not None and precision != "int8":
            log.info("openvino backend: calibration_frames are for int8 only; ignored at %s", precision)
        self.model = model if model.device.type == "cpu" else copy.deepcopy(model).to("cpu")
        export_module(self.model, representation)  # unknown representation/teacher: fail before converting
        self.threads = int(threads) if threads else max(1, torch.get_num_threads())
        self.calibration = None
        if precision == "int8":
            from theia_ros.backends.calibration import DEFAULT_CALIBRATION_SIZE, CalibrationSet

            self.calibration = CalibrationSet(self.input_size, int(calibration_size or DEFAULT_CALIBRATION_SIZE),
                                              extra=calibration_frames)
        self.key = engine_key(self.model, representation, precision, self.input_size, self.pos_interpolation,
                              self.calibration.identity if self.calibration is not None else None,
                              self.int8_float or "f32")
        try:
            self.environment = _versions(precision)
        except ImportError as exc:
            raise BackendError(f"openvino backend: {exc}") from None
        self._lock = threading.Lock()
        result = cache.get_or_build("openvino", self.key, self.environment, self._build, root=cache_dir,
                                    rebuild=rebuild)
        try:
            self._load(result)
            if result.status == "hit":  # a built engine passed the gate in _build; a cached one passes it now
                start = time.perf_counter()
                self.validation = self._validate()
                log.info("openvino %s engine loaded from cache, accuracy gate passed (worst cosine %.6f, %.0f ms): %s",
                         precision, self.validation["cosine"], (time.perf_counter() - start) * 1e3, self.engine_path)
        except BackendError as exc:  # a cached engine that does not load or fails the gate: rebuild it once
            log.warning("openvino engine %s from the cache cannot be used (%s): rebuilding", result.directory, exc)
            result = cache.get_or_build("openvino", self.key, self.environment, self._build, root=cache_dir,
                                        rebuild=True)
            self._load(result)
        self.cache = result

    # ------------------------------------------------------------------ engine
    def _load(self, result):
        self.engine_path = result.directory / IR_FILE
        self.validation = dict(result.meta.get("validation") or {})
        self.validation_cosine = self.validation.get("cosine")
        self.int8_recipe = result.meta.get("int8_recipe")
        try:
            ov_model = core().read_model(str(self.engine_path))
        except Exception as exc:  # broad on purpose: OpenVINO raises RuntimeError subclasses for a bad file
            raise BackendError(f"openvino backend: cannot read {self.engine_path}: {exc}") from None
        self._compile(ov_model)

    def compile_config(self) -> dict:
        hint = self.int8_float if self.precision == "int8" else _HINTS[self.precision]
        config = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"}
        if self.ov_device == "CPU":
            config.update({"INFERENCE_NUM_THREADS": self.threads, "NUM_STREAMS": 1, "ENABLE_CPU_PINNING": False})
        return config

    def _compile(self, ov_model):
        """``compiled`` / ``request``: the IR reshaped to a static batch of 1 (the per-frame path);
        ``compiled_batched`` / ``batched_request``: the IR as it is (batch 1..64), only when max_batch > 1."""
        config = self.compile_config()
        try:
            batch1 = ov_model.clone()
            batch1.reshape({0: [1, 3, *self.input_size]})
            self.compiled = core().compile_model(batch1, self.ov_device, config)
            self.compiled_batched = None
            if self.max_batch > 1:
                self.compiled_batched = core().compile_model(ov_model, self.ov_device, config)
        except Exception as exc:  # broad on purpose: OpenVINO raises RuntimeError subclasses
            raise BackendError(f"openvino backend: cannot compile the engine for {self.ov_device}: {exc}") from None
        self.request = self.compiled.create_infer_request()
        self.batched_request = (self.compiled_batched.create_infer_request() if self.compiled_batched is not None
                                else None)

    def _what(self):
        size = "x".join(str(v) for v in self.input_size)
        return (f"openvino {self.precision} engine of {self.model.variant} ({self.representation}, {size}, "
                f"{self.ov_device})")

    def _validate(self) -> dict:
        from theia_ros.backends.validation import gate

        try:  # both compilations: batch 1 alone (static), then batches of max_batch (dynamic)
            result = gate(self.run_pixels, self.model, self.representation, self.precision,
                          f"{self._what()} at batch 1", self.input_size, self.pos_interpolation, 1)
            if self.compiled_batched is not None:
                batched = gate(self.run_pixels, self.model, self.representation, self.precision,
                               f"{self._what()} at batch {self.max_batch}", self.input_size, self.pos_interpolation,
                               self.max_batch)
                result = dict(min((result, batched), key=lambda r: r["cosine"]), batch1=result["cosine"],
                              batched=batched["cosine"])
        except BackendError:
            raise
        except Exception as exc:  # broad on purpose: an engine that cannot even run is refused like a wrong one
            raise BackendError(f"refusing {self._what()}: it fails to run: {type(exc).__name__}: {exc}") from None
        self.validation_cosine = result["cosine"]
        return result

    def _build(self, directory):
        import openvino as ov

        start = time.perf_counter()
        log.info("converting %s (%s, %dx%d) to OpenVINO ...", self.model.variant, self.representation, *self.input_size)
        converted = convert(self.model, self.representation, self.input_size, self.pos_interpolation)
        extra = {"convert_seconds": round(time.perf_counter() - start, 3)}
        recipes = INT8_RECIPES if self.precision == "int8" else (None,)
        failures = []
        for recipe in recipes:
            ov_model = converted
            if recipe is not None:
                start = time.perf_counter()
                log.info("int8: calibrating on %d natural images (recipe %s) ...", len(self.calibration), recipe)
                ov_model = quantize(converted.clone(), self.calibration.pixels, recipe)
                extra.update(int8_recipe=recipe, quantize_seconds=round(time.perf_counter() - start, 3),
                             calibration=self.calibration.identity)
            self._compile(ov_model)
            try:
                validation = self._validate()
            except BackendError as exc:
                failures.append(str(exc))
                if recipe is not None and recipe != recipes[-1]:
                    log.warning("int8 engine refused with recipe %s (%s); trying the next recipe", recipe, exc)
                    continue
                raise BackendError("; ".join(failures)) from None
            ov.save_model(ov_model, str(directory / IR_FILE), compress_to_fp16=False)
            self.int8_recipe = recipe
            return {"files": [IR_FILE, WEIGHTS_FILE], "validation": validation, **extra}
        raise BackendError("; ".join(failures))  # not reached: the loop returns or raises

    @property
    def identity(self):
        identity = super().identity
        identity["engine"] = str(self.engine_path)
        identity["ov_device"] = self.ov_device
        if self.calibration is not None:
            identity["calibration"] = self.calibration.identity
            identity["int8_float"] = self.int8_float
        return identity

    def run_pixels(self, pixels):
        self.check_pixels(pixels)
        array = np.ascontiguousarray(pixels.detach().to("cpu", torch.float32).numpy())
        if not 1 <= len(array) <= MAX_OPENVINO_BATCH:
            raise BackendError(f"openvino backend: batch {len(array)} outside 1..{MAX_OPENVINO_BATCH}")
        with self._lock:  # infer requests reused; their output buffers are copied out before the next call
            if len(array) > 1 and self.batched_request is not None:
                self.batched_request.infer({0: array}, share_inputs=True)
                return torch.from_numpy(self.batched_request.get_output_tensor(0).data.copy())
            outputs = []  # batch 1, or more than max_batch == 1 asked for: image by image, static shape
            for i in range(len(array)):
                self.request.infer({0: array[i:i + 1]}, share_inputs=True)
                outputs.append(self.request.get_output_tensor(0).data.copy())
            return torch.from_numpy(outputs[0] if len(outputs) == 1 else np.concatenate(outputs))
