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

import torch
import yaml

from emoverse.artifacts import (
    MODEL_KINDS,
    atomic_dir,
    folder_bytes,
    library_versions,
    manifest_digest,
    verify,
    write_manifest,
)
from emoverse.compress.stages import STAGES, gptqmodel_python, run_stage
from emoverse.config import RecipeError, load_config
from emoverse.model import EmoVerse
from emoverse.records import load_records
from emoverse.tasks import TASK_NAMES, TASKS

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
        stage = load_config(STAGES[kind], params, per_stage.pop(i, None), where=f"{path}: stages[{i}] ({kind})")
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
    data: str | os.PathLike, model: EmoVerse, n_per_task: int = 16, seed: int = 0
) -> tuple[list[dict], str]:
    """AMT train records of every task, encoded as inference sees them, and their hash.

    Each row holds `input_ids` and `inputs_embeds`: the LLM's input with the image/frame slots filled by the
    projector's real visual tokens (FER faces, MELD/MOSI frames). A quantizer calibrated on pad tokens in
    those slots never sees the activations FER depends on. Rows are round-robin over tasks, so any prefix a
    stage keeps covers every task.
    """
    import random

    builder = model.prompts
    missing = builder.missing_media
    builder.missing_media = "drop"  # the paper's test lists name MELD videos distributed separately
    per_task = []
    try:
        for task in TASKS:
            if task not in TASK_NAMES and not (Path(data) / task / "train.jsonl").is_file():
                continue  # a registered extra task this data folder does not have
            recs = load_records(Path(data) / task / "train.jsonl")
            rows = []
            for r in random.Random(f"{seed}:{task}").sample(recs, min(n_per_task, len(recs))):
                media = (r.images, r.videos) if model.vision is not None else ([], [])
                enc = builder.encode(r.query, r.response, list(media[0]), list(media[1]))
                batch = builder.collate([enc])
                with torch.no_grad():
                    embeds = model.embed(batch["input_ids"], batch["visual_mask"], batch["media"])[0]
                rows.append(
                    {
                        "task": task,
                        "id": r.id,
                        "input_ids": enc.input_ids,
                        "inputs_embeds": embeds.float(),
                        "visual_tokens": int(sum(enc.visual_mask)),
                        "media": [m.key for m in enc.media],
                    }
                )
            per_task.append(rows)
    finally:
        builder.missing_media = missing
    # round-robin over tasks, so the first N records a stage keeps cover every task (not msa, mer, ... in blocks)
    calib = [row for group in zip(*per_task, strict=False) for row in group]
    calib += [row for rows in per_task for row in rows[min(map(len, per_task)) :]]
    digest = hashlib.sha256(json.dumps([(c["id"], c["input_ids"], c["media"]) for c in calib]).encode()).hexdigest()
    return calib, digest


def _used(calib: list[dict], info: dict) -> list[dict]:
    """The calibration records a stage used: the ids it reports, else its first `calibration_samples`."""
    if "calibration_ids" in info:
        by_id = {c["id"]: c for c in calib}
        return [by_id[i] for i in info["calibration_ids"]]
    return calib[: info.get("calibration_samples", 0)]


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
            gptqmodel_python(params)
    model = EmoVerse.full_form(model)  # an adapter-form release is expanded once (cached)
    parent = verify(model, kind=MODEL_KINDS)
    # enough records per task that the largest calibration_samples any stage asks for is round-robin over all
    need = max((getattr(params, "calibration_samples", 0) for _, params in stages), default=0)
    extra = max((n for _, p in stages for n in (getattr(p, "extra_calibration", None) or {}).values()), default=0)
    per_task = max(16, -(-need // len(TASKS)) + extra)
    # stages that calibrate nothing (w4_base_lora, fp8_dynamic, int8_weight_only) need no encoded records
    calib, calib_hash = calibration_set(data, EmoVerse.load(model), n_per_task=per_task) if need else ([], None)
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
                                            json.dumps([c["input_ids"], c["media"]]).encode()
                                        ).hexdigest()[:16],
                                        "visual_tokens": c["visual_tokens"],
                                    }
                                    for c in _used(calib, info)
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
