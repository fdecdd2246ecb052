"""Does the model's ECPE knowledge add to the conversation's layout? Cause decisions fused from the model's
posterior marginals (`CausePairTask.marginals` over its scored cause sets) and `pair-lr`'s layout probability,
judged by 5-fold cross-validation on the ECF DEV split, folds by conversation, each fold's threshold chosen on
its own training folds (test is never read).

    emoverse eval --model models/emoverse-nano --data data/amt --split dev --out runs/ecpe-head-dev \
        --mode score --batch-size 16 --precision bf16 --tasks ecpe --baselines heuristic pair-lr
    python scripts/ecpe_fusion_dev.py --predictions runs/ecpe-head-dev/predictions.jsonl --data data/amt \
        --out docs/results/ecpe-fusion-dev.json

Fusions (logistic regression over each (target, candidate) pair):
- stack: pair-lr's logit (fitted on train) + the model's marginal logit + in-window flag (3 weights + bias);
- stack-by-offset: the same with both logits per offset 0/1/2;
- model+offset: the model's logit with offset one-hots (no speaker/emotion layout);
- full: pair-lr's features and the model's, all refitted on the dev folds.
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
from sklearn.feature_extraction import DictVectorizer
from sklearn.linear_model import LogisticRegression

from emoverse.artifacts import atomic_write_json
from emoverse.baselines import PairLayoutModel, best_pair_threshold, featurise_pairs, pair_answers
from emoverse.records import load_records
from emoverse.stats import paired_ratio
from emoverse.tasks import TASKS

TASK = TASKS["ecpe"]


def pair_rows(featurised, scores):
    """Every candidate row of `featurise_pairs` output, in its order: (record index, pair, layout features, the
    model's marginal or None where the pair is outside its candidate sets, offset to the target)."""
    out = []
    for i, (r, (k, emo, rows)) in enumerate(featurised):
        cands = list(scores[r.id])
        m = TASK.marginals(cands, [scores[r.id][c] for c in cands])
        out += [(i, f"{k}_{emo},{c}", feats, m.get(f"{k}_{emo},{c}"), k - c) for c, feats in rows]
    return out


def pair_f1(records, preds):
    return TASK.metrics([r.response for r in records], [preds[r.id] for r in records], [None] * len(records))["pair_f1"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--predictions", required=True, help="a dev eval's predictions.jsonl (with candidate scores)")
    ap.add_argument("--data", default="data/amt")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    rows = [json.loads(x) for x in open(args.predictions, encoding="utf-8")]
    scores = {r["id"]: r["scores"] for r in rows if r["system"] == "emoverse/score" and "scores" in r}
    dev = [r for r in load_records(args.data, split="dev") if r.task == "ecpe"]
    missing = [r.id for r in dev if r.id not in scores]
    if missing:
        raise SystemExit(f"{args.predictions}: no candidate scores for {len(missing)} dev records ({missing[0]}, …)")
    train = [r for r in load_records(args.data, split="train") if r.task == "ecpe"]

    layout = PairLayoutModel(train)
    feat = featurise_pairs(dev)
    dv = pair_rows(feat, scores)
    golds = [set(TASK.parse(r.response).pairs) for r in dev]
    y = np.array([pair in golds[i] for i, pair, *_ in dv])
    p_lr = layout.proba(feat)
    lr_logit = np.log(p_lr) - np.log1p(-p_lr)
    in_win = np.array([float(m is not None) for *_, m, _ in dv])
    # marginals of exactly 0 or 1 would be infinite logits; 1e-4 bounds them at ±9.2
    model_logit = np.array([0.0 if m is None else math.log(m + 1e-4) - math.log(1 - m + 1e-4) for *_, m, _ in dv])
    offset = np.array([o for *_, o in dv])
    designs = {
        "stack": np.stack([lr_logit, model_logit, in_win], 1),
        "stack-by-offset": np.stack(
            [lr_logit, model_logit, in_win] + [x * (offset == o) for o in range(3) for x in (lr_logit, model_logit)],
            1,
        ),
        "model+offset": np.stack([model_logit, in_win] + [(offset == o).astype(float) for o in range(7)], 1),
    }
    conv = lambda rid: rid.rsplit("-", 1)[0]  # noqa: E731  (ids are <source>-<conversation>-<utterance>)
    convs = sorted({conv(r.id) for r in dev})
    np.random.default_rng(0).shuffle(convs)
    fold_of = {c: i % 5 for i, c in enumerate(convs)}
    record_fold = np.array([fold_of[conv(r.id)] for r in dev])
    fold = record_fold[[i for i, *_ in dv]]

    pair_lr_name = f"pair-lr (train fit, {layout.threshold:.2f})"
    preds = {
        "model (marginal >= 0.25)": {r.id: TASK.choose(list(scores[r.id]), list(scores[r.id].values())) for r in dev},
        pair_lr_name: pair_answers(feat, p_lr, layout.threshold),
    }
    chosen: dict[str, list[float]] = {}
    for name in [*designs, "full"]:
        out: dict[str, str] = {}
        chosen[name] = []
        for k in range(5):
            tr, te = np.where(fold != k)[0], np.where(fold == k)[0]
            if name == "full":
                feats = [
                    dict(dv[i][2], **({"model_logit": model_logit[i]} if in_win[i] else {})) for i in range(len(dv))
                ]
                v = DictVectorizer()
                clf = LogisticRegression(max_iter=3000).fit(v.fit_transform([feats[i] for i in tr]), y[tr])
                p_tr = clf.predict_proba(v.transform([feats[i] for i in tr]))[:, 1]
                p_te = clf.predict_proba(v.transform([feats[i] for i in te]))[:, 1]
            else:
                clf = LogisticRegression(max_iter=3000).fit(designs[name][tr], y[tr])
                p_tr, p_te = clf.predict_proba(designs[name][tr])[:, 1], clf.predict_proba(designs[name][te])[:, 1]
            # rows run record by record, so a fold's rows are its records' rows in order
            feat_tr = [x for x, f in zip(feat, record_fold, strict=True) if f != k]
            feat_te = [x for x, f in zip(feat, record_fold, strict=True) if f == k]
            t = best_pair_threshold(feat_tr, p_tr)
            chosen[name].append(t)
            out.update(pair_answers(feat_te, p_te, t))
        preds[f"fused: {name} (5-fold CV)"] = out

    base = preds[pair_lr_name]
    gold = [r.response for r in dev]
    report = {
        "split": "dev",
        "records": len(dev),
        "predictions": args.predictions,
        "method": __doc__.split("\n\n")[0].replace("\n", " "),
        "pair_f1": {name: round(pair_f1(dev, p), 4) for name, p in preds.items()},
        "difference_to_pair_lr": {
            name: paired_ratio(TASK, gold, [base[r.id] for r in dev], [p[r.id] for r in dev], [None] * len(dev))
            for name, p in preds.items()
            if p is not base
        },
        "thresholds_chosen": chosen,
    }
    atomic_write_json(args.out, report)
    print(json.dumps(report["pair_f1"], indent=1))
    print(json.dumps(report["difference_to_pair_lr"], indent=1))


if __name__ == "__main__":
    main()
