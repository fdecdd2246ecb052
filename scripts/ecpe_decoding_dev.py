"""How ECPE's set decoding was chosen (tasks.CausePairTask.window / threshold), on the dev split only.

Scores every candidate cause set of each ECF dev record with a model through the runtime API (the same
`candidates` and scoring as `emoverse eval --mode score`), then reports pair F1 of the marginal-threshold
decision at several thresholds beside the "target + previous" rule, the single most probable set, and how
well the marginals rank each position (AUC). Scores are cached in --scores, so a rerun only re-reads them.

    .venv/bin/python scripts/ecpe_decoding_dev.py --model models/emoverse-nano --data data/amt \
        --scores runs/ecpe-dev/scores-with-end.jsonl --out docs/results/ecpe-decoding-dev.json   # ~10 min on 2 cores
"""

from __future__ import annotations

import argparse
import copy
import json
from datetime import date
from pathlib import Path

import numpy as np

from emoverse.artifacts import cpu_name
from emoverse.tasks import TASKS

THRESHOLDS = (0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5)


def score_dev(model: str, data: str, path: Path, precision: str) -> None:
    import contextlib

    import torch

    from emoverse.evaluate import _chunks
    from emoverse.records import load_records
    from emoverse.runtime.backends import open_runtime

    ecpe = TASKS["ecpe"]
    done = {json.loads(line)["id"] for line in path.read_text().splitlines()} if path.is_file() else set()
    records = [r for r in load_records(Path(data) / "ecpe", split="dev") if r.id not in done]
    if not records:
        return
    rt = open_runtime(model, "auto")
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f, autocast:
        for chunk in _chunks(records, "score", 8):
            items = [(r.query, ecpe.candidates(r.query), list(r.images)) for r in chunk]
            for r, (_, cands, _), scores in zip(chunk, items, rt.score_batch(items, ecpe), strict=True):
                f.write(
                    json.dumps({"id": r.id, "query": r.query, "gold": r.response, "cands": cands, "scores": scores})
                )
                f.write("\n")
            f.flush()


def report(path: Path) -> dict:
    from sklearn.metrics import roc_auc_score

    ecpe = TASKS["ecpe"]
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    gold = [set(ecpe.parse(r["gold"]).pairs) for r in rows]

    def pair_f1(answers: list[str]) -> float:
        return float(ecpe.metrics([r["gold"] for r in rows], answers, [None] * len(rows))["pair_f1"])

    out = {
        "records": len(rows),
        "heuristic": pair_f1([ecpe.heuristic_answer(r["query"]) for r in rows]),
        "most_probable_set": pair_f1([r["cands"][int(np.argmax(r["scores"]))] for r in rows]),
        "threshold": {},
        "auc_by_offset": {},
    }
    for t in THRESHOLDS:
        task = copy.copy(ecpe)
        task.threshold = t
        out["threshold"][str(t)] = pair_f1([task.choose(r["cands"], r["scores"]) for r in rows])
    for offset in (0, -1, -2):
        y, s = [], []
        for r, g in zip(rows, gold, strict=True):
            k, emotion = ecpe.target(r["query"])
            if k + offset >= 1:
                pair = f"{k}_{emotion},{k + offset}"
                y.append(pair in g)
                s.append(ecpe.marginals(r["cands"], r["scores"]).get(pair, 0.0))
        out["auc_by_offset"][str(offset)] = float(roc_auc_score(y, s))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/emoverse-nano")
    ap.add_argument("--data", default="data/amt")
    ap.add_argument("--scores", type=Path, default=Path("runs/ecpe-dev/scores-with-end.jsonl"))
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    ap.add_argument("--out", type=Path, default=Path("docs/results/ecpe-decoding-dev.json"))
    a = ap.parse_args()
    score_dev(a.model, a.data, a.scores, a.precision)
    result = {
        "model": a.model,
        "split": "dev",
        "window": TASKS["ecpe"].window,
        "shipped_threshold": TASKS["ecpe"].threshold,
        "precision": a.precision,
        "created": date.today().isoformat(),
        "machine": {"cpu": cpu_name()},
        "command": "python scripts/ecpe_decoding_dev.py "
        + " ".join(f"--{k} {v}" for k, v in (("model", a.model), ("data", a.data), ("out", a.out))),
        **report(a.scores),
    }
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
