"""Paired comparison of two models' answers per task and per source (the ratio table of `emoverse compare`
pools sources and needs both sides to be one artifact's evals): `emoverse.compare.paired_task_stats` by source
on prediction files — new − reference of each task's primary metric with its paired bootstrap CI, and the share of
identical closed answers.
Each side is one or more predictions.jsonl files joined with '+' (e.g. a closed-task eval + an ECPE eval).

    python scripts/paired_by_source.py REF/predictions.jsonl[+REF2/...] NEW/predictions.jsonl[+...] \
        [--tasks fer msa] [--metric eri=rouge_l] --out FILE.json
"""

from __future__ import annotations

import argparse
import json

from emoverse.compare import GENERATED_ONLY, paired_task_stats


def load(spec: str, system: str) -> dict[str, dict]:
    """Answers by record id; a generated-only task (ERI) is read from whichever system answered it."""
    out: dict[str, dict] = {}
    for path in spec.split("+"):
        for line in open(path, encoding="utf-8"):
            row = json.loads(line)
            if row["system"] == system or (row["system"].startswith("emoverse/") and row["task"] in GENERATED_ONLY):
                out.setdefault(row["id"], row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("reference")
    ap.add_argument("new")
    ap.add_argument("--tasks", nargs="*")
    ap.add_argument(
        "--metric", action="append", default=[], help="TASK=METRIC instead of the primary, e.g. eri=rouge_l"
    )
    ap.add_argument("--system", default="emoverse/score")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    chosen = dict(m.split("=", 1) for m in args.metric)
    ref, new = load(args.reference, args.system), load(args.new, args.system)
    if args.tasks:
        new = {i: r for i, r in new.items() if r["task"] in args.tasks}
    rows = paired_task_stats(ref, new, by_source=True, metrics=chosen)
    report = {
        "reference": args.reference,
        "new": args.new,
        "method": "paired percentile bootstrap over records, 1000 resamples, 95% (emoverse.compare.paired_task_stats)",
        "rows": rows,
    }
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    for key, st in rows.items():
        lo, hi = st["difference_ci"]
        print(
            f"{key:18s} n={st['n']:5d} {st['metric']:13s} {st['reference']:.3f} -> {st['new']:.3f} "
            f"({st['difference']:+.3f} [{lo:+.3f}, {hi:+.3f}])"
        )


if __name__ == "__main__":
    main()
