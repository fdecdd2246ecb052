"""`emoverse data build`: raw sources -> one JSONL per task and split, plus a manifest."""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from pathlib import Path

from tqdm import tqdm

from emoverse.artifacts import atomic_dir, write_manifest
from emoverse.records import SPLITS, Record, read_records, write_records
from emoverse.sources import SOURCES, BuildReport, missing_sources


def build_amt(
    raw: str | os.PathLike,
    out: str | os.PathLike,
    *,
    sources: list[str] | None = None,
    extra: list[str] | None = None,
    skip_bad: bool = False,
    overwrite: bool = False,
) -> dict:
    """Read every source (deterministically), write `out/<task>/<split>.jsonl` atomically, return the manifest.

    `extra`: JSON/JSONL files already in the ms-swift or AMT form (e.g. the official AMT files), added as-is.
    """
    raw = Path(raw).resolve()
    if not raw.is_dir():
        raise FileNotFoundError(f"{raw}: raw data directory not found")
    names = sources or list(SOURCES)
    unknown = [n for n in names if n not in SOURCES]
    if unknown:
        raise ValueError(f"unknown source(s) {unknown}; known: {list(SOURCES)}")
    missing = missing_sources(raw, names)
    if missing:
        raise FileNotFoundError(
            "raw sources missing (docs/data.md; --sources builds from a subset):\n  " + "\n  ".join(missing)
        )
    report = BuildReport(skip_bad=skip_bad)
    records: list[Record] = []
    for name in tqdm(names, desc="sources", unit="src"):
        records.extend(SOURCES[name](raw, report))
    for entry in extra or []:
        # FILE:SPLIT names the split of records that carry none; records without either are refused
        path, _, split = entry.rpartition(":") if entry.rpartition(":")[2] in SPLITS else (entry, "", "")
        records.extend(read_records(path, split=split or None, require_split=True))
    seen: set[str] = set()
    for r in records:
        if r.id in seen:
            raise ValueError(f"duplicate record id {r.id!r} (source {r.source})")
        seen.add(r.id)

    groups: dict[tuple[str, str], list[Record]] = defaultdict(list)
    for r in records:
        groups[(r.task, r.split)].append(r)
    counts: dict = defaultdict(lambda: defaultdict(dict))
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for (task, split), recs in sorted(groups.items()):
            write_records(tmp / task / f"{split}.jsonl", recs)
            by_source = Counter(r.source for r in recs)
            by_label = Counter(r.label or "-" for r in recs)
            counts[task][split] = {
                "total": len(recs),
                "by_source": dict(sorted(by_source.items())),
                "by_label": dict(sorted(by_label.items())),
            }
        manifest = write_manifest(
            tmp,
            kind="amt-data",
            producer={"stage": "data build", "sources": names, "skip_bad": skip_bad},
            inputs={
                "raw_dir": str(raw),
                "raw_files": report.files,
                "raw_images": report.image_digests(raw),
                "extra": [str(e) for e in extra or []],
            },
            extra={
                "counts": counts,
                "dropped": dict(sorted(report.dropped.items())),
                "skipped": report.skipped,
            },
        )
    return manifest


def summary_table(manifest: dict) -> str:
    lines = ["task  split  records  by source"]
    for task, splits in manifest["counts"].items():
        for split, c in splits.items():
            lines.append(f"{task:<5} {split:<6} {c['total']:>7}  {c['by_source']}")
    for reason, n in manifest.get("dropped", {}).items():
        lines.append(f"dropped {n:>6}  {reason}")
    for s in manifest.get("skipped", [])[:20]:
        lines.append(f"skipped: {s}")
    return "\n".join(lines)
