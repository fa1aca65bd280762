"""Torch-TensorRT backend (CUDA): fp32 / fp16 / bf16 engines, built once, cached, reloaded.

Build path (torch-tensorrt 2.x dynamo frontend; written against 2.13/2.14, works back to the
2.8 of JetPack 6.2 where the same arguments exist):

    torch.export.export(module, (example,), dynamic_shapes=batch Dim 1..max_batch)   # example batch >= 2
    -> torch_tensorrt.dynamo.compile(exported, arg_inputs=[Input(min, opt, max)], use_explicit_typing=True, ...)
    -> validation against fp32 torch on the fixed validation input (cosine >= 0.9999 fp32, >= 0.999 fp16/bf16)
    -> torch_tensorrt.save(..., output_format="exported_program")      # into the engine cache
    later: torch_tensorrt.load(path) -> run, without recompiling.

Precision: torch-tensorrt >= 2.13 builds strongly typed networks and ignores (removed)
``enabled_precisions``; an fp16 engine is obtained by giving it an fp16 graph.  The default
"explicit" mode builds that graph here: linear/conv weights cast to fp16 (bf16), LayerNorm
computed in fp32 (input upcast, fp32 weights, result cast back), attention with its softmax in
fp32 (transformers' eager attention), engine inputs and outputs fp32.  ``fp16_mode="autocast"``
instead hands an fp32 graph to torch-tensorrt's rule-based autocast (2.10+), keeping layer_norm
and softmax in fp32.  Either way the engine must pass the validation gate before it is cached.

Accumulation: TensorRT may pick fp16-accumulating GEMM kernels for an fp16 graph.  torch-tensorrt's
``use_fp32_acc`` (2.8+) prevents that by running each fp16 matmul on fp32-cast inputs, which costs
speed, so ``fp32_acc="auto"`` (the default) builds without it first and rebuilds with it only when
the fp16 engine fails the validation gate; "on" / "off" force it.  It has no effect on bf16/fp32.

The argument names used here are checked against the signatures recorded from the released wheels
(2.8, 2.10, 2.13, 2.14: ``scripts/record_trt_signatures.py``, ``test/data``).

Engines are specific to the GPU model and the TensorRT version: both are part of the cache
sidecar, and a mismatch rebuilds the engine (see backends.cache).  An engine loaded from the cache
passes the same validation gate before its first frame (an engine altered on disk, its sidecar
rewritten to match, is caught there and rebuilt).

Input size: an engine takes one spatial size (``input_size``, default 224x224; position embeddings
interpolated once, a constant of the graph); the cache key names the size (sizes other than 224x224
only, so 224x224 engines cached before keep their key) and engines for several sizes coexist.
"""
from __future__ import annotations

import copy
import inspect
import logging
import platform
import time

import torch
import torch.nn.functional as F
from torch import nn

from theia_ros.backends import cache
from theia_ros.backends.base import (
    DEFAULT_INPUT_SIZE,
    BackendError,
    InferenceBackend,
    canonical_representation,
    engine_size_fields,
    export_module,
)
from theia_ros.representations import is_teacher, teacher_of

log = logging.getLogger("theia_ros.backends")

ENGINE_FILE = "engine.ep"
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FP16_MODES = ("explicit", "autocast")
FP32_ACC_MODES = ("auto", "on", "off")


def tensorrt_available() -> bool:
    """CUDA is present and torch_tensorrt imports (what backend="auto" and the benchmark probe)."""
    if not torch.cuda.is_available():
        return False
    try:
        import torch_tensorrt  # noqa: F401 (imported only to probe that it loads)
    except Exception:  # broad on purpose: ImportError, or a broken install raising anything
        return False
    return True


def import_torch_tensorrt():
    """torch_tensorrt, or BackendError saying how to get it."""
    try:
        import torch_tensorrt
    except Exception as exc:  # broad on purpose: ImportError, or a wheel that does not match torch
        raise BackendError(
            f"tensorrt backend: torch_tensorrt cannot be imported ({type(exc).__name__}: {exc}); install the "
            f"torch-tensorrt wheel matching torch {torch.__version__} (see docs/backends.md)") from None
    return torch_tensorrt


# ------------------------------------------------------------------ pure helpers (tested without a GPU)

def batch_profile(max_batch: int, opt_batch=None):
    """(min, opt, max) batch of the engine's optimisation profile and the example batch for
    torch.export (>= 2 when the batch is dynamic: export specialises a batch of 1)."""
    max_batch = int(max_batch)
    if max_batch < 1:
        raise BackendError(f"tensorrt backend: max_batch must be >= 1, got {max_batch}")
    opt = int(opt_batch) if opt_batch else max_batch
    if not 1 <= opt <= max_batch:
        raise BackendError(f"tensorrt backend: opt_batch must be in 1..{max_batch}, got {opt_batch}")
    example = 1 if max_batch == 1 else 2
    return (1, opt, max_batch), example


def engine_key(model, representation, precision, max_batch, opt_batch, fp16_mode="explicit",
               optimization_level=None, graph="model", fp32_acc="auto", input_size=DEFAULT_INPUT_SIZE,
               pos_interpolation="scale_factor") -> dict:
    return {
        **engine_size_fields(input_size, pos_interpolation),
        "backend": "tensorrt",
        "variant": model.variant,
        "weights_id": model.weights_id,
        "representation": canonical_representation(model, representation),
        "precision": precision,
        "batch": [1, int(max_batch)],
        "opt_batch": int(opt_batch),
        "fp16_mode": fp16_mode if precision != "fp32" else None,
        "optimization_level": optimization_level,
        "graph": graph,
        "fp32_acc": fp32_acc if precision == "fp16" else None,
    }


def compile_kwargs(params, precision: str, device, fp16_mode: str = "explicit", optimization_level=None,
                   workspace_size=None, tf32=False, fp32_acc=False) -> dict:
    """Keyword arguments for torch_tensorrt.dynamo.compile, restricted to the ones its signature
    (``params``: parameter names) has.  Never passes ``enabled_precisions`` (ignored by 2.13+).
    fp32 engines are true fp32 unless ``tf32`` (TensorRT would otherwise use TF32 matmuls on
    Ampere and newer, ~1e-3 relative error per matmul).  ``fp32_acc``: fp16 matmuls accumulate in
    fp32 (``use_fp32_acc``)."""
    params = set(params)
    kwargs = {"min_block_size": 1, "device": device}
    fp32_acc = bool(fp32_acc) and precision == "fp16"
    if fp32_acc and "use_fp32_acc" not in params:
        raise BackendError("tensorrt backend: fp32 accumulation needs torch-tensorrt >= 2.8 (use_fp32_acc)")
    optional = {
        "use_explicit_typing": True,      # honour the dtypes in the graph (2.13+: always on)
        "cache_built_engines": False,     # our own cache holds the whole program
        "reuse_cached_engines": False,
        "truncate_double": True,
        "require_full_compilation": False,
        "optimization_level": optimization_level,
        "workspace_size": workspace_size,
        "disable_tf32": not tf32,
        "use_fp32_acc": True if fp32_acc else None,
        "attn_bias_is_causal": False,     # 2.13+ assumes a causal attention bias by default; a ViT has none
    }
    for name, value in optional.items():
        if value is not None and name in params:
            kwargs[name] = value
    if precision != "fp32" and fp16_mode == "autocast":
        needed = ("enable_autocast", "autocast_low_precision_type", "autocast_excluded_ops")
        missing = [n for n in needed if n not in params]
        if missing:
            raise BackendError("tensorrt backend: fp16_mode='autocast' needs torch-tensorrt >= 2.10 "
                               f"(this one lacks {', '.join(missing)}); use fp16_mode='explicit'")
        kwargs.update(enable_autocast=True, autocast_low_precision_type=_DTYPES[precision],
                      autocast_excluded_ops={torch.ops.aten.native_layer_norm.default,
                                             torch.ops.aten.layer_norm.default,
                                             torch.ops.aten._softmax.default,
                                             torch.ops.aten.softmax.int})
    return {k: v for k, v in kwargs.items() if k in params or k in ("min_block_size", "device")}


def save_kwargs(params, example, dynamic_shapes) -> dict:
    """Keyword arguments for torch_tensorrt.save (exported_program format) that its signature has."""
    params = set(params)
    kwargs = {"output_format": "exported_program"}
    if "arg_inputs" in params:
        kwargs["arg_inputs"] = [example]
    elif "inputs" in params:
        kwargs["inputs"] = [example]
    if dynamic_shapes is not None and "dynamic_shapes" in params:
        kwargs["dynamic_shapes"] = dynamic_shapes
        if "retrace" in params:
            kwargs["retrace"] = True   # 2.10+: keeps the symbolic batch it is told about
    elif "retrace" in params:
        # older releases (JetPack's 2.8) re-export static shapes when retracing: keep the graph as built
        kwargs["retrace"] = dynamic_shapes is None
    return kwargs


class Fp32LayerNorm(nn.Module):
    """LayerNorm computed in fp32 inside a low-precision graph: upcast, fp32 weights, cast back."""

    def __init__(self, norm: nn.LayerNorm):
        super().__init__()
        self.normalized_shape = tuple(norm.normalized_shape)
        self.eps = norm.eps
        self.weight = None if norm.weight is None else nn.Parameter(norm.weight.detach().float(), requires_grad=False)
        self.bias = None if norm.bias is None else nn.Parameter(norm.bias.detach().float(), requires_grad=False)

    def forward(self, x):
        return F.layer_norm(x.float(), self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


class _CastIO(nn.Module):
    """fp32 pixels in, fp32 features out, ``dtype`` inside."""

    def __init__(self, module, dtype):
        super().__init__()
        self.module, self.dtype = module, dtype

    def forward(self, pixels):
        return self.module(pixels.to(self.dtype)).float()


def low_precision_module(model, representation: str, dtype: torch.dtype, graph: str = "model",
                         input_size=None, pos_interpolation="scale_factor") -> nn.Module:
    """A copy of the model as an explicitly typed ``dtype`` graph for one representation:
    matmul/conv weights in ``dtype``, LayerNorm and softmax in fp32, fp32 input and output.
    With ``input_size`` the graph takes that size only (position embeddings a constant).
    The original model is left untouched."""
    keep = None
    if is_teacher(representation):
        keep = model.heads[model.head_name(teacher_of(representation))]
    # copy the backbone and the one head needed; the other heads become placeholders
    memo = {id(head): nn.Identity() for head in model.heads.values() if head is not keep}
    low = copy.deepcopy(model, memo)
    config = getattr(low.backbone, "config", None)
    if config is not None:  # transformers' eager attention takes its softmax in fp32
        config._attn_implementation = "eager"
    for parent in list(low.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.LayerNorm):
                setattr(parent, name, Fp32LayerNorm(child))
    for module in low.modules():
        if isinstance(module, Fp32LayerNorm):
            continue
        for name, param in list(module.named_parameters(recurse=False)):
            param.data = param.data.to(dtype)
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf.is_floating_point():
                setattr(module, name, buf.to(dtype))
    low.eval()
    if graph == "lean":
        from theia_ros.backends.lean import LeanTheia

        inner = LeanTheia(low, representation, input_size=input_size, pos_interpolation=pos_interpolation)
    else:
        inner = export_module(low, representation, input_size, pos_interpolation)
    return _CastIO(inner, dtype).eval()


def fp32_module(model, representation: str, graph: str = "model", input_size=None,
                pos_interpolation="scale_factor") -> nn.Module:
    if graph == "lean":
        from theia_ros.backends.lean import LeanTheia

        return LeanTheia(model, representation, input_size=input_size, pos_interpolation=pos_interpolation).eval()
    return export_module(model, representation, input_size, pos_interpolation).eval()


def gpu_environment(device) -> dict:
    """What a TensorRT engine depends on besides the model: GPU, TensorRT, torch-tensorrt, torch."""
    device = torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    env = {
        "gpu_name": torch.cuda.get_device_name(index),
        "compute_capability": f"{major}.{minor}",
        "platform": platform.machine(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    try:
        import torch_tensorrt

        env["torch_tensorrt"] = torch_tensorrt.__version__
    except Exception:  # broad on purpose: a broken install is reported as absent
        env["torch_tensorrt"] = None
    try:
        import tensorrt

        env["tensorrt"] = tensorrt.__version__
    except Exception:  # broad on purpose: a broken install is reported as absent
        env["tensorrt"] = None
    return env


def _signature_params(fn):
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


def _as_callable(loaded):
    """torch_tensorrt.load returns an ExportedProgram (2.x) or a module; give back something callable."""
    if isinstance(loaded, torch.export.ExportedProgram):
        return loaded.module()
    return loaded


def _first_output(out):
    if isinstance(out, (tuple, list)):
        out = out[0]
    if isinstance(out, dict):
        out = next(iter(out.values()))
    return out


# ------------------------------------------------------------------ the backend

class TensorRTBackend(InferenceBackend):
    name = "tensorrt"
    # tests set False to drive the build / cache / reload logic with a stand-in torch_tensorrt on the CPU
    _require_cuda = True

    def __init__(self, model, representation="tokens", precision="fp16", device="cuda", max_batch=4,
                 opt_batch=None, fp16_mode="explicit", optimization_level=None, workspace_size=None,
                 tf32=False, graph="model", fp32_acc="auto", cache_dir=None, rebuild=False, input_size=None,
                 pos_interpolation="scale_factor"):
        super().__init__(model, representation, precision, device, max_batch, input_size, pos_interpolation)
        if precision not in _DTYPES:
            raise BackendError(f"tensorrt backend: unknown precision {precision!r}; use fp32, fp16 or bf16")
        if self._require_cuda and self.device.type != "cuda":
            raise BackendError(f"tensorrt backend: needs a CUDA device, got {device!r}")
        if self._require_cuda and not torch.cuda.is_available():
            raise BackendError("tensorrt backend: CUDA is not available (torch.cuda.is_available() is False)")
        if fp16_mode not in FP16_MODES:
            raise BackendError(f"tensorrt backend: fp16_mode must be one of {FP16_MODES}, got {fp16_mode!r}")
        if fp32_acc not in FP32_ACC_MODES:
            raise BackendError(f"tensorrt backend: fp32_acc must be one of {FP32_ACC_MODES}, got {fp32_acc!r}")
        if graph not in ("model", "lean"):
            raise BackendError(f"tensorrt backend: graph must be 'model' or 'lean', got {graph!r}")
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.trt = import_torch_tensorrt()
        self.model = model.to(self.device).eval()
        fp32_module(self.model, representation)  # unknown representation / teacher: fail before building
        (self.min_batch, self.opt_batch, _), self.example_batch = batch_profile(max_batch, opt_batch)
        self.fp16_mode, self.optimization_level, self.workspace_size = fp16_mode, optimization_level, workspace_size
        self.graph, self.tf32, self.fp32_acc = graph, bool(tf32), fp32_acc
        self.key = engine_key(self.model, representation, precision, self.max_batch, self.opt_batch, fp16_mode,
                              optimization_level, graph, fp32_acc, self.input_size, self.pos_interpolation)
        self.key["tf32"] = self.tf32
        self.environment = gpu_environment(self.device)
        self._built_module = None
        result = cache.get_or_build("tensorrt", self.key, self.environment, self._build, root=cache_dir,
                                    rebuild=rebuild)
        self.engine_path = result.directory / ENGINE_FILE
        self.validation_cosine = result.meta.get("validation", {}).get("cosine")
        try:
            self.module = self._built_module if self._built_module is not None else self._load()
            if result.status == "hit":  # a built engine passed the gate in _build; a cached one passes it now
                start = time.perf_counter()
                self.validation_cosine = self._validate(self.module)
                log.info("tensorrt engine loaded from cache without rebuilding, accuracy gate passed "
                         "(cosine %.6f, %.0f ms): %s", self.validation_cosine, (time.perf_counter() - start) * 1e3,
                         self.engine_path)
        except Exception as exc:  # broad on purpose: an engine TensorRT refuses, or one failing the gate
            log.warning("tensorrt engine %s from the cache cannot be used (%s: %s): rebuilding", self.engine_path,
                        type(exc).__name__, exc)
            result = cache.get_or_build("tensorrt", self.key, self.environment, self._build, root=cache_dir,
                                        rebuild=True)
            self.module = self._built_module
            self.validation_cosine = result.meta.get("validation", {}).get("cosine")
        self._built_module = None
        self.cache = result
        self.fp32_acc_used = result.meta.get("fp32_acc_used", False)

    @property
    def identity(self):
        identity = super().identity
        identity["engine"] = str(self.engine_path)
        identity["gpu"] = self.environment.get("gpu_name")
        return identity

    def _load(self):
        return _as_callable(self.trt.load(str(self.engine_path)))

    def _validate(self, module):
        from theia_ros.backends.validation import check_output, min_cosine_for, reference_output, validation_pixels

        pixels = validation_pixels(min(2, self.max_batch), size=self.input_size)
        reference = reference_output(self.model, pixels, self.representation, self.device, self.pos_interpolation)
        with torch.inference_mode():
            out = _first_output(module(pixels.to(self.device)))
        return check_output(out.float().cpu(), reference, min_cosine_for(self.precision),
                            f"tensorrt {self.precision} engine of {self.model.variant} ({self.representation})")

    def _build(self, directory):
        trt = self.trt
        dtype = _DTYPES[self.precision]
        if self.precision == "fp32" or self.fp16_mode == "autocast":
            module = fp32_module(self.model, self.representation, self.graph, self.input_size, self.pos_interpolation)
        else:
            module = low_precision_module(self.model, self.representation, dtype, self.graph, self.input_size,
                                          self.pos_interpolation)
        module = module.to(self.device).eval()
        height, width = self.input_size
        example = torch.randn(self.example_batch, 3, height, width, device=self.device).clamp_(-1, 1)
        dynamic = None
        if self.max_batch > 1:
            dynamic = ({0: torch.export.Dim("batch", min=1, max=self.max_batch)},)
        log.info("building tensorrt %s engine for %s (%s, %dx%d), batch 1..%d (opt %d) on %s; this takes minutes",
                 self.precision, self.model.variant, self.representation, height, width, self.max_batch,
                 self.opt_batch, self.environment["gpu_name"])
        start = time.perf_counter()
        spec = trt.Input(min_shape=(1, 3, height, width), opt_shape=(self.opt_batch, 3, height, width),
                         max_shape=(self.max_batch, 3, height, width), dtype=torch.float32)
        compile_fn = trt.dynamo.compile
        params = _signature_params(compile_fn)
        inputs_kw = "arg_inputs" if "arg_inputs" in params else "inputs"
        # fp32 accumulation: as asked, or ("auto", fp16) only when the fp16-accumulating engine is refused
        attempts = [self.fp32_acc == "on"]
        if self.fp32_acc == "auto" and self.precision == "fp16" and "use_fp32_acc" in params:
            attempts.append(True)
        for attempt, fp32_acc in enumerate(attempts):
            kwargs = compile_kwargs(params, self.precision, self.device, self.fp16_mode, self.optimization_level,
                                    self.workspace_size, self.tf32, fp32_acc)
            with torch.no_grad():  # a fresh program each attempt: compile lowers the one it is given
                exported = torch.export.export(module, (example,), dynamic_shapes=dynamic, strict=False)
            try:
                compiled = compile_fn(exported, **{inputs_kw: [spec]}, **kwargs)
            except Exception as exc:  # broad on purpose: each compile error becomes a BackendError
                raise BackendError(
                    f"tensorrt backend: building the engine failed: {type(exc).__name__}: {exc}") from exc
            try:
                cosine = self._validate(compiled)  # raises BackendError: nothing is cached
                break
            except BackendError as exc:
                if attempt + 1 == len(attempts):
                    raise
                log.warning("%s; rebuilding with fp32 accumulation (use_fp32_acc)", exc)
        compile_seconds = time.perf_counter() - start
        path = directory / ENGINE_FILE
        trt.save(compiled, str(path), **save_kwargs(_signature_params(trt.save), example, dynamic))
        self._built_module = compiled
        log.info("tensorrt engine built in %.0f s%s, cosine %.6f to fp32 torch: %s", compile_seconds,
                 " with fp32 accumulation" if fp32_acc and self.precision == "fp16" else "", cosine, path)
        return {"files": [ENGINE_FILE], "validation": {"cosine": cosine},
                "fp32_acc_used": bool(fp32_acc and self.precision == "fp16"),
                "compile_seconds": round(compile_seconds, 1)}

    def run_pixels(self, pixels):
        self.check_pixels(pixels)
        if pixels.shape[0] > self.max_batch:
            raise BackendError(f"tensorrt backend: batch {pixels.shape[0]} exceeds the engine's max_batch "
                               f"{self.max_batch}")
        with torch.inference_mode():
            out = _first_output(self.module(pixels.to(self.device, torch.float32, non_blocking=True).contiguous()))
        return out.float().cpu()
