"""`emoverse data validate`: find bad records before a long run — schema, task, label set, media, length.

Needs only a tokenizer (no model weights): every problem is reported as 'file:line: what'.
"""

from __future__ import annotations

import json
from pathlib import Path

from emoverse.model import load_tokenizer
from emoverse.prompting import MediaError, PromptBuilder, PromptTooLong, load_image
from emoverse.records import record_from_dict


def validate_files(
    files: list[str],
    *,
    max_length: int = 2048,
    llm: str = "smollm2-135m-instruct",
    check_media: bool = True,
    n_visual: int = 4,
) -> tuple[list[str], int]:
    builder = PromptBuilder(load_tokenizer(llm), n_visual, max_length, 32, 4)
    problems: list[str] = []
    n = 0
    for f in files:
        path = Path(f)
        if path.is_dir():
            problems += [f"{path}: is a folder; pass its .jsonl files"]
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            problems.append(f"{path}: cannot read ({e})")
            continue
        if path.suffix == ".json":
            try:
                items = [(i, obj) for i, obj in enumerate(json.loads(text))]
            except (json.JSONDecodeError, TypeError) as e:
                problems.append(f"{path}: invalid JSON list ({e})")
                continue
            fmt = "{}: record {}"
        else:
            items = []
            for lineno, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    items.append((lineno, json.loads(line)))
                except json.JSONDecodeError as e:
                    n += 1
                    problems.append(f"{path}:{lineno}: invalid JSON: {e.msg}")
            fmt = "{}:{}"
        for i, obj in items:
            n += 1
            where = fmt.format(path, i)
            try:
                rec = record_from_dict(obj, index=i)
                if check_media:
                    for img in rec.images:
                        load_image(img, 32)
                builder.encode(rec.query, rec.response, rec.images if check_media else [], [])
            except PromptTooLong as e:
                problems.append(f"{where}: prompt too long: {e}")
            except (ValueError, MediaError) as e:
                problems.append(f"{where}: {e}")
    return problems, n
