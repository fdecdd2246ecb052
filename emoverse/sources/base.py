"""Shared pieces of the raw-source readers: error/skip reporting, CSV reading, stable splits."""

from __future__ import annotations

import csv
import hashlib
import io
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from emoverse.artifacts import sha256_file


class SourceError(ValueError):
    """A malformed raw file or row; the message names the file and line."""


@dataclass
class BuildReport:
    """What a build read (with hashes), what it dropped by rule, and what it skipped as malformed."""

    skip_bad: bool = False  # False: a malformed row raises; True: it is skipped and reported
    files: dict[str, str] = field(default_factory=dict)
    dropped: Counter = field(default_factory=Counter)  # (source, reason) -> count, rule-based drops
    skipped: list[str] = field(default_factory=list)  # "file:line: reason" for malformed rows
    images: dict[str, str] = field(default_factory=dict)  # image path -> sha256 (digested per folder)

    def read_file(self, path: Path, raw: Path) -> Path:
        if not path.is_file():
            raise SourceError(f"{path}: missing source file")
        self.files[path.relative_to(raw).as_posix()] = sha256_file(path)
        return path

    def image_digests(self, raw: Path) -> dict[str, dict]:
        """One digest per top-level image folder (too many images to list one by one)."""
        groups: dict[str, list[str]] = {}
        for path, digest in sorted(self.images.items()):
            rel = Path(path).relative_to(raw).as_posix()
            groups.setdefault(rel.split("/")[0], []).append(f"{rel} {digest}")
        return {
            k: {"files": len(v), "sha256": hashlib.sha256("\n".join(v).encode()).hexdigest()} for k, v in groups.items()
        }

    def drop(self, source: str, reason: str) -> None:
        self.dropped[f"{source}: {reason}"] += 1

    def bad(self, where: str, reason: str) -> None:
        if not self.skip_bad:
            raise SourceError(f"{where}: {reason} (rerun with --skip-bad to skip and report such rows)")
        self.skipped.append(f"{where}: {reason}")


def read_csv(path: Path, required: list[str], report: BuildReport) -> Iterator[tuple[int, dict]]:
    """Rows of a CSV as dicts with their 1-based file line, after checking the header."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in required if c not in (reader.fieldnames or [])]
            if missing:
                raise SourceError(f"{path}:1: missing column(s) {missing}; found {reader.fieldnames}")
            for row in reader:
                if None in row or any(v is None for v in row.values()):
                    report.bad(f"{path}:{reader.line_num}", "wrong number of fields (truncated or malformed row)")
                    continue
                yield reader.line_num, row
    except UnicodeDecodeError as e:
        raise SourceError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise SourceError(f"{path}: malformed CSV ({e})") from None


def stable_bucket(key: str, buckets: int = 10) -> int:
    """A split bucket that depends only on the key (not on order, machine or Python's hash seed)."""
    return int(hashlib.sha1(key.encode()).hexdigest(), 16) % buckets


def check_image(path: Path, report: BuildReport, where: str) -> bool:
    """True when the image decodes; a corrupt or missing image is reported with its path."""
    from PIL import Image

    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            im.load()
        report.images[str(path)] = hashlib.sha256(data).hexdigest()
        return True
    except (OSError, SyntaxError) as e:
        report.bad(where, f"unreadable image {path} ({e})")
        return False


def abspath(path: Path) -> str:
    return os.path.abspath(path)
