"""Where a bundle's INT8 prefill decoder (or, `--graph decoder`, its 4-bit decoder) spends its time, per operator
type (onnxruntime's own profiler).

Answers test requests of one task through the runtime with profiling on, then sums the kernel time of each
operator type per call of the chosen graph. On the Intel Xeon with AMX (2026-12-07) the
int8 GEMMs themselves (`MatMulIntegerToFloat`) were a quarter of it: the rest is ~3,000 small nodes per call
(per-token quantization, attention, shape arithmetic of the dynamic-shape export), the next latency lever.
Profiling adds overhead: read the shares, not the absolute times.

    .venv/bin/python scripts/prefill_profile.py --bundle bundles/<tag>/release-w4lora-deploy-p8f --data data/amt \\
        --task fer --limit 25 --out docs/results/prefill-profile.json     # ~1 min; run it alone
    .venv/bin/python scripts/prefill_profile.py --bundle … --graph decoder --task eri --limit 3 --out …  # decode steps
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
from collections import Counter, defaultdict
from datetime import date
from pathlib import Path

import emoverse.runtime.ort as ort
from emoverse.artifacts import atomic_write_json, cpu_name
from emoverse.records import load_records, select_records
from emoverse.runtime.backends import open_runtime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", type=Path, required=True, help="a CPU bundle (for decoder_prefill: --int8-prefill)")
    ap.add_argument("--graph", choices=("decoder_prefill", "decoder"), default="decoder_prefill")
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--task", default="fer")
    ap.add_argument("--limit", type=int, default=25, help="test records per source")
    ap.add_argument("--top", type=int, default=15, help="operator types listed")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    plain = ort.session_options
    folder, opened = Path(tempfile.mkdtemp()), itertools.count()

    def profiled(integer_gemms: bool = False):  # every session profiles (its own file); one is read
        opts = plain(integer_gemms)
        opts.enable_profiling, opts.profile_file_prefix = True, str(folder / f"graph{next(opened)}")
        return opts

    ort.session_options = profiled
    rt = open_runtime(args.bundle, "onnxruntime", threads=None)
    session = rt.prefill_decoder if args.graph == "decoder_prefill" else rt.decoder
    if session is None:
        raise SystemExit(f"{args.bundle} has no INT8 prefill decoder (export --int8-prefill)")
    records = select_records(load_records(args.data, split="test"), tasks=[args.task], limit=args.limit)
    for r in records:
        rt.answer(r.task, r.query, r.images)
    events = json.loads(Path(session.end_profiling()).read_text())

    micros, nodes, runs = defaultdict(float), Counter(), []
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            micros[e["args"]["op_name"]] += e["dur"]
            nodes[e["args"]["op_name"]] += 1
        elif e.get("cat") == "Session" and e["name"] == "model_run":
            runs.append(e["dur"] / 1e3)
    calls = len(runs)
    if not calls:  # e.g. a task the bundle keeps off its INT8 prefill decoder (runtime.json int8_prefill_tasks)
        raise SystemExit(f"no {args.graph} call answered {args.task} requests in {args.bundle}")
    total = sum(micros.values())
    ops = sorted(micros, key=micros.get, reverse=True)
    atomic_write_json(
        args.out,
        {
            "bundle": str(args.bundle),
            "graph": args.graph,
            "task": args.task,
            "requests": len(records),
            "calls": calls,
            "nodes_per_call": sum(nodes.values()) / calls,
            "kernel_ms_per_call (profiled)": total / calls / 1e3,
            "median_call_ms (profiled)": float(sorted(runs)[calls // 2]),  # decode: a one-token step
            "operators": [
                {
                    "op": op,
                    "share": round(micros[op] / total, 4),
                    "ms_per_call": round(micros[op] / calls / 1e3, 3),
                    "nodes_per_call": nodes[op] / calls,
                }
                for op in ops[: args.top]
            ],
            "cpu": cpu_name(),
            "date": date.today().isoformat(),
            "command": "python scripts/prefill_profile.py "
            + f"--bundle {args.bundle} --graph {args.graph} --data {args.data} --task {args.task} "
            + f"--limit {args.limit} --out {args.out}",
        },
    )
    for op in ops[: args.top]:
        print(f"{op:30s} {micros[op] / total:6.1%}  {nodes[op] / calls:5.0f} nodes/call")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
