"""Benchmark of the inference backends (shared by `theia-ros bench` and benchmarks/bench_backends.py).

For every available backend x precision x batch x input kind (224x224 model input, or natural
480x640 camera frames with the node's preprocessing inside the timed call): median and p90 milliseconds per image,
images/s, the worst sample's cosine to fp32 eager torch (on the CPU) and the speed-up over eager
fp32 torch on the same device, measured in the same run.  Backends are timed in interleaved
rounds, so that a shared, noisy machine slows them all alike; compare ratios within one table,
not absolute times across runs.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import os
import platform
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from theia_ros.backends.base import BackendError
from theia_ros.backends.factory import create_backend

log = logging.getLogger("theia_ros.backends")

BENCH_BACKENDS = ("torch", "torch-compile", "onnxruntime", "openvino", "tensorrt", "torch-cudagraphs")
#: what a timed call takes: "pixels" (224x224 model input, preprocessed beforehand) or "frame" (natural
#: 480x640 RGB camera frames, preprocessed in the timed call: to_model_input + run_pixels, the node's path)
BENCH_INPUTS = ("pixels", "frame")


@dataclasses.dataclass
class Case:
    backend: str          # one of BENCH_BACKENDS
    precision: str
    device: str
    options: dict = dataclasses.field(default_factory=dict)
    name: str = ""        # label in the table (default: the backend)

    @property
    def label(self) -> str:
        return self.name or self.backend

    @property
    def is_baseline(self) -> bool:
        return self.backend == "torch" and self.precision == "fp32" and not self.options and not self.name

    def create(self, model, representation, max_batch, cache_dir=None):
        name = "torch" if self.backend in ("torch-compile", "torch-cudagraphs") else self.backend
        options = dict(self.options)
        if self.backend == "torch-compile":
            options.setdefault("compile", True)
        if self.backend == "torch-cudagraphs":  # CUDA only
            options.setdefault("cuda_graphs", True)
        if name in ("onnxruntime", "openvino", "tensorrt") and cache_dir:
            options.setdefault("cache_dir", cache_dir)
        return create_backend(name, model, representation=representation, precision=self.precision,
                              device=self.device, max_batch=max_batch, **options)


def available_cases(backends: Optional[Sequence[str]] = None, precisions: Optional[Sequence[str]] = None,
                    devices: Optional[Sequence[str]] = None) -> List[Case]:
    """Every (backend, precision, device) that can run here, restricted to the ones asked for.
    Eager fp32 torch on each device is always included: it is the baseline of the ratios."""
    from theia_ros.backends.onnxruntime_backend import ort_available
    from theia_ros.backends.openvino_backend import cpu_has_native_bf16, nncf_available, openvino_available
    from theia_ros.backends.tensorrt_backend import tensorrt_available
    from theia_ros.backends.torch_backend import cpu_has_fast_bf16

    if devices is None:
        devices = ["cuda"] if torch.cuda.is_available() else ["cpu"]
    wanted = list(backends) if backends else ["torch", "onnxruntime", "openvino", "tensorrt"] + (
        ["torch-compile", "torch-cudagraphs"] if any(d.startswith("cuda") for d in devices) else [])
    unknown = [b for b in wanted if b not in BENCH_BACKENDS]
    if unknown:
        raise ValueError(f"unknown backend(s) {', '.join(unknown)}; choose from {', '.join(BENCH_BACKENDS)}")
    cases = []
    for device in devices:
        cuda = device.startswith("cuda")
        if cuda and not torch.cuda.is_available():
            continue
        offered = {
            "torch": ["fp32", "fp16", "bf16"] if cuda else (["fp32", "bf16"] if cpu_has_fast_bf16() else ["fp32"]),
            "torch-compile": ["fp32", "fp16"] if cuda else ["fp32"],
            "torch-cudagraphs": ["fp32", "fp16", "bf16"] if cuda else [],
            "onnxruntime": [] if cuda or not ort_available() else ["fp32"],
            "openvino": [] if cuda or not openvino_available() else (
                ["fp32"] + (["bf16"] if cpu_has_native_bf16() else []) + (["int8"] if nncf_available() else [])),
            "tensorrt": ["fp32", "fp16"] if cuda and tensorrt_available() else [],
        }
        cases.append(Case("torch", "fp32", device))
        for backend in wanted:
            for precision in offered[backend]:
                if precisions and precision not in precisions:
                    continue
                if backend == "torch" and precision == "fp32":
                    continue
                cases.append(Case(backend, precision, device))
    return cases


@dataclasses.dataclass
class Row:
    backend: str
    precision: str
    device: str
    batch: int
    median_ms: float = float("nan")      # per image
    p90_ms: float = float("nan")         # per image
    images_per_s: float = float("nan")
    cosine: float = float("nan")
    speedup: float = float("nan")        # eager fp32 torch (same device) median / this median
    calls: int = 0
    setup_s: float = float("nan")
    error: str = ""
    input: str = "pixels"                # one of BENCH_INPUTS


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index or 0
        return torch.cuda.get_device_name(index)
    return platform.processor() or platform.machine()


def run_bench(model, cases: Sequence[Case], batches: Sequence[int] = (1, 4), seconds: float = 5.0,
              representation: str = "tokens", rounds: int = 10, cache_dir=None,
              progress: Callable[[str], None] = print, inputs: Sequence[str] = ("pixels",)) -> List[Row]:
    """Time every case at every batch and input kind (BENCH_INPUTS); ``seconds`` per case, batch and
    input, spread over ``rounds`` interleaved rounds.  Backends are created once at max(batches)."""
    from theia_ros.backends.validation import cosine, reference_output, validation_pixels

    unknown = [kind for kind in inputs if kind not in BENCH_INPUTS]
    if unknown:
        raise ValueError(f"unknown input kind(s) {', '.join(unknown)}; choose from {', '.join(BENCH_INPUTS)}")
    max_batch = max(batches)
    cpu_model = model.to("cpu").eval()
    models: Dict[str, torch.nn.Module] = {"cpu": cpu_model}
    engines, setup, errors = {}, {}, {}
    for key, case in enumerate(cases):
        device_model = models.get(case.device)
        if device_model is None:  # one copy per GPU, shared by that GPU's cases
            device_model = models[case.device] = copy.deepcopy(cpu_model).to(case.device)
        progress(f"setting up {case.label} {case.precision} on {case.device} ...")
        start = time.perf_counter()
        try:
            engines[key] = case.create(device_model, representation, max_batch, cache_dir)
        except (BackendError, RuntimeError, ValueError, ImportError) as exc:
            errors[key] = f"{type(exc).__name__}: {exc}"
            progress(f"  unavailable: {errors[key]}")
        setup[key] = time.perf_counter() - start
    rows: List[Row] = []
    for batch in batches:
        for kind in inputs:
            if kind == "frame":
                from theia_ros.preprocess import to_model_input

                frames = _natural_frames(batch)
                pixels = to_model_input(frames)

                def work(engine, frames=frames):
                    return engine.run_pixels(to_model_input(frames))
            else:
                pixels = validation_pixels(batch)

                def work(engine, pixels=pixels):
                    return engine.run_pixels(pixels)
            rows.extend(_time_cases(cases, engines, errors, setup, work,
                                    reference_output(cpu_model, pixels, representation, torch.device("cpu")),
                                    batch, kind, seconds, rounds, cosine, progress))
    return rows


def _natural_frames(batch):
    """``batch`` natural 480x640 RGB frames (held-out photographs, backends.calibration)."""
    from theia_ros.backends.calibration import held_out_photographs

    frames = list(held_out_photographs().values())
    return np.stack([frames[i % len(frames)] for i in range(batch)])


def _time_cases(cases, engines, errors, setup, work, reference, batch, kind, seconds, rounds, cosine, progress):
    live = {k: e for k, e in engines.items()}
    samples: Dict[tuple, List[float]] = {k: [] for k in live}
    cosines, failed = {}, {}
    for key, engine in list(live.items()):
        try:
            out = None
            for _ in range(3):  # warm-up (and compilation, for torch.compile)
                out = work(engine)
            cosines[key] = cosine(out, reference)
        except Exception as exc:  # broad on purpose: report the failure in the table, go on
            failed[key] = f"{type(exc).__name__}: {exc}"
            del live[key]
    progress(f"batch {batch}, {kind} input: timing {len(live)} backends, {seconds:g} s each in {rounds} rounds ...")
    slot = seconds / rounds
    for _ in range(rounds):
        for key, engine in live.items():
            end = time.perf_counter() + slot
            while True:
                start = time.perf_counter()
                work(engine)
                now = time.perf_counter()
                samples[key].append((now - start) * 1e3 / batch)
                if now >= end:
                    break
    batch_rows = []
    for key, case in enumerate(cases):
        row = Row(case.label, case.precision, case.device, batch, setup_s=setup.get(key, float("nan")), input=kind)
        if key in samples and samples[key]:
            times = np.asarray(samples[key])
            row.median_ms = float(np.median(times))
            row.p90_ms = float(np.percentile(times, 90))
            row.images_per_s = 1e3 / row.median_ms
            row.cosine = cosines[key]
            row.calls = len(times)
        else:
            row.error = failed.get(key) or errors.get(key, "not run")
        batch_rows.append(row)
    base = {case.device: row.median_ms for case, row in zip(cases, batch_rows) if case.is_baseline}
    for row in batch_rows:
        if row.device in base:
            row.speedup = base[row.device] / row.median_ms
    return batch_rows


def _fmt(value, spec):
    return "-" if value != value else format(value, spec)  # NaN -> "-"


def markdown_table(rows: Sequence[Row]) -> str:
    lines = ["| backend | precision | device | batch | input | median ms/img | p90 ms/img | img/s "
             "| cosine vs fp32 torch | speed-up vs eager fp32 |",
             "|---|---|---|---:|---|---:|---:|---:|---:|---:|"]
    inputs = {"pixels": "224 pixels", "frame": "480x640 frame"}
    for r in rows:
        if r.error:
            lines.append(f"| {r.backend} | {r.precision} | {r.device} | {r.batch} | {inputs.get(r.input, r.input)} "
                         f"| - | - | - | - | unavailable: {r.error.splitlines()[0][:120]} |")
            continue
        lines.append(f"| {r.backend} | {r.precision} | {r.device} | {r.batch} | {inputs.get(r.input, r.input)} "
                     f"| {_fmt(r.median_ms, '.2f')} | "
                     f"{_fmt(r.p90_ms, '.2f')} | {_fmt(r.images_per_s, '.1f')} | {_fmt(r.cosine, '.6f')} | "
                     f"{_fmt(r.speedup, '.2f')}x |")
    return "\n".join(lines)


def environment_summary(model, threads=None) -> str:
    parts = [f"model {model.variant} ({'random weights' if model.random_weights else model.weights_id})",
             f"torch {torch.__version__}", f"{torch.get_num_threads()} torch threads"]
    try:
        import onnxruntime

        parts.append(f"onnxruntime {onnxruntime.__version__}")
    except ImportError:
        pass
    try:
        import openvino

        parts.append(f"openvino {openvino.__version__.split('-')[0]}")
    except ImportError:
        pass
    if torch.cuda.is_available():
        parts.append(f"GPU {_device_name('cuda')}")
        try:
            import torch_tensorrt

            parts.append(f"torch-tensorrt {torch_tensorrt.__version__}")
        except Exception:  # broad on purpose: a broken torch-tensorrt install is reported as absent
            parts.append("no torch-tensorrt")
    parts.append(f"CPU {platform.machine()} x{os.cpu_count()}")
    return ", ".join(parts)
