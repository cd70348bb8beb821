#!/usr/bin/env bash
# jaxdecode against transformers on an NVIDIA GPU, in one prepared run (<= 8 minutes).
#
# On a machine with an NVIDIA GPU (driver installed, pip reaching PyPI), from anywhere:
#
#     bash benchmarks/gpu.sh
#
# 1. Creates two virtual environments under .venv-gpu/ (in parallel; reused when
#    already complete): `jax/` with jaxdecode (editable) and jax[cuda12] or
#    jax[cuda13] (matching the driver's CUDA version, see JAX_CUDA), and `torch/`
#    with torch (PyPI's CUDA build) and transformers 5. Two environments, because
#    torch and JAX each pin their own CUDA libraries (cuDNN, cuBLAS) from PyPI;
#    in one environment one would overwrite the other's.
# 2. Checks that JAX sees the GPU and that torch sees CUDA (else stops: CPU
#    figures from this script would be mislabelled).
# 3. Runs benchmarks/compare_hf.py (the package benchmarks/compare/) for every
#    model in MODELS and dtype in DTYPES (jaxdecode and transformers in the same
#    dtype, transformers on CUDA in its own environment via --hf-python), for the
#    workloads in WORKLOADS (batch 1, 8 and 64), each run under what is left of
#    BUDGET_S, and writes benchmarks/results/compare_hf_gpu_<model>_<dtype>.json
#    (and a .md table beside it). A run that would start with under a minute left
#    is skipped and said so; what finished is kept.
#
# The libraries' processes are shared by a run's workloads (fresh ones per workload
# would cost about two minutes of the budget): JAX's device peak memory is then the
# maximum since the run started ("device_peak_scope": "process"); torch's is per
# workload.
#
# float32 runs set JAX_DEFAULT_MATMUL_PRECISION=float32: XLA's default lets a
# float32 matrix product run as TF32 on a GPU, torch's default does not; both do
# full float32 then (each JSON records both settings).
#
#     bash benchmarks/gpu.sh --dry-run
#
# checks the Python part without a GPU: no environments, no installs, JAX on the
# CPU, transformers on the CPU, the tiny model and --quick sizes, results in a
# temporary directory (or --out DIR). PYTHON picks the interpreter (default python3;
# for a dry run it needs jaxdecode's dependencies, torch and transformers; on a GPU
# machine it only creates the two environments, so it must be one jax supports).
#
# Settings (environment variables):
#   MODELS     model specs of benchmarks/compare/models.py (default "gpt2-small";
#              SmolLM2-135M and a 1B-class Llama shape are added there as entries,
#              then named here)
#   DTYPES     default "bfloat16 float32"
#   WORKLOADS  default "greedy_b1 greedy_b8 greedy_b64 beam4_b1 sample_b1 sample_b8 sample_b64"
#   RUNS       timed runs per library and workload (default 3)
#   BUDGET_S   seconds for the whole script, installs included (default 480)
#   JAX_CUDA   cuda12 or cuda13 (default: cuda13 when the driver supports CUDA 13, else cuda12)
#   JAX_VERSION  default 0.10.2 (the version the CPU figures were measured with)
#   TORCH_VERSION  default 2.13.0
#   VENV_DIR   default .venv-gpu (repository root)
set -euo pipefail

START=$(date +%s)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

DRY_RUN=0
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --out) OUT=$2; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

MODELS=${MODELS:-gpt2-small}
DTYPES=${DTYPES:-bfloat16 float32}
WORKLOADS=${WORKLOADS:-greedy_b1 greedy_b8 greedy_b64 beam4_b1 sample_b1 sample_b8 sample_b64}
RUNS=${RUNS:-3}
BUDGET_S=${BUDGET_S:-480}
JAX_VERSION=${JAX_VERSION:-0.10.2}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
VENV_DIR=${VENV_DIR:-$ROOT/.venv-gpu}

elapsed() { echo $(($(date +%s) - START)); }
say() { echo "[gpu.sh $(elapsed)s] $*" >&2; }

BASE_PYTHON=$(command -v "${PYTHON:-python3}") || {
  echo "gpu.sh: no ${PYTHON:-python3} on PATH" >&2
  exit 1
}

if [ "$DRY_RUN" = 1 ]; then
  PY_JAX=$BASE_PYTHON
  PY_HF=$PY_JAX
  OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/jaxdecode-gpu-dry-run.XXXXXX")}
  export JAX_PLATFORMS=cpu
  HF_DEVICE=cpu
  # --quick sizes, and the tiny model in place of every model.
  EXTRA=(--quick)
  MODELS=gpt2-tiny
  say "dry run: CPU, $PY_JAX, results in $OUT"
else
  OUT=${OUT:-$ROOT/benchmarks/results}
  HF_DEVICE=cuda
  EXTRA=(--pause-s 0.05)  # no CPU threads to let settle between GPU calls
  if ! command -v nvidia-smi > /dev/null; then
    echo "gpu.sh: no nvidia-smi: this script needs an NVIDIA GPU (try --dry-run)" >&2
    exit 1
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2
  DRIVER_CUDA=$(nvidia-smi | sed -n 's/.*CUDA Version: *\([0-9][0-9]*\)\..*/\1/p' | head -n 1)
  if [ -z "${JAX_CUDA:-}" ]; then
    if [ "${DRIVER_CUDA:-12}" -ge 13 ]; then JAX_CUDA=cuda13; else JAX_CUDA=cuda12; fi
  fi
  say "driver CUDA ${DRIVER_CUDA:-?}: jax[$JAX_CUDA]==$JAX_VERSION, torch==$TORCH_VERSION"

  VJ=$VENV_DIR/jax
  VT=$VENV_DIR/torch
  LOGS=$VENV_DIR/logs
  mkdir -p "$LOGS"
  JAX_MARK=$VJ/.complete-$JAX_CUDA-$JAX_VERSION
  TORCH_MARK=$VT/.complete-$TORCH_VERSION
  install_jax() {
    [ -f "$JAX_MARK" ] && return 0
    rm -rf "$VJ"
    "$BASE_PYTHON" -m venv "$VJ"
    "$VJ/bin/python" -m pip install -q --upgrade pip
    "$VJ/bin/python" -m pip install -q -e "$ROOT" "jax[$JAX_CUDA]==$JAX_VERSION"
    touch "$JAX_MARK"
  }
  install_torch() {
    [ -f "$TORCH_MARK" ] && return 0
    rm -rf "$VT"
    "$BASE_PYTHON" -m venv "$VT"
    "$VT/bin/python" -m pip install -q --upgrade pip
    # PyPI's Linux torch wheel is the CUDA build.
    "$VT/bin/python" -m pip install -q "torch==$TORCH_VERSION" "transformers>=5,<6" numpy
    touch "$TORCH_MARK"
  }
  say "installing (logs in $LOGS) ..."
  install_jax > "$LOGS/jax.log" 2>&1 &
  JAX_PID=$!
  install_torch > "$LOGS/torch.log" 2>&1 &
  TORCH_PID=$!
  STATUS=0
  wait "$JAX_PID" || { STATUS=1; echo "gpu.sh: the JAX install failed:" >&2; tail -n 30 "$LOGS/jax.log" >&2; }
  wait "$TORCH_PID" || { STATUS=1; echo "gpu.sh: the torch install failed:" >&2; tail -n 30 "$LOGS/torch.log" >&2; }
  [ "$STATUS" = 0 ] || exit 1
  say "installed"
  PY_JAX=$VJ/bin/python
  PY_HF=$VT/bin/python

  # Fail early and clearly rather than time a CPU fallback.
  "$PY_JAX" -c '
import jax, sys
print("jax", jax.__version__, jax.default_backend(), jax.devices(), file=sys.stderr)
sys.exit(jax.default_backend() != "gpu")
' || { echo "gpu.sh: JAX does not see the GPU (JAX_CUDA=$JAX_CUDA); see above" >&2; exit 1; }
  "$PY_HF" -c '
import sys, torch
ok = torch.cuda.is_available()
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", ok, file=sys.stderr)
sys.exit(not ok)
' || { echo "gpu.sh: torch does not see CUDA (its CUDA build may need a newer driver)" >&2; exit 1; }
fi

mkdir -p "$OUT"
read -r -a WORKLOAD_LIST <<< "$WORKLOADS"
WRITTEN=()
SKIPPED=()
FAILED=()
for model in $MODELS; do
  for dtype in $DTYPES; do
    left=$((BUDGET_S - $(elapsed)))
    if [ "$left" -lt 60 ]; then
      say "skipping $model $dtype: ${left}s left of BUDGET_S=$BUDGET_S"
      SKIPPED+=("$model/$dtype")
      continue
    fi
    json=$OUT/compare_hf_gpu_${model}_${dtype}.json
    [ "$DRY_RUN" = 1 ] && json=$OUT/compare_hf_cpu_${model}_${dtype}_dry_run.json
    md=${json%.json}.md
    rm -f "$json" "$md"
    precision=()
    [ "$dtype" = float32 ] && precision=(JAX_DEFAULT_MATMUL_PRECISION=float32)
    say "running $model $dtype (at most ${left}s) ..."
    status=0
    env ${precision[@]+"${precision[@]}"} timeout --signal=TERM --kill-after=10 "$left" \
      "$PY_JAX" benchmarks/compare_hf.py --model "$model" "${EXTRA[@]}" \
      --dtype "$dtype" --hf-dtype "$dtype" --hf-device "$HF_DEVICE" --hf-python "$PY_HF" \
      --workloads "${WORKLOAD_LIST[@]}" --workers shared --runs "$RUNS" \
      --json "$json" --markdown "$md" || status=$?
    if [ "$status" = 0 ]; then
      WRITTEN+=("$json")
    else
      say "$model $dtype failed or ran out of time (status $status)"
      FAILED+=("$model/$dtype")
      # The JSON is rewritten after every workload: keep what finished.
      [ -f "$json" ] && say "partial results (finished workloads only): $json"
    fi
  done
done

echo
for json in ${WRITTEN[@]+"${WRITTEN[@]}"}; do
  echo "## $(basename "${json%.json}")"
  echo
  cat "${json%.json}.md"
  echo
done
say "done: ${#WRITTEN[@]} written, ${#SKIPPED[@]} skipped (${SKIPPED[*]:-}), ${#FAILED[@]} failed (${FAILED[*]:-})"
for json in ${WRITTEN[@]+"${WRITTEN[@]}"}; do echo "wrote $json" >&2; done
[ "${#FAILED[@]}" = 0 ]
