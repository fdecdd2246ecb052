"""`emoverse compare`: what each compressed variant costs, task by task, against the FP32 reference.

Input: metrics.json files from `emoverse eval` on the same records (the first is the reference). Each
names its model artifact, whose size on disk and parameter count are read from the folder.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from emoverse.artifacts import atomic_write_json, atomic_write_text, folder_bytes, read_manifest

# the one metric per task the comparison (and MLPerf's 99% rule) is judged on
PRIMARY = {"msa": "msa.accuracy", "mer": "mer.weighted_f1", "fer": "fer.accuracy", "eri": "eri.label_accuracy",
           "ecpe": "ecpe.pair_f1"}
SYSTEM = "emoverse/score"


def parameter_count(artifact: Path) -> int:
    """Logical parameters (as the model computes with them; packed 4-bit weights counted unpacked), read
    from the safetensors headers, so it works for every format (compressed-tensors, GPTQ, ModelOpt FP8)
    without the libraries that run them."""
    from safetensors import safe_open

    # quantization metadata (scales, zero points, group indices) is not model capacity
    extra = re.compile(r"(_scale|_zero_point|_g_idx|weight_shape|\.qzeros|\.scales|\.g_idx)$")
    qcfg = json.loads((artifact / "llm" / "config.json").read_text()).get("quantization_config") or {}
    bits = qcfg.get("bits") or 0  # GPTQ
    for group in qcfg.get("config_groups", {}).values():  # compressed-tensors
        bits = (group.get("weights") or {}).get("num_bits") or bits
    total = 0
    for f in sorted(artifact.rglob("*.safetensors")):
        with safe_open(str(f), "np") as st:
            for name in st.keys():
                if extra.search(name):
                    continue
                numel = int(np.prod(st.get_slice(name).get_shape()))
                # compressed-tensors' `weight_packed` and GPTQ's `qweight` hold 32 // bits weights per int32
                packed = name.endswith(("weight_packed", ".qweight")) and bits
                total += numel * (32 // bits if packed else 1)
    return total


def compare(metrics_files: list[str | os.PathLike], out: str | os.PathLike | None = None, system: str = SYSTEM) -> dict:
    rows = []
    for f in metrics_files:
        m = json.loads(Path(f).read_text(encoding="utf-8"))
        spec = m["model"]["spec"]
        art = Path(spec)
        if not (art / "manifest.json").is_file():
            raise ValueError(f"{f}: its model {spec!r} is not an artifact folder on this machine")
        res = m["results"].get(system)
        if res is None:
            raise ValueError(f"{f}: no {system!r} results (have {sorted(m['results'])})")
        manifest = read_manifest(art)
        stages = manifest.get("producer", {}).get("stages")
        rows.append({"variant": art.name if not stages else "+".join(s["type"] for s in stages), "artifact": str(art),
                     "bytes": folder_bytes(art), "llm_bytes": folder_bytes(art / "llm"),
                     "parameters": parameter_count(art), "records": m["records"],
                     "metrics": {k: res[k] for k in PRIMARY.values() if k in res}})
    ref = rows[0]
    for r in rows[1:]:
        if r["records"] != ref["records"]:
            raise ValueError(f"{r['artifact']}: evaluated on different records than the reference; not comparable")
    for r in rows:
        r["size_ratio"] = ref["bytes"] / r["bytes"]
        r["llm_size_ratio"] = ref["llm_bytes"] / r["llm_bytes"]
        r["ratios"] = {k: (v / ref["metrics"][k] if ref["metrics"].get(k) else None) for k, v in r["metrics"].items()}
    report = {"reference": ref["artifact"], "system": system, "rows": rows}
    if out:
        out = Path(out)
        atomic_write_json(out / "compare.json", report)
        atomic_write_text(out / "compare.md", format_compare(report) + "\n")
    return report


def format_compare(report: dict) -> str:
    keys = list(PRIMARY.values())
    head = "| variant | size MB | × smaller (all / LLM) | params M | " + " | ".join(keys) + " |"
    lines = [head, "|---|---:|---:|---:|" + "---:|" * len(keys)]
    for r in report["rows"]:
        cells = []
        for k in keys:
            v, q = r["metrics"].get(k), r["ratios"].get(k)
            cells.append("–" if v is None else f"{v:.3f} ({q:.1%})" if q is not None else f"{v:.3f}")
        lines.append(f"| {r['variant']} | {r['bytes'] / 1e6:.1f} | {r['size_ratio']:.2f} / {r['llm_size_ratio']:.2f} | "
                     f"{r['parameters'] / 1e6:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
