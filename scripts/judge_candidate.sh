#!/usr/bin/env bash
# A candidate model judged against the release before it may replace it: both as FP32 bundles (one code path,
# the one compression is measured against), paired on the DEV splits of MSA / MER / FER / ECPE (never test)
# and on ERI's test split (ERI has no dev split; 169 records, generated), by source with paired bootstrap CIs.
#   scripts/judge_candidate.sh CANDIDATE_MODEL NAME      e.g. runs/v5-mer/model v5-mer
# Writes runs/judge/NAME/{closed,ecpe,eri}/ and docs/results/judge-NAME.json (+ -rouge.json for ERI ROUGE-L,
# -ecpe-offsets.json for where each side's ECPE causes lie: scripts/ecpe_offsets.py).
# The release's side is computed once per release (runs/judge/release-<its manifest digest>/, so a new release
# is never judged against by its predecessor's answers) and reused. Resumable: finished parts are skipped.
# ~25 min on 2 CPU cores per model (ECPE dev: 668 prompts of ~500 tokens, ~10 min).
# CLOSED_TEST=1 adds the closed tasks' test splits (FER2013, never trained on, is only there; ~6 min a model)
# → docs/results/judge-NAME-test-closed.json. Judge on dev first; the test splits are for the record.
set -euo pipefail
cd "$(dirname "$0")/.."
CAND=${1:?candidate model folder}
NAME=${2:?a short name}
E=.venv/bin/emoverse
PY=.venv/bin/python
D=${DATA:-data/amt}
RELEASE=${RELEASE:-models/emoverse-nano}
EV="--data $D --mode score --batch-size 16"
J=runs/judge
REL=release-$(sha256sum "$RELEASE/manifest.json" | cut -c1-12)

side() {  # MODEL NAME: FP32 bundle + its dev closed, dev ECPE and test ERI evals
  local model=$1 name=$2 b=bundles/judge/$2
  [ -f "$b/manifest.json" ] || $E export --model "$model" --target cpu --precision fp32 --out "$b"
  [ -f "$J/$name/closed/metrics.json" ] || $E eval --model "$b" $EV --split dev --tasks msa mer fer --out "$J/$name/closed"
  [ -f "$J/$name/ecpe/metrics.json" ] || $E eval --model "$b" $EV --split dev --tasks ecpe --out "$J/$name/ecpe"
  [ -f "$J/$name/eri/metrics.json" ] || $E eval --model "$b" $EV --tasks eri --out "$J/$name/eri"
}
side_test() {  # NAME: its bundle's closed test splits
  [ -f "$J/$1/closed-test/metrics.json" ] || $E eval --model "bundles/judge/$1" $EV --tasks msa mer fer --out "$J/$1/closed-test"
}
preds() { echo "$J/$1/closed/predictions.jsonl+$J/$1/ecpe/predictions.jsonl+$J/$1/eri/predictions.jsonl"; }

side "$RELEASE" "$REL"
side "$CAND" "$NAME"
$PY scripts/paired_by_source.py "$(preds "$REL")" "$(preds "$NAME")" --out "docs/results/judge-$NAME.json"
$PY scripts/paired_by_source.py "$(preds "$REL")" "$(preds "$NAME")" --tasks eri --metric eri=rouge_l \
  --out "docs/results/judge-$NAME-rouge.json"
# where each side's ECPE causes lie (does the candidate decide beyond position?)
$PY scripts/ecpe_offsets.py "release=$J/$REL/ecpe/predictions.jsonl" "$NAME=$J/$NAME/ecpe/predictions.jsonl" \
  --data "$D" --split dev --out "docs/results/judge-$NAME-ecpe-offsets.json"
if [ "${CLOSED_TEST:-0}" = 1 ]; then
  side_test "$REL"
  side_test "$NAME"
  $PY scripts/paired_by_source.py "$J/$REL/closed-test/predictions.jsonl" "$J/$NAME/closed-test/predictions.jsonl" \
    --out "docs/results/judge-$NAME-test-closed.json"
fi
