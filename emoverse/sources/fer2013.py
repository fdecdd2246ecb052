"""FER2013 PrivateTest faces (in-the-wild, label only): test split."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from emoverse.records import Record
from emoverse.sources.base import BuildReport, abspath, check_image
from emoverse.tasks import TASKS

FER2013_LABELS = ("anger", "disgust", "fear", "happy", "neutral", "sadness", "surprise")


def read_fer2013(raw: Path, report: BuildReport) -> Iterator[Record]:
    fer = TASKS["fer"]
    root = raw / "fer2013_subset" / "test"
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: FER2013 test folder missing")
    for label_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        label = fer.canonical(label_dir.name)
        if label not in FER2013_LABELS:
            report.bad(str(label_dir), f"folder label {label_dir.name!r} not a FER2013 label")
            continue
        for img in sorted(label_dir.glob("*.jpg")):
            if not check_image(img, report, str(img)):
                continue
            yield Record(
                id=f"fer2013-{img.stem}",
                task="fer",
                source="fer2013",
                split="test",
                query=fer.query(FER2013_LABELS, with_aus=False),
                response=fer.response(label, None),
                label=label,
                images=[abspath(img)],
            )
