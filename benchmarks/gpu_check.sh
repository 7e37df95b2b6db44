#!/usr/bin/env bash
# One prepared check on one CUDA GPU (sized for an H200: the batch-8 cell holds ~100 GB), at most 8 minutes with
# every step capped by `timeout`:
#   1. the CUDA tests: Triton kernels against torch, every method's decode replayed as a CUDA graph against the
#      eager loop, the random-weight build on the device, CUDA peak memory (tests marked for CUDA, skipped on CPU);
#   2. benchmarks/kernel_bench.py at 32k / budget 256: each Triton kernel against its bytes floor;
#   3. task=efficiency on model=llama3.1-8b-random: full KV and every method at budget 256 at 16k, 32k, 64k and 96k
#      (batch 1), RocketKV at 1024 and 4096 at 96k, and every method at 32k with batch 8;
#   4. one table of everything (benchmarks/gpu_check_summary.py), also written to $OUT/summary.txt.
# Uses the machine's own torch and triton.  Packages the image lacks come from .gpu/ when it is there (prepare it
# with `bash benchmarks/gpu_wheels.sh` on a machine that reaches PyPI, and copy it along); else from the
# environment (pip install -e '.[test,triton]').
#   bash benchmarks/gpu_check.sh            exit 0: every step passed; 1: a step failed; 2: no CUDA GPU here
# Environment: GPU_CHECK_OUT (default results/gpu_check/<date-time>), PYTHON (default python3).
set -uo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${GPU_CHECK_OUT:-results/gpu_check/$(date +%Y-%m-%d_%H-%M-%S)}
"$PY" -c 'import sys, torch
sys.exit(0 if torch.cuda.is_available() else
         f"gpu_check.sh needs a CUDA GPU: torch.cuda.is_available() is False here (torch {torch.__version__}, "
         f"CUDA build: {torch.version.cuda or False}); run it on a GPU machine with a CUDA build of torch")' || exit 2
if [[ -d .gpu/wheels ]]; then
    site=${TMPDIR:-/tmp}/rocketkv-gpu-site
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .gpu/wheels/*.whl \
        || { echo "gpu_check.sh: installing .gpu/wheels failed" >&2; exit 1; }
    export PYTHONPATH="$site:$PWD/.gpu/pylib:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

"$PY" - <<'EOF' || exit 2
import sys
missing = []
for module in ("triton", "transformers", "hydra", "omegaconf", "platformdirs", "pytest"):
    try:
        __import__(module)
    except ImportError:
        missing.append(module)
if missing:
    sys.exit(f"gpu_check.sh: missing {', '.join(missing)}; run `bash benchmarks/gpu_wheels.sh` where PyPI is "
             "reachable and copy .gpu/ along, or pip install -e '.[test,triton]'")
import torch, transformers, triton
print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, triton {triton.__version__}, "
      f"transformers {transformers.__version__}")
EOF
mkdir -p "$OUT"
STEPS="$OUT/steps.tsv"
: > "$STEPS"
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

# every efficiency run: the random 8B model, no leaderboard, its own results folder under $OUT
efficiency() {
    local name=$1 limit=$2
    shift 2
    step "efficiency: $name" "$limit" "$OUT/efficiency_${name// /_}.log" \
        "$PY" run_eval.py task=efficiency model=llama3.1-8b-random "output_dir=$OUT/results" \
        update_leaderboard=false progress=false "hydra.run.dir=$OUT/hydra/${name// /_}" "$@"
}

step "CUDA tests" 110 "$OUT/cuda_tests.log" \
    "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_kernels.py tests/test_cuda_graphs.py \
    tests/test_random_models.py tests/test_efficiency.py
step "kernel bench 32k / budget 256" 40 "$OUT/kernel_bench.log" \
    "$PY" benchmarks/kernel_bench.py --context 32768 --budget 256 --json "$OUT/kernel_bench.json"
efficiency "batch 1 at 16k-96k" 150 'task.lengths=[16384,32768,65536,98304]'
efficiency "rocketkv at 96k" 50 'task.lengths=[98304]' task.warmup=false 'grid.methods=[rocketkv]' \
    'grid.budgets=[1024,4096]'
efficiency "batch 8 at 32k" 90 'task.lengths=[32768]' task.batch_size=8 task.warmup=false

echo
timeout 30 "$PY" benchmarks/gpu_check_summary.py --steps "$STEPS" --kernels "$OUT/kernel_bench.json" \
    --results "$OUT/results" | tee "$OUT/summary.txt" || failed=1
exit $failed
