"""Same-run A/B of one decoder graph in two bundles (e.g. a bundle exported before and after a change to the
export's graph form): are the outputs bit-identical, and how long does a call take in each?

Both graphs get the same random inputs (`export.onnx_export.random_decoder_inputs`, what the export's fold check
feeds: one request, a decode step or a prefill call of NEW tokens over CACHED positions), sessions opened by the
runtime itself (`open_runtime`); the two alternate over `--rounds` rounds of `--calls` calls each (drift of the
machine spreads over both), medians reported. Bit-identical outputs are what a graph change that only touches
shapes must keep; any other change shows here as a max |difference|.

    .venv/bin/python scripts/graph_ab.py --a bundles/<tag>/release-w4lora-deploy-mixf \\
        --b bundles/new/release-w4lora-deploy-mixf --graph decoder --shapes 1x60 1x300 \\
        --out docs/results/graph-ab.json          # ~1 min on 2 cores; run it alone
"""

from __future__ import annotations

import argparse
import time
from datetime import date
from pathlib import Path

import numpy as np

from emoverse.artifacts import atomic_write_json, cpu_name
from emoverse.export.onnx_export import random_decoder_inputs
from emoverse.runtime.backends import open_runtime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--a", type=Path, required=True, help="a bundle folder")
    ap.add_argument("--b", type=Path, required=True, help="another bundle folder with the same graph")
    ap.add_argument("--graph", choices=("decoder", "decoder_prefill"), default="decoder")
    ap.add_argument("--shapes", nargs="+", default=["1x60", "1x300"], help="NEWxCACHED tokens per call")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--calls", type=int, default=10, help="calls per round")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    sessions = {}
    for name, folder in (("a", args.a), ("b", args.b)):
        runtime = open_runtime(folder)  # the sessions as the runtime opens them (options, load-time tensors)
        sessions[name] = runtime.prefill_decoder if args.graph == "decoder_prefill" else runtime.decoder
        if sessions[name] is None:
            raise SystemExit(f"{folder}: no {args.graph} graph")
    rows = []
    rng = np.random.default_rng(0)
    for shape in args.shapes:
        new, cached = (int(x) for x in shape.split("x"))
        x = random_decoder_inputs(sessions["a"], 1, new, cached, rng)
        outs = {k: s.run(None, x) for k, s in sessions.items()}
        diff = max(float(np.abs(p - q).max()) for p, q in zip(outs["a"], outs["b"], strict=True))
        identical = all(np.array_equal(p, q) for p, q in zip(outs["a"], outs["b"], strict=True))
        times: dict[str, list[float]] = {"a": [], "b": []}
        for _ in range(args.rounds):
            for k, s in sessions.items():
                start = time.perf_counter()
                for _ in range(args.calls):
                    s.run(None, x)
                times[k].append((time.perf_counter() - start) / args.calls * 1e3)
        a_ms, b_ms = float(np.median(times["a"])), float(np.median(times["b"]))
        rows.append(
            {
                "new_tokens": new,
                "cached_tokens": cached,
                "bit_identical": identical,
                "max_abs_diff": diff,
                "a_ms_median": round(a_ms, 3),
                "b_ms_median": round(b_ms, 3),
                "b_over_a": round(b_ms / a_ms, 4),
            }
        )
        print(
            f"{new} new over {cached} cached: identical {identical}, a {a_ms:.2f} ms, b {b_ms:.2f} ms, "
            f"b/a {b_ms / a_ms:.3f}"
        )
    atomic_write_json(
        args.out,
        {
            "what": f"{args.graph} of {args.a} (a) and {args.b} (b), same inputs, alternating rounds",
            "cpu": cpu_name(),
            "date": date.today().isoformat(),
            "rounds": args.rounds,
            "calls_per_round": args.calls,
            "rows": rows,
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
