"""Where a system's ECPE causes lie: per cause offset (target index minus cause index; 0 = the target itself),
the gold pairs, the predicted pairs and the hits, with precision and recall — whether a model decides causes
beyond position. On ECF dev the rule "target + previous" names the previous utterance in all 608 records that
have one (precision 42%); `pair-lr` in 377 (55%); a model that names it nearly always has learned the
position prior only.

    python scripts/ecpe_offsets.py [NAME=]RUN/predictions.jsonl [MORE ...] --data data/amt --split dev \
        --out docs/results/ecpe-offsets-dev.json
Every system found in the files is reported (eval writes one row per system and record); NAME= reports a
file's model answers (`emoverse/score`) as NAME, so two models' evals can stand side by side.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from emoverse.artifacts import atomic_write_json
from emoverse.compare import split_name
from emoverse.records import load_records
from emoverse.tasks import TASKS


def offsets(gold: dict[str, str], rows: list[dict]) -> dict[str, dict]:
    """system -> {"pair_f1", "records", "by_offset": {offset: {gold, predicted, hits, precision, recall}}}."""
    task = TASKS["ecpe"]
    pairs = lambda text: {(int(p.split("_")[0]), int(p.rsplit(",", 1)[1])) for p in task.parse(text).pairs}  # noqa: E731
    counts: dict[str, dict[int, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0, 0]))
    n: dict[str, int] = defaultdict(int)
    for row in rows:
        if row["task"] != "ecpe" or row["id"] not in gold:
            continue
        g, p = pairs(gold[row["id"]]), pairs(row["prediction"])
        by = counts[row["system"]]
        n[row["system"]] += 1
        for k, c in g:
            by[k - c][0] += 1
        for k, c in p:
            by[k - c][1] += 1
        for k, c in g & p:
            by[k - c][2] += 1
    out = {}
    for system, by in counts.items():
        g, p, h = (sum(v[i] for v in by.values()) for i in range(3))
        out[system] = {
            "records": n[system],
            "pair_f1": round(2 * h / (g + p), 4) if g + p else 0.0,
            "by_offset": {
                str(o): {
                    "gold": v[0],
                    "predicted": v[1],
                    "hits": v[2],
                    "precision": round(v[2] / v[1], 3) if v[1] else None,
                    "recall": round(v[2] / v[0], 3) if v[0] else None,
                }
                for o, v in sorted(by.items())
            },
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("predictions", nargs="+", help="[NAME=]predictions.jsonl files of `emoverse eval` on ECPE")
    ap.add_argument("--data", default="data/amt")
    ap.add_argument("--split", default="dev")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    path = Path(a.data) / "ecpe" / f"{a.split}.jsonl"
    gold = {r.id: r.response for r in load_records(path)}
    rows = []
    for spec in a.predictions:
        name, path_ = split_name(spec)  # `emoverse compare`'s NAME=path convention
        for line in open(path_, encoding="utf-8"):
            row = json.loads(line)
            if name and row["system"] == "emoverse/score":
                row["system"] = name
            rows.append(row)
    result = {"gold": str(path), "predictions": a.predictions, "systems": offsets(gold, rows)}
    atomic_write_json(Path(a.out), result)
    for system, r in result["systems"].items():
        o = r["by_offset"]
        print(
            f"{system:16s} F1 {r['pair_f1']:.3f}  offset 0 {o.get('0')}  offset 1 {o.get('1')}  offset 2 {o.get('2')}"
        )


if __name__ == "__main__":
    main()
