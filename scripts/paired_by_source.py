"""Paired per-source accuracy difference of two evals of one closed task on the same records (the ratio table of
`emoverse compare` pools the sources): B - A with a 95% paired percentile bootstrap over records, and the share of
identical answers. Written for the face-probe experiment (docs/history.md).

    python scripts/paired_by_source.py A/predictions.jsonl B/predictions.jsonl --task fer --out FILE.json
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--task", default="fer")
    ap.add_argument("--system", default="emoverse/score")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    def load(path: str) -> dict:
        rows = (json.loads(line) for line in open(path, encoding="utf-8"))
        return {r["id"]: r for r in rows if r["system"] == args.system and r["task"] == args.task}

    a, b = load(args.a), load(args.b)
    if set(a) != set(b):
        raise SystemExit(f"{args.a} and {args.b} answer different records")
    rng = np.random.default_rng(0)
    out = {"a": args.a, "b": args.b, "task": args.task, "resamples": 2000, "sources": {}}
    for src in sorted({r["source"] for r in a.values()}) + ["all"]:
        ids = [k for k in a if src == "all" or a[k]["source"] == src]
        ca = np.array([a[k]["parsed_label"] == a[k]["label"] for k in ids], float)
        cb = np.array([b[k]["parsed_label"] == b[k]["label"] for k in ids], float)
        d = cb - ca
        boot = d[rng.integers(0, len(d), (2000, len(d)))].mean(1)
        out["sources"][src] = {
            "n": len(ids),
            "accuracy_a": round(ca.mean(), 4),
            "accuracy_b": round(cb.mean(), 4),
            "difference": round(d.mean(), 4),
            "ci95": [round(x, 4) for x in np.percentile(boot, [2.5, 97.5])],
            "identical_answers": round(float(np.mean([a[k]["prediction"] == b[k]["prediction"] for k in ids])), 4),
        }
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out["sources"], indent=1))


if __name__ == "__main__":
    main()
