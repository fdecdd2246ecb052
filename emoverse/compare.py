"""`emoverse compare`: what each compressed variant costs, task by task, against the FP32 reference.

Input: metrics.json files from `emoverse eval` on the same records (the first is the reference). Each
names its model artifact or bundle, whose size on disk and parameter count are read from the folder. It
reads what every layer makes (model artifacts, bundles), so it lives in the app layer.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from emoverse.artifacts import atomic_write_json, atomic_write_text, folder_bytes, read_manifest
from emoverse.llm_files import quantization_config
from emoverse.model import EmoVerse
from emoverse.runtime.ort import decoder_weight_bytes
from emoverse.stats import paired_ratio, verdict
from emoverse.tasks import TASKS

# the one metric per task the comparison (and MLPerf's 99% rule) is judged on
PRIMARY = {name: f"{name}.{task.primary}" for name, task in TASKS.items()}  # defined by each task
SYSTEM = "emoverse/score"


def parameter_count(artifact: Path) -> int:
    """Logical parameters (as the model computes with them; packed 4-bit weights counted unpacked), read
    from the safetensors headers, so it works for every format (compressed-tensors, GPTQ, ModelOpt FP8)
    without the libraries that run them."""
    from safetensors import safe_open

    # quantization metadata (scales, zero points, group indices) is not model capacity
    extra = re.compile(r"(_scale|_zero_point|_g_idx|weight_shape|\.qzeros|\.scales|\.g_idx|\.d|\.m)$")
    qcfg = quantization_config(artifact / "llm")
    bits = qcfg.get("bits") or 0  # GPTQ
    for group in qcfg.get("config_groups", {}).values():  # compressed-tensors
        bits = (group.get("weights") or {}).get("num_bits") or bits
    total = 0
    for f in sorted((artifact / "llm").rglob("*.safetensors")):  # the LLM's, as a bundle reports them
        with safe_open(str(f), "np") as st:
            for name in st.keys():
                if extra.search(name):
                    continue
                numel = int(np.prod(st.get_slice(name).get_shape()))
                # compressed-tensors' `weight_packed` and GPTQ's `qweight` hold 32 // bits weights per int32
                packed = name.endswith(("weight_packed", ".qweight")) and bits
                nibbles = name.endswith(".q4")  # W4 base + LoRA: two 4-bit weights per byte
                total += numel * (32 // bits if packed else 2 if nibbles else 1)
    return total


GENERATED_ONLY = ("eri",)  # answered by generation in both eval modes (ECPE is scored in score mode)
ACCURACY_BUDGET = 0.99  # the deploy issue's "at least 99% of the teacher", judged on the paired CI


def split_name(spec: str | os.PathLike) -> tuple[str | None, str]:
    """`name=a.json+b.json` -> ("name", "a.json+b.json"); a spec without a name -> (None, spec)."""
    text = str(spec)
    name, sep, rest = text.partition("=")
    return (name, rest) if sep and not Path(text).exists() else (None, text)


def _manifest(artifact: Path) -> bytes:
    return (artifact / "manifest.json").read_bytes()


def _load_variant(spec: str | os.PathLike, system: str) -> tuple[Path, dict, dict, dict, dict, str | None]:
    """One variant's (artifact or bundle, records, results, predictions by id) from `a.json` or `a.json+b.json`
    (e.g. a closed-label score eval plus an ERI or ECPE eval of the same model), the CIs, and the precision
    its first file was evaluated in."""
    art, records, res, preds, cis, precision = None, {}, {}, {}, {}, None
    for f in str(spec).split("+"):
        m = json.loads(Path(f).read_text(encoding="utf-8"))
        if art is None:
            precision = m.get("precision")
        this = Path(m["model"]["spec"])
        if not (this / "manifest.json").is_file():
            raise ValueError(f"{f}: its model {str(this)!r} is not an artifact folder on this machine")
        # one artifact: the same folder, or a copy of it (its manifest lists every file's sha256)
        if art is not None and this.resolve() != art.resolve() and _manifest(this) != _manifest(art):
            raise ValueError(f"{spec}: files evaluate different artifacts ({art} and {this})")
        art = this
        got = dict(m["results"].get(system) or {})
        gen = m["results"].get("emoverse/generate") or {}
        for k, v in gen.items():  # ERI is generated in either mode
            if k.split(".")[0].split("/")[0] in GENERATED_ONLY:
                got.setdefault(k, v)
        if not got:
            raise ValueError(f"{f}: no {system!r} results (have {sorted(m['results'])})")
        res.update({k: v for k, v in got.items() if k not in res})
        for k, v in (m.get("ci") or {}).get(system, {}).items():
            cis.setdefault(k, v)
        records.update(m["records"])
        pred_file = Path(f).parent / "predictions.jsonl"
        if pred_file.is_file():
            for line in pred_file.read_text(encoding="utf-8").splitlines():
                row = json.loads(line)
                gen_task = row["task"] in GENERATED_ONLY and row["system"] == "emoverse/generate"
                if row["system"] == system or gen_task:
                    preds.setdefault(row["id"], row)
    return art, records, res, preds, cis, precision


def variant_name(art: Path) -> str:
    """The chain of compression stages that made an artifact, parents first (distill+gptq_w4a16), or the
    training run's name for an uncompressed model (runs/nano/model -> nano)."""
    stages: list[str] = []
    seen = set()
    while art is not None and art.resolve() not in seen:
        seen.add(art.resolve())
        m = read_manifest(art)
        mine = [s["type"] for s in m.get("producer", {}).get("stages") or []]
        if not mine:
            base = art.parent.name if art.name == "model" else art.name
            return "+".join(stages) if stages else base
        stages = mine + stages
        parent = (m.get("inputs", {}).get("parent") or {}).get("path")
        art = Path(parent) if parent and (Path(parent) / "manifest.json").is_file() else None
    return "+".join(stages)


def _folder_facts(art: Path) -> dict:
    """Size on disk, the LLM's share and its logical parameter count, for a model artifact or a bundle."""
    if read_manifest(art).get("kind") == "emoverse-bundle":
        cfg = json.loads((art / "runtime.json").read_text())
        llm = decoder_weight_bytes(art, cfg["graphs"])  # the bundle format is the runtime's
        return {"bytes": folder_bytes(art), "llm_bytes": llm, "parameters": cfg["llm_parameters"]}
    if not (art / "llm").is_dir():  # an adapter-form release: counted as it runs, in its full form
        art = EmoVerse.full_form(art)
    return {"bytes": folder_bytes(art), "llm_bytes": folder_bytes(art / "llm"), "parameters": parameter_count(art)}


def paired_task_stats(
    ref_preds: dict, preds: dict, *, by_source: bool = False, metrics: dict[str, str] | None = None
) -> dict:
    """Per task on the records both answered: the paired bootstrap ratio (and difference) of the primary
    metric (or `metrics[task]`) against the reference, its verdict against ACCURACY_BUDGET, and for closed
    tasks the share of identical answers. With by_source, also one '<task>/<source>' row per source of a task
    that has several."""
    out = {}
    for name, task in TASKS.items():
        ids = sorted(i for i, r in preds.items() if r["task"] == name and i in ref_preds)
        if not ids:
            continue
        groups = {name: ids}
        sources = sorted({preds[i]["source"] for i in ids}) if by_source else []
        if len(sources) > 1:
            groups.update({f"{name}/{s}": [i for i in ids if preds[i]["source"] == s] for s in sources})
        for key, gids in groups.items():
            gold = [ref_preds[i]["response"] for i in gids]
            labels = [ref_preds[i].get("label") for i in gids]
            ref = [ref_preds[i]["prediction"] for i in gids]
            new = [preds[i]["prediction"] for i in gids]
            stats = paired_ratio(task, gold, ref, new, labels, (metrics or {}).get(name))
            stats["verdict_99"] = verdict(stats["ratio_ci"], ACCURACY_BUDGET)
            if task.closed:
                same = [ref_preds[i].get("parsed_label") == preds[i].get("parsed_label") for i in gids]
                stats["identical_answers"] = round(sum(same) / len(same), 4)
            out[key] = stats
    return out


def _bench_rows(report_path: str | os.PathLike) -> tuple[dict[str, dict], dict]:
    """({resolved bundle/model path: bench result}, where the latencies come from: the report, its machine and
    how many test records per task and source it timed) from a bench report.json."""
    report = json.loads(Path(report_path).read_text())
    machine = report.get("machine", {})
    source = {
        "bench": str(report_path),
        "cpu": machine.get("cpu"),
        "cores": machine.get("cores"),
        "records_per_task": report.get("config", {}).get("limit"),
    }
    return {str(Path(r["path"]).resolve()): r for r in report["results"]}, source


def _bench_sources(
    reports: str | os.PathLike | list[str | os.PathLike] | None,
) -> tuple[dict[str, dict], dict | list[dict] | None]:
    """Bench results by resolved path, from several reports of one machine in order of precedence: a task's
    result comes from the first report that timed it (e.g. a closed-task run over more records, then a run of
    every task), and each source records the tasks it supplied. Reports from different CPUs are refused:
    latency is a fact of one machine."""
    paths = [] if not reports else [reports] if isinstance(reports, (str, os.PathLike)) else list(reports)
    if not paths:
        return {}, None
    loaded = [_bench_rows(p) for p in paths]
    if len(loaded) == 1:
        return loaded[0]
    cpus = {(src["cpu"], src["cores"]) for _, src in loaded}
    if len(cpus) > 1:
        raise ValueError(f"bench reports from different machines ({sorted(map(str, cpus))}): compare one at a time")
    merged: dict[str, dict] = {}
    seen: set[str] = set()
    for rows, src in loaded:
        for path, r in rows.items():
            tasks = merged.setdefault(path, {**r, "tasks": {}})["tasks"]
            for task, t in r["tasks"].items():
                tasks.setdefault(task, t)
        timed = {t for r in rows.values() for t in r["tasks"]}
        src["tasks"] = sorted(timed - seen)  # the tasks this report supplies: those no earlier one timed
        seen |= timed
    return merged, [src for _, src in loaded]


def compare(
    metrics_files: list[str | os.PathLike],
    out: str | os.PathLike | None = None,
    system: str = SYSTEM,
    *,
    size_reference: str | os.PathLike | None = None,
    bench_report: str | os.PathLike | list[str | os.PathLike] | None = None,
) -> dict:
    """One row per variant (`[name=]a.json[+b.json]`); ratios and paired CIs against the first. Variants may
    cover different tasks (a `–` where not evaluated), but every source they share with the reference must
    have the same records. `size_reference`: the folder sizes are divided into (e.g. the FP32 teacher's
    bundle); `bench_report`: a bench report.json whose latencies are joined to the variants by path (or several
    of one machine: a task's from the first that timed it)."""
    rows = []
    bench, latency_from = _bench_sources(bench_report)
    for f in metrics_files:
        name, spec = split_name(f)
        art, records, res, preds, cis, precision = _load_variant(spec, system)
        row = {
            "variant": name or variant_name(art),
            "artifact": str(art),
            **_folder_facts(art),
            "records": records,
            "metrics": {k: res[k] for k in PRIMARY.values() if k in res},
            "ci": {k: cis[k] for k in PRIMARY.values() if k in cis},
            "_preds": preds,
        }
        b = bench.get(str(art.resolve()))
        # the bench runs a PyTorch artifact in fp32: its latency is not that of a bf16-autocast eval's row
        if b and not (b.get("backend") == "torch" and precision not in (None, "fp32")):
            row["latency"] = {
                task: {
                    "p90_ms": t["single_stream"]["p90_ms"],
                    "decode_tokens_per_s": 1e3 / t["tpot"]["p50_ms"] if t.get("tpot") else None,
                }
                for task, t in b["tasks"].items()
            }
        rows.append(row)
    ref = rows[0]
    for r in rows[1:]:
        shared = set(r["records"]) & set(ref["records"])
        if not shared or any(r["records"][s] != ref["records"][s] for s in shared):
            raise ValueError(f"{r['artifact']}: evaluated on different records than the reference; not comparable")
    base_bytes = folder_bytes(Path(size_reference)) if size_reference else ref["bytes"]
    for r in rows:
        r["size_ratio"] = base_bytes / r["bytes"]
        r["llm_size_ratio"] = ref["llm_bytes"] / r["llm_bytes"]
        r["ratios"] = {k: (v / ref["metrics"][k] if ref["metrics"].get(k) else None) for k, v in r["metrics"].items()}
        r["paired"] = paired_task_stats(ref["_preds"], r["_preds"]) if r is not ref and ref["_preds"] else {}
    for r in rows:
        del r["_preds"]
    report = {
        "reference": ref["artifact"],
        "system": system,
        "size_reference": str(size_reference or ref["artifact"]),
        "size_reference_bytes": base_bytes,
        "accuracy_budget": ACCURACY_BUDGET,
        "rows": rows,
    }
    if latency_from:  # latencies are facts of one machine: the table says which
        report["latency_from"] = latency_from
    if out:
        out = Path(out)
        json_path, md_path = (
            (out, out.with_suffix(".md"))
            if out.suffix == ".json"
            else (
                out / "compare.json",
                out / "compare.md",
            )
        )
        atomic_write_json(json_path, report)
        atomic_write_text(md_path, format_compare(report) + "\n")
    return report


def format_compare(report: dict) -> str:
    keys = list(PRIMARY.values())
    head = "| variant | size MB | × smaller (all / LLM) | LLM params M | " + " | ".join(keys) + " |"
    lines = [head, "|---|---:|---:|---:|" + "---:|" * len(keys)]
    for r in report["rows"]:
        cells = []
        for k in keys:
            v, q = r["metrics"].get(k), r["ratios"].get(k)
            cells.append("–" if v is None else f"{v:.3f} ({q:.1%})" if q is not None else f"{v:.3f}")
        lines.append(
            f"| {r['variant']} | {r['bytes'] / 1e6:.1f} | {r['size_ratio']:.2f} / {r['llm_size_ratio']:.2f} | "
            f"{r['parameters'] / 1e6:.1f} | " + " | ".join(cells) + " |"
        )
    lines += [
        "",
        f"Size ratios against {report['size_reference']}. Per task, paired with the reference on the same records "
        f"(ratio of the primary metric, its 95% paired-bootstrap CI, verdict against {report['accuracy_budget']:.0%}, "
        "identical closed-label answers, p90 latency where benched):",
        "",
        "| variant | task | n | ratio [95% CI] | difference [95% CI] | ≥ 99%? | identical answers | p90 ms |",
        "|---|---|---:|---|---|---|---:|---:|",
    ]
    for r in report["rows"][1:]:
        for task, st in r.get("paired", {}).items():
            lat = (r.get("latency") or {}).get(task) or {}
            same = st.get("identical_answers")
            lines.append(
                f"| {r['variant']} | {task} | {st['n']} | {st['ratio']:.3f} [{st['ratio_ci'][0]:.3f}, "
                f"{st['ratio_ci'][1]:.3f}] | {st['difference_ci'][0]:+.3f} … {st['difference_ci'][1]:+.3f} | "
                f"{st['verdict_99']} | {'–' if same is None else f'{same:.1%}'} | "
                f"{'–' if not lat else format(lat['p90_ms'], '.1f')} |"
            )
    return "\n".join(lines)
