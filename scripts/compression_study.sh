#!/usr/bin/env bash
# The compression study behind docs/results/compression.json: the release teacher, what compress/ makes from
# it, and the bundles export makes FROM those artifacts, each evaluated on the same test records as the
# teacher's results (full splits; ECPE the same seeded 200 per source) and benched side by side in one run.
# Resumable: a step whose output exists is skipped. About 1.5 hours on 2 CPU cores.
# Needs the teacher's evals first (README "Results": runs/release-eval, runs/release-eval-eri, runs/release-eval-ecpe).
# Usage: scripts/compression_study.sh [STEP ...]   (default: compress export eval_deployed bench eval_artifacts more compare)
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
export_bundle() {  # NAME MODEL [export args]
  local name=$1 model=$2; shift 2
  [ -f "$B/$name/manifest.json" ] || $E export --model "$model" --target cpu --out "$B/$name" "$@"
}

step_compress() {
  compress gptq-w4a16 gptq-w4a16
}
step_export() {
  export_bundle release-fp32 "$M" --precision fp32
  # the deployed CPU bundle: GPTQ's own 4-bit weights (MatMulNBits), the tied embedding / output projection
  # stored once at 8 bits, static INT8 vision encoder calibrated on FER training faces
  export_bundle release-w4-deploy "$R/gptq-w4a16" --embedding-bits 8 --vision-int8 --calibration-data "$D"
  # the same with int8 activations in MatMulNBits (latency lever; not bit-exact)
  export_bundle release-w4-deploy-a8 "$R/gptq-w4a16" --embedding-bits 8 --vision-int8 --int8-activations \
    --calibration-data "$D"
}
step_eval_deployed() {
  evaluate "$B/release-w4-deploy" "$R/eval/release-w4-deploy"
  evaluate "$B/release-w4-deploy-a8" "$R/eval/release-w4-deploy-a8"
}
step_bench() {  # latency side by side in one run: PyTorch FP32 teacher, FP32 bundle, deployed bundles
  [ -f "$R/bench/report.json" ] || $E bench --model "$M" --bundle "$B/release-fp32" --bundle "$B/release-w4-deploy" \
    --bundle "$B/release-w4-deploy-a8" --data "$D" --target cpu --limit 10 --out "$R/bench" || [ $? -eq 1 ]
  cp "$R/bench/report.json" docs/results/bench-cpu.json
  cp "$R/bench/report.md" docs/results/bench-cpu.md
}
step_eval_artifacts() {  # the PyTorch GPTQ artifact itself (bf16 autocast, as the teacher's eval), closed tasks
  local out=$R/eval/gptq-w4a16
  [ -f "$out/closed/metrics.json" ] || $E eval --model "$R/gptq-w4a16" $EV --tasks msa mer fer --precision bf16 \
    --out "$out/closed"
}
step_more() {  # the other compress outputs, measured in PyTorch on the closed tasks (full splits)
  compress int8-weight-only int8-weight-only
  compress modelopt-fp8 modelopt-fp8
  # the FP32 teacher's bundle (fp32 onnxruntime numerics: the teacher's own eval ran bf16 autocast)
  [ -f "$R/eval/release-fp32/closed/metrics.json" ] || $E eval --model "$B/release-fp32" $EV --tasks msa mer fer \
    --out "$R/eval/release-fp32/closed"
  local v
  for v in int8-weight-only modelopt-fp8; do
    [ -f "$R/eval/$v/closed/metrics.json" ] || $E eval --model "$R/$v" $EV --tasks msa mer fer --precision bf16 \
      --out "$R/eval/$v/closed"
  done
}
step_compare() {
  local T=runs/release-eval-eri/metrics.json+runs/release-eval/metrics.json+runs/release-eval-ecpe/metrics.json
  local W=$R/eval/release-w4-deploy A=$R/eval/release-w4-deploy-a8
  local more=() v
  [ -f "$R/eval/release-fp32/closed/metrics.json" ] && more+=("FP32 bundle=$R/eval/release-fp32/closed/metrics.json")
  for v in int8-weight-only modelopt-fp8; do
    [ -f "$R/eval/$v/closed/metrics.json" ] && more+=("$v (PyTorch)=$R/eval/$v/closed/metrics.json")
  done
  $E compare "teacher=$T" \
    "gptq-w4a16 (PyTorch)=$R/eval/gptq-w4a16/closed/metrics.json" "${more[@]}" \
    "CPU bundle: GPTQ w4 + int8 tied table + int8 vision=$W/closed/metrics.json+$W/eri/metrics.json+$W/ecpe/metrics.json" \
    "same, int8 activations (deployed)=$A/closed/metrics.json+$A/eri/metrics.json+$A/ecpe/metrics.json" \
    --size-reference "$B/release-fp32" --bench "$R/bench/report.json" --out docs/results/compression.json
}

for step in ${@:-compress export eval_deployed bench eval_artifacts more compare}; do "step_$step"; done
