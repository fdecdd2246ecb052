"""`emoverse compress`: run a recipe (an ordered list of stages, as data) on a model artifact.

Every stage's type and parameters are checked before any work; the result is written atomically and
its manifest names the recipe, the parent artifact's digest, the calibration set's hash and sizes.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, fields
from pathlib import Path

import yaml

from emoverse.artifacts import MODEL_KINDS, atomic_dir, folder_bytes, manifest_digest, verify, write_manifest
from emoverse.compress.stages import STAGES, run_stage
from emoverse.config import RecipeError, load_config
from emoverse.model import EmoVerse
from emoverse.records import load_records

RECIPES = Path(__file__).parent / "recipes"


def parse_recipe(path: str | os.PathLike, overrides: list[str] | None = None) -> list[tuple[str, object]]:
    """[(stage type, typed stage object)], or RecipeError naming the stage and key. Each stage's parameters
    go through the same typed loader as training recipes; overrides address them as `stages.0.group_size=128`."""
    path = Path(path)
    if not path.is_file():
        shipped = RECIPES / f"{path}.yaml"
        if not shipped.is_file():
            known = ", ".join(sorted(p.stem for p in RECIPES.glob("*.yaml")))
            raise RecipeError(f"{path}: no such recipe file or shipped compress recipe ({known})")
        path = shipped
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: invalid YAML ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("stages"), list) or not doc["stages"]:
        raise RecipeError(f"{path}: expected a mapping with a non-empty 'stages' list")
    per_stage: dict[int, list[str]] = {}
    for item in overrides or []:
        key, _, value = item.partition("=")
        parts = key.split(".", 2)
        if len(parts) != 3 or parts[0] != "stages" or not parts[1].isdigit() or not _:
            raise RecipeError(f"override {item!r}: expected stages.<index>.<parameter>=<value>")
        per_stage.setdefault(int(parts[1]), []).append(f"{parts[2]}={value}")
    out = []
    for i, st in enumerate(doc["stages"]):
        if not isinstance(st, dict) or "type" not in st:
            raise RecipeError(f"{path}: stages[{i}] needs a 'type'")
        kind = st["type"]
        if kind not in STAGES:
            raise RecipeError(f"{path}: stages[{i}]: unknown stage type {kind!r}; known: {sorted(STAGES)}")
        params = {k: v for k, v in st.items() if k != "type"}
        stage = load_config(
            STAGES[kind], params, per_stage.pop(i, None), where=f"{path}: stages[{i}] ({kind})"
        )
        for f in fields(stage):
            v = getattr(stage, f.name)
            if (
                isinstance(v, (int, float))
                and not isinstance(v, bool)
                and v <= 0
                and f.name not in ("seed", "max_minutes")
            ):
                raise RecipeError(f"{path}: stages[{i}] ({kind}): {f.name}={v!r} must be positive")
        out.append((kind, stage))
    if per_stage:
        raise RecipeError(f"{path}: overrides for stages {sorted(per_stage)}, which the recipe does not have")
    return out


def calibration_set(
    data: str | os.PathLike, tokenizer_dir: Path, n_per_task: int = 16, seed: int = 0
) -> tuple[list[dict], str]:
    """Chat-rendered AMT train records of every task (text part; image slots as pad tokens), and their hash."""
    import random

    from emoverse.model import load_tokenizer
    from emoverse.prompting import PromptBuilder
    from emoverse.tasks import TASK_NAMES, TASKS

    tok = load_tokenizer(str(tokenizer_dir))
    builder = PromptBuilder(tok, n_visual=4, max_length=4096, image_size=32, max_video_frames=1)
    builder.missing_media = "drop"
    per_task = []
    for task in TASKS:
        if task not in TASK_NAMES and not (Path(data) / task / "train.jsonl").is_file():
            continue  # a registered extra task this data folder does not have
        recs = load_records(Path(data) / task / "train.jsonl")
        rows = []
        for r in random.Random(f"{seed}:{task}").sample(recs, min(n_per_task, len(recs))):
            enc = builder.encode(r.query, r.response, [], [])
            rows.append({"task": task, "id": r.id, "input_ids": enc.input_ids})
        per_task.append(rows)
    # round-robin over tasks, so the first N records a stage keeps cover every task (not msa, mer, ... in blocks)
    calib = [row for group in zip(*per_task, strict=False) for row in group]
    calib += [row for rows in per_task for row in rows[min(map(len, per_task)) :]]
    digest = hashlib.sha256(json.dumps([(c["id"], c["input_ids"]) for c in calib]).encode()).hexdigest()
    return calib, digest


def compress(
    recipe: str | os.PathLike,
    model: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    overrides: list[str] | None = None,
) -> dict:
    stages = parse_recipe(recipe, overrides)  # fails before any work
    for kind, params in stages:
        if kind == "gptqmodel_w4a16":  # its separate environment must exist before hours of distillation
            from emoverse.compress.stages import gptqmodel_python

            gptqmodel_python(params)
    model = EmoVerse.full_form(model)  # an adapter-form release is expanded once (cached)
    parent = verify(model, kind=MODEL_KINDS)
    calib, calib_hash = calibration_set(data, model / "llm")
    infos = []
    with tempfile.TemporaryDirectory(
        prefix="emoverse-compress-", dir=Path(out).parent if Path(out).parent.exists() else None
    ) as work:
        src = model
        for i, (kind, params) in enumerate(stages):
            dst = Path(work) / f"stage{i}"
            dst.mkdir()
            infos.append({**run_stage(kind, params, src, dst, calib, data), "params": asdict(params)})
            src = dst
        with atomic_dir(out, overwrite=overwrite) as tmp:
            for p in src.iterdir():
                os.replace(p, tmp / p.name)
            from emoverse.artifacts import library_versions

            manifest = write_manifest(
                tmp,
                kind="emoverse-model",
                producer={
                    "stage": "compress",
                    "recipe": str(recipe),
                    "overrides": overrides or [],
                    "stages": infos,
                },
                inputs={
                    "parent": {"path": str(model.resolve()), "digest": manifest_digest(parent)},
                    "calibration": {
                        "sha256": calib_hash,
                        "records": len(calib),
                        "tasks": sorted({c["task"] for c in calib}),
                        "used": [
                            {
                                "stage": info["type"],
                                "records": [
                                    {
                                        "id": c["id"],
                                        "task": c["task"],
                                        "sha256": hashlib.sha256(
                                            json.dumps(c["input_ids"]).encode()
                                        ).hexdigest()[:16],
                                    }
                                    for c in calib[: info.get("calibration_samples", 0)]
                                ],
                            }
                            for info in infos
                            if info.get("calibration_samples")
                        ],
                    },
                },
                extra={
                    "sizes": {"bytes": folder_bytes(tmp), "parent_bytes": folder_bytes(model)},
                    "compress_libraries": library_versions(
                        ("llmcompressor", "compressed-tensors", "nvidia-modelopt", "transformers")
                    ),
                },
            )
    return manifest
