"""`emoverse eval`: predictions and per-task metrics for a model artifact and baselines, on any AMT records.

Closed-label tasks (MSA, MER, FER) and ECPE are answered two ways: `score` scores the task's candidate
answers by log-probability (one prefill) and the task chooses (the best label; ECPE's likely causes),
`generate` decodes greedily (ECPE under its grammar) and parses the text. ERI is generated. Predictions
are appended to a partial file as they are made, so an interrupted eval resumes where it stopped.
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from pathlib import Path

from tqdm import tqdm

from emoverse.artifacts import atomic_write_json, atomic_write_text, autocast_precision, read_manifest
from emoverse.baselines import run_baseline
from emoverse.model import EmoVerse, ModelConfig
from emoverse.records import Record, load_records, select_records  # noqa: F401
from emoverse.runtime.backends import open_runtime
from emoverse.runtime.ort import Answer
from emoverse.runtime.torch_ref import TorchRuntime
from emoverse.stats import bootstrap_ci
from emoverse.tasks import INVALID, TASKS

ZERO_SHOT = "zero-shot"


def compute_metrics(records: list[Record], preds: dict[str, str]) -> dict[str, float]:
    """Flat '<task>.<metric>' plus '<task>/<source>.<metric>' for every task and source present."""
    out: dict[str, float] = {}
    by_task: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        if r.id in preds:
            by_task[r.task].append(r)
    for task, recs in sorted(by_task.items()):
        t = TASKS[task]
        groups = {task: recs}
        sources = sorted({r.source for r in recs})
        if len(sources) > 1:
            groups.update({f"{task}/{s}": [r for r in recs if r.source == s] for s in sources})
        for name, rs in groups.items():
            m = t.metrics([r.response for r in rs], [preds[r.id] for r in rs], [r.label for r in rs])
            out.update({f"{name}.{k}": int(v) if k in ("n", "label_n") else round(float(v), 4) for k, v in m.items()})
    return out


def compute_cis(records: list[Record], preds: dict[str, str], n_boot: int = 1000) -> dict[str, list[float]]:
    """95% bootstrap intervals for the same '<task>[/<source>].<metric>' keys as compute_metrics."""

    out: dict[str, list[float]] = {}
    by_task: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        if r.id in preds:
            by_task[r.task].append(r)
    for task, recs in sorted(by_task.items()):
        groups = {task: recs}
        sources = sorted({r.source for r in recs})
        if len(sources) > 1:
            groups.update({f"{task}/{s}": [r for r in recs if r.source == s] for s in sources})
        for name, rs in groups.items():
            ci = bootstrap_ci(
                TASKS[task],
                [r.response for r in rs],
                [preds[r.id] for r in rs],
                [r.label for r in rs],
                n_boot=n_boot,
            )
            out.update({f"{name}.{k}": v for k, v in ci.items()})
    return out


class Predictor:
    """Answers records through the runtime API, the code path `emoverse run` and the bench use: a model
    artifact or release runs on the PyTorch backend (the reference), a bundle on its own backend. Closed
    tasks by label scoring (or free generation), open ones by batched KV-cache decoding with the task's
    grammar (ECPE), so eval and bench give the same answers on the same records."""

    def __init__(self, runtime, missing_media: str = "error"):
        self.rt = runtime
        self.missing_media = missing_media

    def _images(self, rec: Record) -> list[str]:
        if rec.videos and (self.missing_media == "error" or any(Path(v).is_file() for v in rec.videos)):
            raise ValueError(
                f"record {rec.id}: has video input; the runtime answers images and text (extract "
                "frames as images, or --missing-media drop for videos that are not there)"
            )
        if self.missing_media == "drop":
            return [i for i in rec.images if Path(i).is_file()]
        return list(rec.images)

    def many(self, recs: list[Record], mode: str) -> list[Answer]:
        """Answers (text, label, candidate scores) for records of one task, as one batch."""
        answers = self.rt.answer_many(
            [{"task": r.task, "query": r.query, "images": self._images(r)} for r in recs],
            mode=mode,
            batch_size=len(recs),
        )
        for a in answers:
            if isinstance(a, Exception):
                raise ValueError(str(a))
        return answers


def _load_runtime(spec: str, device: str = "cpu"):
    if spec == ZERO_SHOT:
        return TorchRuntime(None, model=EmoVerse.build(ModelConfig(), lora=False), device=device)
    return open_runtime(spec, "auto", device=device)


def _chunks(records: list[Record], mode: str, size: int) -> list[list[Record]]:
    """Batches of one task (one max_new_tokens, one candidate set) of at most `size` records. Scored records
    go by prompt length (little padding). Generated ones go by query, and a batch that has become a group
    of queries sharing most of their text (ECPE queries about one conversation) ends where the group ends,
    so the runtime computes their common part once."""
    import os.path

    def shares(a: Record, b: Record) -> bool:
        return len(os.path.commonprefix([a.query, b.query])) >= len(b.query) / 2

    chunks: list[list[Record]] = []
    by_task: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_task[r.task].append(r)
    for task, recs in by_task.items():
        if TASKS[task].closed and mode == "score":
            recs = sorted(recs, key=lambda r: len(r.query))
            chunks += [recs[i : i + size] for i in range(0, len(recs), size)]
            continue
        chunk: list[Record] = []
        for r in sorted(recs, key=lambda r: r.query):
            group = len(chunk) >= 2 and shares(chunk[0], chunk[-1])
            if chunk and (len(chunk) >= size or (group and not shares(chunk[0], r))):
                chunks.append(chunk)
                chunk = []
            chunk.append(r)
        if chunk:
            chunks.append(chunk)
    return chunks


def _run_model(
    name: str,
    runtime,
    records: list[Record],
    modes: list[str],
    partial: Path,
    done: dict,
    batch_size: int = 8,
    missing_media: str = "error",
    scores: dict | None = None,
) -> dict[str, dict[str, str]]:
    """Each system's answers by record id; `scores` (when given) gets each scored answer's candidate scores by
    (system, id), so a decision rule can be fitted or checked on them later without running the model again."""
    scores = {} if scores is None else scores
    predictor = Predictor(runtime, missing_media)
    results: dict[str, dict[str, str]] = {}
    with open(partial, "a", encoding="utf-8") as f:
        for mode in modes:
            system = f"{name}/{mode}"
            preds = results.setdefault(system, {})
            todo = []
            for r in records:
                if mode == "score" and not TASKS[r.task].scored and "generate" in modes:
                    continue  # generated once, under the generate mode, and counted under both
                if (system, r.id) in done:
                    preds[r.id] = done[(system, r.id)]
                else:
                    todo.append(r)
            bar = tqdm(total=len(todo), desc=system, unit="rec")
            for chunk in _chunks(todo, mode, batch_size):
                try:
                    answers = predictor.many(chunk, mode)
                except ValueError:  # find and name the bad record
                    for r in chunk:
                        try:
                            predictor.many([r], mode)
                        except ValueError as e:
                            raise ValueError(f"record {r.id} ({r.task}, {r.source}): {e}") from None
                    raise
                for r, answer in zip(chunk, answers, strict=True):
                    preds[r.id] = answer.text
                    row = {"system": system, "id": r.id, "prediction": answer.text}
                    if answer.scores:
                        row["scores"] = scores[(system, r.id)] = answer.scores
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
                f.flush()
                bar.update(len(chunk))
            bar.close()
    # open tasks count under both modes so each system's row covers all five tasks
    if f"{name}/score" in results and f"{name}/generate" in results:
        for rid, p in results[f"{name}/generate"].items():
            results[f"{name}/score"].setdefault(rid, p)
    return results


def evaluate(
    model: str | None,
    data: list[str],
    out: str | os.PathLike,
    *,
    mode: str = "both",
    split: str | None = "test",
    limit: int | None = None,
    tasks: list[str] | None = None,
    baselines: list[str] | None = None,
    threads: int | None = None,
    seed: int = 0,
    missing_media: str = "error",
    batch_size: int = 8,
    precision: str = "fp32",
    device: str = "cpu",
) -> dict:
    import contextlib

    import torch

    if precision not in ("fp32", "bf16"):
        raise ValueError(
            f"precision={precision!r}: use fp32 (the reference) or bf16 (autocast; faster on CPUs with "
            "AVX-512 BF16 or AMX)"
        )
    dev_type = torch.device(device).type
    requested, precision = precision, autocast_precision(precision, dev_type)
    autocast = torch.autocast(dev_type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()

    if threads:
        torch.set_num_threads(threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    all_records = load_records(data, split=split if any(Path(d).is_dir() for d in data) else None)
    records = select_records(all_records, tasks=tasks, limit=limit, seed=seed)
    if not records:
        raise ValueError(f"no records to evaluate in {data} (split={split}, tasks={tasks})")
    modes = ["score", "generate"] if mode == "both" else [mode]
    partial = out / "predictions.partial.jsonl"
    done: dict[tuple[str, str], str] = {}
    scores: dict[tuple[str, str], dict[str, float]] = {}
    if partial.exists():
        for line in partial.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
                done[(row["system"], row["id"])] = row["prediction"]
                if "scores" in row:
                    scores[(row["system"], row["id"])] = row["scores"]
            except (json.JSONDecodeError, KeyError):
                continue  # a line cut by a crash
    systems: dict[str, dict[str, str]] = {}
    if model is not None:
        name = "zero-shot" if model == ZERO_SHOT else "emoverse"
        with autocast:
            systems.update(
                _run_model(
                    name, _load_runtime(model, device), records, modes, partial, done, batch_size, missing_media, scores
                )
            )
    baselines = baselines or []
    if model is None and not baselines:
        raise ValueError("nothing to evaluate: give --model and/or --baselines")
    if "zero-shot" in baselines and model != ZERO_SHOT:
        with autocast:
            systems.update(
                _run_model(
                    "zero-shot",
                    _load_runtime(ZERO_SHOT, device),
                    records,
                    modes,
                    partial,
                    done,
                    batch_size,
                    missing_media,
                    scores,
                )
            )
    fitted = [b for b in baselines if b != "zero-shot"]
    if fitted:
        train = []
        for d in data:
            if Path(d).is_dir():
                train += [r for r in load_records(d, split="train") if not tasks or r.task in tasks]
        for b in fitted:
            systems[b] = run_baseline(b, records, train)

    by_id = {r.id: r for r in records}
    lines = []
    for system, preds in systems.items():
        for rid, p in preds.items():
            r = by_id[rid]
            parsed = TASKS[r.task].parse(p)
            row = {
                "system": system,
                "id": rid,
                "task": r.task,
                "source": r.source,
                "prediction": p,
                "parsed_label": None if parsed.label in (None, INVALID) else parsed.label,
                "response": r.response,
                "label": r.label,
            }
            if (system, rid) in scores:
                row["scores"] = scores[(system, rid)]
            lines.append(json.dumps(row, ensure_ascii=False))

    atomic_write_text(out / "predictions.jsonl", "\n".join(lines) + "\n")
    model_info: dict = {"spec": model}
    if model not in (None, ZERO_SHOT):
        m = read_manifest(model)
        model_info.update({"training": m.get("training"), "created": m.get("created")})
    metrics = {
        "model": model_info,
        "data": [str(d) for d in data],
        "split": split,
        "limit": limit,
        "seed": seed,
        "missing_media": missing_media,
        "precision": precision,
        **({"precision_requested": requested} if requested != precision else {}),
        "device": device if dev_type == "cpu" else f"{device} ({torch.cuda.get_device_name(device)})",
        "records": dict(sorted(Counter(f"{r.task}/{r.source}" for r in records).items())),
        "results": {s: _drop_generated_only(s, compute_metrics(records, p)) for s, p in systems.items()},
        "ci": {s: _drop_generated_only(s, compute_cis(records, p)) for s, p in systems.items()},
        "ci_method": "percentile bootstrap over records, 1000 resamples, 95%",
    }
    atomic_write_json(out / "metrics.json", metrics)
    partial.unlink(missing_ok=True)
    return metrics


def _drop_generated_only(system: str, metrics: dict) -> dict:
    """Label scoring answers with the label alone: FER's action-unit F1 is a generation metric."""
    if system.endswith("/score"):
        return {k: v for k, v in metrics.items() if not k.endswith(".au_f1")}
    return metrics


HEADLINE = [
    "msa.accuracy",
    "msa.f1",
    "mer.accuracy",
    "mer.weighted_f1",
    "fer.accuracy",
    "fer.weighted_f1",
    "fer.au_f1",
    "eri.label_accuracy",
    "eri.rouge_l",
    "ecpe.pair_f1",
    "ecpe.weighted_f1",
]


def format_table(metrics: dict, keys: list[str] | None = None) -> str:
    """Markdown table: one row per metric, one column per system."""
    results = metrics["results"]
    systems = list(results)
    keys = keys or [k for k in HEADLINE if any(k in r for r in results.values())]
    extra = sorted(
        {k for r in results.values() for k in r if "/" in k.split(".")[0] and not k.endswith((".n", ".label_n"))}
    )
    rows = ["| metric | " + " | ".join(systems) + " |", "|---|" + "---|" * len(systems)]
    for k in keys + extra:
        cells = [f"{results[s][k]:.3f}" if k in results[s] else "–" for s in systems]
        rows.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def merge_metrics(paths: list[str | os.PathLike]) -> dict:
    """Several metrics.json files (same records) as one: their systems side by side."""
    merged: dict = {"results": {}, "records": None, "sources": [str(p) for p in paths]}
    for p in paths:
        m = json.loads(Path(p).read_text(encoding="utf-8"))
        if merged["records"] is not None and m["records"] != merged["records"]:
            raise ValueError(f"{p}: evaluated on different records than {paths[0]}; not comparable side by side")
        merged["records"] = m["records"]
        for system, res in m["results"].items():
            merged["results"].setdefault(system, res)
    return merged
