#!/usr/bin/env bash
# The compression study behind docs/results/compression.json: the release teacher, what compress/ makes from
# it, and the bundles export makes from those, each evaluated on the same full test splits (ECPE: the same
# seeded 200 per source as the teacher) and benched side by side. Resumable: a step whose output exists is
# skipped. About 2 hours on 2 CPU cores. Usage: scripts/compression_study.sh [STEP...] (default: all).
set -euo pipefail
cd "$(dirname "$0")/.."
E=.venv/bin/emoverse
M=${MODEL:-models/emoverse-nano}
D=${DATA:-data/amt}
R=${RUNS:-runs/compression}
B=${BUNDLES:-bundles}
EV="--data $D --mode score --batch-size 16"
mkdir -p "$R" "$B"

compress() {  # NAME RECIPE
  [ -f "$R/$1/manifest.json" ] || $E compress --recipe "$2" --model "$M" --data "$D" --out "$R/$1" --eval-limit 0
}
evaluate() {  # MODEL OUT [extra args]: closed tasks + ERI on full splits, ECPE on the teacher's seeded sample
  local model=$1 out=$2; shift 2
  [ -f "$out/closed/metrics.json" ] || $E eval --model "$model" $EV --tasks msa mer fer --out "$out/closed" "$@"
  [ -f "$out/eri/metrics.json" ] || $E eval --model "$model" $EV --tasks eri --out "$out/eri" "$@"
  [ -f "$out/ecpe/metrics.json" ] || $E eval --model "$model" $EV --tasks ecpe --limit 200 --out "$out/ecpe" "$@"
}

step_compress() {
  compress gptq-w4a16 gptq-w4a16
  compress int8-weight-only int8-weight-only
  compress modelopt-fp8 modelopt-fp8
}
step_export() {
  [ -f "$B/release-fp32/manifest.json" ] || $E export --model "$M" --target cpu --precision fp32 --out "$B/release-fp32"
  # the deployed CPU bundle: GPTQ's own 4-bit weights (MatMulNBits), 4-bit tied embedding / output
  # projection, static INT8 vision encoder calibrated on FER training faces
  [ -f "$B/release-w4-deploy/manifest.json" ] || $E export --model "$R/gptq-w4a16" --target cpu \
    --embedding-bits 4 --vision-int8 --calibration-data "$D" --out "$B/release-w4-deploy"
  [ -f "$B/release-w4/manifest.json" ] || $E export --model "$R/gptq-w4a16" --target cpu --out "$B/release-w4"
}
step_eval_deployed() {
  evaluate "$B/release-w4-deploy" "$R/eval/release-w4-deploy"
}
step_eval_artifacts() {  # the PyTorch compressed artifacts (bf16 autocast like the teacher's eval)
  evaluate "$R/gptq-w4a16" "$R/eval/gptq-w4a16" --precision bf16
  evaluate "$R/int8-weight-only" "$R/eval/int8-weight-only" --precision bf16
  evaluate "$R/modelopt-fp8" "$R/eval/modelopt-fp8"
}
step_bench() {  # latency side by side in one run: PyTorch FP32 teacher, FP32 bundle, GPTQ bundles
  [ -f "$R/bench/report.json" ] || $E bench --model "$M" --bundle "$B/release-fp32" --bundle "$B/release-w4" \
    --bundle "$B/release-w4-deploy" --data "$D" --target cpu --limit 20 --out "$R/bench" || [ $? -eq 1 ]
}

for step in "${@:-compress export eval_deployed bench eval_artifacts}"; do
  for s in $step; do "step_$s"; done
done
