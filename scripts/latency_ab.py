"""Same-run A/B of the runtime's two exact latency measures, on one bundle and the same test records:

- `full`: every closed-label candidate teacher-forced to its end, every session's threads spinning (as before);
- `pruned`: candidates scored branch-and-bound (`runtime.ort.PRUNE_MARGIN`; the same answers);
- `pruned, quiet vision`: as shipped: also the vision and embedding graphs' threads stop after a run
  (`runtime.ort.SPINNING_GRAPHS`), so they do not compete with the decoder's prefill that follows.

Each variant opens its own runtime and answers every record once after a warm-up; answers are checked equal.

    .venv/bin/python scripts/latency_ab.py --bundle bundles/<tag>/release-w4lora-deploy --data data/amt \\
        --limit 10 --out docs/results/latency-ab.json        # ~3 min on 2 cores; run it alone
"""

from __future__ import annotations

import argparse
import math
import time
from datetime import date
from pathlib import Path

import emoverse.runtime.ort as ort
from emoverse.artifacts import atomic_write_json, cpu_name
from emoverse.bench.runner import percentiles
from emoverse.records import load_records, select_records

VARIANTS = {  # name: (PRUNE_MARGIN, SPINNING_GRAPHS)
    "full": (math.inf, ("decoder", "vision", "embed")),
    "pruned": (0.0, ("decoder", "vision", "embed")),
    "pruned, quiet vision": (0.0, ("decoder",)),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--limit", type=int, default=10, help="records per task and source (seeded, as the bench)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    records = select_records(load_records(Path(a.data), split="test"), tasks=["msa", "mer", "fer"], limit=a.limit)
    shipped = (ort.PRUNE_MARGIN, ort.SPINNING_GRAPHS)
    results, answers = {}, {}
    try:
        for name, (margin, spinning) in VARIANTS.items():
            ort.PRUNE_MARGIN, ort.SPINNING_GRAPHS = margin, spinning
            rt = ort.OrtRuntime(a.bundle, threads=a.threads)
            for r in records[:3]:  # warm-up
                rt.answer(r.task, r.query, r.images)
            lat: dict[str, list[float]] = {}
            for r in records:
                t0 = time.perf_counter()
                ans = rt.answer(r.task, r.query, r.images)
                lat.setdefault(r.task, []).append((time.perf_counter() - t0) * 1e3)
                answers.setdefault(r.id, set()).add(ans.text)
            results[name] = {task: percentiles(ms) for task, ms in lat.items()}
            del rt
    finally:
        ort.PRUNE_MARGIN, ort.SPINNING_GRAPHS = shipped
    differ = sorted(k for k, v in answers.items() if len(v) > 1)
    atomic_write_json(
        a.out,
        {
            "what": "closed-label latency of one bundle, three runtime settings in one run (same records, answers)",
            "bundle": a.bundle,
            "records": {t: sum(r.task == t for r in records) for t in ("msa", "mer", "fer")},
            "threads": a.threads,
            "cpu": cpu_name(),
            "date": date.today().isoformat(),
            "answers_differ": differ,
            "variants": results,
            "command": "scripts/latency_ab.py " + " ".join(f"--{k} {v}" for k, v in vars(a).items()),
        },
    )
    for name, tasks in results.items():
        print(f"{name:22s}", "  ".join(f"{t} p50 {v['p50_ms']:.1f} p90 {v['p90_ms']:.1f}" for t, v in tasks.items()))
    if differ:
        raise SystemExit(f"answers differ between settings on {len(differ)} records: {differ[:5]}")


if __name__ == "__main__":
    main()
