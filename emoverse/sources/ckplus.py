"""CK+48 faces with FACS codes (NetFACS table), split by subject so no subject is in two splits."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from emoverse.records import Record
from emoverse.sources.base import BuildReport, abspath, check_image, read_csv, stable_bucket
from emoverse.tasks import TASKS

NAME = re.compile(r"^(S\d+)_(\d+)_(\d+)\.png$")
CK_LABELS = ("anger", "contempt", "disgust", "fear", "happy", "sadness", "surprise")


def subject_split(subject: str) -> str:
    """70/10/20 train/dev/test by a hash of the subject id."""
    b = stable_bucket("ckplus:" + subject)
    return "train" if b < 7 else "dev" if b < 8 else "test"


def read_facs(raw: Path, report: BuildReport) -> dict[str, list[int]]:
    path = report.read_file(raw / "ckplus_facs_netfacs" / "emotions_set_ckplus_aus.csv", raw)
    aus: dict[str, list[int]] = {}
    for line, row in read_csv(path, ["video", "AU.combination"], report):
        try:
            aus[row["video"].strip()] = sorted({int(a) for a in row["AU.combination"].split("_") if a.strip()})
        except ValueError:
            # e.g. '4_7_9_1.7' (line 256): the table's one-hot AU columns are the unambiguous record
            cols = sorted(int(k[2:]) for k, v in row.items() if re.fullmatch(r"AU\d+", k) and v.strip() == "1")
            if not cols:
                report.bad(f"{path}:{line}", f"AU combination {row['AU.combination']!r} is not '_'-joined numbers")
                continue
            report.drop("ckplus", f"AU combination read from the one-hot columns ({row['video']})")
            aus[row["video"].strip()] = cols
    return aus


def read_ckplus(raw: Path, report: BuildReport) -> Iterator[Record]:
    fer = TASKS["fer"]
    facs = read_facs(raw, report)
    root = raw / "ck_plus_48" / "CK+48"
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: CK+48 image folder missing")
    for label_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        label = fer.canonical(label_dir.name)
        if label not in fer.labels:
            report.bad(str(label_dir), f"folder label {label_dir.name!r} not a FER label")
            continue
        for img in sorted(label_dir.iterdir()):
            m = NAME.match(img.name)
            if not m:
                report.bad(str(img), "file name is not S<subject>_<seq>_<frame>.png")
                continue
            if not check_image(img, report, str(img)):
                continue
            subject, seq = m.group(1), f"{m.group(1)}_{m.group(2)}"
            aus = facs.get(seq)
            if aus is None:
                report.drop("ckplus", "sequence without FACS codes (label-only answer)")
            yield Record(
                id=f"ckplus-{img.stem}",
                task="fer",
                source="ckplus",
                split=subject_split(subject),
                query=fer.query(CK_LABELS, with_aus=aus is not None),
                response=fer.response(label, aus),
                label=label,
                images=[abspath(img)],
            )
