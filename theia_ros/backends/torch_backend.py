"""Eager PyTorch backend: CPU or CUDA, fp32 / fp16 / bf16, inference mode; optionally torch.compile.

fp16/bf16 run under autocast (matmuls and convolutions in low precision, LayerNorm and softmax
accumulated in fp32) and are checked once against fp32 on the validation input (cosine >= 0.999)
when the backend is created.  ``compile=True`` wraps the forward in ``torch.compile`` (CPU:
inductor with weight freezing; CUDA: "reduce-overhead", i.e. CUDA graphs); the first call at each
batch size compiles (tens of seconds on a small CPU).

Any input size: pixels [B, 3, H, W] of any H, W >= 16 run with the backend's ``pos_interpolation``
(``input_size`` only sets the size of the validation input; with torch.compile each new size
compiles once).

``cuda_graphs=True`` (CUDA only; off by default): one CUDA graph of the forward per batch bucket
(:func:`batch_buckets`: every batch 1..max_batch up to 8, then powers of two and max_batch), all
captured when the backend is built, at ``input_size`` and the backend's precision (autocast inside
the capture).  A call copies its pixels into the static input of the smallest bucket that holds its
batch (spare rows zeroed), replays that graph and returns a CPU copy of the first rows of its output.
Such a backend takes ``input_size`` only (``fixed_input_size``; FeatureEncoder builds one per size)
and batches up to ``max_batch``; it is refused together with ``compile`` (torch.compile's
"reduce-overhead" is its own CUDA graphs).  The accuracy gate runs through the graphs.  One thread
at a time (the encoder's inference thread): a lock serialises callers, which share the static buffers.
"""
import inspect
import logging
import threading
import time

import torch
from torch import nn

from theia_ros.backends.base import BackendError, InferenceBackend, reference_forward
from theia_ros.representations import is_teacher, teacher_of

log = logging.getLogger("theia_ros.backends")

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bf16 matmul instructions (AVX512-BF16 or AMX); without them
    bf16 on the CPU is emulated and slower than fp32."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    for name in probes:
        fn = getattr(torch.cpu, name, None)
        try:
            if fn is not None and fn():
                return True
        except Exception:  # broad on purpose: private probes; absent or failing means "no"
            pass
    return False


class _Forward(nn.Module):
    """pixels -> one representation, optionally under autocast (what torch.compile sees)."""

    def __init__(self, model, representation, device_type, dtype, lean=False, pos_interpolation="scale_factor",
                 autocast_cache=True):
        super().__init__()
        self.model = model
        # CUDA graphs capture autocast's casts of the weights: its cache must be off (PyTorch's rule)
        self.autocast_cache = autocast_cache
        self.lean = None
        if lean:
            from theia_ros.backends.lean import LeanTheia

            self.lean = LeanTheia(model, representation, pos_interpolation=pos_interpolation)
        self.representation = representation
        self.pos_interpolation = pos_interpolation
        self.device_type = device_type
        self.dtype = dtype

    def _run(self, pixels):
        if self.lean is not None:
            return self.lean(pixels)
        return reference_forward(self.model, pixels, self.representation, self.pos_interpolation)

    def forward(self, pixels):
        if self.dtype == torch.float32:
            return self._run(pixels)
        with torch.autocast(self.device_type, dtype=self.dtype, cache_enabled=self.autocast_cache):
            return self._run(pixels)


class TorchBackend(InferenceBackend):
    name = "torch"
    fixed_input_size = False

    def __init__(self, model, representation="tokens", precision="fp32", device="cpu", max_batch=4,
                 compile=False, lean=False, validate=None, input_size=None,  # noqa: A002 (mirrors torch.compile)
                 pos_interpolation="scale_factor", cuda_graphs=False):
        super().__init__(model, representation, precision, device, max_batch, input_size, pos_interpolation)
        if precision not in _DTYPES:
            raise BackendError(f"torch backend: unknown precision {precision!r}; use one of {sorted(_DTYPES)}")
        self.cuda_graphs = _flag(cuda_graphs, "cuda_graphs")
        if self.cuda_graphs:
            if _compile_mode(compile, self.device) is not None:
                raise BackendError(f"torch backend: cuda_graphs and compile={compile!r} cannot be combined (both would "
                                   "capture CUDA graphs); use cuda_graphs=True alone, or compile='reduce-overhead' "
                                   "alone for torch.compile's own CUDA graphs")
            _check_graphs_device(self.device)
            self.fixed_input_size = True  # the graphs hold one input shape (per bucket)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise BackendError("torch backend: CUDA requested but torch.cuda.is_available() is False")
        if self.device.type == "cpu" and precision == "fp16":
            raise BackendError("torch backend: fp16 on the CPU is slower than fp32 and inexact; use fp32 or bf16")
        if is_teacher(representation):
            model.head_name(teacher_of(representation))  # unknown teacher: fail now, not per frame
        self.model = model.to(self.device).eval()
        self._dtype = _DTYPES[precision]
        self.compile_mode = _compile_mode(compile, self.device)
        self.lean = bool(lean)
        self._forward = _Forward(self.model, representation, self.device.type, self._dtype, self.lean,
                                 self.pos_interpolation, autocast_cache=not self.cuda_graphs)
        if self.compile_mode is not None:
            self._forward = _compiled(self._forward, self.compile_mode)
        self._graphs = None
        if self.cuda_graphs:
            start = time.perf_counter()
            input_buffer = torch.zeros(self.max_batch, 3, *self.input_size, dtype=torch.float32, device=self.device)
            self._graphs = BucketRunner(cuda_graph_capture(self._forward, self.device), batch_buckets(self.max_batch),
                                        input_buffer, what=f"torch {precision} CUDA graphs on {self.device}")
            with torch.inference_mode():
                self._graphs.capture_all()
            log.info("torch %s on %s: captured CUDA graphs for batches %s at %dx%d in %.1f s", precision, self.device,
                     ", ".join(map(str, self._graphs.buckets)), *self.input_size, time.perf_counter() - start)
        self.validation_cosine = None
        self.validation = None  # the gate's result (validation.gate), when it ran
        if validate is None:
            validate = precision != "fp32" or self.compile_mode is not None or self.lean or self.cuda_graphs
        if validate:
            self._validate()

    @property
    def identity(self):
        identity = super().identity
        if self.compile_mode is not None:
            identity["compile"] = self.compile_mode
        if self.lean:
            identity["graph"] = "lean"
        if self.cuda_graphs:
            identity["cuda_graphs"] = True
            identity["batch_buckets"] = list(self._graphs.buckets)
        return identity

    def _validate(self):
        from theia_ros.backends.validation import gate

        start = time.perf_counter()
        what = f"torch {self.precision} on {self.device}"
        if self.compile_mode:
            what += f" (compile {self.compile_mode})"
        if self.cuda_graphs:
            what += " (CUDA graphs)"
        # fp16/bf16: also per image on held-out photographs (the gate's natural images), like every engine
        self.validation = gate(self.run_pixels, self.model, self.representation, self.precision, what,
                               input_size=self.input_size, pos_interpolation=self.pos_interpolation,
                               max_batch=min(2, self.max_batch), device=self.device)
        self.validation_cosine = self.validation["cosine"]
        log.info("%s: cosine %.6f to fp32 torch (%.1f s)", what, self.validation_cosine, time.perf_counter() - start)

    @torch.inference_mode()
    def run_pixels(self, pixels):
        if self._graphs is not None:
            self.check_pixels(pixels)
            return self._graphs.run(pixels)
        pixels = pixels.to(self.device, non_blocking=True)
        out = self._forward(pixels)
        if self.device.type != "cpu" or out.dtype != torch.float32:
            return out.float().cpu()
        if self.compile_mode is not None:
            return out.clone()  # compiled programs may reuse their output buffers
        return out


def _compile_mode(compile, device):  # `compile` as torch.compile's own option name
    if compile in (False, None, "", "none", "off"):
        return None
    if compile is True or compile in ("default", "auto", "on"):
        return "reduce-overhead" if device.type == "cuda" else "freezing"
    if compile in ("freezing", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs", "inductor"):
        return compile
    raise BackendError(f"torch backend: unknown compile mode {compile!r}; use true, freezing, inductor, "
                       "reduce-overhead, max-autotune")


def _compiled(module, mode):
    if mode == "freezing":  # inductor with weights folded in as constants (oneDNN prepacking on CPU)
        return torch.compile(module, dynamic=False, options={"freezing": True})
    if mode == "inductor":
        return torch.compile(module, dynamic=False)
    return torch.compile(module, mode=mode, dynamic=False)


def _flag(value, name):
    if isinstance(value, bool):
        return value
    if value in (None, 0, 1, "", "false", "off", "no", "true", "on", "yes"):
        return value in (1, "true", "on", "yes")
    raise BackendError(f"torch backend: {name} must be true or false, got {value!r}")


# ------------------------------------------------------------------------- CUDA graphs

#: every batch size is a bucket up to this one; above it, powers of two (and max_batch itself)
EVERY_BATCH_UP_TO = 8
#: forward calls on a side stream before each capture (cuBLAS handles, workspaces, lazy inits)
CAPTURE_WARMUP_CALLS = 3


def batch_buckets(max_batch: int) -> tuple:
    """The batch sizes CUDA graphs are captured for: every size 1..max_batch up to 8 (small batches are
    launch-bound, where the graphs pay off, and a graph each costs little), then 16, 32, ... below
    max_batch and max_batch itself (a batch between two buckets runs padded to the larger one:
    at most about twice the work, instead of up to 64 graphs and their output buffers)."""
    try:
        max_batch = int(max_batch)
    except (TypeError, ValueError):
        raise BackendError(f"max_batch must be an integer >= 1, got {max_batch!r}") from None
    if max_batch < 1:
        raise BackendError(f"max_batch must be >= 1, got {max_batch}")
    buckets = list(range(1, min(max_batch, EVERY_BATCH_UP_TO) + 1))
    size = 2 * EVERY_BATCH_UP_TO
    while size < max_batch:
        buckets.append(size)
        size *= 2
    if max_batch > EVERY_BATCH_UP_TO:
        buckets.append(max_batch)
    return tuple(buckets)


class BucketRunner:
    """Runs pixels [n, 3, H, W], n <= max_batch, through one fixed-shape program per batch bucket.

    ``capture(static_input) -> (replay, static_output)`` builds the program of one bucket: it reads
    ``static_input`` (rows 0..bucket-1 of ``input_buffer``, [max_batch, 3, H, W] on the device) and
    each ``replay()`` rewrites ``static_output`` in place (a CUDA graph; the tests use a CPU stand-in).
    A call copies the pixels into the buffer's first n rows, zeroes the bucket's spare rows, replays
    the smallest bucket >= n and returns a CPU float32 copy of the output's first n rows, never the
    static output itself (the next call overwrites that).  Not re-entrant: a lock makes concurrent
    callers take turns, since they share the static buffers.
    """

    def __init__(self, capture, buckets, input_buffer, what="CUDA graphs"):
        self.buckets = tuple(sorted({int(b) for b in buckets}))
        if not self.buckets or self.buckets[0] < 1:
            raise BackendError(f"{what}: batch buckets must be >= 1, got {buckets!r}")
        if input_buffer.dim() != 4 or input_buffer.shape[0] < self.buckets[-1]:
            raise BackendError(f"{what}: the input buffer {tuple(input_buffer.shape)} has fewer rows than the "
                               f"largest bucket {self.buckets[-1]}")
        self.input_buffer = input_buffer
        self.what = what
        self._capture = capture
        self._programs = {}  # bucket -> (replay, static_output)
        self._lock = threading.Lock()

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    @property
    def captured(self) -> tuple:
        return tuple(sorted(self._programs))

    def bucket_for(self, batch: int) -> int:
        """The smallest bucket that holds ``batch`` rows; BackendError above max_batch."""
        for bucket in self.buckets:
            if batch <= bucket:
                return bucket
        raise BackendError(f"{self.what}: batch {batch} exceeds max_batch {self.max_batch} (graphs are captured "
                           f"for batches {', '.join(map(str, self.buckets))}); split it or build with a larger "
                           "max_batch (FeatureEncoder splits by max_batch)")

    def capture_all(self):
        for bucket in self.buckets:
            self._program(bucket)

    def _program(self, bucket):
        program = self._programs.get(bucket)
        if program is None:
            try:
                program = self._capture(self.input_buffer[:bucket])
            except BackendError:
                raise
            except Exception as exc:  # broad on purpose: CUDA capture errors are RuntimeErrors of many kinds
                raise BackendError(f"{self.what}: capturing the graph for batch {bucket} failed: "
                                   f"{type(exc).__name__}: {exc}") from exc
            self._programs[bucket] = program
        return program

    def run(self, pixels):
        shape = tuple(self.input_buffer.shape[1:])
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != shape:
            raise BackendError(f"{self.what}: expected pixels [B, {', '.join(map(str, shape))}], "
                               f"got {tuple(pixels.shape)}")
        batch = int(pixels.shape[0])
        bucket = self.bucket_for(max(batch, 1))
        with self._lock:
            replay, static_output = self._program(bucket)
            self.input_buffer[:batch].copy_(pixels)
            if batch < bucket:
                self.input_buffer[batch:bucket].zero_()  # spare rows: finite, and nothing of an earlier call
            replay()
            return static_output[:batch].to("cpu", torch.float32, copy=True)


def _check_graphs_device(device):
    if device.type != "cuda":
        raise BackendError(f"torch backend: cuda_graphs needs a CUDA device, got {device}; CUDA graphs do not "
                           "exist on the CPU (leave cuda_graphs off there)")


def _graph_kwargs():
    # "thread_local": another thread's CUDA calls (e.g. a policy in the same process) neither break the
    # capture nor get refused while it runs (older torch has no such argument)
    params = inspect.signature(torch.cuda.graph.__init__).parameters
    return {"capture_error_mode": "thread_local"} if "capture_error_mode" in params else {}


def cuda_graph_capture(forward, device, warmup_calls=CAPTURE_WARMUP_CALLS):
    """The ``capture`` of a :class:`BucketRunner` for ``forward`` on CUDA ``device``: warm-up calls
    on a side stream, then one capture into a graph with its own memory pool (no pool shared between
    buckets: a few MB each, and no replay can overwrite another bucket's memory).  Call under
    torch.inference_mode()."""
    device = torch.device(device)

    def capture(static_input):
        with torch.cuda.device(device):
            current = torch.cuda.current_stream(device)
            side = torch.cuda.Stream(device)
            side.wait_stream(current)
            with torch.cuda.stream(side):
                for _ in range(warmup_calls):
                    forward(static_input)
            current.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, **_graph_kwargs()):
                static_output = forward(static_input)
            torch.cuda.synchronize(device)

        def replay():
            with torch.cuda.device(device):
                graph.replay()

        replay.graph = graph  # keeps the graph (and its memory pool) alive with the program
        return replay, static_output

    return capture
