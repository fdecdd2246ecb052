"""Paired comparison of two models' answers per task and per source (the ratio table of `emoverse compare`
pools sources and needs both sides to be one artifact's evals): new − reference of each task's primary metric,
with the paired bootstrap CI of `emoverse.stats.paired_ratio`, and the share of identical closed answers.
Each side is one or more predictions.jsonl files joined with '+' (e.g. a closed-task eval + an ECPE eval).

    python scripts/paired_by_source.py REF/predictions.jsonl[+REF2/...] NEW/predictions.jsonl[+...] \
        [--tasks fer msa] [--metric eri=rouge_l] --out FILE.json
"""

from __future__ import annotations

import argparse
import json

from emoverse.stats import paired_ratio
from emoverse.tasks import TASKS


def load(spec: str, system: str) -> dict[str, dict]:
    """Answers by record id; a generated-only task (ERI) is read from whichever system answered it."""
    out: dict[str, dict] = {}
    for path in spec.split("+"):
        for line in open(path, encoding="utf-8"):
            row = json.loads(line)
            if row["system"] == system or (row["system"].startswith("emoverse/") and not TASKS[row["task"]].closed):
                out.setdefault(row["id"], row)
    return out


def compare_by_source(
    ref: dict[str, dict], new: dict[str, dict], tasks: list[str] | None = None, metrics: dict[str, str] | None = None
) -> dict:
    """Rows '<task>/<source or all>' of paired_ratio on each task's primary metric (or metrics[task])."""
    out: dict = {}
    metrics = metrics or {}
    for name in sorted({r["task"] for r in new.values()}):
        if tasks and name not in tasks:
            continue
        ids = sorted(i for i, r in new.items() if r["task"] == name and i in ref)
        groups = {"all": ids}
        groups.update({s: [i for i in ids if new[i]["source"] == s] for s in sorted({new[i]["source"] for i in ids})})
        for group, gids in groups.items():
            if not gids or (group != "all" and len(groups) == 2):
                continue  # one source: its row is the task's
            stats = paired_ratio(
                TASKS[name],
                [ref[i]["response"] for i in gids],
                [ref[i]["prediction"] for i in gids],
                [new[i]["prediction"] for i in gids],
                [ref[i].get("label") for i in gids],
                metrics.get(name),
            )
            if TASKS[name].closed:
                same = sum(ref[i].get("parsed_label") == new[i].get("parsed_label") for i in gids)
                stats["identical_answers"] = round(same / len(gids), 4)
            out[f"{name}/{group}"] = stats
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
    rows = compare_by_source(load(args.reference, args.system), load(args.new, args.system), args.tasks, chosen)
    report = {
        "reference": args.reference,
        "new": args.new,
        "method": "paired percentile bootstrap over records, 1000 resamples, 95% (emoverse.stats.paired_ratio)",
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
