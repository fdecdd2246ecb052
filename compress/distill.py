"""The compress pipeline's `distill` stage: a depth-pruned student distilled from the model being compressed.

Knowledge distillation belongs to the trainer (train/distill.py: layer importance, pruning, the KD loss,
checkpoints, time budgets, DDP); this stage only maps its parameters onto a one-stage training recipe whose
teacher is the stage's input, runs it, and hands the student on to the next stage. For long runs (hours, a
GPU) train the student with `emoverse train` and a recipe with `distill.teacher` set, then compress its
`model/` folder: that run resumes after an interruption, this stage starts over.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from emoverse.config import load_config
from emoverse.model import llm_depth, read_model_config


@dataclass
class Distill:
    keep_layers: int = 20  # of the teacher's decoder layers (SmolLM2-135M: 30)
    steps: int = 200
    lr: float = 2e-4
    batch_size: int = 8
    max_batch_tokens: int = 1536
    max_train_length: int = 768
    temperature: float = 2.0
    kd_weight: float = 0.7  # loss = kd_weight * T^2 * KL + (1 - kd_weight) * CE
    importance_samples: int = 16  # records per task for the layer-importance score
    lora_r: int | None = None  # the student's LoRA rank (alpha = 2r); null: the teacher's
    precision: str = "fp32"  # or "bf16" (autocast) where the CPU has it
    seed: int = 0
    max_minutes: float = 0.0  # 0: no time budget
    task_weights: dict = field(default_factory=lambda: {"msa": 0.2, "mer": 0.25, "fer": 0.2, "eri": 0.1, "ecpe": 0.25})


def run_distill(params: Distill, src: Path, dst: Path, data: str | Path) -> dict:
    from emoverse.train.trainer import TrainConfig, Trainer

    teacher_cfg = read_model_config(src)
    n_layers = llm_depth(src)  # either artifact form (the adapter-form release has no llm/ folder)
    if not 0 < params.keep_layers < n_layers:  # a compress stage makes the model smaller: refused before any work
        raise ValueError(f"distill: keep_layers={params.keep_layers} must be between 1 and {n_layers - 1}")
    lora_r = params.lora_r or teacher_cfg.lora_r
    run = dst.parent / f"{dst.name}-train"  # beside the stage's output: checkpoints are not part of the model
    overrides = {
        "data": str(data),
        "out": str(run),
        "seed": params.seed,
        "batch_size": params.batch_size,
        "max_batch_tokens": params.max_batch_tokens,
        "max_train_length": params.max_train_length,
        "precision": params.precision,
        "response_logits_only": True,
        "log_every": 10,
        "checkpoint_every": max(1, params.steps),
        "distill.teacher": str(src),
        "distill.keep_layers": params.keep_layers,
        "distill.temperature": params.temperature,
        "distill.kd_weight": params.kd_weight,
        "distill.importance_batches": max(1, params.importance_samples // params.batch_size),
        "model.lora_r": lora_r,
        "model.lora_alpha": 2 * lora_r,
        "model.lora_dropout": 0.0,
        "model.lora_from_layer": 0,
        "stages": [
            {
                "name": "distill",
                "steps": params.steps,
                "lr": params.lr,
                "warmup_steps": min(10, params.steps),
                "task_weights": {t: w for t, w in params.task_weights.items() if w > 0},
                "max_minutes": params.max_minutes or None,
                "anneal_in_time": bool(params.max_minutes),
            }
        ],
    }
    cfg = load_config(TrainConfig, None, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])
    model_dir = Trainer(cfg).run()
    for p in Path(model_dir).iterdir():  # the student is this stage's output
        os.replace(p, dst / p.name)
    summary = json.loads((run / "train_summary.json").read_text())
    student = json.loads((run / "student.json").read_text())
    log = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    return {
        "type": "distill",
        "teacher_layers": student["teacher_layers"],
        "kept_layers": student["kept_layers"],
        "layer_importance": student["layer_importance"],
        "steps_done": summary["steps"],
        "seconds": round(summary["seconds"], 1),
        "tokens": summary["tokens"],
        "final_loss": log[-1]["loss"] if log else None,
        "lora_r": lora_r,
    }
