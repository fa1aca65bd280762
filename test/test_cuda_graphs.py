"""CUDA graphs in the torch backend (issue 17): batch buckets, static buffers, copies out, the
accuracy gate through the graphs, fixed input size, refusals; and the bench's torch-cudagraphs case.

On the CPU the capture is replaced by a stand-in with the same contract as a CUDA graph: the
"program" of a bucket reads the bucket's static input view and rewrites one static output tensor in
place on every replay.  The tests marked "needs CUDA" run on a GPU (benchmarks/gpu_check.sh).
"""
import pytest
import torch

from theia_ros.backends import torch_backend
from theia_ros.backends.base import BackendError
from theia_ros.backends.calibration import natural_pixels
from theia_ros.backends.factory import create_backend, create_encoder
from theia_ros.backends.torch_backend import BucketRunner, TorchBackend, batch_buckets
from theia_ros.backends.validation import cosine, min_cosine_for, reference_output, validation_pixels

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TINY = "random:theia-tiny-patch16-224-cddsv"
SMALL = (32, 48)  # a 2x3 patch grid: the model runs in milliseconds on one thread
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def tiny():
    from theia_ros.encoder.model import load_model

    return load_model(TINY)


class StandIn:
    """A CPU stand-in for cuda_graph_capture(forward, device): records captures and replays; each
    replay rewrites the one static output, as a CUDA graph does.  ``corrupt``: what a broken capture
    would compute (to show the accuracy gate runs through the replayed programs)."""

    def __init__(self, corrupt=None):
        self.captures, self.replays, self.inputs_seen = [], [], []
        self.corrupt = corrupt

    def __call__(self, forward, device):
        def capture(static_input):
            self.captures.append(len(static_input))
            with torch.no_grad():
                static_output = forward(static_input).clone()

            @torch.no_grad()
            def replay():
                self.replays.append(len(static_input))
                self.inputs_seen.append(static_input.clone())
                out = forward(static_input)
                static_output.copy_(self.corrupt(out) if self.corrupt else out)

            return replay, static_output

        return capture


def _row_forward(x):
    """Per-row, nonlinear, a different output shape than its input: [B, 3, H, W] -> [B, 5]."""
    flat = x.flatten(1)
    return torch.stack([flat.sum(1), flat.abs().max(1).values, flat[:, 0], flat.mean(1) ** 2, torch.tanh(flat[:, -1])],
                       dim=1)


def _runner(buckets, max_batch, stand_in=None, forward=_row_forward, size=(4, 6)):
    stand_in = stand_in or StandIn()
    buffer = torch.zeros(max_batch, 3, *size)
    return BucketRunner(stand_in(forward, "cpu"), buckets, buffer, what="test graphs"), stand_in


# ----------------------------------------------------------------------------- buckets

def test_batch_buckets():
    assert batch_buckets(1) == (1,)
    assert batch_buckets(4) == (1, 2, 3, 4)
    assert batch_buckets(8) == tuple(range(1, 9))
    assert batch_buckets(12) == tuple(range(1, 9)) + (12,)
    assert batch_buckets(16) == tuple(range(1, 9)) + (16,)
    assert batch_buckets(64) == tuple(range(1, 9)) + (16, 32, 64)
    assert batch_buckets(40) == tuple(range(1, 9)) + (16, 32, 40)
    for bad in (0, -1, "x", None):
        with pytest.raises(BackendError, match="max_batch"):
            batch_buckets(bad)


@pytest.mark.parametrize("buckets,max_batch", [((1, 2, 3, 4), 4), ((1, 2, 4), 4), (batch_buckets(12), 12)])
def test_every_batch_equals_eager_and_padding_never_shows(buckets, max_batch):
    runner, stand_in = _runner(buckets, max_batch)
    runner.capture_all()
    assert stand_in.captures == list(runner.buckets) and runner.captured == runner.buckets
    gen = torch.Generator().manual_seed(0)
    # a full batch of large values first, so that stale rows would show if spare rows were not cleared
    runner.run(torch.full((max_batch, 3, 4, 6), 1e3))
    for batch in range(1, max_batch + 1):
        pixels = torch.randn(batch, 3, 4, 6, generator=gen)
        out = runner.run(pixels)
        bucket = runner.bucket_for(batch)
        assert bucket == min(b for b in buckets if b >= batch)
        assert stand_in.replays[-1] == bucket
        assert out.shape == (batch, 5) and out.dtype == torch.float32
        torch.testing.assert_close(out, _row_forward(pixels), rtol=0, atol=0)
        seen = stand_in.inputs_seen[-1]
        assert seen.shape[0] == bucket
        torch.testing.assert_close(seen[:batch], pixels, rtol=0, atol=0)
        assert not seen[batch:].any(), "the spare rows of the bucket must be zero, not an earlier call's pixels"
    assert stand_in.captures == list(runner.buckets), "no bucket is captured twice"


def test_outputs_are_copies_not_the_static_buffers():
    runner, _ = _runner((1, 2, 4), 4)
    a, b = torch.randn(3, 3, 4, 6), torch.randn(3, 3, 4, 6)
    first = runner.run(a)
    kept = first.clone()
    second = runner.run(b)  # same bucket (4): the same static output is rewritten
    torch.testing.assert_close(first, kept, rtol=0, atol=0)
    assert not torch.equal(first, second)
    static_output = runner._programs[4][1]
    assert first.untyped_storage().data_ptr() != static_output.untyped_storage().data_ptr()
    first.fill_(-7.0)  # a caller scribbling on its result changes nothing for the next call
    torch.testing.assert_close(runner.run(a), _row_forward(a), rtol=0, atol=0)


def test_batches_beyond_max_batch_and_wrong_shapes_are_refused():
    runner, stand_in = _runner((1, 2, 4), 4)
    with pytest.raises(BackendError, match="batch 5 exceeds max_batch 4"):
        runner.run(torch.zeros(5, 3, 4, 6))
    with pytest.raises(BackendError, match=r"expected pixels \[B, 3, 4, 6\]"):
        runner.run(torch.zeros(2, 3, 6, 4))
    with pytest.raises(BackendError, match="expected pixels"):
        runner.run(torch.zeros(3, 4, 6))
    assert stand_in.replays == []
    assert runner.run(torch.zeros(0, 3, 4, 6)).shape == (0, 5)
    with pytest.raises(BackendError, match="fewer rows than the largest bucket"):
        BucketRunner(StandIn()(_row_forward, "cpu"), (1, 2, 8), torch.zeros(4, 3, 4, 6))


def test_a_failing_capture_is_a_backend_error():
    def capture(static_input):
        raise RuntimeError("operation not permitted when stream is capturing")

    runner = BucketRunner(capture, (1, 2), torch.zeros(2, 3, 4, 6))
    with pytest.raises(BackendError, match="capturing the graph for batch 1 failed: RuntimeError: operation not"):
        runner.capture_all()


# ----------------------------------------------------------------------------- the backend

def test_cuda_graphs_are_refused_on_the_cpu_and_with_compile(tiny):
    with pytest.raises(BackendError, match="cuda_graphs needs a CUDA device, got cpu"):
        TorchBackend(tiny, device="cpu", cuda_graphs=True, input_size=SMALL)
    with pytest.raises(BackendError, match="cuda_graphs needs a CUDA device"):
        create_backend("torch", tiny, device="cpu", cuda_graphs=True, input_size=SMALL)
    with pytest.raises(BackendError, match="cannot be combined"):
        TorchBackend(tiny, device="cpu", cuda_graphs=True, compile="reduce-overhead", input_size=SMALL)
    with pytest.raises(BackendError, match="must be true or false"):
        TorchBackend(tiny, device="cpu", cuda_graphs="maybe", input_size=SMALL)
    eager = TorchBackend(tiny, device="cpu", cuda_graphs=False, input_size=SMALL)
    assert eager.fixed_input_size is False and eager.accepts((224, 224)) and "cuda_graphs" not in eager.identity


@pytest.fixture
def graphs_on_cpu(monkeypatch):
    """TorchBackend's graph path on the CPU: the device check waived, the capture a stand-in."""
    stand_in = StandIn()
    monkeypatch.setattr(torch_backend, "_check_graphs_device", lambda device: None)
    monkeypatch.setattr(torch_backend, "cuda_graph_capture", stand_in)
    return stand_in


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_backend_runs_through_its_graphs_with_the_gate(tiny, graphs_on_cpu, precision):
    backend = TorchBackend(tiny, precision=precision, device="cpu", max_batch=3, input_size=SMALL, cuda_graphs=True)
    assert graphs_on_cpu.captures == [1, 2, 3], "every bucket captured when the backend is built"
    # the gate ran through the graphs: the synthetic pair (batch 2), then for bf16 the held-out photographs
    n = 0 if precision == "fp32" else len(natural_pixels(SMALL)[0])
    photographs = [2] * (n // 2) + [1] * (n % 2)
    assert graphs_on_cpu.replays == [2] + photographs, "the accuracy gate ran through the graphs"
    assert backend.validation_cosine >= min_cosine_for(precision)
    assert backend._forward.autocast_cache is False
    identity = backend.identity
    assert identity["cuda_graphs"] is True and identity["batch_buckets"] == [1, 2, 3]
    assert backend.fixed_input_size and TorchBackend.fixed_input_size is False
    assert backend.accepts(SMALL) and not backend.accepts((224, 224))
    pixels = validation_pixels(3, size=SMALL)
    reference = reference_output(tiny, pixels, "tokens")
    for batch in (1, 2, 3):
        out = backend.run_pixels(pixels[:batch])
        assert out.shape == reference[:batch].shape
        assert cosine(out, reference[:batch]) >= min_cosine_for(precision)
    assert graphs_on_cpu.replays[-3:] == [1, 2, 3]
    with pytest.raises(BackendError, match="built for 32x48 inputs"):
        backend.run_pixels(validation_pixels(1, size=(48, 32)))
    with pytest.raises(BackendError, match="batch 4 exceeds max_batch 3"):
        backend.run_pixels(validation_pixels(4, size=SMALL))


def test_a_wrong_graph_fails_the_gate(tiny, monkeypatch):
    monkeypatch.setattr(torch_backend, "_check_graphs_device", lambda device: None)
    monkeypatch.setattr(torch_backend, "cuda_graph_capture", StandIn(corrupt=lambda out: out.flip(-1)))
    with pytest.raises(BackendError, match=r"refusing torch fp32 on cpu \(CUDA graphs\)"):
        TorchBackend(tiny, device="cpu", max_batch=2, input_size=SMALL, cuda_graphs=True)


def test_encoder_builds_a_graphed_backend_per_input_size(graphs_on_cpu):
    import numpy as np

    from theia_ros.preprocess import PreprocessConfig, to_model_input

    encoder = create_encoder(TINY, backend="torch", device="cpu", max_batch=2, input_size=SMALL, cuda_graphs=True)
    first = encoder.backends[0]
    other = encoder.prepare((48, 32))
    assert other is not first and other.cuda_graphs and other.input_size == (48, 32)
    assert encoder.prepare(SMALL) is first
    frames = [np.full((60, 80, 3), 90 + 40 * i, np.uint8) for i in range(3)]
    features, _ = encoder.encode(frames, [PreprocessConfig(size=SMALL)] * 3)  # 3 frames: chunks of 2 and 1
    pixels = torch.cat([to_model_input(f, PreprocessConfig(size=SMALL)) for f in frames])
    reference = reference_output(encoder.model, pixels, "tokens")
    assert features.shape == reference.shape and cosine(features, reference) >= 0.9999


def test_auto_on_the_cpu_ignores_cuda_graphs(monkeypatch, caplog):
    """The node's torch.cuda_graphs parameter reaches the backend only on CUDA: auto on a CPU-only machine
    builds its CPU engine (torch here) and says why, and the engines of further input sizes do the same."""
    import logging

    from theia_ros.backends import factory

    monkeypatch.setattr(factory, "_capabilities", lambda: {"cuda": False, "onnxruntime": False, "openvino": False})
    with caplog.at_level(logging.INFO, logger="theia_ros.backends"):
        encoder = create_encoder(TINY, backend="auto", device="auto", max_batch=2, input_size=SMALL, cuda_graphs=True)
    first = encoder.backends[0]
    assert first.name == "torch" and str(first.device) == "cpu" and first.cuda_graphs is False
    assert "cuda_graphs applies to torch on CUDA only; ignored on the CPU" in caplog.text
    other = encoder.backend_factory((48, 32), "scale_factor")  # what the engine of another size is built with
    assert other is not first and other.cuda_graphs is False and other.input_size == (48, 32)


# ----------------------------------------------------------------------------- bench

def test_bench_offers_torch_cudagraphs_on_cuda_only(monkeypatch):
    from theia_ros.backends import bench

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cases = bench.available_cases(["torch-cudagraphs"], None, ["cuda"])
    assert [(c.backend, c.precision) for c in cases] == [("torch", "fp32"), ("torch-cudagraphs", "fp32"),
                                                         ("torch-cudagraphs", "fp16"), ("torch-cudagraphs", "bf16")]
    assert cases[0].is_baseline and not cases[1].is_baseline
    assert any(c.backend == "torch-cudagraphs" for c in bench.available_cases(None, ["fp16"], ["cuda"]))
    assert [c.backend for c in bench.available_cases(["torch-cudagraphs"], None, ["cpu"])] == ["torch"]
    calls = []
    monkeypatch.setattr(bench, "create_backend", lambda name, model, **kw: calls.append((name, kw)))
    cases[2].create("model", "tokens", 4)
    assert calls == [("torch", {"representation": "tokens", "precision": "fp16", "device": "cuda", "max_batch": 4,
                                "cuda_graphs": True})]


def test_bench_cli_takes_the_case_name(capsys):
    from theia_ros.cli.main import main

    argv = ["bench", TINY, "--device", "cpu", "--backends", "torch", "torch-cudagraphs", "--precisions", "fp32",
            "--batches", "1", "--seconds", "0.02", "--rounds", "1", "--threads", "1"]
    assert main(argv) == 0
    assert "| torch | fp32 | cpu | 1 |" in capsys.readouterr().out
    assert main(argv[:5] + ["torch-graphs"] + argv[7:]) == 2
    assert "unknown backend(s) torch-graphs" in capsys.readouterr().err


# ----------------------------------------------------------------------------- CUDA (gpu_check.sh)

@pytest.fixture(scope="module")
def tiny_cuda():
    from theia_ros.encoder.model import load_model

    return load_model(TINY).to("cuda")


@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_cuda_graphs_match_eager_at_every_batch(tiny_cuda, precision):
    graphed = TorchBackend(tiny_cuda, precision=precision, device="cuda", max_batch=4, cuda_graphs=True)
    eager = TorchBackend(tiny_cuda, precision=precision, device="cuda", max_batch=4)
    assert graphed.validation_cosine >= min_cosine_for(precision)
    assert graphed.identity["batch_buckets"] == [1, 2, 3, 4]
    pixels = validation_pixels(4)
    reference = reference_output(tiny_cuda, pixels, "tokens")
    results = {}
    for batch in (4, 1, 3, 2):
        out = graphed.run_pixels(pixels[:batch])
        assert out.device.type == "cpu" and out.dtype == torch.float32 and out.shape == reference[:batch].shape
        assert cosine(out, reference[:batch]) >= min_cosine_for(precision)
        assert cosine(out, eager.run_pixels(pixels[:batch])) >= 0.99999
        results[batch] = out.clone(), out
    for batch, (kept, out) in results.items():  # later replays did not change earlier results
        torch.testing.assert_close(out, kept, rtol=0, atol=0)
    with pytest.raises(BackendError, match="exceeds max_batch 4"):
        graphed.run_pixels(validation_pixels(5))
    with pytest.raises(BackendError, match="built for 224x224"):
        graphed.run_pixels(validation_pixels(1, size=(160, 224)))


@needs_cuda
def test_cuda_graphs_pad_between_buckets(tiny_cuda):
    graphed = TorchBackend(tiny_cuda, precision="fp16", device="cuda", max_batch=10, cuda_graphs=True,
                           input_size=(96, 128))
    assert graphed.identity["batch_buckets"] == list(range(1, 9)) + [10]
    pixels = validation_pixels(10, size=(96, 128))
    reference = reference_output(tiny_cuda, pixels, "tokens")
    graphed.run_pixels(pixels)
    out = graphed.run_pixels(pixels[:9])  # padded to 10: one spare row
    assert out.shape == reference[:9].shape and cosine(out, reference[:9]) >= 0.999


@needs_cuda
def test_cuda_graphs_encoder_second_size(tiny_cuda):
    import numpy as np

    from theia_ros.preprocess import PreprocessConfig

    encoder = create_encoder(TINY, backend="torch", device="cuda", precision="fp16", max_batch=2, cuda_graphs=True)
    frames = [np.random.default_rng(i).integers(0, 255, (240, 320, 3), np.uint8) for i in range(3)]
    features, _ = encoder.encode(frames, [PreprocessConfig(size=(96, 128))] * 3)
    assert len(encoder.backends) == 2 and all(b.cuda_graphs for b in encoder.backends)
    assert features.shape[0] == 3 and bool(torch.isfinite(features.float()).all())
