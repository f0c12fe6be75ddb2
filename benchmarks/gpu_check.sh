#!/usr/bin/env bash
# The first thing to run on a machine with an NVIDIA GPU (never run on one yet).
#
#   bash benchmarks/gpu_check.sh            # from anywhere; about 8 minutes at most
#
# Steps, each bounded by `timeout` and by a total budget of GPU_CHECK_BUDGET_S (450 s):
#   1. nvidia-smi and jax's view of the devices; stops here unless jax sees a CUDA GPU.
#   2. the GPU tests (pytest marker `gpu`, tests/test_gpu.py): cuDNN vs 'xla', the automatic
#      choice never sending a bias to cuDNN, rows emptied by a -inf bias, NaN propagation.
#      JATTN_REQUIRE_GPU=1 turns their "no GPU" skip into a failure.
#   3. the core numerics tests on the GPU backend (float32 matmuls at 'highest' precision).
#   4. benchmarks/bench_attention.py --gpu on T in {1024, 4096, 16384}; falls back to --quick
#      if that does not finish in time.
# Results go to benchmarks/results/: attention_gpu*.json/png from the benchmark, and
# gpu_check/ (summary.txt, the logs and JUnit XML of each step). Exits non-zero if any step
# failed; every step runs regardless, so one run collects everything.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
BUDGET=${GPU_CHECK_BUDGET_S:-450}
OUT=benchmarks/results/gpu_check
mkdir -p "$OUT"
SUMMARY=$OUT/summary.txt
: > "$SUMMARY"
FAILED=0

log() { echo "[gpu_check +${SECONDS}s] $*" | tee -a "$SUMMARY"; }

# run_step NAME CAP_SECONDS CMD...: run CMD with a timeout of min(CAP, what is left of the
# budget), log to $OUT/NAME.log, record the outcome. Returns CMD's status (124 = timed out).
run_step() {
  local name=$1 cap=$2
  shift 2
  local left=$((BUDGET - SECONDS))
  local limit=$((cap < left ? cap : left))
  if ((limit < 10)); then
    log "SKIP $name: only ${left}s of the ${BUDGET}s budget left"
    FAILED=1
    return 1
  fi
  log "RUN  $name (timeout ${limit}s): $*"
  local start=$SECONDS rc=0
  timeout --kill-after=10 "$limit" "$@" > >(tee "$OUT/$name.log") 2>&1 || rc=$?
  if ((rc == 0)); then
    log "OK   $name in $((SECONDS - start))s"
  else
    log "FAIL $name: exit $rc$( ((rc == 124)) && echo ' (timed out)') after $((SECONDS - start))s; see $OUT/$name.log"
    FAILED=1
  fi
  return $rc
}

log "jattn GPU check in $ROOT, commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), budget ${BUDGET}s"
if command -v nvidia-smi > /dev/null; then
  run_step nvidia_smi 30 nvidia-smi || true
else
  log "nvidia-smi not found"
fi

if ! run_step devices 120 "$PY" -c '
import jax
from jattn import dispatch
print("jax", jax.__version__, "backend", jax.default_backend(), "devices", jax.devices())
if not dispatch.on_nvidia_gpu():
    raise SystemExit("jax does not see a CUDA GPU: install jax[cuda12] (or cuda13) first")
'; then
  log "stopping: no usable NVIDIA GPU"
  exit 1
fi

export JATTN_REQUIRE_GPU=1
run_step pytest_gpu 180 "$PY" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider \
  --junitxml="$OUT/pytest_gpu.xml" || true

JAX_DEFAULT_MATMUL_PRECISION=highest run_step pytest_core_on_gpu 120 "$PY" -m pytest -q \
  tests/test_faults_core.py tests/test_dispatch.py -p no:cacheprovider \
  --junitxml="$OUT/pytest_core_on_gpu.xml" || true

if ! run_step bench_gpu 200 "$PY" benchmarks/bench_attention.py --gpu --lengths 1024 4096 16384; then
  run_step bench_gpu_quick 90 "$PY" benchmarks/bench_attention.py --gpu --quick || true
fi

log "done in ${SECONDS}s; $( ((FAILED)) && echo 'SOME STEPS FAILED' || echo 'all steps passed')"
log "results: $OUT/ and benchmarks/results/attention_gpu*.json"
exit $FAILED
