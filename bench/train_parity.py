"""Loss parity of training settings over a few hundred steps: each arm trains the same model from the same
seed on the same batches through the real trainer (`Trainer.run`), then every arm's model is scored on one
fixed dev sample (dev split, eval mode, no dropout).

    python -m emoverse.bench.train_parity --steps 200 --out docs/results/train-parity-xeon.json

The arms: the release's CPU settings as they were (LoRA dropout 0.05, sdpa attention), eager attention (the
same attention, another kernel: the loss should match to bf16 tolerance), and eager attention without LoRA
dropout (a recipe change: removes a regulariser, so the dev loss, not the train loss, is the test).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from emoverse.artifacts import atomic_write_json, cpu_name
from emoverse.config import load_config, resolve_recipe
from emoverse.records import load_records
from emoverse.train.trainer import RECIPES, StageConfig, TrainConfig, Trainer

# (name, trainer-setting overrides, model-setting overrides) on top of the recipe
ARMS: list[tuple[str, dict, dict]] = [
    ("release CPU settings (LoRA dropout 0.05, sdpa)", {"attention": "sdpa"}, {"lora_dropout": 0.05}),
    ("+ eager attention", {"attention": "eager"}, {"lora_dropout": 0.05}),
    ("+ eager attention, no LoRA dropout", {"attention": "eager"}, {"lora_dropout": 0.0}),
]
MIX = {"msa": 0.2, "mer": 0.3, "fer": 0.2, "eri": 0.05, "ecpe": 0.25}  # train_throughput's mix


@torch.no_grad()
def dev_loss(trainer: Trainer, per_task: int, seed: int = 0) -> dict[str, float]:
    """Mean response-token loss per task on a fixed seeded sample of the dev split (batches of 8); tasks without
    a dev split (ERI) are left out."""
    model = trainer.model
    model.eval()
    out = {}
    for task in dev_tasks(trainer.cfg.data):
        recs = load_records(Path(trainer.cfg.data) / task / "dev.jsonl")
        recs = random.Random(seed).sample(recs, min(per_task, len(recs)))
        items = [model.prompts.encode(r.query, r.response, r.images, r.videos) for r in recs]
        items = [e for e in items if len(e.input_ids) <= trainer.cfg.max_train_length]
        total = n = 0.0
        for i in range(0, len(items), 8):
            batch = {
                k: v.to(trainer.device) if torch.is_tensor(v) else v
                for k, v in model.prompts.collate(items[i : i + 8]).items()
            }
            tokens = int((batch["labels"][:, 1:] != -100).sum())
            total += trainer.loss(model, batch).item() * tokens
            n += tokens
        out[task] = round(total / n, 4)
    out["mean"] = round(sum(out.values()) / len(out), 4)
    return out


def dev_tasks(data: str) -> list[str]:
    return [t for t in MIX if (Path(data) / t / "dev.jsonl").is_file()]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="data/amt")
    ap.add_argument("--recipe", default="nano-release")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--dev-per-task", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="runs/train-parity", help="the arms' run folders")
    ap.add_argument("--out", default="docs/results/train-parity.json")
    ap.add_argument("overrides", nargs="*", help="key=value recipe overrides (e.g. model.llm=tiny-random)")
    argv = sys.argv[1:] if argv is None else argv
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    base = load_config(TrainConfig, resolve_recipe(a.recipe, RECIPES), [f"data={a.data}", *a.overrides])
    stage = StageConfig(name="parity", steps=a.steps, lr=base.stages[0].lr, warmup_steps=10, task_weights=MIX)
    rows = []
    for i, (name, train_over, model_over) in enumerate(ARMS):
        out = Path(a.work) / f"arm{i}"
        log = out / "train_log.jsonl"
        if log.exists():
            log.unlink()  # a fresh run: the trainer appends
        for ckpt in (out / "checkpoints").glob("*/state.json"):
            ckpt.unlink()  # and must not resume an earlier run of this arm
        cfg = replace(
            base,
            **train_over,
            out=str(out),
            stages=[stage],
            log_every=1,
            checkpoint_every=a.steps,
            model=replace(base.model, **model_over),
        )
        trainer = Trainer(cfg)
        t0 = time.perf_counter()
        trainer.run()
        seconds = time.perf_counter() - t0
        losses = [json.loads(line)["loss"] for line in log.read_text().splitlines()]
        summary = json.loads((out / "train_summary.json").read_text())
        row = {
            "name": name,
            "settings": {**train_over, **model_over},
            "train_seconds": round(seconds, 1),
            "tokens_per_s": summary["tokens_per_s"],
            "train_loss_first_20": round(sum(losses[:20]) / len(losses[:20]), 4),
            "train_loss_last_50": round(sum(losses[-50:]) / len(losses[-50:]), 4),
            "dev_loss": dev_loss(trainer, a.dev_per_task),
            "train_losses": losses,
        }
        rows.append(row)
        print(
            f"{name:50s} {row['tokens_per_s']:7.1f} tok/s  train(last 50) {row['train_loss_last_50']:.4f}  "
            f"dev {row['dev_loss']['mean']:.4f}",
            flush=True,
        )
    result = {
        "benchmark": "train-parity",
        "cpu": cpu_name(),
        "threads": a.threads,
        "torch": torch.__version__,
        "recipe": a.recipe,
        "steps": a.steps,
        "task_mix": MIX,
        "dev_per_task": a.dev_per_task,
        "dev_tasks": dev_tasks(a.data),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "python -m emoverse.bench.train_parity " + " ".join(argv),
        "arms": rows,
    }
    atomic_write_json(Path(a.out), result)
    print(f"wrote {a.out}")
    return result


if __name__ == "__main__":
    main()
