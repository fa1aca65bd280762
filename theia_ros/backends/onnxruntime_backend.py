"""ONNX Runtime backend (CPU, fp32): the model exported to ONNX once, cached, run by ORT.

Export: torch.onnx (dynamo exporter, opset 18) with a dynamic batch dimension, then ONNX
Runtime's transformer fusions (bias+GELU, residual+LayerNorm) when they apply.  The graph lives
in the engine cache (see backends.cache) keyed by weights digest, output, precision and the
torch / onnx / onnxruntime versions, and is validated against fp32 torch (cosine >= 0.9999)
before it is recorded, and again every time it is loaded from the cache (a graph altered on disk,
its sidecar rewritten to match, is caught there and rebuilt; the gate costs one batch-2 run of the
graph and of eager torch: 0.15 s for theia-tiny on one thread).  Sessions never spin their threads
("session.intra_op.allow_spinning" = "0"): spinning ORT threads slow down torch code running next
to them in the same process.

Input size: a graph is exported for one spatial size (``input_size``, default 224x224) with its
position embeddings interpolated once, as a constant; the cache key names the size and the
position-embedding convention (sizes other than 224x224 only, so 224x224 engines cached before keep
their key), so graphs for several sizes coexist in one cache.
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import time

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

OPSET = 18
MAX_ONNX_BATCH = 64  # the exported graph takes any batch 1..64 (the node's max_batch range)
GRAPH_FILE = "model.onnx"
FUSED_FILE = "fused.onnx"
_LEVELS = ("disable", "basic", "extended", "all")


def ort_available() -> bool:
    """onnxruntime to run, onnx + onnxscript to export (torch's dynamo exporter needs both)."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnx", "onnxscript"))


def _versions() -> dict:
    import onnx
    import onnxruntime

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def engine_key(model, representation, precision="fp32", fuse=True, graph="lean", input_size=DEFAULT_INPUT_SIZE,
               pos_interpolation="scale_factor") -> dict:
    return {
        **engine_size_fields(input_size, pos_interpolation),
        "backend": "onnxruntime",
        "variant": model.variant,
        "weights_id": model.weights_id,
        "representation": canonical_representation(model, representation),
        "precision": precision,
        "batch": [1, MAX_ONNX_BATCH],
        "opset": OPSET,
        "transformer_fusion": bool(fuse),
        "graph": graph,
    }


def session_options(threads=None, level="all"):
    import onnxruntime as ort

    if level not in _LEVELS:
        raise BackendError(f"onnxruntime backend: graph_optimization must be one of {', '.join(_LEVELS)}, "
                           f"got {level!r}")
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads) if threads else max(1, torch.get_num_threads())
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    so.log_severity_level = 3
    return so


_CHATTY_LOGGERS = ("onnx_ir", "onnxscript", "onnx_model", "onnx_model_bert", "fusion_base", "fusion_utils",
                   "torch.onnx", "torch.export", "torch._export")


@contextlib.contextmanager
def quiet_exporters():
    """The exporters and ORT's optimizer log every pass at INFO; keep ours readable."""
    saved = {}
    for name in _CHATTY_LOGGERS:
        logger = logging.getLogger(name)
        saved[name] = logger.level
        logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def export_onnx(model, representation, path, example_batch=2, graph="lean", input_size=DEFAULT_INPUT_SIZE,
                pos_interpolation="scale_factor"):
    """torch.onnx export (opset 18, dynamic batch 1..64) of ``representation`` to ``path``
    (weights in ``path + '.data'``), for pixels of ``input_size`` (height, width) only.  ``graph``:
    "lean" (backends.lean: packed qkv, 2-D GEMMs, ONNX Runtime's fused MultiHeadAttention) or
    "model" (the model's own modules, standard ONNX ops only).  Returns the seconds it took."""
    table = None
    height, width = (int(v) for v in input_size)
    if graph == "lean":
        from theia_ros.backends.lean import LeanTheia, onnx_translation_table

        module = LeanTheia(model, representation, onnx_attention=True, input_size=(height, width),
                           pos_interpolation=pos_interpolation).eval()
        table = onnx_translation_table()
    elif graph == "model":
        module = export_module(model, representation, (height, width), pos_interpolation).eval()
    else:
        raise BackendError(f"onnxruntime backend: graph must be 'lean' or 'model', got {graph!r}")
    example = torch.zeros(example_batch, 3, height, width)
    batch = torch.export.Dim("batch", min=1, max=MAX_ONNX_BATCH)
    start = time.perf_counter()
    with quiet_exporters(), torch.inference_mode(False), torch.no_grad():
        torch.onnx.export(module, (example,), str(path), input_names=["pixels"], output_names=["features"],
                          opset_version=OPSET, dynamo=True, external_data=True,
                          dynamic_shapes=({0: batch},), optimize=True, custom_translation_table=table)
    return time.perf_counter() - start


def fuse_transformer(path, out_path, num_heads, hidden_size):
    """ONNX Runtime's transformer fusions (Gelu, LayerNorm, attention, ...) of ``path`` into
    ``out_path`` (weights in ``out_path + '.data'``).  Returns the fused-op counts, or None when the
    optimizer is unavailable or fails (the plain graph is then used)."""
    try:
        from onnxruntime.transformers import optimizer
    except ImportError:
        return None
    try:
        with quiet_exporters():
            fused = optimizer.optimize_model(str(path), model_type="vit", num_heads=num_heads,
                                             hidden_size=hidden_size, opt_level=0)
            counts = {k: v for k, v in fused.get_fused_operator_statistics().items() if v}
            fused.save_model_to_file(str(out_path), use_external_data_format=True, all_tensors_to_one_file=True)
    except Exception as exc:  # broad on purpose: fusion is an optimisation: keep the plain graph
        log.warning("onnxruntime transformer fusion failed (%s: %s); keeping the plain graph", type(exc).__name__, exc)
        return None
    return counts


def _remove(*paths):
    for path in paths:
        if os.path.exists(path):
            os.remove(path)


class OnnxRuntimeBackend(InferenceBackend):
    name = "onnxruntime"

    def __init__(self, model, representation="tokens", precision="fp32", device="cpu", max_batch=4,
                 threads=None, graph_optimization="all", fuse=True, graph="lean", cache_dir=None,
                 rebuild=False, input_size=None, pos_interpolation="scale_factor"):
        super().__init__(model, representation, precision, device, max_batch, input_size, pos_interpolation)
        if not ort_available():
            raise BackendError("onnxruntime backend: needs the onnxruntime, onnx and onnxscript packages")
        if self.device.type != "cpu":
            raise BackendError(f"onnxruntime backend: runs on the CPU only, got device {device!r}")
        if precision != "fp32":
            raise BackendError(f"onnxruntime backend: precision {precision!r} not offered on the CPU; use fp32 "
                               "(or the torch backend for bf16)")
        if not 1 <= self.max_batch <= MAX_ONNX_BATCH:
            raise BackendError(f"onnxruntime backend: max_batch must be 1..{MAX_ONNX_BATCH}, got {max_batch}")
        if graph_optimization not in _LEVELS:
            raise BackendError(f"onnxruntime backend: graph_optimization must be one of {', '.join(_LEVELS)}, "
                               f"got {graph_optimization!r}")
        if graph not in ("lean", "model"):
            raise BackendError(f"onnxruntime backend: graph must be 'lean' or 'model', got {graph!r}")
        # export and validation run on a CPU model; a model living on a GPU is copied, not moved
        self.model = model if model.device.type == "cpu" else copy.deepcopy(model).to("cpu")
        export_module(self.model, representation)  # unknown representation/teacher: fail before exporting
        self.threads = threads
        self.graph_optimization = graph_optimization
        self.graph = graph
        self.key = engine_key(self.model, representation, precision, fuse, graph, self.input_size,
                              self.pos_interpolation)
        try:
            self.environment = _versions()
        except ImportError as exc:
            raise BackendError(f"onnxruntime backend: {exc}") from None
        self._fuse = fuse
        result = cache.get_or_build("onnxruntime", self.key, self.environment, self._build, root=cache_dir,
                                    rebuild=rebuild)
        self.engine_path = result.directory / result.meta.get("graph_file", GRAPH_FILE)
        self.validation_cosine = result.meta.get("validation", {}).get("cosine")
        try:
            self.session = self._session()
            if result.status == "hit":  # a built graph passed the gate in _build; a cached one passes it now
                start = time.perf_counter()
                self.validation_cosine = self._validate(self.session)
                log.info("onnxruntime graph loaded from cache, accuracy gate passed (cosine %.6f, %.0f ms): %s",
                         self.validation_cosine, (time.perf_counter() - start) * 1e3, self.engine_path)
        except BackendError as exc:  # a cached graph that does not load or fails the gate: rebuild it once
            log.warning("onnxruntime graph %s from the cache cannot be used (%s): rebuilding", self.engine_path, exc)
            result = cache.get_or_build("onnxruntime", self.key, self.environment, self._build, root=cache_dir,
                                        rebuild=True)
            self.engine_path = result.directory / result.meta.get("graph_file", GRAPH_FILE)
            self.validation_cosine = result.meta.get("validation", {}).get("cosine")
            self.session = self._session()
        self.cache = result

    @property
    def identity(self):
        identity = super().identity
        identity["engine"] = str(self.engine_path)
        return identity

    def _session(self):
        import onnxruntime as ort

        try:
            return ort.InferenceSession(str(self.engine_path), session_options(self.threads, self.graph_optimization),
                                        providers=["CPUExecutionProvider"])
        except Exception as exc:  # broad on purpose: onnxruntime raises several types for a bad file
            raise BackendError(f"onnxruntime backend: cannot load {self.engine_path}: {exc}") from None

    def _validate(self, session):
        from theia_ros.backends.validation import check_output, min_cosine_for, reference_output, validation_pixels

        pixels = validation_pixels(min(2, self.max_batch), size=self.input_size)
        reference = reference_output(self.model, pixels, self.representation, torch.device("cpu"),
                                     self.pos_interpolation)
        output = session.run(None, {"pixels": pixels.numpy()})[0]
        size = "x".join(str(v) for v in self.input_size)
        return check_output(torch.from_numpy(output), reference, min_cosine_for(self.precision),
                            f"onnxruntime {self.precision} graph of {self.model.variant} ({self.representation}, "
                            f"{size})")

    def _build(self, directory):
        plain = directory / GRAPH_FILE
        log.info("exporting %s (%s, %dx%d) to ONNX opset %d ...", self.model.variant, self.representation,
                 *self.input_size, OPSET)
        seconds = export_onnx(self.model, self.representation, plain, graph=self.graph, input_size=self.input_size,
                              pos_interpolation=self.pos_interpolation)
        fused = None
        if self._fuse:
            spec = self.model.spec
            fused = fuse_transformer(plain, directory / FUSED_FILE, spec.num_heads, spec.hidden_size)
        log.info("ONNX export took %.1f s%s", seconds, f"; fused {fused}" if fused else "")
        cosine = None
        if fused is not None:
            self.engine_path = directory / FUSED_FILE
            try:
                cosine = self._validate(self._session())
                _remove(plain, directory / (GRAPH_FILE + ".data"))
            except BackendError as exc:  # a fusion that changed the result: use the plain graph
                log.warning("fused ONNX graph refused (%s); using the unfused graph", exc)
                fused = None
                _remove(directory / FUSED_FILE, directory / (FUSED_FILE + ".data"))
        if fused is None:
            self.engine_path = plain
            cosine = self._validate(self._session())
        files = sorted(p.name for p in directory.iterdir() if p.is_file())
        return {"files": files, "graph_file": self.engine_path.name,
                "validation": {"cosine": cosine, "min_cosine": 0.9999},
                "export_seconds": round(seconds, 3), "fused_ops": fused or {}}

    def run_pixels(self, pixels):
        self.check_pixels(pixels)
        array = pixels.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {"pixels": array})[0])
