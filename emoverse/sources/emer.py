"""EMER reasons: v1 (labelled, with subtitles) and v2 (long reasons, label where the sample is in v1).

Split by a hash of the sample name (60% train / 40% test) so a sample's v1 and v2 reasons share a split.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from emoverse.records import Record
from emoverse.sources.base import BuildReport, read_csv, stable_bucket
from emoverse.tasks import TASKS

SUBTITLE = re.compile(r"subtitles?[^\"\u201c]{0,40}[\"\u201c]([^\"\u201d]{2,300})[\"\u201d]", re.I)


def sample_split(name: str) -> str:
    return "train" if stable_bucket("emer:" + name) < 6 else "test"


def read_emer(raw: Path, report: BuildReport) -> Iterator[Record]:
    eri = TASKS["eri"]
    v1 = report.read_file(raw / "emer_affectgpt" / "dataset-v1" / "gt-eng.csv", raw)
    labels: dict[str, str] = {}
    for line, row in read_csv(v1, ["names", "emotions", "subtitles", "reasons"], report):
        name, label = row["names"].strip(), row["emotions"].strip().lower()
        if label not in eri.EMOTION_WORDS:
            report.bad(f"{v1}:{line}", f"emotion {label!r} not in {sorted(eri.EMOTION_WORDS)}")
            continue
        if not row["reasons"].strip():
            report.bad(f"{v1}:{line}", "empty reason")
            continue
        labels[name] = label
        yield Record(
            id=f"emer1-{name}",
            task="eri",
            source="emer1",
            split=sample_split(name),
            query=eri.query(row["subtitles"].strip()),
            response=row["reasons"].strip(),
            label=label,
        )
    v2 = report.read_file(raw / "emer_affectgpt" / "dataset-v2" / "final-EMER-reason.csv", raw)
    for line, row in read_csv(v2, ["name", "english"], report):
        name, reason = row["name"].strip(), row["english"].strip()
        if not reason:
            report.bad(f"{v2}:{line}", "empty reason")
            continue
        m = SUBTITLE.search(reason)
        if not m:
            report.drop("emer2", "no subtitle quoted in the reason (query without the utterance)")
        yield Record(
            id=f"emer2-{name}",
            task="eri",
            source="emer2",
            split=sample_split(name),
            query=eri.query(m.group(1).strip() if m else None),
            response=reason,
            label=labels.get(name),
        )
