"""The AMT record: the paper's ms-swift form plus id/task/source/split/label, JSONL read/write, validation.

Errors always name the file and line, so a bad record is found before a long run, not in it.
"""

from __future__ import annotations

import json
import os
import random
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from emoverse.artifacts import atomic_write_text
from emoverse.tasks import get_task, infer_task

SPLITS = ("train", "dev", "test")


class RecordError(ValueError):
    """A record that cannot be used; the message starts with 'file:line:'."""


@dataclass
class Record:
    id: str
    task: str
    source: str
    split: str
    query: str
    response: str
    label: str | None = None
    images: list[str] = field(default_factory=list)
    videos: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)


def validate(rec: Record) -> None:
    """Raise ValueError (no location) when a record breaks the schema or its task's label set."""
    task = get_task(rec.task)
    if not isinstance(rec.query, str) or not rec.query.strip():
        raise ValueError("empty query")
    if not isinstance(rec.response, str):
        raise ValueError("response must be a string")
    for key in ("images", "videos"):
        paths = getattr(rec, key)
        if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
            raise ValueError(f"{key} must be a list of paths")
    task.check_label(rec.label)


def record_from_dict(
    obj: dict, *, default_split: str | None = "test", default_source: str = "external", index: int = 0
) -> Record:
    """Accept our own form or the bare ms-swift form ({query, response, images?, videos?})."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if "query" not in obj or "response" not in obj:
        raise ValueError("missing 'query' or 'response'")
    for key in ("query", "response"):
        if not isinstance(obj[key], str):
            raise ValueError(f"'{key}' must be a string, got {type(obj[key]).__name__}")
    for key in ("task", "label", "id", "source", "split"):
        if obj.get(key) is not None and not isinstance(obj[key], (str, int)) or isinstance(obj.get(key), bool):
            raise ValueError(f"'{key}' must be a string, got {type(obj[key]).__name__}")
    task = obj.get("task") or infer_task(str(obj["query"]))
    if task is None:
        raise ValueError("no 'task' field and the query carries no known task tag")
    label = obj.get("label")
    if label is None and get_task(task).closed and obj["response"]:
        parsed = get_task(task).parse_label(obj["response"])
        label = None if parsed.startswith("<") else parsed
    known = {"id", "task", "source", "split", "query", "response", "label", "images", "videos"}
    if not obj.get("split") and default_split is None:
        raise ValueError(
            "no 'split' field: name the file's split (--extra FILE:train|dev|test) or give each "
            "record one; a record never becomes a test record by default"
        )
    rec = Record(
        id=str(obj.get("id") or f"{default_source}-{index}"),
        task=task,
        source=str(obj.get("source") or default_source),
        split=str(obj.get("split") or default_split),
        query=obj["query"],
        response=obj["response"],
        label=label,
        images=obj.get("images") or [],
        videos=obj.get("videos") or [],
    )
    unknown = set(obj) - known - {"system", "history"}
    if unknown:
        raise ValueError(f"unknown field(s) {sorted(unknown)}")
    validate(rec)
    return rec


def read_records(path: str | os.PathLike, *, split: str | None = None, require_split: bool = False) -> Iterator[Record]:
    """Read a JSONL file (our form or ms-swift form) or a JSON list (the paper's files). A record without a
    'split' field takes `split`, else "test" — or, with require_split, is an error naming the record."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RecordError(f"{path}: not UTF-8 text ({e})") from None
    source = path.stem
    if path.suffix == ".json":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise RecordError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
        if not isinstance(items, list):
            raise RecordError(f"{path}:1: expected a JSON list of records")
        for i, obj in enumerate(items):
            try:
                yield record_from_dict(
                    obj,
                    default_split=split or (None if require_split else "test"),
                    default_source=source,
                    index=i,
                )
            except ValueError as e:
                raise RecordError(f"{path}: record {i}: {e}") from None
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise RecordError(f"{path}:{lineno}: invalid JSON: {e.msg}") from None
        try:
            yield record_from_dict(
                obj,
                default_split=split or (None if require_split else "test"),
                default_source=source,
                index=lineno,
            )
        except ValueError as e:
            raise RecordError(f"{path}:{lineno}: {e}") from None


def load_records(paths: str | os.PathLike | Iterable[str | os.PathLike], *, split: str | None = None) -> list[Record]:
    """Records from files or directories (a directory: every *.jsonl below it, sorted; a split filter)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*.jsonl") if split is None or f.stem == split)
        elif p.exists():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or directory")
    out: list[Record] = []
    for f in files:
        out.extend(read_records(f))
    if split is not None:
        out = [r for r in out if r.split == split]
    return out


def write_records(path: str | os.PathLike, records: Iterable[Record]) -> int:
    """Write JSONL atomically (temp file + fsync + rename); returns the count."""

    lines = [r.to_json() for r in records]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)


def select_records(records: list[Record], *, tasks: list[str] | None, limit: int | None, seed: int = 0) -> list[Record]:
    """Filter by task; keep at most `limit` per (task, source), a seeded sample in file order."""
    if tasks:
        for t in tasks:
            get_task(t)
        records = [r for r in records if r.task in tasks]
    if not limit:
        return records
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        groups[(r.task, r.source)].append(i)
    keep: set[int] = set()
    for key, idx in sorted(groups.items()):
        keep.update(random.Random(f"{seed}:{key}").sample(idx, min(limit, len(idx))))
    return [r for i, r in enumerate(records) if i in keep]
