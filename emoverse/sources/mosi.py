"""CMU-MOSI transcripts (label.csv): score > 0 positive, < 0 negative, 0 dropped; given splits."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from emoverse.records import Record
from emoverse.sources.base import BuildReport, read_csv
from emoverse.tasks import TASKS

SPLITS = {"train": "train", "valid": "dev", "dev": "dev", "test": "test"}


def read_mosi(raw: Path, report: BuildReport) -> Iterator[Record]:
    msa = TASKS["msa"]
    path = report.read_file(raw / "cmu_mosi_text" / "label.csv", raw)
    for line, row in read_csv(path, ["id", "text", "label", "mode"], report):
        where = f"{path}:{line}"
        text = row["text"].strip()
        try:
            score = float(row["label"])
        except ValueError:
            report.bad(where, f"score {row['label']!r} is not a number")
            continue
        split = SPLITS.get(row["mode"].strip())
        if split is None:
            report.bad(where, f"mode {row['mode']!r} not one of {list(SPLITS)}")
            continue
        if not text:
            report.bad(where, "empty utterance")
            continue
        if score == 0:
            report.drop("mosi", "zero sentiment score")
            continue
        label = "positive" if score > 0 else "negative"
        yield Record(
            id=f"mosi-{split}-{row['id']}",
            task="msa",
            source="mosi",
            split=split,
            query=msa.query(text),
            response=msa.format_label(label),
            label=label,
        )
