"""How small can a bundle's `label_decision_margin` be before a closed answer moves? Measured on the DEV split.

A closed label is answered by its first token when that token leads every other label's first token by the
margin (nats); otherwise the leader is completed (one more decoder call, the closed tasks' latency tail). The
answer can move only when the leader's continuation ('.', end of answer) costs more than the margin. For each
dev record this script computes, on the same batches as `emoverse eval` (batch 16, sorted by length), the exact
answer (no margin) and the first-token lead from the same prefill, then reports per task and margin: the share
of requests decided by the first token and how many answers differ from exact scoring.

    python scripts/label_margin_dev.py --bundle bundles/<tag>/release-w4lora-deploy-mix --data data/amt \
        --out docs/results/label-margin-dev.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import numpy as np

from emoverse.artifacts import atomic_write_json
from emoverse.evaluate import Predictor, _chunks
from emoverse.records import load_records
from emoverse.runtime.backends import open_runtime
from emoverse.runtime.ort import _log_softmax
from emoverse.tasks import TASKS

MARGINS = (0.1, 0.25, 0.5, 1.0, 2.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--data", default="data/amt")
    ap.add_argument("--split", default="dev")
    ap.add_argument("--tasks", nargs="+", default=["msa", "mer", "fer"])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    rt = open_runtime(args.bundle, "auto")
    rt.label_margin = None  # exact scoring, whatever the bundle ships
    predictor = Predictor(rt)
    # the first-token logits are the exact scoring's own prefill, recorded on the way (no second prefill)
    prefilled: list[np.ndarray] = []
    exact_prefill = rt.prefill

    def recording_prefill(embs):
        out = exact_prefill(embs)
        prefilled.append(out[0])
        return out

    rt.prefill = recording_prefill
    records = [r for r in load_records(args.data, split=args.split) if r.task in args.tasks]
    stats: dict[str, list[tuple[float, bool]]] = defaultdict(list)  # task -> (lead, leader == exact answer)
    cost: dict[str, list[float]] = defaultdict(list)  # task -> what the answer's continuation cost (nats)
    for chunk in _chunks(records, "score", 16):
        task = TASKS[chunk[0].task]
        prefilled.clear()
        exact = predictor.many(chunk, "score")
        assert len(prefilled) == 1 and len(prefilled[0]) == len(chunk)  # one batch of one task: one prefill, in order
        first = _log_softmax(prefilled[0])
        for i, (r, answer) in enumerate(zip(chunk, exact, strict=True)):
            cands = task.candidates(r.query)
            bounds = [float(first[i, rt.tok.encode(c, add_special_tokens=False).ids[0]]) for c in cands]
            order = np.argsort(bounds)[::-1]
            lead = bounds[order[0]] - (bounds[order[1]] if len(cands) > 1 else -np.inf)
            stats[task.name].append((lead, cands[order[0]] == answer.text))
            cost[task.name].append(bounds[cands.index(answer.text)] - answer.scores[answer.text])
        print(f"{sum(map(len, stats.values()))}/{len(records)}", flush=True)
    report = {
        "bundle": args.bundle,
        "split": args.split,
        "method": __doc__.split("\n\n")[1].replace("\n", " "),
        "tasks": {},
    }
    for name, rows in stats.items():
        lead = np.array([x for x, _ in rows])
        same = np.array([s for _, s in rows])
        report["tasks"][name] = {
            "records": len(rows),
            "by_margin": {
                str(m): {
                    "decided_by_first_token": round(float((lead >= m).mean()), 4),
                    "answers_moved": int(((lead >= m) & ~same).sum()),
                }
                for m in MARGINS
            },
            "largest_lead_of_a_losing_leader": (float(lead[~same].max()) if (~same).any() else None),
            # a leader can lose only when its continuation costs more than the margin
            "answer_continuation_cost_nats": {
                "max": round(float(np.max(cost[name])), 5),
                "p99": round(float(np.percentile(cost[name], 99)), 5),
                "median": round(float(np.median(cost[name])), 5),
            },
        }
    atomic_write_json(args.out, report)
    print(json.dumps(report["tasks"], indent=1))


if __name__ == "__main__":
    main()
