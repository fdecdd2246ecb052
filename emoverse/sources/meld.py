"""MELD (declare-lab/MELD): MER from Emotion, MSA from Sentiment with neutral dropped."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from emoverse.records import Record
from emoverse.sources.base import BuildReport, read_csv
from emoverse.tasks import TASKS

FILES = {"train": "train_sent_emo.csv", "dev": "dev_sent_emo.csv", "test": "test_sent_emo.csv"}
COLUMNS = ["Utterance", "Emotion", "Sentiment", "Dialogue_ID", "Utterance_ID"]


def read_meld(raw: Path, report: BuildReport) -> Iterator[Record]:
    mer, msa = TASKS["mer"], TASKS["msa"]
    for split, name in FILES.items():
        path = report.read_file(raw / "meld" / name, raw)
        for line, row in read_csv(path, COLUMNS, report):
            where = f"{path}:{line}"
            text = row["Utterance"].strip()
            emotion, sentiment = row["Emotion"].strip().lower(), row["Sentiment"].strip().lower()
            if not text:
                report.bad(where, "empty utterance")
                continue
            if emotion not in mer.labels:
                report.bad(where, f"emotion {emotion!r} not in {list(mer.labels)}")
                continue
            uid = f"dia{row['Dialogue_ID']}_utt{row['Utterance_ID']}"
            yield Record(
                id=f"meld-mer-{split}-{uid}",
                task="mer",
                source="meld",
                split=split,
                query=mer.query(text),
                response=mer.format_label(emotion),
                label=emotion,
            )
            if sentiment == "neutral":
                report.drop("meld", "neutral sentiment (MSA is binary)")
            elif sentiment in msa.labels:
                yield Record(
                    id=f"meld-msa-{split}-{uid}",
                    task="msa",
                    source="meld",
                    split=split,
                    query=msa.query(text),
                    response=msa.format_label(sentiment),
                    label=sentiment,
                )
            else:
                report.bad(where, f"sentiment {sentiment!r} not positive/negative/neutral")
