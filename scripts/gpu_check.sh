#!/usr/bin/env bash
# The prepared GPU check for a lent GPU machine (PyTorch + CUDA, no TensorRT, no registry access): run from the
# repository root there; writes $OUT/gpu_check.json. Never part of CI. The project is put on the path without
# installing it (the machine cannot reach the package registry); missing optional packages skip their check.
set -euo pipefail
OUT="${OUT:-.}"
mkdir -p "$OUT"
source scripts/gpu_path.sh
timeout 450 python scripts/gpu_check.py --out "$OUT/gpu_check.json" "$@"
