#!/usr/bin/env bash
# One prepared check on one CUDA GPU (sized for an H200: the batch-8 cell holds ~100 GB), at most 8 minutes in the
# worst case: every step is capped by `timeout`, and the caps plus the install sum to under 480 s
# (tests/test_gpu_check.py adds them up):
#   1. the CUDA tests: Triton kernels against torch, every method's decode replayed as a CUDA graph against the
#      eager loop, the random-weight build on the device, CUDA peak memory (tests marked for CUDA, skipped on CPU);
#   2. benchmarks/kernel_bench.py: full KV's dense kernel at 32k-96k, batch 1 and 8, against its bytes floor, and the
#      small kernels in us per call, each replayed in a CUDA graph;
#   3. benchmarks/topk_ties.py: which of tied values at the cut CUDA's topk keeps;
#   4. task=efficiency on model=llama3.1-8b-random: full KV and every method at budget 256 at 32k and 96k (batch 1),
#      and every method at 32k with batch 8 (the targets' cells; 16k, 64k, larger budgets and method.compile=on do not fit 8 min);
#   5. one table of everything (benchmarks/gpu_check_summary.py), also written to $OUT/summary.txt.
# Uses the machine's own torch and triton.  Packages the image lacks come from .gpu/ when it is there (prepare it
# with `bash benchmarks/gpu_wheels.sh` on a machine that reaches PyPI, and copy it along); else from the
# environment (pip install -e '.[test,triton]').
#
#   bash benchmarks/gpu_check.sh            exit 0: every step passed; 1: a step failed; 2: cannot start here
#   bash benchmarks/gpu_check.sh --dry-run  on a CPU machine: everything above that runs without CUDA, in an
#                                           environment resembling the GPU image (benchmarks/gpu_image_env.sh),
#                                           the efficiency command lines on a small llama at small lengths
# Environment: GPU_CHECK_OUT (default results/gpu_check/<date-time>), PYTHON (default python3).
set -uo pipefail

cd "$(dirname "$0")/.."
DRY_RUN=0
case "${1:-}" in
    --dry-run) DRY_RUN=1 ;;
    "") ;;
    *) echo "gpu_check.sh: unknown option '$1'; use --dry-run or nothing" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
OUT=${GPU_CHECK_OUT:-results/gpu_check/$(date +%Y-%m-%d_%H-%M-%S)}
INSTALL_LIMIT=30
LIMIT_SCALE=1  # a dry run stretches the step limits: a busy 2-core CPU runs the tests slower than the GPU machine

GPU_DIR=.gpu
if [[ $DRY_RUN == 1 ]]; then
    LIMIT_SCALE=5
    PY=$(bash benchmarks/gpu_image_env.sh | tail -n 1) || { echo "gpu_check.sh: gpu_image_env.sh failed" >&2; exit 2; }
    # gpu_wheels.sh's wheels, for this machine's Python (the real .gpu/ holds the image's 3.12 ones)
    GPU_DIR=$(dirname "$(dirname "$PY")")/gpu-wheels
    pyver=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    [[ -d "$GPU_DIR/wheels" ]] || GPU_WHEELS_DEST="$GPU_DIR" bash benchmarks/gpu_wheels.sh "$pyver" >/dev/null \
        || { echo "gpu_check.sh: gpu_wheels.sh failed" >&2; exit 2; }
    echo "dry run on CPU with $PY (an environment resembling the GPU image) and the wheels of $GPU_DIR"
else
    "$PY" -c 'import sys, torch
sys.exit(0 if torch.cuda.is_available() else
         f"gpu_check.sh needs a CUDA GPU: torch.cuda.is_available() is False here (torch {torch.__version__}, "
         f"CUDA build: {torch.version.cuda or False}); run it on a GPU machine with a CUDA build of torch, "
         f"or --dry-run on a CPU machine")' || exit 2
fi
if [[ -d "$GPU_DIR/wheels" ]]; then
    site=${TMPDIR:-/tmp}/rocketkv-gpu-site$DRY_RUN
    timeout "$INSTALL_LIMIT" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" "$GPU_DIR"/wheels/*.whl || { echo "gpu_check.sh: installing $GPU_DIR/wheels failed" >&2; exit 2; }
    export PYTHONPATH="$site:$(cd "$GPU_DIR" && pwd)/pylib:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

# The imports every later step needs, and transformers within pyproject.toml's range (the image's own is too old).
timeout 20 "$PY" - <<'EOF' || exit 2
import re, sys
missing = []
for module in ("triton", "transformers", "hydra", "omegaconf", "platformdirs", "pytest", "pandas", "filelock"):
    try:
        __import__(module)
    except ImportError:
        missing.append(module)
if missing:
    sys.exit(f"gpu_check.sh: missing {', '.join(missing)}; run `bash benchmarks/gpu_wheels.sh` where PyPI is "
             "reachable and copy .gpu/ along, or pip install -e '.[test,triton]'")
import torch, transformers, triton
pin = re.search(r'"transformers([^"]+)"', open("pyproject.toml").read()).group(1)
from packaging.specifiers import SpecifierSet
if transformers.__version__ not in SpecifierSet(pin):
    sys.exit(f"gpu_check.sh: transformers {transformers.__version__} is imported, this project needs {pin}; "
             "run `bash benchmarks/gpu_wheels.sh` where PyPI is reachable and copy .gpu/ along")
import rocketkv.harness.runner, rocketkv.core.kernels.triton_decode  # noqa: F401  the project imports here
device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU (dry run)"
print(f"GPU: {device}, torch {torch.__version__}, triton {triton.__version__}, "
      f"transformers {transformers.__version__}")
EOF
mkdir -p "$OUT"
STEPS="$OUT/steps.tsv"
: > "$STEPS"
failed=0

# step NAME LIMIT_S LOG CMD...: runs CMD under `timeout`, output to the terminal and LOG; records the outcome.
step() {
    local name=$1 limit=$(($2 * LIMIT_SCALE)) log=$3
    shift 3
    echo
    echo "=== $name (at most ${limit}s) ==="
    local start=$SECONDS rc=0
    timeout --kill-after=5 "$limit" "$@" 2>&1 | tee "$log" || rc=$?
    local status=ok
    if [[ $rc -eq 124 || $rc -eq 137 ]]; then status="timeout after ${limit}s"; failed=1
    elif [[ $rc -ne 0 ]]; then status="failed (rc=$rc)"; failed=1; fi
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" "$log" >> "$STEPS"
}

# Every efficiency run: the random 8B model (a small llama on a dry run), no leaderboard, its own results folder.
if [[ $DRY_RUN == 1 ]]; then
    MODEL=(model.parameters=null model.max_len=4096 model.dtype=float32 model.architecture.hidden_size=64
           model.architecture.intermediate_size=128 model.architecture.num_hidden_layers=2
           model.architecture.num_attention_heads=4 model.architecture.num_key_value_heads=2
           model.architecture.head_dim=16 model.architecture.vocab_size=1024 task.max_new_tokens=6)
    K32=1024 K96=2048
else
    MODEL=() K32=32768 K96=98304
fi
efficiency() {
    local name=$1 limit=$2
    shift 2
    step "efficiency: $name" "$limit" "$OUT/efficiency_${name// /_}.log" \
        "$PY" run_eval.py task=efficiency model=llama3.1-8b-random "output_dir=$OUT/results" \
        update_leaderboard=false progress=false "hydra.run.dir=$OUT/hydra/${name// /_}" "${MODEL[@]}" "$@"
}

# step 1's limit leaves room for a cold Triton cache: every kernel compiled once per shape/dtype
step "CUDA tests" 140 "$OUT/cuda_tests.log" \
    "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_kernels.py tests/test_dense_kernel.py \
    tests/test_cuda_graphs.py tests/test_random_models.py tests/test_efficiency.py tests/test_gpu_dtypes.py
step "kernel bench: dense 32k-96k, batch 1 and 8" 60 "$OUT/kernel_bench.log" \
    "$PY" benchmarks/kernel_bench.py --json "$OUT/kernel_bench.json"
step "topk ties" 10 "$OUT/topk_ties.log" "$PY" benchmarks/topk_ties.py
efficiency "batch 1 at 32k and 96k" 95 "task.lengths=[$K32,$K96]"
efficiency "batch 8 at 32k" 65 "task.lengths=[$K32]" task.batch_size=8 task.warmup=false
if [[ $DRY_RUN == 1 ]]; then  # what the image's Triton compiles for sm_90: registers, spills, loads (CPU only)
    AOT_LIMIT=120
    step "kernel AOT for sm_90 (triton $("$PY" -c 'import triton; print(triton.__version__)'))" "$AOT_LIMIT" \
        "$OUT/kernel_aot.log" "$PY" benchmarks/kernel_aot.py --json "$OUT/kernel_aot.json"
fi

echo
timeout 20 "$PY" benchmarks/gpu_check_summary.py --steps "$STEPS" --kernels "$OUT/kernel_bench.json" \
    --results "$OUT/results" | tee "$OUT/summary.txt"
[[ ${PIPESTATUS[0]} -ne 0 ]] && failed=1
# a dry run has no GPU numbers (its targets read missing): what counts is that every step ran
[[ $DRY_RUN == 1 ]] && echo "dry run: $([[ $failed == 0 ]] && echo "every step passed" || echo "a step FAILED")"
exit $failed
