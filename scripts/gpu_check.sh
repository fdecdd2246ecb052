#!/usr/bin/env bash
# The prepared GPU check for a lent GPU machine (PyTorch + CUDA, no TensorRT, no registry access): run from the
# repository root there; writes $OUT/gpu_check.json. Never part of CI. The project is put on the path without
# installing it (the machine cannot reach the package registry); missing optional packages skip their check.
set -euo pipefail
OUT="${OUT:-.}"
mkdir -p "$OUT"
export PYTHONPATH="$(pwd)/.gpu-path${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONSAFEPATH=1  # else the cwd comes first, whose emoverse/ lacks train/, runtime/, ...
# the package-dir mapping of pyproject (train/ -> emoverse.train, ...) as links, so `import emoverse.*` works
mkdir -p .gpu-path/emoverse
for f in emoverse/*.py; do ln -sf "$(pwd)/$f" .gpu-path/emoverse/; done
ln -sfn "$(pwd)/emoverse/sources" .gpu-path/emoverse/sources
for d in train compress export runtime bench; do ln -sfn "$(pwd)/$d" ".gpu-path/emoverse/$d"; done
timeout 450 python scripts/gpu_check.py --out "$OUT/gpu_check.json" "$@"
