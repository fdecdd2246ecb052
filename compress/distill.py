"""Depth-pruned student distilled from the trained EmoVerse teacher.

1. Layer importance, measured: Block Influence (ShortGPT, Men et al. 2024) = 1 - cos(h_in, h_out) of
   each decoder layer, averaged over the response-region tokens of AMT train records of every task.
   The `keep_layers` most influential layers are kept, in order.
2. Knowledge distillation: the student (pruned LLM + the teacher's projector, both trained) learns from
   the teacher's logits on response tokens (KL at temperature T) plus the task cross-entropy, on AMT train
   records of all five tasks, sampled by `task_weights`.

Written by hand, not with nvidia-modelopt: modelopt's depth pruning (Minitron) needs Megatron-core
models, and its distillation wrapper calls teacher and student on the same module inputs, while ours
splice visual tokens into inputs_embeds before the LLM; the loss below is the same KL it would compute.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from emoverse.model import EmoVerse
from emoverse.prompting import IGNORE, PromptTooLong
from emoverse.records import load_records
from emoverse.tasks import TASKS


@dataclass
class Distill:
    keep_layers: int = 20  # of the teacher's decoder layers (SmolLM2-135M: 30)
    steps: int = 200
    lr: float = 1e-4
    batch_size: int = 8
    max_batch_tokens: int = 1536
    max_train_length: int = 768
    temperature: float = 2.0
    kd_weight: float = 0.7  # loss = kd_weight * KL + (1 - kd_weight) * CE
    importance_samples: int = 16  # records per task for the layer-importance score
    seed: int = 0
    max_minutes: float = 0.0  # 0: no time budget
    task_weights: dict = field(default_factory=lambda: {"msa": 0.2, "mer": 0.25, "fer": 0.2, "eri": 0.1, "ecpe": 0.25})


def _decoder_layers(llm) -> torch.nn.ModuleList:
    return llm.model.layers


@torch.no_grad()
def layer_importance(model, batches: list[dict]) -> list[float]:
    """Block Influence per decoder layer, averaged over tokens that carry labels (responses)."""
    n = len(_decoder_layers(model.llm))
    total = torch.zeros(n)
    count = 0
    for batch in batches:
        embeds = model.embed(batch["input_ids"], batch["visual_mask"], batch["media"], cache=True)
        out = model.llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"], output_hidden_states=True)
        hs = out.hidden_states  # n + 1 tensors (input embeddings, then after each layer)
        mask = batch["attention_mask"].bool()
        for i in range(n):
            cos = F.cosine_similarity(hs[i][mask], hs[i + 1][mask], dim=-1)
            total[i] += (1 - cos).sum()
        count += int(mask.sum())
    return (total / max(count, 1)).tolist()


def prune_layers(llm, keep: list[int]):
    """A copy of `llm` with only the decoder layers in `keep` (sorted), caches re-indexed."""
    student = copy.deepcopy(llm)
    layers = _decoder_layers(student)
    student.model.layers = torch.nn.ModuleList([layers[i] for i in keep])
    for new_idx, layer in enumerate(student.model.layers):
        if hasattr(layer, "self_attn") and hasattr(layer.self_attn, "layer_idx"):
            layer.self_attn.layer_idx = new_idx
    student.config.num_hidden_layers = len(keep)
    if getattr(student.config, "layer_types", None):
        student.config.layer_types = [student.config.layer_types[i] for i in keep]
    return student


def run_distill(params: Distill, src: Path, dst: Path, data: str | Path) -> dict:
    torch.manual_seed(params.seed)
    teacher = EmoVerse.load(src, check=False).eval()  # verified by the pipeline already
    n_layers = len(_decoder_layers(teacher.llm))
    if not 0 < params.keep_layers < n_layers:
        raise ValueError(f"distill: keep_layers={params.keep_layers} must be between 1 and {n_layers - 1}")
    unknown = set(params.task_weights) - set(TASKS)
    if unknown:
        raise ValueError(f"distill: unknown task(s) {sorted(unknown)} in task_weights")

    builder = teacher.prompts
    builder.max_length = min(builder.max_length, params.max_train_length)
    pools: dict[str, list] = {}
    for task, w in params.task_weights.items():
        if w <= 0:
            continue
        items = []
        for r in load_records(Path(data) / task / "train.jsonl"):
            try:
                items.append(builder.encode(r.query, r.response, r.images, r.videos))
            except PromptTooLong:
                continue
        pools[task] = items

    def batch_for(step: int, task: str | None = None) -> tuple[str, dict]:
        tasks = sorted(pools)
        w = np.array([params.task_weights[t] for t in tasks], dtype=float)
        rng = np.random.default_rng([params.seed, step])
        task = task or tasks[rng.choice(len(tasks), p=w / w.sum())]
        pool = pools[task]
        idx = rng.choice(len(pool), size=min(params.batch_size, len(pool)), replace=False)
        items = [pool[i] for i in idx]
        longest = max(len(e.input_ids) for e in items)
        return task, builder.collate(items[: max(1, min(len(items), params.max_batch_tokens // longest))])

    # 1. measured layer importance on records of every task
    probe = [
        batch_for(10_000 + i, t)[1]
        for i, t in enumerate(sorted(pools))
        for _ in range(max(1, params.importance_samples // params.batch_size))
    ]
    scores = layer_importance(teacher, probe)
    keep = sorted(sorted(range(n_layers), key=lambda i: -scores[i])[: params.keep_layers])

    # 2. student = pruned LLM + teacher's projector; KD on response tokens
    student = EmoVerse(teacher.cfg, prune_layers(teacher.llm, keep), teacher.tokenizer, teacher.vision, teacher.face)
    student.projector.load_state_dict(teacher.projector.state_dict())
    student._feature_cache = teacher._feature_cache  # same frozen encoder
    for n, p in student.named_parameters():
        p.requires_grad_(not n.startswith("vision."))
    trainable = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=params.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10) * max(0.1, 1 - s / params.steps))
    t0 = time.monotonic()
    log = []
    student.train()
    if student.vision is not None:
        student.vision.eval()  # frozen BatchNorm statistics
    bar = tqdm(range(params.steps), desc="distill", unit="step")
    for step in bar:
        task, batch = batch_for(step)
        with torch.no_grad():
            t_logits = teacher(batch, cache_features=True).logits
        out = student(batch, cache_features=True)
        labels = batch["labels"][:, 1:]
        sel = labels != IGNORE
        s_log = out.logits[:, :-1][sel] / params.temperature
        t_log = t_logits[:, :-1][sel] / params.temperature
        kd = F.kl_div(s_log.log_softmax(-1), t_log.log_softmax(-1), log_target=True, reduction="batchmean")
        loss = params.kd_weight * kd * params.temperature**2 + (1 - params.kd_weight) * out.loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(task=task, loss=f"{loss.item():.3f}")
        log.append({"step": step, "task": task, "loss": round(loss.item(), 4), "kd": round(kd.item(), 4)})
        if params.max_minutes and time.monotonic() - t0 > 60 * params.max_minutes:
            break
    student.eval()
    # the one model-folder writer (the compress pipeline replaces the manifest with its own)
    student.save(dst, producer={"stage": "distill"}, overwrite=True)
    return {
        "type": "distill",
        "teacher_layers": n_layers,
        "kept_layers": keep,
        "layer_importance": [round(s, 5) for s in scores],
        "steps_done": len(log),
        "seconds": round(time.monotonic() - t0, 1),
        "final_loss": log[-1]["loss"] if log else None,
    }
