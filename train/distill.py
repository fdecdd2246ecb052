"""Knowledge distillation as a recipe of the trainer: a depth-pruned student learns from a trained teacher.

A recipe with `distill.teacher` set trains a student instead of the package's base model:
1. Layer importance, measured: Block Influence (ShortGPT, Men et al. 2024) = 1 - cos(h_in, h_out) of each
   decoder layer of the teacher, averaged over the tokens of train records of every task the recipe samples.
   The `keep_layers` most influential layers are kept, in order (all of them when keep_layers is null: a
   same-depth student, e.g. for recovery after quantization).
2. The student = the teacher's LLM (its LoRA merged) with only those layers, fresh LoRA adapters as the
   recipe's `model.lora_*` say, and the teacher's projector and frozen encoders.
3. Loss on response tokens = kd_weight * T^2 * KL(teacher || student at temperature T) + (1 - kd_weight) *
   cross-entropy with the reference answer; the teacher runs frozen in the same step, on the same batch.
Everything else is the trainer's: stages and task weights, checkpoints and bit-identical resume, time
budgets, bf16 autocast, response-only logits, DDP. The kept layers are written to `student.json` in the run
folder on the first start, so a resumed run rebuilds the same student without measuring again.

Written by hand, not with nvidia-modelopt: modelopt's depth pruning (Minitron) needs Megatron-core models,
and its distillation wrapper calls teacher and student on the same module inputs, while ours splice visual
tokens into inputs_embeds before the LLM; the loss is the same KL it would compute.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from emoverse.artifacts import atomic_write_json, manifest_digest, read_manifest
from emoverse.model import EmoVerse, ModelConfig, add_lora


@dataclass
class DistillConfig:
    teacher: str | None = None  # a trained model (artifact or adapter-form release); null: no distillation
    keep_layers: int | None = None  # the student's depth (of the teacher's decoder layers); null: all
    temperature: float = 2.0
    kd_weight: float = 0.7  # loss = kd_weight * T^2 * KL + (1 - kd_weight) * CE
    importance_batches: int = 2  # batches per task for the layer-importance score


def decoder_layers(llm) -> torch.nn.ModuleList:
    return llm.model.layers


@torch.no_grad()
def layer_importance(model: EmoVerse, batches: list[dict]) -> list[float]:
    """Block Influence per decoder layer, averaged over the batches' (non-padding) tokens."""
    n = len(decoder_layers(model.causal_lm))
    total = torch.zeros(n)
    count = 0
    for batch in batches:
        embeds = model.embed(batch["input_ids"], batch["visual_mask"], batch["media"], cache=True)
        out = model.llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"], output_hidden_states=True)
        hs = out.hidden_states  # n + 1 tensors (input embeddings, then after each layer)
        mask = batch["attention_mask"].bool()
        for i in range(n):
            cos = F.cosine_similarity(hs[i][mask].float(), hs[i + 1][mask].float(), dim=-1)
            total[i] += (1 - cos).sum().cpu()
        count += int(mask.sum())
    return (total / max(count, 1)).tolist()


def most_influential(scores: list[float], keep: int) -> list[int]:
    """The `keep` layers of highest importance, in model order (ties: the earlier layer)."""
    return sorted(sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:keep])


def prune_layers(llm, keep: list[int]):
    """A copy of `llm` with only the decoder layers in `keep` (sorted), caches re-indexed."""
    student = copy.deepcopy(llm)
    layers = decoder_layers(student)
    student.model.layers = torch.nn.ModuleList([layers[i] for i in keep])
    for new_idx, layer in enumerate(student.model.layers):
        if hasattr(layer, "self_attn") and hasattr(layer.self_attn, "layer_idx"):
            layer.self_attn.layer_idx = new_idx
    student.config.num_hidden_layers = len(keep)
    if getattr(student.config, "layer_types", None):
        student.config.layer_types = [student.config.layer_types[i] for i in keep]
    return student


def load_teacher(path: str | Path, device: torch.device) -> tuple[EmoVerse, dict]:
    """The frozen teacher (LoRA merged) and what the manifest says of it (path, kind, digest)."""
    teacher = EmoVerse.load(path).eval().requires_grad_(False).to(device)
    manifest = read_manifest(Path(path))
    return teacher, {"path": str(path), "kind": manifest.get("kind"), "digest": manifest_digest(manifest)}


def student_layers(run: Path, dcfg: DistillConfig, teacher: EmoVerse, batches: list[dict], write: bool = True) -> dict:
    """The kept layers: read from the run's `student.json` when a first start wrote it (a resume must rebuild
    the same student), else measured on `batches` and written there (by one process: every DDP rank measures
    the same seeded batches)."""
    path = run / "student.json"
    n = len(decoder_layers(teacher.causal_lm))
    keep = dcfg.keep_layers if dcfg.keep_layers is not None else n
    if not 0 < keep <= n:
        raise ValueError(f"distill.keep_layers={dcfg.keep_layers} must be between 1 and {n} (the teacher's depth)")
    if path.is_file():
        info = json.loads(path.read_text())
        if len(info["kept_layers"]) != keep or info["teacher_layers"] != n:
            raise ValueError(f"{path}: this run's student has other layers than distill.keep_layers={keep} asks")
        return info
    scores = layer_importance(teacher, batches) if keep < n else [1.0] * n
    info = {
        "teacher_layers": n,
        "kept_layers": most_influential(scores, keep),
        "layer_importance": [round(s, 6) for s in scores],
    }
    if write:
        run.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, info)
    return info


def build_student(teacher: EmoVerse, keep: list[int], lora: ModelConfig) -> EmoVerse:
    """The teacher's (merged) LLM pruned to `keep`, with fresh LoRA as `lora` says (its lora_* fields), and the
    teacher's projector (a copy, trained on) and frozen encoders (shared, with their feature cache)."""
    cfg = replace(
        teacher.cfg,
        **{k: getattr(lora, k) for k in ("lora_r", "lora_alpha", "lora_dropout", "lora_targets", "lora_from_layer")},
    )
    llm = prune_layers(teacher.causal_lm, keep).requires_grad_(True)
    if cfg.lora_r > 0:
        llm = add_lora(llm, cfg)
    student = EmoVerse(cfg, llm, teacher.tokenizer, teacher.vision, teacher.face)
    student.projector.load_state_dict(teacher.projector.state_dict())
    student._feature_cache = teacher._feature_cache  # same frozen encoders: features computed once per image
    return student.to(teacher.device)


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, dcfg: DistillConfig
) -> torch.Tensor:
    """kd_weight * T^2 * KL(teacher || student) + (1 - kd_weight) * CE, over response positions (R, vocab).
    The T^2 keeps the KL's gradient scale independent of T (Hinton et al. 2015)."""
    t = dcfg.temperature
    s_log = (student_logits.float() / t).log_softmax(-1)
    t_log = (teacher_logits.float() / t).log_softmax(-1)
    kl = F.kl_div(s_log, t_log, log_target=True, reduction="batchmean")
    ce = F.cross_entropy(student_logits.float(), targets)
    return dcfg.kd_weight * kl * t**2 + (1 - dcfg.kd_weight) * ce
