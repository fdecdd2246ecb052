"""Confidence intervals by the bootstrap over records: one system's metrics, and the paired ratio of two
systems answering the same records (the "B keeps >= 99% of A" question).

The per-record statistics and the metrics computed from them belong to each task (`Task.record_stats` /
`Task.aggregate`), so a resample never re-parses an answer. Percentile intervals, 1,000 resamples, seeded.
"""

from __future__ import annotations

import numpy as np

from emoverse.tasks import Task

N_BOOT = 1000


def _resample(stats: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[idx] for k, v in stats.items()}


def bootstrap_ci(
    task: Task,
    gold: list[str],
    pred: list[str],
    labels: list[str | None],
    *,
    n_boot: int = N_BOOT,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, list[float]]:
    """{metric: [low, high]} for every metric `task.aggregate` reports, by the percentile bootstrap."""
    if not gold:
        return {}
    stats = task.record_stats(gold, pred, labels)
    idx = np.random.default_rng(seed).integers(0, len(gold), size=(n_boot, len(gold)))
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    return {
        k: [round(float(x), 4) for x in np.percentile(v, q)] for k, v in task.aggregate(_resample(stats, idx)).items()
    }


def point(task: Task, gold: list[str], pred: list[str], labels: list[str | None]) -> dict[str, float]:
    """The metrics on the records as they are (the centre the bootstrap resamples around)."""
    stats = task.record_stats(gold, pred, labels)
    return {k: float(v[0]) for k, v in task.aggregate(_resample(stats, np.arange(len(gold))[None])).items()}


def paired_ratio(
    task: Task,
    gold: list[str],
    pred_ref: list[str],
    pred_new: list[str],
    labels: list[str | None],
    metric: str | None = None,
    *,
    n_boot: int = N_BOOT,
    seed: int = 0,
    level: float = 0.95,
) -> dict:
    """new/ref of one metric with a paired bootstrap CI: both systems are scored on the same resampled
    records, so what the records have in common cancels and the interval is about the difference alone."""
    metric = metric or task.primary
    ref, new = task.record_stats(gold, pred_ref, labels), task.record_stats(gold, pred_new, labels)
    # label stats index labels per call: re-index both onto one vocabulary so gold agrees between them
    if "gold" in ref:
        ref, new = _shared_label_index(task, gold, pred_ref, pred_new, ref, new)
    idx = np.random.default_rng(seed).integers(0, len(gold), size=(n_boot, len(gold)))
    a = task.aggregate(_resample(ref, idx))[metric]
    b = task.aggregate(_resample(new, idx))[metric]
    ratio = b / np.where(a > 0, a, np.nan)
    whole = np.arange(len(gold))[None]
    a0 = float(task.aggregate(_resample(ref, whole))[metric][0])
    b0 = float(task.aggregate(_resample(new, whole))[metric][0])
    r0 = b0 / max(a0, 1e-12)
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    lo, hi = np.nanpercentile(ratio, q)
    diff_lo, diff_hi = np.percentile(b - a, q)
    return {
        "metric": metric,
        "reference": round(a0, 4),
        "new": round(b0, 4),
        "ratio": round(r0, 4),
        "ratio_ci": [round(float(lo), 4), round(float(hi), 4)],
        "difference": round(b0 - a0, 4),
        "difference_ci": [round(float(diff_lo), 4), round(float(diff_hi), 4)],
        "n": len(gold),
    }


def _shared_label_index(task, gold, pred_ref, pred_new, ref, new):
    both = task.record_stats(gold + gold, list(pred_ref) + list(pred_new), [None] * (2 * len(gold)))
    n = len(gold)
    ref = {**ref, "gold": both["gold"][:n], "pred": both["pred"][:n]}
    new = {**new, "gold": both["gold"][n:], "pred": both["pred"][n:]}
    return ref, new


def verdict(ratio_ci: list[float], budget: float) -> str:
    """An accuracy budget's verdict from the CI of a ratio: pass when the whole interval clears it, fail
    when the whole interval lies below, inconclusive when it straddles."""
    lo, hi = ratio_ci
    if lo >= budget:
        return "pass"
    if hi < budget:
        return "fail"
    return "inconclusive"
