#!/usr/bin/env bash
# GPU check of the inference backends, for an NVIDIA machine that may have no network and no venv.
#
#   bash benchmarks/gpu_check.sh            # from the repository root; uses the machine's python3
#
# Needs: python3 with CUDA torch, numpy and transformers (the model is built from a config).
# Uses RANDOM weights (random:theia-*): the right speed, meaningless features - no download needed.
# Where torch_tensorrt imports: builds fp16 and fp32 TensorRT engines for theia-tiny and theia-base
# (batch 1..4) into a fresh engine cache, builds each twice to show the second is a cache hit (load
# without recompiling), runs the tensorrt tests, and prints bench tables (eager torch fp32/fp16/bf16
# and TensorRT fp32/fp16, ratios to eager fp32 on the GPU measured in the same run).
# Where it does not: says so, and checks and benchmarks the torch CUDA paths instead: the CUDA-graph
# tests (test/test_cuda_graphs.py with pytest, else a smoke check), then bench tables for theia-tiny
# and theia-base at batch 1 and 4 of eager fp32/fp16/bf16 and the torch backend's own CUDA graphs
# (torch-cudagraphs) fp32/fp16/bf16, then torch.compile "reduce-overhead" (torch-compile); each table
# has eager fp32 on the GPU measured in the same run, the baseline of its speed-up column.
# With TensorRT, the tables hold the torch-cudagraphs rows next to TensorRT's, and the CUDA-graph tests run too.
# Everything runs under one deadline (GPU_CHECK_SECONDS, default 540 s) so the whole check stays
# inside 10 minutes; a step that would not fit is skipped with a message, a step that fails is named
# at the end.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_SECONDS:-540}
START=$(date +%s)
OUT=${OUT:-}
export THEIA_ROS_CACHE=${THEIA_ROS_CACHE:-$(mktemp -d "${HOME:-/root}/.theia_gpu_check.XXXXXX")}
TINY=random:theia-tiny-patch16-224-cddsv
BASE=random:theia-base-patch16-224-cddsv
RESULTS=${OUT:-$THEIA_ROS_CACHE}   # the log and the bench rows (JSON) are kept there, not in the work tree
LOG=$RESULTS/gpu_check.log
: > "$LOG"

FAILED=()
say() { echo "== $*" | tee -a "$LOG"; }
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
# run CAP CMD...: run with a timeout of min(CAP, time left - 10 s); skip when under 20 s are left
run() {
  local cap=$1; shift
  local t=$(( $(left) - 10 )); (( t > cap )) && t=$cap
  if (( t < 20 )); then say "SKIPPED (out of time): $*"; FAILED+=("skipped: ${*:2:6}"); return 124; fi
  echo "\$ $* (timeout ${t}s)" | tee -a "$LOG"
  timeout --signal=INT --kill-after=15 "$t" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  (( rc == 124 )) && say "TIMED OUT after ${t}s: $*"
  (( rc != 0 )) && FAILED+=("rc $rc: ${*:2:6}")
  return "$rc"
}

# the CUDA-graph checks: the tests where pytest imports, else the same checks as one script
SMOKE='
import torch
from theia_ros.backends.base import BackendError
from theia_ros.backends.torch_backend import TorchBackend
from theia_ros.backends.validation import cosine, min_cosine_for, reference_output, validation_pixels
from theia_ros.encoder.model import load_model
model = load_model("random:theia-tiny-patch16-224-cddsv").to("cuda")
pixels = validation_pixels(4)
reference = reference_output(model, pixels, "tokens")
bad = 0
for precision in ("fp32", "fp16", "bf16"):
    b = TorchBackend(model, precision=precision, device="cuda", max_batch=4, cuda_graphs=True)
    first = b.run_pixels(pixels[:3])
    kept = first.clone()
    worst = min(cosine(b.run_pixels(pixels[:n]), reference[:n]) for n in (4, 1, 2, 3))
    try:
        b.run_pixels(validation_pixels(5))
        refused = False
    except BackendError:
        refused = True
    ok = worst >= min_cosine_for(precision) and torch.equal(first, kept) and refused
    bad += not ok
    buckets, verdict = b.identity["batch_buckets"], "ok" if ok else "FAIL"
    print(f"cuda graphs {precision}: buckets {buckets}, gate cosine {b.validation_cosine:.6f}, "
          f"worst cosine over batches 1-4 {worst:.6f}, batch 5 refused {refused}: {verdict}")
raise SystemExit(1 if bad else 0)
'
cuda_graph_tests() {
  if "$PY" -c "import pytest" 2>/dev/null; then
    say "CUDA-graph tests (test/test_cuda_graphs.py)"
    run 120 "$PY" -m pytest -q -p no:cacheprovider test/test_cuda_graphs.py -rs
  else
    say "pytest not installed: CUDA-graph smoke check instead of test/test_cuda_graphs.py"
    run 120 "$PY" -c "$SMOKE"
  fi
}

say "theia_ros GPU check, $(date -u +%FT%TZ), budget ${BUDGET}s, engine cache $THEIA_ROS_CACHE"
"$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import importlib, platform
print("python", platform.python_version(), platform.machine())
for name in ("torch", "numpy", "transformers", "torch_tensorrt", "tensorrt", "onnxruntime", "pytest"):
    try:
        mod = importlib.import_module(name)
        print(f"{name:15s} {getattr(mod, '__version__', '?')}")
    except Exception as exc:  # noqa: BLE001
        print(f"{name:15s} MISSING ({type(exc).__name__}: {str(exc).splitlines()[0][:100]})")
import torch
print("cuda available:", torch.cuda.is_available(), "| torch.version.cuda:", torch.version.cuda)
if torch.cuda.is_available():
    print("gpu:", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
EOF

if ! "$PY" -c "import torch, numpy, transformers, sys; sys.exit(0 if torch.cuda.is_available() else 3)" 2>/dev/null; then
  say "FAIL: needs python3 with CUDA torch, numpy and transformers (see above); nothing to check"
  exit 2
fi
"$PY" -c "import theia_ros.backends.factory, theia_ros.encoder.model" || { say "FAIL: theia_ros.backends does not import"; exit 2; }

if "$PY" -c "import torch_tensorrt" 2>/dev/null; then
  HAVE_TRT=1
  say "torch_tensorrt imports: building TensorRT engines (random weights: speed only)"
else
  HAVE_TRT=0
  say "torch_tensorrt does NOT import here: no TensorRT engines; benchmarking the torch CUDA paths instead"
fi

if (( HAVE_TRT )); then
  for model in "$TINY" "$BASE"; do
    for prec in fp16 fp32; do
      cap=150; [[ $model == "$BASE" ]] && cap=200
      run $cap "$PY" -m theia_ros.cli export "$model" --backend tensorrt --precision $prec --max-batch 4
      # the same call again must load the cached engine without recompiling ("hit in ...")
      run 60 "$PY" -m theia_ros.cli export "$model" --backend tensorrt --precision $prec --max-batch 4
    done
  done
  if "$PY" -c "import pytest" 2>/dev/null; then
    say "tensorrt tests"
    THEIA_TEST_ENGINE_CACHE=$THEIA_ROS_CACHE run 240 "$PY" -m pytest -q -p no:cacheprovider \
        test/test_backends.py -k "tensorrt" -rs
  else
    say "pytest not installed: the export runs above (build, validation gate, cache hit) stand in for the tests"
  fi
  say "bench theia-tiny (TensorRT + eager torch + torch CUDA graphs, CUDA)"
  run 150 "$PY" -m theia_ros.cli bench "$TINY" --device cuda --backends torch tensorrt torch-cudagraphs \
      --batches 1 4 --seconds 2 \
      --json "$RESULTS/bench1.json"
  say "bench theia-base (TensorRT + eager torch + torch CUDA graphs, CUDA)"
  run 150 "$PY" -m theia_ros.cli bench "$BASE" --device cuda --backends torch tensorrt torch-cudagraphs \
      --batches 1 4 --seconds 2 \
      --json "$RESULTS/bench2.json"
  cuda_graph_tests
  say "bench theia-tiny torch.compile (CUDA graphs) fp16, if time is left"
  run 150 "$PY" -m theia_ros.cli bench "$TINY" --device cuda --backends torch-compile --precisions fp16 \
      --batches 1 4 --seconds 2 \
      --json "$RESULTS/bench3.json"
else
  cuda_graph_tests
  say "bench theia-tiny (eager torch and torch CUDA graphs, fp32/fp16/bf16, CUDA)"
  run 120 "$PY" -m theia_ros.cli bench "$TINY" --device cuda --backends torch torch-cudagraphs \
      --precisions fp32 fp16 bf16 --batches 1 4 --seconds 2 \
      --json "$RESULTS/bench4.json"
  say "bench theia-base (eager torch and torch CUDA graphs, fp32/fp16/bf16, CUDA)"
  run 150 "$PY" -m theia_ros.cli bench "$BASE" --device cuda --backends torch torch-cudagraphs \
      --precisions fp32 fp16 bf16 --batches 1 4 --seconds 2 \
      --json "$RESULTS/bench5.json"
  # fp16 only: reduce-overhead compiles once per batch size (validation 2, then 1 and 4) and precision
  say "bench theia-tiny torch.compile reduce-overhead fp16 next to eager and torch CUDA graphs"
  run 180 "$PY" -m theia_ros.cli bench "$TINY" --device cuda --backends torch torch-cudagraphs torch-compile \
      --precisions fp16 --batches 1 4 --seconds 2 \
      --json "$RESULTS/bench6.json"
  say "bench theia-base torch.compile reduce-overhead fp16 next to eager and torch CUDA graphs"
  run 180 "$PY" -m theia_ros.cli bench "$BASE" --device cuda --backends torch torch-cudagraphs torch-compile \
      --precisions fp16 --batches 1 4 --seconds 2 \
      --json "$RESULTS/bench7.json"
fi
if (( ${#FAILED[@]} )); then
  say "steps that failed, timed out or were skipped: ${#FAILED[@]}"
  for f in "${FAILED[@]}"; do say "  $f"; done
fi
say "done in $(( $(date +%s) - START ))s; engines in $THEIA_ROS_CACHE; log $LOG"
(( ${#FAILED[@]} == 0 ))
