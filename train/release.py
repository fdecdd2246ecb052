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

from emoverse.artifacts import ArtifactError, cpu_name, manifest_digest, read_manifest, sha256_file
from emoverse.config import load_config, to_yaml
from emoverse.model import EmoVerse
from emoverse.train.trainer import TrainConfig, list_checkpoints


def last_checkpoint(run: Path) -> Path:
    ckpts = list_checkpoints(run / "checkpoints")
    if not ckpts:
        raise ArtifactError(f"{run}: no checkpoints (train with `emoverse train` first)")
    return ckpts[-1]


def _trained_run(run: Path, checkpoint: str) -> dict:
    """One link of a lineage: what a run trained (its recipe, steps, tokens, time) as its folder records it."""
    manifest = read_manifest(run / "model") if (run / "model" / "manifest.json").is_file() else None
    if manifest is None:
        raise ArtifactError(
            f"{run}: a continued run starts from this run's checkpoint, but the run has no model/manifest.json "
            "(unfinished or moved); its recipe cannot be recorded in the release's lineage"
        )
    summary = json.loads((run / "train_summary.json").read_text()) if (run / "train_summary.json").is_file() else {}
    return {
        "run": str(run),
        "checkpoint": checkpoint,
        "recipe": manifest["producer"]["recipe"],
        "training": {k: summary.get(k) for k in ("steps", "tokens", "seconds", "stages")},
        "device": summary.get("device", "cpu"),
        "init_from": summary.get("init_from", manifest.get("init_from")),
    }


def lineage(init_from: dict | None) -> list[dict]:
    """The trainings a continued run starts from, oldest first: each one's recipe and what it ran. A release
    made from a continuation (init_from a release or a checkpoint, possibly several deep) names its whole
    chain, so it can be retrained from the base without the runs/ folders it came from."""
    chain: list[dict] = []
    seen = 0
    while init_from:
        seen += 1
        if seen > 32:
            raise ArtifactError(f"init_from chain longer than 32 at {init_from.get('path')}: a loop?")
        src = Path(init_from["path"])
        if init_from.get("kind") == "emoverse-adapter":
            if not (src / "manifest.json").is_file():
                raise ArtifactError(f"{src}: the release this run started from is gone; its lineage cannot be recorded")
            manifest = read_manifest(src)
            digest = manifest_digest(manifest)
            wanted = init_from.get("digest") or digest
            if digest != wanted:
                # overwritten since, typically by a release of its own descendant, whose lineage then holds it
                recorded = (manifest.get("release") or {}).get("lineage") or []
                hit = next((i for i, link in enumerate(recorded) if link.get("digest") == wanted), None)
                if hit is None:
                    raise ArtifactError(
                        f"{src}: not the release this run started from (its digest changed since: overwritten?), "
                        "and the release there does not record it in its lineage; the lineage cannot be recorded"
                    )
                chain.extend(reversed(recorded[: hit + 1]))
                break
            info = manifest.get("release")
            if not info:  # an adapter written by hand or a test: nothing to chain further
                chain.append({"run": str(src), "recipe": None, "training": None, "init_from": None})
                break
            if "lineage" in info:  # a release that already carries its chain ends the walk
                link = {k: info.get(k) for k in ("recipe", "training", "device", "checkpoint")}
                chain.append(link | {"run": str(src), "digest": digest})
                chain.extend(reversed(info["lineage"]))
                break
            link = {k: info.get(k) for k in ("recipe", "training", "device", "checkpoint", "init_from")}
            link |= {"run": str(src), "digest": digest}
        else:  # RUN/checkpoints/stageN-stepM
            weights = src / "trainable.safetensors"
            if init_from.get("sha256") and weights.is_file() and sha256_file(weights) != init_from["sha256"]:
                raise ArtifactError(f"{weights}: not the checkpoint this run started from (sha256 changed)")
            link = _trained_run(src.parent.parent, src.name)
        chain.append(link)
        init_from = link.pop("init_from", None)
    return list(reversed(chain))


def _pinned_steps(recipe: dict, training: dict | None) -> list[str]:
    """Overrides that retrain a run by the steps it took rather than by its clock (a stage's time budget
    ends it at a machine-dependent step; its clock-annealed schedule then anneals by steps instead)."""
    stages = (training or {}).get("stages") or {}
    out = []
    for i, stage in enumerate(recipe.get("stages") or []):
        ran = stages.get(stage.get("name"), {})
        if ran.get("steps") and stage.get("max_minutes"):
            out += [f"stages.{i}.steps={ran['steps']}", f"stages.{i}.max_minutes=null"]
    return out


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
    chain = lineage(summary.get("init_from"))
    files = {"recipe.yaml": to_yaml(cfg)}
    reproduce = []
    source = "null"  # what the next command starts from
    for i, link in enumerate(chain):
        if link.get("recipe") is None:
            # nothing trains it (an adapter written by hand): the next link starts from it where it lies
            reproduce.append(f"# lineage-{i}: {link['run']} records no recipe (not a release of a training run)")
            source = link["run"]
            continue
        files[f"lineage-{i}.yaml"] = to_yaml(link["recipe"])
        reproduce += [
            " ".join(
                [f"emoverse train --recipe {Path(out) / f'lineage-{i}.yaml'} out=runs/lineage-{i} init_from={source}"]
                + _pinned_steps(link["recipe"], link.get("training"))
            ),
            f"emoverse release --run runs/lineage-{i} --out runs/lineage-{i}/adapter",
        ]
        source = f"runs/lineage-{i}/adapter"
    # the run itself, started from the chain's last link when it has one
    start = [f"init_from={source}", *_pinned_steps(recipe, summary)] if chain else []
    reproduce += [
        " ".join([f"emoverse train --recipe {Path(out) / 'recipe.yaml'} out={run}", *start]),
        f"emoverse release --run {run} --out {out}" + (" --overwrite" if overwrite else ""),
    ]
    info = {
        "recipe": recipe,
        "data": trained.get("inputs", {}).get("data"),
        "training": {k: summary.get(k) for k in ("steps", "tokens", "seconds", "tokens_per_s", "stages")},
        "wall_seconds": round(sum(s.get("seconds", 0.0) for s in summary.get("stages", {}).values()), 1),
        "cpu": trained.get("release_cpu") or cpu_name(),
        "device": summary.get("device", "cpu"),  # where the steps ran (a GPU-trained run: its name)
        "checkpoint": ckpt.name,
        "init_from": summary.get("init_from"),
        # the trainings it continues, oldest first (each one's recipe is also lineage-I.yaml beside it)
        "lineage": chain,
        "reproduce": reproduce,
        "command": " ".join(["emoverse", *sys.argv[1:]]) if sys.argv else "",
    }
    return model.save_adapter(
        out,
        overwrite=overwrite,
        files=files,
        producer={"stage": "release", "run": str(run)},
        inputs={
            "data": info["data"],
            "trained_model": {"kind": trained.get("kind"), "created": trained.get("created")},
        },
        extra={"release": info, "training": summary},
    )
