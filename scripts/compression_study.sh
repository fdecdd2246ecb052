#!/usr/bin/env bash
# The compression study behind docs/results/compression.json: the release teacher, what compress/ makes from
# it, and the bundles export makes FROM those artifacts, each evaluated on the same test records as the
# teacher's results (full splits; ECPE a seeded 200 per source, records the teacher's full-split ECPE eval
# contains, so the paired ratios pair them) and benched side by side in one run.
# Resumable: a step whose output exists is skipped. About 2.5 hours on 2 CPU cores.
# Needs the teacher's closed-task + ERI eval first (README "Results": runs/release-eval, or TEACHER_EVAL=DIR).
# Usage: scripts/compression_study.sh [STEP ...]   (default: compress export eval_deployed bench eval_artifacts more compare)
#        scripts/compression_study.sh core compare_core   (~25 min: the deployed bundle against the FP32 teacher's
#        bundle on the closed tasks; add core_open and bench_core before compare_core for ECPE/ERI and latency)
#        scripts/compression_study.sh core core_open core_p8 bench_core compare_bundles   (the three bundles on
#        every task with this machine's latencies, ~50 min on an AMD EPYC; COMPARE_OUT names the JSON)
#        scripts/compression_study.sh core core_open core_p8 bench_core ecpe_full compare_core   (the same, with
#        ECPE on its full split, ~2.5 h more: the README's command, BENCH_OUT / COMPARE_OUT naming the release's files)
set -euo pipefail
cd "$(dirname "$0")/.."
E=.venv/bin/emoverse
M=${MODEL:-models/emoverse-nano}
D=${DATA:-data/amt}
# Outputs are keyed by the model's manifest digest: a step is skipped only when its output was made from
# this very model (a new release must not reuse the bundles of the previous one).
TAG=$(sha256sum "$M/manifest.json" | cut -c1-12)
R=${RUNS:-runs/compression/$TAG}
B=${BUNDLES:-bundles/$TAG}
# the per-CPU steps (cpu_check, cpu_p8f, cpu_ecpe): CPU_TAG names their results files and their runs' folder
CPU_TAG=${CPU_TAG:-avx2}
CPU_RUNS=$R/cpu-$CPU_TAG
EV="--data $D --mode score --batch-size 16"
TEACHER_EVAL=${TEACHER_EVAL:-runs/release-eval}  # the teacher's closed-task + ERI eval (README "Results")
TEACHER_ECPE=${TEACHER_ECPE:-runs/release-eval-ecpe}  # the teacher's full-split ECPE eval (README "Results")
# bench_core's report, committed: BENCH_OUT.json / .md (a new release's bench must not overwrite the file an
# earlier release's compression report cites: BENCH_OUT=docs/results/bench-cpu-v4)
BENCH_OUT=${BENCH_OUT:-docs/results/bench-cpu}
# DIR[+DIR...]: several eval folders of the teacher, the first one holding a task's answers wins (a newer ERI
# eval before the full one: TEACHER_EVAL=runs/release-eval-eri+runs/release-eval)
teacher_metrics() { echo "${TEACHER_EVAL//+//metrics.json+}/metrics.json"; }
mkdir -p "$R" "$B"

compress() {  # NAME RECIPE
  [ -f "$R/$1/manifest.json" ] || $E compress --recipe "$2" --model "$M" --data "$D" --out "$R/$1" --eval-limit 0
}
eval_closed() {  # MODEL OUT [extra args]: MSA, MER, FER on their full splits
  local model=$1 out=$2; shift 2
  [ -f "$out/closed/metrics.json" ] || $E eval --model "$model" $EV --tasks msa mer fer --out "$out/closed" "$@"
}
eval_ecpe() {  # MODEL OUT [extra args]: ECPE on a seeded 200 per source (the full split is ~1 h per bundle)
  local model=$1 out=$2; shift 2
  [ -f "$out/ecpe/metrics.json" ] || $E eval --model "$model" $EV --tasks ecpe --limit 200 --out "$out/ecpe" "$@"
}
eval_eri() {  # MODEL OUT [extra args]: ERI on its full split
  local model=$1 out=$2; shift 2
  [ -f "$out/eri/metrics.json" ] || $E eval --model "$model" $EV --tasks eri --out "$out/eri" "$@"
}
evaluate() {  # MODEL OUT [extra args]: closed tasks + ERI on full splits, ECPE on its seeded sample
  local model=$1 out=$2; shift 2
  eval_closed "$model" "$out" "$@"
  eval_eri "$model" "$out" "$@"
  eval_ecpe "$model" "$out" "$@"
}
export_bundle() {  # NAME MODEL [export args]
  local name=$1 model=$2; shift 2
  [ -f "$B/$name/manifest.json" ] || $E export --model "$model" --target cpu --out "$B/$name" "$@"
}

export_reference() {  # the FP32 teacher's bundle: the reference every variant is judged against
  export_bundle release-fp32 "$M" --precision fp32
}
export_deployed() {  # the deployed bundle: the vision encoder's weights in INT8 with fp32 activations instead of
  # static INT8 (static INT8 moved 8% of CK+ answers; weight-only ~3%, and it is 0.3 MB smaller)
  export_bundle release-w4lora-deploy "$R/w4-base-lora" --embedding-bits 8 --vision-int8-weights --int8-activations
}
export_prefill8_form() {  # NAME [export args]: the deployed bundle + an INT8 prefill decoder (int8 GEMMs for calls of
  # several tokens, their weights built at load from the same 4-bit tensors; SmoothQuant on activation ranges of 16
  # train records per task), with what the args change
  local name=$1
  shift
  export_bundle "$name" "$R/w4-base-lora" --embedding-bits 8 --vision-int8-weights --int8-activations \
    --int8-prefill --calibration-data "$D" "$@"
}
export_prefill8() {  # the INT8 prefill form as shipped: every task's calls of several tokens on it
  export_prefill8_form release-w4lora-deploy-p8
}
export_keepdown() {  # the INT8 prefill form with down_proj on the 4-bit kernels (its input, after SwiGLU, has the
  # widest per-token range)
  export_prefill8_form p8-keepdown --int8-prefill-keep down_proj
}

step_compress() {
  compress gptq-w4a16 gptq-w4a16
  compress w4-base-lora w4-base-lora  # the base's own 4-bit grid + the adapter as int8 factors (no requantizing)
}
step_export() {
  export_reference
  # the deployed CPU bundle: GPTQ's own 4-bit weights (MatMulNBits), the tied embedding / output projection
  # stored once at 8 bits, static INT8 vision encoder calibrated on FER training faces
  export_bundle release-w4-deploy "$R/gptq-w4a16" --embedding-bits 8 --vision-int8 --calibration-data "$D"
  # the same with int8 activations in MatMulNBits (latency lever; not bit-exact)
  export_bundle release-w4-deploy-a8 "$R/gptq-w4a16" --embedding-bits 8 --vision-int8 --int8-activations \
    --calibration-data "$D"
  # the same bundle parts around the W4 base + LoRA artifact (MatMulNBits + a low-rank correction per layer)
  export_bundle release-w4lora "$R/w4-base-lora" --embedding-bits 8 --vision-int8 --calibration-data "$D"
  export_bundle release-w4lora-a8 "$R/w4-base-lora" --embedding-bits 8 --vision-int8 --int8-activations \
    --calibration-data "$D"
  export_deployed
}
step_eval_deployed() {
  local b
  for b in release-w4lora-deploy release-w4-deploy release-w4-deploy-a8 release-w4lora-a8; do evaluate "$B/$b" "$R/eval/$b"; done
  # fp32 activations, static INT8 vision: what the W4 base + LoRA representation itself costs. Closed tasks
  # only: its text answers are 100% those of the FP32 bundle there, and the text tasks never read the vision graph
  eval_closed "$B/release-w4lora" "$R/eval/release-w4lora"
}
step_bench() {  # latency side by side in one run: PyTorch FP32 teacher, FP32 bundle, deployed bundles
  [ -f "$R/bench/report.json" ] || $E bench --model "$M" --bundle "$B/release-fp32" --bundle "$B/release-w4-deploy-a8" \
    --bundle "$B/release-int8" --bundle "$B/release-w4lora" --bundle "$B/release-w4lora-a8" \
    --bundle "$B/release-w4lora-deploy" --data "$D" --target cpu --limit 10 --out "$R/bench" || [ $? -eq 1 ]
  cp "$R/bench/report.json" "$BENCH_OUT.json"
  cp "$R/bench/report.md" "$BENCH_OUT.md"
}
step_eval_artifacts() {  # the PyTorch GPTQ artifact itself (bf16 autocast, as the teacher's eval), closed tasks
  eval_closed "$R/gptq-w4a16" "$R/eval/gptq-w4a16" --precision bf16
}
step_more() {  # the other compress outputs, measured in PyTorch on the closed tasks (full splits)
  compress int8-weight-only int8-weight-only
  compress modelopt-fp8 modelopt-fp8
  compress fp8-dynamic fp8-dynamic
  # the FP32 teacher through its bundle (fp32 onnxruntime, logits within 1e-4 of PyTorch fp32): the reference
  # every variant is judged against (the teacher's own eval ran bf16 autocast, itself not bit-exact)
  evaluate "$B/release-fp32" "$R/eval/release-fp32"
  local v
  for v in int8-weight-only modelopt-fp8 fp8-dynamic; do
    eval_closed "$R/$v" "$R/eval/$v" --precision bf16
  done
  # the INT8 weight-only artifact as a CPU bundle (MatMulNBits bits=8 from its own bytes), closed tasks; the vision
  # encoder's weights in INT8 as in the deployed bundle (static INT8 vision: v4's face-label token is noise, and
  # export refuses it)
  export_bundle release-int8 "$R/int8-weight-only" --embedding-bits 8 --vision-int8-weights --int8-activations
  eval_closed "$B/release-int8" "$R/eval/release-int8"
}
step_core_build() {  # the deployed W4 base + LoRA bundle and the FP32 reference bundle (~5 min)
  compress w4-base-lora w4-base-lora
  export_reference
  export_deployed
}
step_core() {  # the same two evaluated on the closed tasks (~25 min with the build)
  step_core_build
  local b
  for b in release-fp32 release-w4lora-deploy; do eval_closed "$B/$b" "$R/eval/$b"; done
}
step_core_open() {  # the same two on the ECPE sample and ERI's full split (~25 min)
  local b
  for b in release-fp32 release-w4lora-deploy; do eval_ecpe "$B/$b" "$R/eval/$b" && eval_eri "$B/$b" "$R/eval/$b"; done
}
step_core_p8_build() {  # the deployed bundle with an INT8 prefill decoder (~3 min after core_build)
  export_prefill8
}
export_mixed() {  # NAME [export args]: per-task precision, the INT8 prefill decoder for MSA and FER requests only
  # (MIX_TASKS), MER, ERI and ECPE on the 4-bit decoder: FER's p90 misses 60 ms on the 4-bit decoder and MSA's sits
  # at it, while MER's INT8-prefill answers could not be shown >= 99% of the teacher (on v4's dev split the 4-bit
  # decoder agrees with it more on MER: 97.5 vs 96.4%, int8_prefill_dev2; docs/deployment.md)
  local name=$1
  shift
  export_prefill8_form "$name" --int8-prefill-tasks ${MIX_TASKS:-msa fer} "$@"
}
step_core_mix() {  # that bundle on the closed tasks, ERI and the ECPE sample (~35 min)
  export_mixed release-w4lora-deploy-mix
  evaluate "$B/release-w4lora-deploy-mix" "$R/eval/release-w4lora-deploy-mix"
}
core_margin() {  # NAME MARGIN: the per-task bundle answering a closed label by its first token when it leads by
  # MARGIN nats (one decoder call less where decided: MER's tail on the 4-bit decoder); closed tasks, ERI to show its
  # answers stay the mix's (the margin applies to closed-label tasks only; before the fifteenth session it also
  # decided ERI's closing word, and 0.1 moved 2 of 169), and the ECPE sample: ECPE never takes the margin (every
  # cause set is scored), so its answers are the deployed bundle's (whose full-split ECPE compare_core pairs)
  export_mixed "$1" --label-decision-margin "$2"
  eval_closed "$B/$1" "$R/eval/$1"
  eval_eri "$B/$1" "$R/eval/$1"
  eval_ecpe "$B/$1" "$R/eval/$1"
}
step_core_mixm() {  # the margin at 2 nats
  core_margin release-w4lora-deploy-mixm 2
}
step_core_mixf() {  # the margin at 0.1 nats: on the DEV split the answer's continuation ('.', end) cost at most 0.008
  # nats and the first-token leader was the exact answer in all 2,123 closed records (scripts/label_margin_dev.py ->
  # docs/results/label-margin-dev.json), so 0.1 decides 95-97% of requests without the continuation call (2 nats:
  # 35-69%)
  core_margin release-w4lora-deploy-mixf 0.1
}
step_core_keepdown() {  # the INT8 prefill decoder with down_proj on the 4-bit kernels (int8_prefill_dev2's best MER
  # dev agreement of the INT8 forms), for every task; closed tasks and ERI
  export_keepdown
  eval_closed "$B/p8-keepdown" "$R/eval/p8-keepdown"
  eval_eri "$B/p8-keepdown" "$R/eval/p8-keepdown"
}
step_bench_closed() {  # the closed tasks alone, 50 test records per task and source (p90 over 50-100 requests, not
  # 10-20), every CPU bundle built for this release, in one run (~8 min) -> BENCH_CLOSED_OUT.json / .md
  # (BENCH_CLOSED: the bundles to time, default every one built; the run's folder is named after BENCH_CLOSED_OUT,
  # so a second closed-task run of the same release gets its own)
  local bundles=(--bundle "$B/release-fp32") run
  run=$(closed_bench_run)
  built_bundles bundles ${BENCH_CLOSED:-release-w4lora-deploy release-w4lora-deploy-p8 release-w4lora-deploy-mix \
    release-w4lora-deploy-mixm release-w4lora-deploy-mixf p8-keepdown}
  [ -f "$run/report.json" ] || $E bench "${bundles[@]}" --data "$D" --target cpu --tasks msa mer fer \
    --limit 50 --out "$run" || [ $? -eq 1 ]
  cp "$run/report.json" "${BENCH_CLOSED_OUT:-docs/results/bench-cpu-closed-50}.json"
  cp "$run/report.md" "${BENCH_CLOSED_OUT:-docs/results/bench-cpu-closed-50}.md"
}
built_bundles() {  # ARRAY_NAME BUNDLE...: append "--bundle $B/BUNDLE" for each of them that was built
  local -n into=$1
  shift
  local b
  for b in "$@"; do
    [ -f "$B/$b/manifest.json" ] && into+=(--bundle "$B/$b")
  done
  return 0
}
closed_bench_run() { echo "$R/$(basename "${BENCH_CLOSED_OUT:-bench-closed-50}")"; }
step_core_p8m() {  # the INT8 prefill bundle answering a closed label by its first token when it leads by 2 nats
  # (--label-decision-margin: one decoder call less per request); closed tasks only, the only ones it changes
  export_prefill8_form release-w4lora-deploy-p8m --label-decision-margin 2
  eval_closed "$B/release-w4lora-deploy-p8m" "$R/eval/release-w4lora-deploy-p8m"
}
step_core_p8() {  # the same, on the closed tasks, the ECPE sample, ERI
  export_prefill8
  evaluate "$B/release-w4lora-deploy-p8" "$R/eval/release-w4lora-deploy-p8"
}
export_deployed_margin() {  # the deployed bundle (every call on the 4-bit decoder) with closed labels by a 0.1-nat lead
  export_bundle release-w4lora-deploy-f "$R/w4-base-lora" --embedding-bits 8 --vision-int8-weights --int8-activations \
    --label-decision-margin 0.1
}
export_mixf() {  # the shipped bundle: per-task INT8 prefill (MSA, FER), closed labels by a 0.1-nat lead
  export_mixed release-w4lora-deploy-mixf --label-decision-margin 0.1
}
step_cpu_check() {  # the shipped bundle (mixf) on THIS CPU, paired with the FP32 teacher's bundle on the same CPU:
  # quantized answers at near-ties move with a CPU's kernels, so a ratio measured on one CPU is not another's. Also
  # what onnxruntime's saturating u8s8 kernels did on an x86 CPU without VNNI (scripts/emoverse_saturating_int8.py;
  # on a CPU with VNNI both runs are equal), mixf's MER (its 4-bit decoder: deploy-f's answers) and the closed-task
  # latencies. CPU_TAG names the files (default avx2): docs/results/CPU_TAG-*.json, bench-cpu-v4-closed-50-CPU_TAG.
  # ~1.5 h on 2 cores (the AVX2-only AMD EPYC of the sixteenth session)
  local tag=$CPU_TAG out=$CPU_RUNS mixf=$B/release-w4lora-deploy-mixf
  local pair=(.venv/bin/python scripts/paired_by_source.py)
  export_reference
  export_mixf
  export_deployed_margin
  eval_closed "$B/release-fp32" "$out/fp32"
  [ -f "$out/mixf-exact/metrics.json" ] || $E eval --model "$mixf" $EV --tasks msa fer --out "$out/mixf-exact"
  # the saturating runs only where u8s8 kernels can saturate (x86 without VNNI / AMX-INT8): elsewhere the runtime
  # leaves the option off and both runs are one
  local saturating=${SATURATING:-$(.venv/bin/python -c \
    'from emoverse.runtime.ort import u8s8_gemms_saturate as s; print(int(s()))')}
  [ "$saturating" = 0 ] || [ -f "$out/mixf-saturating/metrics.json" ] || .venv/bin/python \
    scripts/emoverse_saturating_int8.py eval --model "$mixf" $EV --tasks msa fer --out "$out/mixf-saturating"
  [ -f "$out/deploy-f-mer/metrics.json" ] || $E eval --model "$B/release-w4lora-deploy-f" $EV --tasks mer \
    --out "$out/deploy-f-mer"
  local fp32=$out/fp32/closed/predictions.jsonl
  "${pair[@]}" "$fp32" "$out/mixf-exact/predictions.jsonl" --tasks msa fer --out "docs/results/$tag-mixf-exact-vs-fp32.json"
  if [ "$saturating" != 0 ]; then
    "${pair[@]}" "$fp32" "$out/mixf-saturating/predictions.jsonl" --tasks msa fer \
      --out "docs/results/$tag-mixf-saturating-vs-fp32.json"
    "${pair[@]}" "$out/mixf-exact/predictions.jsonl" "$out/mixf-saturating/predictions.jsonl" --tasks msa fer \
      --out "docs/results/$tag-mixf-saturating-vs-exact.json"
  fi
  "${pair[@]}" "$fp32" "$out/deploy-f-mer/predictions.jsonl" --tasks mer --out "docs/results/$tag-deploy-f-mer-vs-fp32.json"
  [ "$saturating" = 0 ] || [ -f "$out/bench-saturating/report.json" ] || .venv/bin/python \
    scripts/emoverse_saturating_int8.py bench --bundle "$B/release-fp32" --bundle "$mixf" --data "$D" --target cpu \
    --tasks msa mer fer --limit 50 --out "$out/bench-saturating" || [ $? -eq 1 ]
  BENCH_CLOSED="release-w4lora-deploy release-w4lora-deploy-f release-w4lora-deploy-mixf" \
    BENCH_CLOSED_OUT=docs/results/bench-cpu-v4-closed-50-$tag step_bench_closed
  # ERI decode (tokens/s) against the PyTorch FP32 teacher, 5 records per source
  [ -f "$out/bench-eri/report.json" ] || $E bench --model "$M" --bundle "$B/release-fp32" --bundle "$mixf" --data "$D" \
    --target cpu --tasks eri --limit 5 --out "$out/bench-eri" || [ $? -eq 1 ]
  cp "$out/bench-eri/report.json" "docs/results/bench-cpu-v4-eri-$tag.json"
  cp "$out/bench-eri/report.md" "docs/results/bench-cpu-v4-eri-$tag.md"
}
step_cpu_p8f() {  # where the INT8 prefill is the fast kernel for MER too (the Intel Xeon with AMX: mixf's MER, on the
  # 4-bit decoder, missed 60 ms there by 2x): the INT8 prefill for every task, closed labels by a 0.1-nat lead; its
  # MER on the full split paired with the FP32 teacher's bundle on this CPU (cpu_check's), and the closed tasks
  # benched beside mixf. CPU_TAG as cpu_check's (~20 min after it, whose FP32 eval it reuses; ~40 min alone)
  local tag=$CPU_TAG out=$CPU_RUNS
  export_reference
  export_mixf
  export_prefill8_form release-w4lora-deploy-p8f --label-decision-margin 0.1
  eval_closed "$B/release-fp32" "$out/fp32"
  [ -f "$out/p8f-mer/metrics.json" ] || $E eval --model "$B/release-w4lora-deploy-p8f" $EV --tasks mer --out "$out/p8f-mer"
  .venv/bin/python scripts/paired_by_source.py "$out/fp32/closed/predictions.jsonl" "$out/p8f-mer/predictions.jsonl" \
    --tasks mer --out "docs/results/$tag-p8f-mer-vs-fp32.json"
  BENCH_CLOSED="release-w4lora-deploy-mixf release-w4lora-deploy-p8f" \
    BENCH_CLOSED_OUT=docs/results/bench-cpu-v4-closed-50-$tag-p8f step_bench_closed
}
step_cpu_ecpe() {  # ECPE's seeded sample (200 per source, as eval_ecpe) of the FP32 teacher's bundle and mixf on THIS
  # CPU, paired (~15 min on the AMX Xeon): ECPE takes the 4-bit decoder in mixf, every cause set scored
  local tag=$CPU_TAG out=$CPU_RUNS
  export_reference
  export_mixf
  eval_ecpe "$B/release-fp32" "$out/fp32"
  eval_ecpe "$B/release-w4lora-deploy-mixf" "$out/mixf"
  .venv/bin/python scripts/paired_by_source.py "$out/fp32/ecpe/predictions.jsonl" "$out/mixf/ecpe/predictions.jsonl" \
    --tasks ecpe --out "docs/results/$tag-mixf-ecpe-sample-vs-fp32.json"
}
step_cpu_eri_closing() {  # ERI's closing scored from the decoding cache (export --closing-from-cache) against the
  # second prefill of prompt + text that mixf does: both on ERI's full split on THIS CPU, paired (label accuracy on
  # the 57 labelled records, ROUGE-L on all 169), and benched side by side (~45 min on 2 AVX2 cores)
  local tag=$CPU_TAG out=$CPU_RUNS b
  local pair=(.venv/bin/python scripts/paired_by_source.py)
  export_mixf
  export_mixed release-w4lora-deploy-mixf-cc --label-decision-margin 0.1 --closing-from-cache
  for b in release-w4lora-deploy-mixf release-w4lora-deploy-mixf-cc; do eval_eri "$B/$b" "$out/$b"; done
  local a=$out/release-w4lora-deploy-mixf/eri/predictions.jsonl c=$out/release-w4lora-deploy-mixf-cc/eri/predictions.jsonl
  "${pair[@]}" "$a" "$c" --tasks eri --out "docs/results/$tag-eri-closing-from-cache.json"
  "${pair[@]}" "$a" "$c" --tasks eri --metric eri=rouge_l --out "docs/results/$tag-eri-closing-from-cache-rouge.json"
  [ -f "$out/bench-eri-closing/report.json" ] || $E bench --bundle "$B/release-w4lora-deploy-mixf" \
    --bundle "$B/release-w4lora-deploy-mixf-cc" --data "$D" --target cpu --tasks eri --limit 5 \
    --out "$out/bench-eri-closing" || [ $? -eq 1 ]
  cp "$out/bench-eri-closing/report.json" "docs/results/bench-cpu-v4-eri-closing-$tag.json"
  cp "$out/bench-eri-closing/report.md" "docs/results/bench-cpu-v4-eri-closing-$tag.md"
}
step_bench_core() {  # latency of the two (three with core_p8), with the PyTorch FP32 teacher, in one run (~10 min)
  local p8=()
  built_bundles p8 release-w4lora-deploy-p8 release-w4lora-deploy-p8m release-w4lora-deploy-mix release-w4lora-deploy-mixm
  [ -f "$R/bench/report.json" ] || $E bench --model "$M" --bundle "$B/release-fp32" --bundle "$B/release-w4lora-deploy" \
    "${p8[@]}" --data "$D" --target cpu --limit "${BENCH_LIMIT:-10}" --out "$R/bench" || [ $? -eq 1 ]
  cp "$R/bench/report.json" "$BENCH_OUT.json"
  cp "$R/bench/report.md" "$BENCH_OUT.md"
}
step_ecpe_full() {  # ECPE on its FULL test split (~45 min per bundle on 2 cores; the seeded sample's answers are reused),
  # for each of ECPE_FULL (default: the FP32 teacher's bundle, the deployed one, its INT8-prefill form if built),
  # paired by source with the teacher's full-split ECPE eval (bf16 PyTorch, the README's)
  # -> docs/results/compression-ecpe-full-<bundle>.json (ECPE_FULL_OUT: the prefix); compare_core then uses them
  local b out default="release-fp32 release-w4lora-deploy"
  [ -f "$B/release-w4lora-deploy-p8/manifest.json" ] && default+=" release-w4lora-deploy-p8"
  for b in ${ECPE_FULL:-$default}; do
    out=$R/eval/$b/ecpe-full
    mkdir -p "$out"
    if [ ! -f "$out/metrics.json" ] && [ ! -f "$out/predictions.partial.jsonl" ] &&
      [ -f "$R/eval/$b/ecpe/predictions.jsonl" ]; then  # the sample's answers (core_open), where it ran
      cp "$R/eval/$b/ecpe/predictions.jsonl" "$out/predictions.partial.jsonl"
    fi
    [ -f "$out/metrics.json" ] || $E eval --model "$B/$b" $EV --tasks ecpe --out "$out"
    .venv/bin/python scripts/paired_by_source.py "$TEACHER_ECPE/predictions.jsonl" "$out/predictions.jsonl" \
      --tasks ecpe --out "${ECPE_FULL_OUT:-docs/results/compression-ecpe-full}-$b.json"
  done
}
measured_rows() {  # ARRAY_NAME: append the other compress outputs' rows where measured (eval_artifacts, more:
  # closed tasks, PyTorch, bf16 autocast) and the INT8 weight-only CPU bundle's
  local -n into=$1
  local v
  for v in gptq-w4a16 int8-weight-only modelopt-fp8 fp8-dynamic; do
    [ -f "$R/eval/$v/closed/metrics.json" ] && into+=("$v (PyTorch)=$R/eval/$v/closed/metrics.json")
  done
  [ -f "$R/eval/release-int8/closed/metrics.json" ] &&
    into+=("CPU bundle: INT8 weight-only, int8 act., INT8 vision weights=$R/eval/release-int8/closed/metrics.json")
  return 0
}
step_compare_core() {  # compression.json (or COMPARE_OUT) from the core rows (ECPE, ERI and latency where measured;
  # ECPE on its full split where ecpe_full has run for the FP32 bundle and the deployed one, else the seeded sample)
  local ev=$R/eval ecpe=ecpe
  [ -f "$ev/release-fp32/ecpe-full/metrics.json" ] && [ -f "$ev/release-w4lora-deploy/ecpe-full/metrics.json" ] &&
    ecpe=ecpe-full
  local f=$ev/release-fp32/closed/metrics.json d=$ev/release-w4lora-deploy/closed/metrics.json
  local T=$(teacher_metrics) more=()
  local open
  for open in $ecpe eri; do  # where measured (core_open)
    if [ -f "$ev/release-w4lora-deploy/$open/metrics.json" ]; then
      f+=+$ev/release-fp32/$open/metrics.json d+=+$ev/release-w4lora-deploy/$open/metrics.json
    fi
  done
  if [ $ecpe = ecpe-full ]; then T+=+$TEACHER_ECPE/metrics.json
  elif [ -f "$ev/release-w4lora-deploy/ecpe/metrics.json" ]; then T+=+$(teacher_ecpe_sample)
  fi
  # the closed-task bench over 50 records per task and source first (bench_closed), where it ran
  [ -f "$(closed_bench_run)/report.json" ] && more=(--bench "${BENCH_CLOSED_OUT:-docs/results/bench-cpu-closed-50}.json")
  [ -f "$R/bench/report.json" ] && more+=(--bench "$BENCH_OUT.json")
  local rows=() v x xe
  # the INT8-prefill forms where evaluated (core_p8, core_mix, core_mixm, core_keepdown): closed tasks + ERI, and
  # ECPE where it ran on the reference's records (else left out)
  for v in "same + INT8 prefill decoder=release-w4lora-deploy-p8" \
    "same + INT8 prefill for MSA, FER only (per task)=release-w4lora-deploy-mix" \
    "same, closed labels by a 2-nat first-token lead=release-w4lora-deploy-mixm" \
    "same, closed labels by a 0.1-nat first-token lead=release-w4lora-deploy-mixf" \
    "INT8 prefill decoder, down_proj on 4-bit (every task)=p8-keepdown"; do
    x=$ev/${v#*=} xe=""
    [ -f "$x/$ecpe/metrics.json" ] && xe=+$x/$ecpe/metrics.json
    [ -f "$x/eri/metrics.json" ] && rows+=("${v%%=*}=$x/closed/metrics.json$xe+$x/eri/metrics.json")
  done
  measured_rows rows
  $E compare "teacher, FP32 (its bundle)=$f" "teacher, bf16 autocast (PyTorch)=$T" \
    "CPU bundle: W4 base + LoRA, int8 act., INT8 vision weights (deployed)=$d" "${rows[@]}" \
    --size-reference "$B/release-fp32" "${more[@]}" --out "${COMPARE_OUT:-docs/results/compression.json}"
}
step_compare_bundles() {  # the FP32 teacher's bundle, the deployed bundle and its INT8-prefill form on every task,
  # with this machine's bench_core latencies: the bundles alone, for a machine where the PyTorch compress outputs
  # were not measured (compression.json keeps those rows) -> COMPARE_OUT (default docs/results/compression-bundles.json)
  local p=$R/eval/release-w4lora-deploy-p8 m=()
  [ -f "$R/eval/release-w4lora-deploy-p8m/closed/metrics.json" ] &&
    m=("same, labels decided by a 2-nat first-token lead=$R/eval/release-w4lora-deploy-p8m/closed/metrics.json")
  $E compare "teacher, FP32 (its bundle)=$(all_tasks "$R/eval/release-fp32")" \
    "CPU bundle: W4 base + LoRA, int8 act., INT8 vision weights (deployed)=$(all_tasks "$R/eval/release-w4lora-deploy")" \
    "same + INT8 prefill decoder=$(all_tasks "$p")" "${m[@]}" \
    --size-reference "$B/release-fp32" --bench "$BENCH_OUT.json" \
    --out "${COMPARE_OUT:-docs/results/compression-bundles.json}"
}
dev_compare() {  # OUT "NAME=BUNDLE"...: the FP32 teacher's bundle, the deployed one, its INT8-prefill form and these
  # bundles on the DEV closed splits (never test), compared with the first -> OUT
  local out=$1 x=$R/int8-prefill-dev b rows=()
  shift
  for b in release-fp32 release-w4lora-deploy release-w4lora-deploy-p8 "${@#*=}"; do
    [ -f "$x/$b/metrics.json" ] || $E eval --model "$B/$b" $EV --split dev --tasks msa mer fer --out "$x/$b"
  done
  for b in "$@"; do rows+=("${b%%=*}=$x/${b#*=}/metrics.json"); done
  $E compare "teacher, FP32 (its bundle)=$x/release-fp32/metrics.json" "deployed=$x/release-w4lora-deploy/metrics.json" \
    "INT8 prefill (shipped form)=$x/release-w4lora-deploy-p8/metrics.json" "${rows[@]}" \
    --size-reference "$B/release-fp32" --out "$out"
}
step_int8_prefill_dev() {  # INT8 prefill variants judged on the DEV split (never test): same closed answer as the
  # FP32 teacher's bundle on MSA / MER / FER dev. The shipped form (SmoothQuant alpha 0.5, 16 calibration records
  # per task), 64 records per task, and layers 0-1 / 28-29 kept on the 4-bit kernels (mixed precision). After
  # core_build and core_p8_build; ~20 min -> docs/results/exp-int8-prefill-dev.json
  local ends="" l
  for l in 0 1 28 29; do
    ends+=".layers.$l.self_attn.q_proj,.layers.$l.self_attn.o_proj,.layers.$l.mlp.gate_proj,.layers.$l.mlp.down_proj,"
  done
  export_prefill8_form p8-cal64 --calibration-per-task 64
  export_prefill8_form p8-keepends --int8-prefill-keep "${ends%,}"
  dev_compare docs/results/exp-int8-prefill-dev.json "INT8 prefill, 64 calibration records per task=p8-cal64" \
    "INT8 prefill, layers 0-1 and 28-29 on 4-bit=p8-keepends"
}
step_int8_prefill_dev2() {  # more INT8 prefill levers on the DEV split, for the release the script is run on: SmoothQuant
  # alpha 0.75 (more of each activation outlier moved into the weights) and down_proj kept on the 4-bit kernels
  # (export_keepdown), beside the shipped form, the deployed bundle and the FP32 teacher's bundle; ~15 min
  # -> docs/results/exp-int8-prefill-dev2-<release tag>.json
  export_prefill8_form p8-alpha75 --smoothing-alpha 0.75
  export_keepdown
  dev_compare "docs/results/exp-int8-prefill-dev2-$TAG.json" "INT8 prefill, SmoothQuant alpha 0.75=p8-alpha75" \
    "INT8 prefill, down_proj on 4-bit=p8-keepdown"
}
teacher_ecpe_sample() {  # the teacher's bf16 eval on the bundles' ECPE sample -> its metrics file
  # (the teacher's full-split eval answers those records alike; copying runs/release-eval-ecpe/predictions.jsonl
  # to the out folder's predictions.partial.jsonl first saves its ~7 min)
  eval_ecpe "$M" "$R/eval/teacher-bf16" --precision bf16 >&2
  echo "$R/eval/teacher-bf16/ecpe/metrics.json"
}
all_tasks() {  # EVAL_DIR -> its three metrics files joined, as compare reads them
  echo "$1/closed/metrics.json+$1/eri/metrics.json+$1/ecpe/metrics.json"
}
step_compare() {  # reference: the FP32 teacher (its bundle); the bf16 PyTorch teacher is a row like the others
  local T=$(teacher_metrics)+$(teacher_ecpe_sample)
  local more=()
  measured_rows more
  $E compare "teacher, FP32 (its bundle)=$(all_tasks "$R/eval/release-fp32")" "teacher, bf16 autocast (PyTorch)=$T" \
    "${more[@]}" \
    "CPU bundle: GPTQ w4 + int8 tied table + int8 vision=$(all_tasks "$R/eval/release-w4-deploy")" \
    "same, int8 activations=$(all_tasks "$R/eval/release-w4-deploy-a8")" \
    "CPU bundle: W4 base + LoRA + int8 tied table + int8 vision=$R/eval/release-w4lora/closed/metrics.json" \
    "same, int8 activations=$(all_tasks "$R/eval/release-w4lora-a8")" \
    "same, INT8 vision weights only (deployed)=$(all_tasks "$R/eval/release-w4lora-deploy")" \
    --size-reference "$B/release-fp32" --bench "$R/bench/report.json" --out docs/results/compression.json
}

for step in ${@:-compress export eval_deployed bench eval_artifacts more compare}; do "step_$step"; done
