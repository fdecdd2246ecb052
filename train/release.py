"""A finished training run -> the adapter-form release (`models/emoverse-nano`): LoRA weights, projector and
config, with the base LLM and encoder named by package and sha256, and a manifest saying how it was made.

    emoverse release --run runs/nano-release --out models/emoverse-nano
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from emoverse.artifacts import ArtifactError, cpu_name, read_manifest
from emoverse.config import load_config, to_yaml
from emoverse.model import EmoVerse
from emoverse.train.trainer import TrainConfig, list_checkpoints


def last_checkpoint(run: Path) -> Path:
    ckpts = list_checkpoints(run / "checkpoints")
    if not ckpts:
        raise ArtifactError(f"{run}: no checkpoints (train with `emoverse train` first)")
    return ckpts[-1]


def release(run: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False) -> dict:
    run = Path(run)
    summary_path = run / "train_summary.json"
    if not summary_path.is_file():
        raise ArtifactError(
            f"{run}: training has not finished (no train_summary.json); resume it with the same "
            "`emoverse train` command first"
        )
    summary = json.loads(summary_path.read_text())
    trained = read_manifest(run / "model")
    recipe = trained["producer"]["recipe"]
    if (recipe.get("distill") or {}).get("teacher"):
        raise ArtifactError(
            f"{run}: a distilled student has no adapter form (the release names a package's base LLM, the student's "
            f"base is its pruned teacher); use the full model folder {run / 'model'} as it is"
        )
    cfg = load_config(TrainConfig, None, [f"{k}={json.dumps(v)}" for k, v in recipe.items()])  # schema-checked
    model = EmoVerse.build(cfg.model)
    model.freeze_base()
    ckpt = last_checkpoint(run)
    weights = load_file(ckpt / "trainable.safetensors")
    params = model.trainable_parameters()
    if set(weights) != set(params):
        raise ArtifactError(
            f"{ckpt}: checkpoint does not match the recipe's model ({sorted(set(weights) ^ set(params))[:2]})"
        )
    with torch.no_grad():
        for k, v in weights.items():
            params[k].copy_(v)
    info = {
        "recipe": recipe,
        "data": trained.get("inputs", {}).get("data"),
        "training": {k: summary.get(k) for k in ("steps", "tokens", "seconds", "tokens_per_s", "stages")},
        "wall_seconds": round(sum(s.get("seconds", 0.0) for s in summary.get("stages", {}).values()), 1),
        "cpu": trained.get("release_cpu") or cpu_name(),
        "device": summary.get("device", "cpu"),  # where the steps ran (a GPU-trained run: its name)
        "checkpoint": ckpt.name,
        "init_from": summary.get("init_from"),
        "reproduce": [
            *(
                [f"# first the model it starts from (init_from, digest/sha256 above): {cfg.init_from}"]
                if cfg.init_from
                else []
            ),
            f"emoverse train --recipe {Path(out) / 'recipe.yaml'} out={run}",
            f"emoverse release --run {run} --out {out}",
        ],
        "command": " ".join(["emoverse", *sys.argv[1:]]) if sys.argv else "",
    }
    return model.save_adapter(
        out,
        overwrite=overwrite,
        files={"recipe.yaml": to_yaml(cfg)},
        producer={"stage": "release", "run": str(run)},
        inputs={
            "data": info["data"],
            "trained_model": {"kind": trained.get("kind"), "created": trained.get("created")},
        },
        extra={"release": info, "training": summary},
    )
