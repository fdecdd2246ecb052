"""Same-run A/B of a bundle exported with `--int8-prefill`, on the same test records (closed-label tasks):

- `4-bit prefill`: the bundle's INT8 prefill decoder unused (every call on the 4-bit decoder, as before);
- `int8 prefill, quiet`: calls of several tokens on the INT8 decoder, whose threads stop after a run;
- `int8 prefill, spinning`: the same, its threads spinning after a run (they then compete with the 4-bit
  decoder's decode steps that follow for the same cores).

Variants alternate over `--rounds` rounds (drift of the machine spreads over all of them); answers that differ
between the 4-bit and int8 prefill are counted (expected: int8 is not bit-exact), not failed.

    .venv/bin/python scripts/prefill_ab.py --bundle bundles/<tag>/release-w4lora-deploy-p8 --data data/amt \\
        --limit 10 --out docs/results/prefill-ab.json        # ~3 min on 2 cores; run it alone
"""

from __future__ import annotations

import argparse
import time
from datetime import date
from pathlib import Path

import emoverse.runtime.ort as ort
from emoverse.artifacts import atomic_write_json, cpu_name
from emoverse.bench.runner import percentiles
from emoverse.records import load_records, select_records

VARIANTS = {  # name: (use the INT8 prefill decoder, SPINNING_GRAPHS)
    "4-bit prefill": (False, ("decoder",)),
    "int8 prefill, quiet": (True, ("decoder",)),
    "int8 prefill, spinning": (True, ("decoder", "decoder_prefill")),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--limit", type=int, default=10, help="records per task and source (seeded, as the bench)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    records = select_records(load_records(Path(a.data), split="test"), tasks=["msa", "mer", "fer"], limit=a.limit)
    shipped = ort.SPINNING_GRAPHS
    lat: dict[str, dict[str, list[float]]] = {name: {} for name in VARIANTS}
    answers: dict[str, dict[str, str]] = {name: {} for name in VARIANTS}
    try:
        for _ in range(a.rounds):
            for name, (int8, spinning) in VARIANTS.items():
                ort.SPINNING_GRAPHS = spinning
                rt = ort.OrtRuntime(a.bundle, threads=a.threads)
                if rt.prefill_decoder is None:
                    raise SystemExit(f"{a.bundle}: no INT8 prefill decoder (export it with --int8-prefill)")
                if not int8:
                    rt.prefill_decoder = None
                for r in records[:3]:  # warm-up
                    rt.answer(r.task, r.query, r.images)
                for r in records:
                    t0 = time.perf_counter()
                    ans = rt.answer(r.task, r.query, r.images)
                    lat[name].setdefault(r.task, []).append((time.perf_counter() - t0) * 1e3)
                    answers[name][r.id] = ans.text
                del rt
    finally:
        ort.SPINNING_GRAPHS = shipped
    ref = answers["4-bit prefill"]
    results = {
        name: {
            "latency": {task: percentiles(ms) for task, ms in tasks.items()},
            "same_answer_as_4bit": sum(answers[name][k] == v for k, v in ref.items()) / len(ref),
        }
        for name, tasks in lat.items()
    }
    atomic_write_json(
        a.out,
        {
            "what": "closed-label latency of one bundle with and without its INT8 prefill decoder, one run",
            "bundle": a.bundle,
            "records": {t: sum(r.task == t for r in records) for t in ("msa", "mer", "fer")},
            "rounds": a.rounds,
            "threads": a.threads,
            "cpu": cpu_name(),
            "date": date.today().isoformat(),
            "variants": results,
            "command": "scripts/prefill_ab.py " + " ".join(f"--{k} {v}" for k, v in vars(a).items()),
        },
    )
    for name, v in results.items():
        print(
            f"{name:24s}",
            "  ".join(f"{t} p50 {s['p50_ms']:.1f} p90 {s['p90_ms']:.1f}" for t, s in v["latency"].items()),
            f"same as 4-bit {v['same_answer_as_4bit']:.1%}",
        )


if __name__ == "__main__":
    main()
