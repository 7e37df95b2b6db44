#!/usr/bin/env bash
# Builds (or reuses) a CPU environment that resembles the lent GPU machines' image as closely as PyPI allows, for
# `benchmarks/gpu_check.sh --dry-run`: triton 3.6.0, numpy 2.4.6 (the image has 2.5.2; PyPI here has
# nothing past 2.4.6, and the interpreter's numpy >= 2.4 break is the one that matters), the packages of the image
# that this project uses, and none of those it lacks (datasets, rapidfuzz, rouge, gguf, jieba, lm-eval, submitit,
# hydra, omegaconf, platformdirs).  The project's own extras come from .gpu/ as on the GPU (gpu_check.sh installs
# them).  torch is the CPU build README installs (a CUDA wheel is several GB; the image's is 2.11+cu130), which is
# built for this machine's Python (3.11; the image's is 3.12, and .gpu/ holds 3.12 wheels only where a wheel is
# Python-specific: regex, installed here from PyPI).
#   bash benchmarks/gpu_image_env.sh [folder]     prints the environment's python on its last line
# Environment: PYTHON (default python3), ROCKETKV_GPU_IMAGE_ENV (the folder).
set -euo pipefail
cd "$(dirname "$0")/.."
ENV=${1:-${ROCKETKV_GPU_IMAGE_ENV:-$HOME/.cache/rocketkv/gpu-image-env}}
PY=${PYTHON:-python3}
# what the image holds and this project imports (versions near the image's where it matters)
PACKAGES=(torch==2.13.0 triton==3.6.0 numpy==2.4.6 "huggingface_hub>=1.3,<2" tokenizers safetensors accelerate
          sentencepiece pandas pyarrow matplotlib seaborn tabulate tqdm filelock pyyaml psutil jinja2 regex
          pytest pytest-timeout)
STAMP="$ENV/.rocketkv-image-env"
want="${PACKAGES[*]}"
if [[ -x "$ENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
    echo "$ENV/bin/python"
    exit 0
fi
rm -rf "$ENV"
"$PY" -m venv "$ENV"
"$ENV/bin/python" -m pip install -q "${PACKAGES[@]}" >&2
for absent in datasets rapidfuzz rouge gguf jieba lm_eval submitit hydra omegaconf platformdirs; do
    if "$ENV/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$absent') is None)"; then
        echo "gpu_image_env.sh: $absent came in as a dependency, but the image lacks it" >&2
        exit 1
    fi
done
echo "$want" > "$STAMP"
echo "$ENV/bin/python"
