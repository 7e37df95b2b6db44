#!/usr/bin/env bash
# Prepares .gpu/ for a GPU machine that cannot reach PyPI but has its own torch and triton (Python 3.12): the
# wheels this project needs beyond such an image (transformers 5.24 and the Hydra stack) in .gpu/wheels, and
# antlr4-python3-runtime 4.9.3, which PyPI has only as source, unpacked into .gpu/pylib.  Run it here, with PyPI
# reachable; copy .gpu/ along with the checkout; benchmarks/gpu_check.sh installs from it when it is there.
#   bash benchmarks/gpu_wheels.sh [python-version, default 3.12]
# Environment: GPU_WHEELS_DEST (default .gpu; gpu_check.sh --dry-run prepares its own for this machine's Python).
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${1:-3.12}
PY=${PYTHON:-python3}
DEST=${GPU_WHEELS_DEST:-.gpu}
rm -rf "$DEST" && mkdir -p "$DEST/wheels" "$DEST/pylib"
platforms=()
for n in 2_28 2_27 2_24 2_17 2014 1; do
    case $n in 2014) platforms+=(--platform manylinux2014_x86_64) ;; 1) platforms+=(--platform manylinux1_x86_64) ;;
        *) platforms+=(--platform "manylinux_${n}_x86_64") ;; esac
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    "${platforms[@]}" -d "$DEST/wheels" \
    transformers==5.24.0 hydra-core==1.3.2 omegaconf==2.3.0 platformdirs==4.3.6 regex==2025.11.3
tmp=$(mktemp -d)
"$PY" -m pip download -q --no-deps --no-binary=:all: -d "$tmp" antlr4-python3-runtime==4.9.3
tar -xzf "$tmp"/antlr4-python3-runtime-4.9.3.tar.gz -C "$tmp"
cp -r "$tmp"/antlr4-python3-runtime-4.9.3/src/antlr4 "$DEST/pylib/"
rm -rf "$tmp"
du -sh "$DEST"
ls "$DEST/wheels"
