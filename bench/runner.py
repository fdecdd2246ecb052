"""`emoverse bench`: accuracy on every AMT task held against latency, memory and size budgets.

Scenarios after MLPerf Inference: SingleStream (one query at a time; p50/p90/p99 per task; TTFT and
time per output token for generative tasks) and Offline (all queries back to back; throughput). Every
bundle is run in the same process, one after another, on the same records, so numbers compare side by side.
Targets not present here (Jetson, H100) get roofline *estimates*, always labelled as such.
"""

from __future__ import annotations

import csv
import io
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import yaml
from tqdm import tqdm

from emoverse.artifacts import (
    atomic_write_json,
    atomic_write_text,
    cpu_name,
    folder_bytes,
    library_versions,
    read_manifest,
)
from emoverse.config import RecipeError, load_config
from emoverse.export.targets import load_targets, resolve_precision
from emoverse.records import Record, load_records, select_records
from emoverse.runtime.backends import detect_backend, open_runtime
from emoverse.runtime.ort import decoder_weight_bytes
from emoverse.stats import paired_ratio, verdict
from emoverse.tasks import INVALID, TASKS

BUDGETS = Path(__file__).parent / "budgets.yaml"
PRIMARY = {name: task.primary for name, task in TASKS.items()}  # defined by each task


class BudgetError(ValueError):
    pass


# -- budgets ---------------------------------------------------------------------------------------
@dataclass
class TaskBudget:
    p90_ms: float | None = None  # SingleStream p90 of one answer
    min_accuracy_ratio: float | None = None  # primary metric / the reference's, judged on the paired CI


@dataclass
class TargetBudget:
    bundle_size_mb: float | None = None
    peak_memory_mb: float | None = None
    tasks: dict[str, TaskBudget] = field(default_factory=dict)


def load_budgets(path: str | os.PathLike) -> dict:
    """Parse a budgets file through the typed config loader (unknown keys and wrong types are named with
    their path in the file), then check values are positive and tasks exist. Returns plain dicts."""
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as e:
        raise BudgetError(f"{path}: invalid YAML ({e})") from None
    if not isinstance(doc, dict):
        raise BudgetError(f"{path}: expected a mapping of targets")
    out = {}
    for target, spec in doc.items():
        try:
            where = f"{path}: {target}"
            budget = load_config(TargetBudget, spec if isinstance(spec, dict) else {"": spec}, where=where)
        except RecipeError as e:
            raise BudgetError(str(e)) from None
        for task in budget.tasks:
            if task not in TASKS:
                raise BudgetError(f"{path}: {target}.tasks.{task}: unknown task (known: {list(TASKS)})")
        values = [(k, getattr(budget, k)) for k in ("bundle_size_mb", "peak_memory_mb")]
        for t, tb in budget.tasks.items():
            values += [(f"tasks.{t}.{k}", getattr(tb, k)) for k in ("p90_ms", "min_accuracy_ratio")]
        for key, v in values:
            if v is not None and v <= 0:
                raise BudgetError(f"{path}: {target}.{key}: expected a positive number, got {v!r}")
        plain = {k: v for k, v in asdict(budget).items() if v is not None and k != "tasks"}
        tasks = asdict(budget)["tasks"]
        plain["tasks"] = {t: {k: v for k, v in tb.items() if v is not None} for t, tb in tasks.items()}
        out[target] = plain
    return out


def verdicts(result: dict, budget: dict) -> list[str]:
    """One line per failed budget of one bundle's result; empty when everything passes."""
    fails = []
    name = result["bundle"]
    if "bundle_size_mb" in budget and result["size_mb"] > budget["bundle_size_mb"]:
        fails.append(f"{name}: size {result['size_mb']:.1f} MB > budget {budget['bundle_size_mb']} MB")
    if "peak_memory_mb" in budget and result["peak_memory_mb"] > budget["peak_memory_mb"]:
        fails.append(f"{name}: peak memory {result['peak_memory_mb']:.0f} MB > budget {budget['peak_memory_mb']} MB")
    for task, tb in (budget.get("tasks") or {}).items():
        r = result["tasks"].get(task)
        if r is None:
            continue
        if "p90_ms" in tb and r["single_stream"]["p90_ms"] > tb["p90_ms"]:
            fails.append(f"{name}: {task} p90 {r['single_stream']['p90_ms']:.1f} ms > budget {tb['p90_ms']} ms")
        ratio, ci = r.get("accuracy_ratio"), r.get("accuracy_ratio_ci")
        if "min_accuracy_ratio" in tb and ratio is not None:
            # judged on the paired bootstrap CI of the ratio: fail only when all of it lies below the budget
            v = (
                verdict(ci, tb["min_accuracy_ratio"])
                if ci
                else ("fail" if ratio < tb["min_accuracy_ratio"] else "pass")
            )
            r["accuracy_verdict"] = v
            if v == "fail":
                ci_text = f" (95% CI {ci[0]:.1%}-{ci[1]:.1%})" if ci else ""
                fails.append(
                    f"{name}: {task} {TASKS[task].primary} at {ratio:.1%}{ci_text} of the reference < "
                    f"{tb['min_accuracy_ratio']:.1%}"
                )
    return fails


def inconclusive(result: dict) -> list[str]:
    """Accuracy budgets whose ratio CI straddles the budget: neither pass nor fail; more records decide."""
    return [
        f"{result['bundle']}: {task} {TASKS[task].primary} ratio CI {t['accuracy_ratio_ci'][0]:.1%}-"
        f"{t['accuracy_ratio_ci'][1]:.1%} straddles the budget"
        for task, t in result["tasks"].items()
        if t.get("accuracy_verdict") == "inconclusive"
    ]


def _answer_text(spec, answer: str | None) -> str:
    """Closed answers are kept as parsed labels; metrics read them back in the task's response form."""
    return spec.format_label(answer) if spec.closed and answer and answer != INVALID else (answer or "")


def paired_accuracy(result: dict, reference: dict, records: list[Record]) -> None:
    """Per task: the primary metric's ratio to the reference with its paired bootstrap 95% CI (same records)."""
    for task, t in result["tasks"].items():
        ref = reference["tasks"].get(task)
        if ref is None:
            continue
        spec = TASKS[task]
        recs = [r for r in records if r.task == task and r.id in t["answers"] and r.id in ref["answers"]]
        if not recs:
            continue

        pr = paired_ratio(
            spec,
            [r.response for r in recs],
            [_answer_text(spec, ref["answers"][r.id]) for r in recs],
            [_answer_text(spec, t["answers"][r.id]) for r in recs],
            [r.label for r in recs],
        )
        t["accuracy_ratio_ci"] = pr["ratio_ci"] if all(x == x for x in pr["ratio_ci"]) else None


# -- measurement -----------------------------------------------------------------------------------
def percentiles(samples_ms: list[float]) -> dict[str, float]:
    a = np.asarray(samples_ms, dtype=float)
    if a.size == 0:
        return {
            "p50_ms": float("nan"),
            "p90_ms": float("nan"),
            "p99_ms": float("nan"),
            "mean_ms": float("nan"),
            "n": 0,
        }
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {
        "p50_ms": float(p50),
        "p90_ms": float(p90),
        "p99_ms": float(p99),
        "mean_ms": float(a.mean()),
        "n": int(a.size),
    }


def machine_info() -> dict:
    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "libraries": library_versions(("onnxruntime", "numpy", "tokenizers", "onnx", "emoverse-edge")),
    }


def measure_cpu_roofline(seconds: float = 1.0) -> dict:
    """This CPU's peak fp32 matmul throughput and memory bandwidth, measured with numpy."""
    n = 1024
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = a.copy()
    a @ b
    t0, reps = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds / 2:
        a @ b
        reps += 1
    gflops = 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9
    big = np.ones(64 * 1024 * 1024 // 4, dtype=np.float32)  # 64 MiB, beyond the caches
    dst = np.empty_like(big)
    np.copyto(dst, big)
    t0, reps = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds / 2:
        np.copyto(dst, big)
        reps += 1
    gbs = 2 * big.nbytes * reps / (time.perf_counter() - t0) / 1e9  # read + write
    return {"peak_gflops": gflops, "bandwidth_gbs": gbs}


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 1e6


def release_freed_memory() -> None:
    """Hand freed memory back to the OS before a variant's baseline is read.

    Each variant's memory is its resident set minus the one before it loaded, in one process: the previous
    variant's objects (a PyTorch model's reference cycles) and the pages glibc keeps after freeing them would
    otherwise leave the baseline high and the next variant's delta low, even negative. By hand: psutil and the
    standard library have no call for glibc's malloc_trim."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): the gc pass is what there is
        pass


@dataclass
class BenchConfig:
    limit: int = 20  # records per task and source
    warmup: int = 2
    repetitions: int = 1
    threads: int | None = None
    offline_batch: int = 8  # closed-label requests scored together in the Offline scenario
    tasks: tuple[str, ...] | None = None  # None: every task; e.g. the closed ones for a latency run on more records


def _answer(rt, rec: Record) -> tuple[str, float, float | None, int]:
    """(prediction, latency ms, time-to-first-token ms or None, output tokens)."""
    task = TASKS[rec.task]
    t0 = time.perf_counter()
    if task.scored:
        ans = rt.answer(rec.task, rec.query, rec.images, mode="score")
        return ans.text, (time.perf_counter() - t0) * 1e3, None, 0
    ttft, pieces = None, []
    for piece in rt.stream(rec.query, rec.images, task.max_new_tokens, rt.grammar_for(rec.task, rec.query), task):
        if ttft is None:
            ttft = (time.perf_counter() - t0) * 1e3
        pieces.append(piece)
    text = "".join(pieces).strip()
    return (
        text,
        (time.perf_counter() - t0) * 1e3,
        ttft,
        len(rt.tok.encode(text, add_special_tokens=False).ids),
    )


def variant_name(path: Path) -> str:
    """A readable name: the folder, or its parent for a training run's `model` folder (runs/nano/model -> nano)."""
    return path.parent.name if path.name == "model" and path.parent.name else path.name


def bench_bundle(bundle: Path, records: list[Record], cfg: BenchConfig) -> dict:
    """One variant: a bundle (ONNX Runtime) or a model artifact (PyTorch, the usual FP32 reference)."""

    backend = detect_backend(bundle)
    release_freed_memory()
    before = rss_mb()
    t_load = time.perf_counter()
    rt = open_runtime(bundle, backend, threads=cfg.threads)
    start_s = time.perf_counter() - t_load
    peak = rss_mb()
    by_task: dict[str, list[Record]] = {}
    for r in records:
        by_task.setdefault(r.task, []).append(r)
    out_tasks = {}
    single: dict[str, tuple] = {}
    for task, recs in by_task.items():  # single-stream for every task first: the serving peak
        for r in recs[: cfg.warmup]:
            _answer(rt, r)
        lat, ttft, tpot, preds, n_out = [], [], [], {}, []
        for rep in range(cfg.repetitions):
            for r in tqdm(recs, desc=f"{variant_name(bundle)}/{task} single-stream {rep + 1}", unit="q", leave=False):
                text, ms, first, n_tokens = _answer(rt, r)
                preds[r.id] = text
                lat.append(ms)
                n_out.append(n_tokens)
                if first is not None:
                    ttft.append(first)
                    if n_tokens > 1:
                        tpot.append((ms - first) / (n_tokens - 1))
                peak = max(peak, rss_mb())
        single[task] = (lat, ttft, tpot, preds, n_out)
    # Offline after every single-stream run: its batches (8 ECPE prompts in one prefill) raise resident memory,
    # which glibc keeps; measured first, they would be charged to every single-stream request after them
    offline_peak = peak
    for task, recs in by_task.items():
        lat, ttft, tpot, preds, n_out = single[task]
        t0 = time.perf_counter()  # Offline: all queries at once; closed-label ones batched in one prefill each
        if TASKS[task].scored:
            rt.answer_many(
                [{"task": r.task, "query": r.query, "images": r.images} for r in recs],
                batch_size=cfg.offline_batch,
            )
        else:
            for r in recs:
                _answer(rt, r)
        offline_s = time.perf_counter() - t0
        offline_peak = max(offline_peak, rss_mb())
        t = TASKS[task]
        metrics = t.metrics([r.response for r in recs], [preds[r.id] for r in recs], [r.label for r in recs])
        answers = {r.id: (t.parse(preds[r.id]).label if t.closed else preds[r.id]) for r in recs}
        prompt_tokens = [len(rt.encode(r.query, r.images)[0]) for r in recs]
        cand_tokens = (
            max(len(rt.tok.encode(c, add_special_tokens=False).ids) for c in t.candidates(recs[0].query))
            if t.scored
            else 0
        )
        out_tasks[task] = {
            "n": len(recs),
            "metrics": metrics,
            "primary": metrics.get(TASKS[task].primary),
            "single_stream": percentiles(lat),
            "ttft": percentiles(ttft) if ttft else None,
            "tpot": percentiles(tpot) if tpot else None,
            "offline_qps": len(recs) / offline_s,
            "answers": answers,
            "mean_prompt_tokens": float(np.mean(prompt_tokens)),
            "candidate_tokens": cand_tokens,
            "mean_output_tokens": float(np.mean(n_out)),
        }
    if backend == "torch":  # a release counts with its base weights: the model as it runs (full form)
        # lazy: benching bundles must not need torch; only this PyTorch reference row does
        from emoverse.model import EmoVerse

        full = EmoVerse.full_form(bundle)
        precision, target = "fp32 (torch)", "torch"
        weights, size = folder_bytes(full / "llm"), folder_bytes(full)
    else:
        manifest = read_manifest(bundle)
        precision, target = manifest.get("precision"), manifest.get("target")
        weights, size = decoder_weight_bytes(bundle, rt.cfg["graphs"]), folder_bytes(bundle)
    return {
        "bundle": variant_name(bundle),
        "path": str(bundle),
        "backend": backend,
        "target": target,
        "precision": precision,
        "weights_from_artifact": backend != "torch" and bool(manifest.get("weights_from")),
        "size_mb": size / 1e6,
        "start_s": start_s,
        "peak_memory_mb": peak - before + 0.0,  # serving one request at a time (what budgets judge)
        "peak_memory_offline_mb": offline_peak - before + 0.0,  # with the Offline scenario's batches
        "tasks": out_tasks,
        "llm": {
            "parameters": rt.cfg["llm_parameters"],
            "kv_shape": rt.cfg["kv_shape"],
            "decoder_bytes": weights,
        },
    }


def agreement(result: dict, reference: dict) -> None:
    """Per task, the fraction of records answered as the reference answered them (closed tasks: the parsed
    label; generative tasks: the exact text)."""
    for task, t in result["tasks"].items():
        ref = reference["tasks"].get(task, {}).get("answers", {})
        common = [i for i in t["answers"] if i in ref]
        t["agreement"] = sum(t["answers"][i] == ref[i] for i in common) / len(common) if common else None


BYTES_PER_PARAM = {
    "fp32": 4,
    "fp16": 2,
    "fp8": 1,
    "int8": 1,
    "int4": 0.5625,
}  # int4: + a scale per 32 weights


def roofline(flops: float, bytes_moved: float, peak_flops: float, bandwidth: float) -> float:
    """Lower bound on time (s): the slower of compute and memory traffic."""
    return max(flops / peak_flops, bytes_moved / bandwidth)


def roofline_estimates(result: dict, targets: dict, ctx: int = 256) -> dict:
    """Roofline *estimates* for devices not measured here: a decode step (one token at `ctx` tokens of context)
    and a 128-token prefill, from the LLM's FLOPs (2 x parameters per token) and bytes moved (the decoder's
    weights once, at the precision this bundle would build with there, + the fp16 KV cache), at each target's
    published peak compute and bandwidth. Labelled estimates, never gated.

    No fraction of a roofline is reported for the CPU measurements: a bound that counts only the work the
    runtime does (cached chat prefix, logits at the scored positions only, each task's own candidates,
    attention, the peak of each kernel's precision) was not built, and a bound that over-counts reads above
    100% — worse than none."""
    params = result["llm"]["parameters"]
    n_layers, kv_heads, head_dim = result["llm"]["kv_shape"]
    kv = 2 * n_layers * kv_heads * head_dim * ctx * 2
    own = result.get("precision") if result.get("weights_from_artifact", False) else None
    out = {}
    for name, tgt in targets.items():
        if not tgt.get("peak_tflops") or tgt.get("runtime") != "tensorrt":
            continue
        try:
            prec = resolve_precision(name, None, own_weights=own)["decoder"]
        except ValueError:
            continue
        compute = "fp16" if prec == "int4" else prec  # weight-only int4 multiplies in fp16
        peak = tgt["peak_tflops"].get(compute, tgt["peak_tflops"].get("fp16")) * 1e12
        bw = tgt["memory_bandwidth_gbs"] * 1e9
        wbytes = params * BYTES_PER_PARAM[prec]
        out[name] = {
            "estimate": True,
            "precision": prec,
            "decode_step_ms_roofline": roofline(2 * params, wbytes + kv, peak, bw) * 1e3,
            "prefill_128_ms_roofline": roofline(2 * params * 128, wbytes, peak, bw) * 1e3,
        }
    return {"targets": out}


def run_bench(
    bundles: list[str | os.PathLike],
    data: str | os.PathLike,
    budgets_path: str | os.PathLike,
    target: str,
    out: str | os.PathLike,
    cfg: BenchConfig | None = None,
    reference: int = 0,
) -> tuple[dict, list[str]]:

    cfg = cfg or BenchConfig()
    budgets = load_budgets(budgets_path)
    targets = load_targets()
    measured_on = os.environ.get("EMOVERSE_BENCH_DEVICE", "cpu")  # set on the device the bench runs on
    if target != measured_on and targets.get(target, {}).get("runtime") == "tensorrt":
        # what runs here is measured on this CPU: a GPU target's latency/size budgets would judge the wrong device
        raise BudgetError(
            f"target {target!r}: its budgets apply to measurements on that device; this bench measures "
            "on this machine's CPU. Bench with --target cpu here (the report carries roofline "
            f"*estimates* for {target}, never gated), or run the bench on the {target} itself"
        )
    if target not in budgets:
        raise BudgetError(f"{budgets_path}: no budgets for target {target!r} (have {list(budgets)})")
    records = select_records(load_records(data, split="test"), tasks=list(cfg.tasks or []) or None, limit=cfg.limit)
    cpu = measure_cpu_roofline()
    results = [bench_bundle(Path(b), records, cfg) for b in bundles]
    ref = results[reference]
    for r in results:
        for task, t in r["tasks"].items():
            base = ref["tasks"].get(task, {}).get("primary")
            t["accuracy_ratio"] = (t["primary"] / base) if base else None
        agreement(r, ref)
        paired_accuracy(r, ref, records)
    for r in results:
        r["roofline"] = roofline_estimates(r, {k: v for k, v in targets.items() if k != target})
    failures = [f for r in results for f in verdicts(r, budgets[target])]
    undecided = [x for r in results for x in inconclusive(r)]
    report = {
        "machine": machine_info(),
        "cpu_roofline": cpu,
        "target": target,
        "config": cfg.__dict__,
        "records": {t: sum(1 for r in records if r.task == t) for t in TASKS},
        "reference": ref["bundle"],
        "results": results,
        "failures": failures,
        "inconclusive": undecided,
    }
    write_report(report, Path(out), budgets[target])
    return report, failures


# -- report ----------------------------------------------------------------------------------------
def write_report(report: dict, out: Path, budget: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "report.json", report)
    rows = []
    for r in report["results"]:
        for task, t in r["tasks"].items():
            ss = t["single_stream"]
            rows.append(
                {
                    "bundle": r["bundle"],
                    "precision": r["precision"],
                    "task": task,
                    "primary_metric": TASKS[task].primary,
                    "value": t["primary"],
                    "ratio_to_reference": t["accuracy_ratio"],
                    "agreement_with_reference": t.get("agreement"),
                    "p50_ms": ss["p50_ms"],
                    "p90_ms": ss["p90_ms"],
                    "p99_ms": ss["p99_ms"],
                    "ttft_p50_ms": t["ttft"]["p50_ms"] if t["ttft"] else None,
                    "tpot_p50_ms": t["tpot"]["p50_ms"] if t["tpot"] else None,
                    "offline_qps": t["offline_qps"],
                    "size_mb": r["size_mb"],
                    "peak_memory_mb": r["peak_memory_mb"],
                    "peak_memory_offline_mb": r.get("peak_memory_offline_mb"),
                }
            )
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["bundle"])
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(out / "report.csv", buf.getvalue())
    atomic_write_text(out / "report.md", format_report(report) + "\n")
    pareto_plot(report, out / "pareto.png", budget)


def _fmt(v, spec=".3f"):
    return "–" if v is None else format(v, spec)


def format_report(report: dict) -> str:
    m = report["machine"]
    cpu = report["cpu_roofline"]
    lines = [
        f"# Bench: target {report['target']}",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores; measured peak {cpu['peak_gflops']:.1f} GFLOP/s fp32 matmul, "
        f"{cpu['bandwidth_gbs']:.1f} GB/s copy bandwidth. Reference: {report['reference']}.",
        "",
        "| variant | task | metric | value (ratio) | same answer as ref. | p50 ms | p90 ms | p99 ms | "
        "TTFT p50 | TPOT p50 | offline q/s |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        for task, t in r["tasks"].items():
            ss = t["single_stream"]
            ratio = f" ({t['accuracy_ratio']:.1%})" if t["accuracy_ratio"] is not None else ""
            lines.append(
                f"| {r['bundle']} | {task} | {TASKS[task].primary} | {_fmt(t['primary'])}{ratio} | "
                f"{_fmt(t.get('agreement'), '.1%')} | {ss['p50_ms']:.1f} | "
                f"{ss['p90_ms']:.1f} | {ss['p99_ms']:.1f} | "
                f"{_fmt(t['ttft'] and t['ttft']['p50_ms'], '.1f')} | "
                f"{_fmt(t['tpot'] and t['tpot']['p50_ms'], '.1f')} | {t['offline_qps']:.2f} |"
            )
    lines += [
        "",
        "| variant | precision | size MB | peak memory MB, single-stream | with Offline batches | start s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        offline = r.get("peak_memory_offline_mb")  # reports before it was measured apart
        lines.append(
            f"| {r['bundle']} | {r['precision']} | {r['size_mb']:.1f} | {r['peak_memory_mb']:.0f} | "
            f"{_fmt(offline, '.0f')} | {r['start_s']:.2f} |"
        )
    lines += [
        "",
        "Roofline **estimates** for targets not on this machine (decode step / 128-token prefill, ms; the "
        "precision each would build with there; never gated):",
        "",
        "| bundle | target | precision | decode roofline | prefill-128 roofline |",
        "|---|---|---|---:|---:|",
    ]
    for r in report["results"]:
        for name, e in r["roofline"]["targets"].items():
            lines.append(
                f"| {r['bundle']} | {name} (estimate) | {e['precision']} | {e['decode_step_ms_roofline']:.3f} | "
                f"{e['prefill_128_ms_roofline']:.3f} |"
            )
    lines += ["", "Budget failures:" if report["failures"] else "All budgets pass."]
    lines += [f"- {f}" for f in report["failures"]]
    return "\n".join(lines)


def pareto_plot(report: dict, path: Path, budget: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in report["results"]:
        # the binding task (lowest ratio: a budget holds only if it holds on every task), with its paired CI
        rated = [(t["accuracy_ratio"], name) for name, t in r["tasks"].items() if t["accuracy_ratio"] is not None]
        acc, worst = min(rated) if rated else (float("nan"), None)
        ci = r["tasks"][worst].get("accuracy_ratio_ci") if worst else None
        yerr = [[max(acc - ci[0], 0)], [max(ci[1] - acc, 0)]] if ci else None
        p90 = float(np.mean([t["single_stream"]["p90_ms"] for t in r["tasks"].values()]))
        for ax, x in ((axes[0], p90), (axes[1], r["size_mb"])):
            ax.errorbar([x], [acc], yerr=yerr, fmt="o", capsize=3)
            ax.annotate(f"{r['bundle']} ({worst})" if worst else r["bundle"], (x, acc), fontsize=8)
    ratios = [
        tb.get("min_accuracy_ratio") for tb in (budget.get("tasks") or {}).values() if tb.get("min_accuracy_ratio")
    ]
    for ax in axes:
        if ratios:
            ax.axhline(
                min(ratios),
                color="red",
                linestyle="--",
                linewidth=1,
                label=f"min accuracy ratio {min(ratios):.2f}",
            )
        ax.set_ylabel("lowest task's accuracy ratio to reference (95% CI)")
        ax.grid(alpha=0.3)
    if "bundle_size_mb" in budget:
        axes[1].axvline(budget["bundle_size_mb"], color="red", linestyle=":", linewidth=1, label="size budget")
    axes[0].set_xlabel("mean p90 latency per task (ms)")
    axes[1].set_xlabel("bundle size (MB)")
    for ax in axes:
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Accuracy vs latency and size — target {report['target']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- regression mode -------------------------------------------------------------------------------
def _pct(text: str) -> float:
    text = str(text).strip()
    return float(text[:-1]) / 100 if text.endswith("%") else float(text)


def _pts(text: str) -> float:
    text = str(text).strip()
    return float(text[:-2]) / 100 if text.endswith("pt") else float(text)


def compare_reports(
    old: dict, new: dict, max_latency_regression: str = "5%", max_accuracy_drop: str = "1pt"
) -> list[str]:
    """Regressions of NEW against OLD, per bundle and task: p90 latency up by more than the allowed fraction,
    or the primary metric down by more than the allowed points."""
    lat_tol, acc_tol = _pct(max_latency_regression), _pts(max_accuracy_drop)
    old_by = {(r["bundle"], t): v for r in old["results"] for t, v in r["tasks"].items()}
    problems = []
    for r in new["results"]:
        for task, v in r["tasks"].items():
            o = old_by.get((r["bundle"], task))
            if o is None:
                continue
            ol, nl = o["single_stream"]["p90_ms"], v["single_stream"]["p90_ms"]
            if ol > 0 and (nl - ol) / ol > lat_tol:
                problems.append(
                    f"{r['bundle']}: {task} p90 {ol:.1f} -> {nl:.1f} ms (+{(nl - ol) / ol:.1%} > {lat_tol:.0%})"
                )
            oa, na = o.get("primary"), v.get("primary")
            if oa is not None and na is not None and oa - na > acc_tol:
                problems.append(
                    f"{r['bundle']}: {task} {TASKS[task].primary} {oa:.3f} -> {na:.3f} "
                    f"(-{(oa - na) * 100:.1f} pt > {acc_tol * 100:.1f} pt)"
                )
    return problems
