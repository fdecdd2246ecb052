"""Training throughput, side by side in one run: the original settings vs each throughput lever added in turn.

    python -m emoverse.bench.train_throughput --data data/amt --steps 12 --out docs/results/train-throughput.json

Every variant trains the same EmoVerse-Nano from the same initial weights on batches drawn by the same seeded
sampler (one task per step, the release recipe's task mix), so the only differences are the settings (packing
draws ECPE's batches in token order, so those rows train other ECPE records). Reported per variant: the
records' tokens/s (non-pad; a packed row is credited with its records' tokens), seconds/step, FLOPs actually
executed per token (torch's FlopCounterMode on one step: only work that was done) and MFU against this
machine's matmul peak for that precision, measured in the same run. Absolute numbers move between machines;
the ratios to the first row are the result.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from emoverse.artifacts import atomic_write_json, cpu_name
from emoverse.config import load_config, resolve_recipe
from emoverse.model import EmoVerse
from emoverse.train.trainer import RECIPES, StageConfig, TrainConfig, Trainer

# (name, trainer-setting overrides, model-setting overrides), each row adding one lever to the row before.
_SHIPPED = {"precision": "bf16", "response_logits_only": True, "length_buckets": True}
VARIANTS: list[tuple[str, dict, dict]] = [
    ("original (fp32, full logits, random batches, LoRA on all 30 layers)", {}, {}),
    ("+ bf16 autocast", {"precision": "bf16"}, {}),
    ("+ response-only logits", {"precision": "bf16", "response_logits_only": True}, {}),
    ("+ length buckets", _SHIPPED, {}),
    ("+ LoRA on the upper layers only", _SHIPPED, {"lora_from_layer": 12}),
    ("+ eager attention", {**_SHIPPED, "attention": "eager"}, {"lora_from_layer": 12}),
    ("+ no LoRA dropout", {**_SHIPPED, "attention": "eager"}, {"lora_from_layer": 12, "lora_dropout": 0.0}),
    (
        "+ shared-prefix packing of ECPE",
        {**_SHIPPED, "attention": "eager", "pack_tasks": ["ecpe"]},
        {"lora_from_layer": 12, "lora_dropout": 0.0},
    ),
    (
        "+ torch.compile of the decoder",
        {**_SHIPPED, "attention": "eager", "pack_tasks": ["ecpe"], "compile": True},
        {"lora_from_layer": 12, "lora_dropout": 0.0},
    ),
]
# The row whose settings train/recipes/nano-release.yaml uses (the README's throughput line reads it)
RELEASE_ROW = "+ no LoRA dropout"


def matmul_peak(dtype: torch.dtype, n: int = 2048, seconds: float = 2.0) -> float:
    """FLOP/s of a square matmul in `dtype` on this machine's threads (the roof for MFU)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def _flops_per_step(trainer, batch) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        trainer.loss(trainer.model, batch).backward()
    trainer.model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def measure(trainer, steps: int, warmup: int = 2) -> dict:
    """Train `steps` steps (after `warmup` untimed ones) and count tokens and time."""
    params = list(trainer.params.values())
    opt = torch.optim.AdamW(params, lr=1e-4)
    trainer.model.train()
    if trainer.model.vision is not None:
        trainer.model.vision.eval()
    tokens = seconds = flops = 0.0
    losses = []
    for step in range(warmup + steps):
        task, items = trainer.sample_batch(0, step)
        batch = trainer.collate(task, items)
        if step >= warmup:  # FLOPs this very batch executes (counted untimed: the counter slows the step)
            flops += _flops_per_step(trainer, batch)
        t0 = time.perf_counter()
        loss = trainer.loss(trainer.model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        dt = time.perf_counter() - t0
        if step >= warmup:
            tokens += batch["n_tokens"]  # the records' tokens: a packed row computes fewer for the same records
            seconds += dt
            losses.append(round(loss.item(), 4))
    flops_per_token = flops / tokens
    return {
        "tokens": int(tokens),
        "seconds": round(seconds, 2),
        "tokens_per_s": round(tokens / seconds, 1),
        "seconds_per_step": round(seconds / steps, 3),
        "flops_per_token": round(flops_per_token),
        "achieved_flops_per_s": round(flops / seconds),
        "losses": losses,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="data/amt")
    ap.add_argument("--recipe", default="nano", help="the original settings come from this recipe's model")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="docs/results/train-throughput.json")
    ap.add_argument("--skip", action="append", default=[], help="leave out rows whose name contains this")
    ap.add_argument(
        "--lora-from-layer", type=int, default=12, help="the LoRA-range rows' first adapted layer (12 of 30 layers)"
    )
    ap.add_argument(
        "--mix",
        default="msa=0.2,mer=0.3,fer=0.2,eri=0.05,ecpe=0.25",
        metavar="TASK=WEIGHT,...",
        help="the task mix batches are drawn from (default: the release recipe's)",
    )
    ap.add_argument("overrides", nargs="*", help="key=value recipe overrides (e.g. model.llm=tiny-random)")
    argv = sys.argv[1:] if argv is None else argv
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    base = load_config(TrainConfig, resolve_recipe(a.recipe, RECIPES), [f"data={a.data}", *a.overrides])
    try:
        mix = {k: float(v) for k, v in (m.split("=", 1) for m in a.mix.split(","))}
    except ValueError:
        ap.error(f"--mix takes TASK=WEIGHT pairs, got {a.mix}")
    base = replace(
        base,
        stages=[StageConfig(name="bench", steps=a.steps + 2, task_weights=mix)],
        precision="fp32",
        response_logits_only=False,
        length_buckets=False,
    )
    trainer = Trainer(base)  # records encoded once, shared by every variant
    init = copy.deepcopy(trainer.model.state_dict())
    peaks: dict[str, float] = {}  # per precision a row ran at, measured once (no bf16 peak where bf16 never runs)
    rows = []
    for name, train_over, model_over in [v for v in VARIANTS if not any(k in v[0] for k in a.skip)]:
        trainer.cfg = replace(base, **train_over)
        if "lora_from_layer" in model_over:
            model_over = {**model_over, "lora_from_layer": a.lora_from_layer}
        if model_over:  # a different LoRA layout is a different model: built fresh, same seed
            torch.manual_seed(base.seed)
            trainer.model = EmoVerse.build(replace(base.model, **model_over))
            trainer.model.freeze_base()
        else:
            trainer.model.load_state_dict(init)
        trainer.model.set_attention(trainer.cfg.attention)
        trainer.model.freeze_base()
        trainer.params = trainer.model.trainable_parameters()
        compile_s = None
        if train_over.get("compile"):  # the first (untimed) steps pay for compiling; then the weights go back
            fresh = copy.deepcopy(trainer.model.state_dict())
            t0 = time.perf_counter()
            trainer.model.compile_decoder()
            measure(trainer, 1, warmup=2)
            compile_s = round(time.perf_counter() - t0, 1)
            trainer.model.load_state_dict(fresh)  # the timed steps start from the same weights as every row
        r = measure(trainer, a.steps)
        if compile_s is not None:
            r["compile_and_first_steps_s"] = compile_s
        if trainer.precision not in peaks:  # the precision it ran at (fp32 where this CPU would emulate bf16)
            peaks[trainer.precision] = matmul_peak(torch.bfloat16 if trainer.precision == "bf16" else torch.float32)
        peak = peaks[trainer.precision]
        r.update(
            name=name,
            settings={**train_over, **model_over},
            release=name == RELEASE_ROW,
            precision=trainer.precision,
            mfu=round(r["achieved_flops_per_s"] / peak, 3),
        )
        rows.append(r)
        print(
            f"{name:72s} {r['tokens_per_s']:8.1f} tok/s  {r['tokens_per_s'] / rows[0]['tokens_per_s']:5.2f}x  "
            f"MFU {r['mfu']:.2f}",
            flush=True,
        )
    for r in rows:
        r["speedup_vs_original"] = round(r["tokens_per_s"] / rows[0]["tokens_per_s"], 2)
    result = {
        "benchmark": "train-throughput",
        "cpu": cpu_name(),
        "threads": a.threads,
        "torch": torch.__version__,
        "steps_per_variant": a.steps,
        "task_mix": mix,
        "recipe": a.recipe,
        "overrides": a.overrides,
        "matmul_peak_flops_per_s": {k: round(v) for k, v in peaks.items()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "python -m emoverse.bench.train_throughput " + " ".join(argv),
        "variants": rows,
    }
    atomic_write_json(Path(a.out), result)
    print(f"wrote {a.out}")
    return result


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
