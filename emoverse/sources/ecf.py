"""ECF 1.0 (NUSTM/MECPE text files) and ECF 2.0 Subtask 2 test (SemEval-2024 Task 3 JSON).

One record per non-neutral utterance, in the paper's query form: the whole conversation, the utterances
before the target as candidates, the target, and the gold pairs of that target as 'k_emotion,c;...'.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

from emoverse.records import Record
from emoverse.sources.base import BuildReport
from emoverse.tasks import TASKS

PAIR = re.compile(r"\((\d+),\s*(\d+)\)")
ECF1_FILES = {"train": "train.txt", "dev": "dev.txt", "test": "test.txt"}


def conversation_records(
    source: str, split: str, conv_id: str, utts: list[tuple[str, str, str]], pairs: list[tuple[int, int]]
) -> Iterator[Record]:
    ecpe = TASKS["ecpe"]
    for k, (emotion, _speaker, _text) in enumerate(utts, start=1):
        if emotion == "neutral":
            continue
        causes = [(f"{k}_{emotion}", c) for e, c in pairs if e == k]
        yield Record(
            id=f"{source}-{conv_id}-{k}",
            task="ecpe",
            source=source,
            split=split,
            query=ecpe.query(utts, k),
            response=ecpe.response(causes),
            label=emotion,
        )


def read_ecf1(raw: Path, report: BuildReport) -> Iterator[Record]:
    emotions = set(TASKS["ecpe"].labels) | {"neutral"}
    for split, name in ECF1_FILES.items():
        path = report.read_file(raw / "ecf1_mecpe" / name, raw)
        lines = path.read_text(encoding="utf-8").splitlines()
        i = 0
        while i < len(lines):
            if not lines[i].strip():
                i += 1
                continue
            head = lines[i].split()
            if len(head) != 2 or not all(h.isdigit() for h in head):
                report.bad(f"{path}:{i + 1}", f"expected 'conv_id n_utterances', got {lines[i]!r}")
                i += 1
                continue
            conv_id, n = head[0], int(head[1])
            pairs = [(int(a), int(b)) for a, b in PAIR.findall(lines[i + 1] if i + 1 < len(lines) else "")]
            utts, ok = [], True
            for j in range(n):
                ln = i + 2 + j
                parts = [p.strip() for p in lines[ln].split(" | ")] if ln < len(lines) else []
                if len(parts) < 4 or parts[2] not in emotions or not parts[3]:
                    report.bad(f"{path}:{ln + 1}", "expected 'idx | speaker | emotion | text | time'")
                    ok = False
                    break
                utts.append((parts[2], parts[1], parts[3]))
            i += 2 + n
            if ok:
                yield from conversation_records("ecf1", split, conv_id, utts, pairs)


def read_ecf2(raw: Path, report: BuildReport) -> Iterator[Record]:
    path = report.read_file(raw / "ecf2_semeval2024_ecac" / "Subtask_2_test.json", raw)
    try:
        convs = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    for ci, conv in enumerate(convs):
        try:
            utts = [(u["emotion"], u["speaker"], u["text"]) for u in conv["conversation"]]
            pairs = [(int(e.split("_")[0]), int(c)) for e, c in conv.get("emotion-cause_pairs", [])]
        except (KeyError, TypeError, ValueError) as e:
            report.bad(f"{path}: conversation {ci}", f"malformed conversation ({e!r})")
            continue
        yield from conversation_records("ecf2", "test", str(conv["conversation_ID"]), utts, pairs)
