#!/usr/bin/env bash
# INT8 prefill variants judged on the DEV split (never test): same closed answer as the FP32 teacher's bundle on
# MSA / MER / FER dev. Variants: the shipped form (SmoothQuant alpha 0.5, 16 calibration records per task), 64
# calibration records per task, and the first and last two layers kept on the 4-bit kernels (mixed precision).
# Needs compression_study.sh core_build core_p8_build first (same RUNS/BUNDLES layout). ~20 min on 2 cores.
# Output: docs/results/exp-int8-prefill-dev.json (+ .md).
set -euo pipefail
cd "$(dirname "$0")/.."
E=.venv/bin/emoverse
M=${MODEL:-models/emoverse-nano}
D=${DATA:-data/amt}
TAG=$(sha256sum "$M/manifest.json" | cut -c1-12)
R=${RUNS:-runs/compression/$TAG}
B=${BUNDLES:-bundles/$TAG}
X=$R/int8-prefill-dev
COMMON=(--target cpu --embedding-bits 8 --vision-int8-weights --int8-activations --int8-prefill --calibration-data "$D")
ends=""
for L in 0 1 28 29; do
  ends+=".layers.$L.self_attn.q_proj,.layers.$L.self_attn.o_proj,.layers.$L.mlp.gate_proj,.layers.$L.mlp.down_proj,"
done
[ -f "$B/p8-cal64/manifest.json" ] || $E export --model "$R/w4-base-lora" --out "$B/p8-cal64" "${COMMON[@]}" \
  --calibration-per-task 64
[ -f "$B/p8-keepends/manifest.json" ] || $E export --model "$R/w4-base-lora" --out "$B/p8-keepends" "${COMMON[@]}" \
  --int8-prefill-keep "${ends%,}"
for b in release-fp32 release-w4lora-deploy release-w4lora-deploy-p8 p8-cal64 p8-keepends; do
  [ -f "$X/$b/metrics.json" ] || $E eval --model "$B/$b" --data "$D" --split dev --mode score --batch-size 16 \
    --tasks msa mer fer --out "$X/$b"
done
$E compare "teacher, FP32 (its bundle)=$X/release-fp32/metrics.json" "deployed=$X/release-w4lora-deploy/metrics.json" \
  "INT8 prefill (shipped form)=$X/release-w4lora-deploy-p8/metrics.json" \
  "INT8 prefill, 64 calibration records per task=$X/p8-cal64/metrics.json" \
  "INT8 prefill, layers 0-1 and 28-29 on 4-bit=$X/p8-keepends/metrics.json" \
  --size-reference "$B/release-fp32" --out docs/results/exp-int8-prefill-dev.json
