"""Results files: eval metrics (with CIs) of a model and its baselines -> one JSON per model and the markdown
table generated from it. README and docs quote only these files.

    emoverse results --metrics runs/release-eval/metrics.json --out docs/results/emoverse-nano.json
    emoverse results --markdown docs/results/emoverse-nano.json      # regenerate the .md from the JSON
    emoverse results --metrics docs/results/emoverse-nano.json runs/new-baseline/metrics.json \
        --out docs/results/emoverse-nano.json                           # a results file extended by a later eval
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

from emoverse.artifacts import atomic_write_json, atomic_write_text, cpu_name, sha256_file
from emoverse.tasks import TASKS

# (task, metric) rows of the table beyond each task's primary metric
EXTRA_METRICS = {
    "msa": ["f1"],
    "mer": ["accuracy"],
    "fer": ["weighted_f1", "au_f1"],
    "eri": ["rouge_l"],
    "ecpe": [],
}
# the targets, on full test splits
TARGETS = {
    "mer/meld.weighted_f1": 0.63,
    "mer.weighted_f1": 0.63,
    "msa/mosi.accuracy": 0.80,
    "fer/ckplus.accuracy": 0.90,
    "ecpe/ecf1.pair_f1": 0.70,
    "ecpe/ecf2.pair_f1": 0.70,
    "eri.label_accuracy": 0.45,
    "eri.rouge_l": 0.25,
}
MODEL_SYSTEM = "emoverse/score"  # closed tasks and ECPE by scoring candidates; ERI generated


def build(
    metrics_paths: list[str | os.PathLike], *, model_system: str = MODEL_SYSTEM, command: str | None = None
) -> dict:
    merged: dict = {"results": {}, "ci": {}}
    sources = []
    base: dict | None = None  # a results file being extended: its model's eval keeps its date and machine
    sample_of: dict[str, int | None] = {}  # task -> --limit per source of its eval (None: the full split)
    for p in metrics_paths:
        m = json.loads(Path(p).read_text(encoding="utf-8"))
        if "rows" in m and "evals" in m:  # a results file: its systems and the evals they came from
            base = base or m
            evals, m = m["evals"], _as_metrics(m)
        else:
            evals = [
                {
                    "path": str(p),
                    "model": m.get("model"),
                    "records": m.get("records"),
                    "limit": m.get("limit"),
                    "split": m.get("split"),
                }
            ]
        sources += evals
        for ev in evals:
            for key in ev.get("records") or {}:  # the tasks this eval covered: a full split, or a sample
                sample_of[key.split("/")[0]] = ev.get("limit")
        for system, res in m["results"].items():
            merged["results"].setdefault(system, {}).update(res)
            merged["ci"].setdefault(system, {}).update(m.get("ci", {}).get(system, {}))
    systems = list(merged["results"])
    if model_system not in systems:
        raise ValueError(f"no {model_system!r} in {metrics_paths}; systems: {systems}")
    rows = []
    keys = sorted({k for r in merged["results"].values() for k in r if not k.endswith((".n", ".label_n"))})
    for task_name, task in TASKS.items():
        for metric in [task.primary, *EXTRA_METRICS.get(task_name, [])]:
            for key in [k for k in keys if k.split(".")[0].split("/")[0] == task_name and k.endswith("." + metric)]:
                group = key.rsplit(".", 1)[0]
                n_key = _n_key(group, metric)
                cells = {}
                for s in systems:
                    if key in merged["results"][s]:
                        cells[s] = {
                            "value": merged["results"][s][key],
                            "ci": merged["ci"].get(s, {}).get(key),
                        }
                model = cells.get(model_system, {}).get("value")
                baselines = {s: c["value"] for s, c in cells.items() if not s.startswith("emoverse")}
                rows.append(
                    {
                        "task": task_name,
                        "group": group,
                        "metric": metric,
                        "primary": metric == task.primary,
                        "n": merged["results"][model_system].get(n_key),
                        "sample_limit": sample_of.get(task_name),
                        "systems": cells,
                        "target": TARGETS.get(key),
                        "meets_target": None if TARGETS.get(key) is None or model is None else model >= TARGETS[key],
                        "best_baseline": max(baselines.items(), key=lambda kv: kv[1]) if baselines else None,
                        "beats_every_baseline": None
                        if model is None or not baselines
                        else all(model > v for v in baselines.values()),
                    }
                )
    now = {
        "created": time.strftime("%Y-%m-%d"),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count()},
        "command": command or " ".join(["emoverse", *sys.argv[1:]]),
    }
    extended = {}
    if base is not None:  # the table's date and CPU stay the model eval's; this build is listed after
        extended = {"extended": [*base.get("extended", []), now]}
        now = {k: base[k] for k in ("created", "machine", "command")}
    return {
        "model_system": model_system,
        **now,
        **extended,
        "evals": sources,
        "ci_method": "percentile bootstrap over records, 1000 resamples, 95%",
        "systems": systems,
        "rows": rows,
    }


def _n_key(group: str, metric: str) -> str:
    """Where a metrics file keeps how many records a row rests on (ERI's label accuracy: the labelled ones)."""
    return f"{group}.label_n" if metric == "label_accuracy" else f"{group}.n"


def _as_metrics(res: dict) -> dict:
    """A results file back in the metrics form `build` merges (values, CIs, the model's n per row), so a
    baseline evaluated later joins a published table without the model's eval being run again."""
    out: dict = {"results": {system: {} for system in res["systems"]}, "ci": {}}  # the table's column order
    for row in res["rows"]:
        key = f"{row['group']}.{row['metric']}"
        for system, cell in row["systems"].items():
            out["results"].setdefault(system, {})[key] = cell["value"]
            if cell.get("ci") is not None:
                out["ci"].setdefault(system, {})[key] = cell["ci"]
        out["results"].setdefault(res["model_system"], {})[_n_key(row["group"], row["metric"])] = row["n"]
    return out


def _cell(c: dict | None) -> str:
    if not c:
        return "–"
    ci = c.get("ci")
    return f"{c['value']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def markdown(res: dict) -> str:
    systems = [res["model_system"]] + [
        s for s in res["systems"] if s != res["model_system"] and not s.startswith("emoverse/")
    ]
    head = ["task / source", "metric", "n", *systems, "target", "beats every baseline"]
    lines = [
        f"<!-- generated by `emoverse results --markdown` from {res.get('json', 'the JSON beside it')}; "
        "do not edit -->",
        f"Full test splits; 95% CI (percentile bootstrap over records) in brackets. CPU: {res['machine']['cpu']}; "
        f"{res['created']}.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in res["rows"]:
        target = "–" if r["target"] is None else f"≥ {r['target']:.2f} ({'met' if r['meets_target'] else 'not met'})"
        beats = (
            "–"
            if r["beats_every_baseline"] is None
            else ("yes" if r["beats_every_baseline"] else f"no ({r['best_baseline'][0]})")
        )
        cells = [
            r["group"],
            r["metric"] + (" ★" if r["primary"] else ""),
            str(r["n"] or "–") + (" †" if r.get("sample_limit") else ""),
            *[_cell(r["systems"].get(s)) for s in systems],
            target,
            beats,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "★ the task's primary metric. Systems: " + ", ".join(systems) + "."]
    sampled = _sampled(res)
    if sampled:
        lines.append(f"† {sampled}; every other row is the full test split.")
    lines.append("")
    return "\n".join(lines)


def _sampled(res: dict) -> str:
    tasks = sorted({(r["task"], r["sample_limit"]) for r in res["rows"] if r.get("sample_limit")})
    return "; ".join(f"{t}: a seeded random sample of at most {n} test records per source" for t, n in tasks)


def write(res: dict, out: str | os.PathLike) -> tuple[Path, Path]:
    out = Path(out)
    res = {**res, "json": out.name}
    atomic_write_json(out, res)
    md = out.with_suffix(".md")
    atomic_write_text(md, markdown(res))
    return out, md


BEGIN, END = "<!-- results:begin (generated: emoverse results --readme README.md) -->", "<!-- results:end -->"


def release_tag(release: str | os.PathLike) -> str | None:
    """The short tag `scripts/compression_study.sh` keys a release's bundles and runs by (the first 12 hex digits
    of the sha256 of its manifest.json), or None without a release there."""
    manifest = Path(release) / "manifest.json"
    return sha256_file(manifest)[:12] if manifest.is_file() else None


def measured_on(report: dict) -> str | None:
    """The release tag a compare report's reference bundle was built from (bundles/TAG/...), if it names one."""
    tags = [part for part in Path(report.get("reference", "")).parts if re.fullmatch(r"[0-9a-f]{12}", part)]
    return tags[0] if tags else None


def readme_table(results_dir: str | os.PathLike = "docs/results", release: str | os.PathLike | None = None) -> str:
    """The README's results table: the release's primary metric per task and source with its CI, the best
    baseline beside it, and the training throughput ratio — all read from the JSON files in results_dir.
    With `release` (default: the repository's models/emoverse-nano beside docs/), compression reports measured
    on another release are marked as such, and every report measured on this one is shown."""
    results_dir = Path(results_dir)
    if release is None:
        release = results_dir.resolve().parent.parent / "models" / "emoverse-nano"
    current = release_tag(release)
    res = json.loads((results_dir / "emoverse-nano.json").read_text(encoding="utf-8"))
    model = res["model_system"]
    lines = [
        "| task / source | metric | n | EmoVerse-Nano (95% CI) | best baseline | target |",
        "|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        if not r["primary"] and r["metric"] != "rouge_l":
            continue
        best = r["best_baseline"]
        target = "–" if r["target"] is None else f"≥ {r['target']:.2f} {'✓' if r['meets_target'] else '✗'}"
        lines.append(
            f"| {r['group']} | {r['metric']} | {r['n'] or '–'}{' †' if r.get('sample_limit') else ''} | "
            f"{_cell(r['systems'].get(model))} | "
            f"{f'{best[1]:.3f} ({best[0]})' if best else '–'} | {target} |"
        )
    sampled = _sampled(res)
    out = [
        f"Full test splits{'; † ' + sampled if sampled else ''}. {res['created']}, CPU: "
        f"{res['machine']['cpu']} (`docs/results/emoverse-nano.md` has every metric and baseline).",
        "",
        *lines,
    ]
    line = throughput_line(results_dir)
    if line:
        out += ["", line]
    # compression.json, then every other compression-*.json that joined a bench run (the same bundles timed on
    # another machine: latency is a fact of one CPU)
    shown: list[tuple[str, dict, str | None]] = []  # (file name, report, its release tag)
    for comp in [results_dir / "compression.json", *sorted(results_dir.glob("compression-*.json"))]:
        report = json.loads(comp.read_text(encoding="utf-8")) if comp.is_file() else None
        if not report or not isinstance(report.get("rows"), list):
            continue  # absent, or not an `emoverse compare` report (e.g. a paired_by_source.py one beside them)
        tag = measured_on(report)
        if comp.name == "compression.json" or "latency_from" in report or (current and tag == current):
            shown.append((comp.name, report, tag))
    earlier: list[str] = []
    if current and any(tag == current for _, _, tag in shown):
        # the current release's reports only; the earlier releases' stay in docs/results, named in one line
        earlier = [name for name, _, tag in shown if tag != current]
        shown = [entry for entry in shown if entry[2] == current]
    for name, report, tag in shown:
        stale = bool(current and tag and tag != current)
        out += ["", *compression_table(report, name, stale_tag=tag if stale else None)]
    if earlier:
        out += ["", "Measured on an earlier release: " + ", ".join(f"`docs/results/{n}`" for n in earlier) + "."]
    return "\n".join(out)


def throughput_line(results_dir: Path) -> str | None:
    """One sentence per training-throughput run (one per machine): the row flagged as the release's settings
    against the original settings, measured side by side in that run, and the lever the release row ends on."""
    runs = []
    for tp in sorted(Path(results_dir).glob("train-throughput*.json")):
        t = json.loads(tp.read_text(encoding="utf-8"))
        first = t["variants"][0]
        if not first["name"].startswith("original"):  # a run with rows skipped compares other settings
            continue
        # files written before the flag named the release row "... (release)"
        release = next((v for v in t["variants"] if v.get("release") or "(release)" in v["name"]), t["variants"][-1])
        runs.append(
            f"{t['cpu']}, {first['tokens_per_s']:.0f} → {release['tokens_per_s']:.0f} tokens/s, "
            f"**{release['speedup_vs_original']:.2f}×** up to “{release['name'].removesuffix(' (release)')}” "
            f"(`docs/results/{tp.name}`)"
        )
    if not runs:
        return None
    return (
        "Training throughput, the release settings against the original ones in one run (2 threads): "
        + "; ".join(runs)
        + "."
    )


def _latency_source(report: dict) -> str:
    src = report.get("latency_from")
    if not src:  # reports written before compare recorded the bench they joined
        return "p90 ms where benched"
    if isinstance(src, list):  # several runs of one machine, a task's p90 from the first that timed it
        runs = "; ".join(
            f"{', '.join(x['tasks'])} from `{x['bench']}` ({x['records_per_task']} per task and source)" for x in src
        )
        return f"p90 ms on {src[0]['cpu']}, {src[0]['cores']} cores: {runs}"
    return (
        f"p90 ms from one bench run on {src['cpu']}, {src['cores']} cores, {src['records_per_task']} test records "
        f"per task and source (`{src['bench']}`)"
    )


def compression_table(report: dict, name: str = "compression.json", stale_tag: str | None = None) -> list[str]:
    """README rows from `emoverse compare ... --out docs/results/compression.json`: each variant's size against
    the FP32 teacher's bundle, and per task the paired ratio to the reference with its 95% CI, the verdict
    against 99%, the identical closed answers and the p90 (with the machine and bench run it comes from)."""
    tasks = list(TASKS)
    mark = {"pass": "✓", "fail": "✗", "inconclusive": "?"}
    earlier = (
        f"**Measured on an earlier release** (its bundles: `bundles/{stale_tag}/`; renew with the README's "
        "`scripts/compression_study.sh` commands). "
        if stale_tag
        else ""
    )
    lines = [
        f"{earlier}Compression (`docs/results/{name}`; sizes against the FP32 teacher's bundle, "
        f"{report['size_reference_bytes'] / 1e6:.0f} MB; per task: primary metric as a ratio to "
        f"**{report['rows'][0]['variant']}**, paired 95% CI, ✓/?/✗ = the CI above / straddling / below 99%, "
        f"identical closed answers; {_latency_source(report)}):",
        "",
        "| variant | size MB | × smaller | " + " | ".join(tasks) + " |",
        "|---|---:|---:|" + "---|" * len(tasks),
    ]
    for i, r in enumerate(report["rows"]):
        cells = []
        for t in tasks:
            st = r.get("paired", {}).get(t)
            lat = (r.get("latency") or {}).get(t)
            if i == 0 and lat:  # the reference: its latency only
                cells.append(f"reference, p90 {lat['p90_ms']:.0f} ms")
                continue
            if not st:
                cells.append("–")
                continue
            cell = f"{st['ratio']:.1%} [{st['ratio_ci'][0]:.1%}, {st['ratio_ci'][1]:.1%}] {mark[st['verdict_99']]}"
            if "identical_answers" in st:
                cell += f", {st['identical_answers']:.0%} same"
            cells.append(cell + (f", p90 {lat['p90_ms']:.0f} ms" if lat else ""))
        lines.append(f"| {r['variant']} | {r['bytes'] / 1e6:.1f} | {r['size_ratio']:.2f} | " + " | ".join(cells) + " |")
    return lines


def update_readme(readme: str | os.PathLike, results_dir: str | os.PathLike = "docs/results") -> str:
    path = Path(readme)
    text = path.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        raise ValueError(f"{readme}: no results markers ({BEGIN} ... {END})")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = head + BEGIN + "\n" + readme_table(results_dir) + "\n" + END + tail
    atomic_write_text(path, new)
    return new
