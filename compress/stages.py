"""Compression stages, as in llm-compressor's modifiers: each stage is a class that owns its parameters
(dataclass fields, parsed from a recipe by the typed config loader) and its behaviour (`run`), registered
by name in STAGES. Each takes a model artifact folder and writes a new one; the LLM is quantized, the
vision encoder and affective projector stay in full precision (maintainers' advice for VLMs).

Quantization is llm-compressor's (GPTQModifier, QuantizationModifier), saved in compressed-tensors form,
which transformers reloads; nothing here re-implements a quantizer.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from emoverse.compress.distill import Distill, run_distill
from emoverse.compress.modelopt_fp8 import quantize_fp8
from emoverse.model import NON_LLM_FILES, base_llm_path, read_model_config
from emoverse.w4lora import write as write_w4_lora

STAGES: dict[str, type[Stage]] = {}


def register(cls):
    """Add a stage class to STAGES under its `kind`."""
    STAGES[cls.kind] = cls
    return cls


class Stage:
    kind: ClassVar[str] = ""

    def run(self, src: Path, dst: Path, calibration: list[dict], data: str | Path) -> dict:
        """Read the artifact folder `src`, write the compressed one into `dst`; return what to record."""
        raise NotImplementedError


class LLMCompressorStage(Stage):
    """A stage done by llm-compressor on the LLM alone: load, `quantize` in place, save compressed-tensors."""

    def quantize(self, model, calibration: list[dict]) -> dict:
        raise NotImplementedError

    def run(self, src, dst, calibration, data):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(src / "llm", dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(src / "llm")
        info = {"type": self.kind, **self.quantize(model, calibration)}
        (dst / "llm").mkdir(parents=True, exist_ok=True)
        model.save_pretrained(dst / "llm", save_compressed=True)
        tok.save_pretrained(dst / "llm")
        _copy_non_llm(src, dst)
        return info


@register
@dataclass
class GPTQW4A16(LLMCompressorStage):
    """4-bit weights (groups along the input dim), 16-bit activations; GPTQ error correction."""

    kind: ClassVar[str] = "gptq_w4a16"

    group_size: int = 64  # must divide every quantized layer's input width (SmolLM2: 576, 1536)
    calibration_samples: int = 64
    # more records of some tasks on top of the round-robin ones, e.g. {fer: 64}: FER's four visual tokens per
    # face are ~1% of a text-dominated set, so the Hessian hardly sees the inputs FER depends on
    extra_calibration: dict[str, int] = field(default_factory=dict)
    max_seq_length: int = 384
    dampening_frac: float = 0.01
    ignore: list[str] = field(default_factory=lambda: ["lm_head"])

    def quantize(self, model, calibration):
        from llmcompressor.modifiers.quantization import GPTQModifier

        bad = sorted(w for w in _linear_widths(model) if w % self.group_size)
        if bad:
            raise ValueError(f"gptq_w4a16: group_size {self.group_size} does not divide layer widths {bad}")
        scheme = {
            "group_0": {
                "targets": ["Linear"],
                "weights": {
                    "num_bits": 4,
                    "type": "int",
                    "symmetric": True,
                    "strategy": "group",
                    "group_size": self.group_size,
                },
                "input_activations": None,
                "output_activations": None,
            }
        }
        recipe = GPTQModifier(config_groups=scheme, ignore=list(self.ignore), dampening_frac=self.dampening_frac)
        return _calibrated_oneshot(model, recipe, calibration, self)


@register
@dataclass
class FP8Dynamic(LLMCompressorStage):
    """W8A8 FP8: per-channel FP8 weights, per-token dynamic FP8 activations; needs no calibration."""

    kind: ClassVar[str] = "fp8_dynamic"
    ignore: list[str] = field(default_factory=lambda: ["lm_head"])

    def quantize(self, model, calibration):
        from llmcompressor import oneshot
        from llmcompressor.modifiers.quantization import QuantizationModifier

        oneshot(
            model=model,
            recipe=QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=list(self.ignore)),
        )
        return {}


@register
@dataclass
class Int8WeightOnly(LLMCompressorStage):
    """INT8 weights per output channel, 16-bit activations, round-to-nearest: the CPU-friendly variant."""

    kind: ClassVar[str] = "int8_weight_only"
    ignore: list[str] = field(default_factory=lambda: ["lm_head"])

    def quantize(self, model, calibration):
        from llmcompressor import oneshot
        from llmcompressor.modifiers.quantization import QuantizationModifier

        # explicit per-output-channel INT8 (the W8A16 preset is grouped by 128, which SmolLM2's 576 does not divide)
        scheme = {
            "group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"},
                "input_activations": None,
                "output_activations": None,
            }
        }
        oneshot(model=model, recipe=QuantizationModifier(config_groups=scheme, ignore=list(self.ignore)))
        return {}


@register
@dataclass
class W8A8SmoothQuant(LLMCompressorStage):
    """INT8 weights and activations after SmoothQuant migration + GPTQ (kept to measure how it degrades)."""

    kind: ClassVar[str] = "w8a8_smoothquant"
    smoothing_strength: float = 0.8
    calibration_samples: int = 64
    max_seq_length: int = 384
    ignore: list[str] = field(default_factory=lambda: ["lm_head"])

    def quantize(self, model, calibration):
        from llmcompressor.modifiers.quantization import GPTQModifier
        from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

        recipe = [
            SmoothQuantModifier(smoothing_strength=self.smoothing_strength),
            GPTQModifier(targets="Linear", scheme="W8A8", ignore=list(self.ignore)),
        ]
        return _calibrated_oneshot(model, recipe, calibration, self)


@register
@dataclass
class ModelOptFP8(Stage):
    """nvidia-modelopt FP8 (E4M3 per-tensor weights, static per-tensor inputs from max calibration), written as
    modelopt's unified HF checkpoint: the form TensorRT-LLM builds FP8 engines from."""

    kind: ClassVar[str] = "modelopt_fp8"
    calibration_samples: int = 64
    max_seq_length: int = 384

    def run(self, src, dst, calibration, data):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(src / "llm", dtype=torch.float32)
        n = quantize_fp8(model, calibration, dst / "llm", self.calibration_samples, self.max_seq_length)
        AutoTokenizer.from_pretrained(src / "llm").save_pretrained(dst / "llm")
        _copy_non_llm(src, dst)
        return {"type": self.kind, "calibration_samples": n}


@register
@dataclass
class GPTQModelW4A16(Stage):
    """GPTQ W4A16 in the classic on-disk GPTQ format (auto-gptq's; vLLM, TGI, ExLlama read it), made by
    GPTQModel. GPTQModel wants transformers 5.24, llm-compressor caps it at 5.17: it runs in its own
    environment, `python` (default $EMOVERSE_GPTQMODEL_PYTHON, else .venv-gptq/bin/python; `make gptq-env`)."""

    kind: ClassVar[str] = "gptqmodel_w4a16"
    bits: int = 4
    group_size: int = 64
    desc_act: bool = False
    damp_percent: float = 0.01
    calibration_samples: int = 64
    max_seq_length: int = 384
    python: str = ""

    def run(self, src, dst, calibration, data):
        return _run_gptqmodel(self, src, dst, calibration)


def gptqmodel_python(params: GPTQModelW4A16) -> Path:
    """The GPTQModel environment's interpreter, or a clear error before any work."""
    py = Path(params.python or os.environ.get("EMOVERSE_GPTQMODEL_PYTHON") or ".venv-gptq/bin/python")
    if not py.is_file():
        raise ValueError(
            f"gptqmodel_w4a16: no GPTQModel environment at {py} (GPTQModel needs transformers 5.24, "
            "which conflicts with llm-compressor's <=5.17): run `make gptq-env`, or set "
            "EMOVERSE_GPTQMODEL_PYTHON / the stage's `python`"
        )
    return py


def _run_gptqmodel(params: GPTQModelW4A16, src: Path, dst: Path, calibration: list[dict]) -> dict:
    import subprocess
    import tempfile

    py = gptqmodel_python(params)
    worker = Path(__file__).parent / "gptqmodel_worker.py"
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        calib = Path(tmp) / "calibration.jsonl"
        calib.write_text(
            "".join(
                json.dumps({"input_ids": c["input_ids"][: params.max_seq_length]}) + "\n"
                for c in calibration[: params.calibration_samples]
            )
        )
        cmd = [
            str(py),
            str(worker),
            "--llm",
            str(src / "llm"),
            "--calibration",
            str(calib),
            "--out",
            str(dst / "llm"),
            "--bits",
            str(params.bits),
            "--group-size",
            str(params.group_size),
            "--damp-percent",
            str(params.damp_percent),
        ] + (["--desc-act"] if params.desc_act else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "GPTQMODEL_CPU_WORKERS": "2"})
    if proc.returncode != 0:
        raise RuntimeError(
            f"gptqmodel_w4a16: the GPTQModel worker failed (exit {proc.returncode}):\n" + proc.stderr[-3000:]
        )
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    _copy_non_llm(src, dst)
    # GPTQModel's quantize() takes token ids only: its image slots hold pad tokens, said in the manifest
    return {"type": "gptqmodel_w4a16", "visual_calibration": False, **info}


@register
@dataclass
class W4BaseLoRA(Stage):
    """The base LLM's linear layers kept on their own 4-bit grid (SmolLM2 ships as Q4_1: they already are),
    the fine-tune's update beside them as int8 rank-r factors (emoverse/w4lora.py says why). No calibration,
    no requantized weight: the compressed model computes what the teacher computes, to the int8 rounding of
    the update; export turns it into MatMulNBits + a low-rank correction."""

    kind: ClassVar[str] = "w4_base_lora"
    group_size: int = 32  # Q4_1's block
    max_rank: int = 64  # a larger update is not a LoRA fine-tune: refused

    def run(self, src, dst, calibration, data):
        base = Path(base_llm_path(read_model_config(src)))
        info = write_w4_lora(src / "llm", base, dst / "llm", group_size=self.group_size, max_rank=self.max_rank)
        _copy_non_llm(src, dst)
        return {"type": self.kind, "base": str(base), **info}


@register
@dataclass
class DistillStage(Distill, Stage):
    """Layer pruning + knowledge distillation into a shallower student (compress/distill.py)."""

    kind: ClassVar[str] = "distill"

    def run(self, src, dst, calibration, data):
        return run_distill(self, src, dst, data)


def select_calibration(calibration: list[dict], params) -> list[dict]:
    """The records a stage calibrates on: the first `calibration_samples` (round-robin over tasks), then
    `extra_calibration`'s further records of the tasks it names."""
    chosen = calibration[: params.calibration_samples]
    taken = {id(c) for c in chosen}
    for task, n in (getattr(params, "extra_calibration", None) or {}).items():
        more = [c for c in calibration if c["task"] == task and id(c) not in taken][:n]
        if len(more) < n:
            raise ValueError(f"extra_calibration: {n} more {task!r} records wanted, the set has {len(more)} left")
        chosen += more
        taken |= {id(c) for c in more}
    return chosen


def _calibrated_oneshot(model, recipe, calibration: list[dict], params) -> dict:
    """llm-compressor oneshot over the first `calibration_samples` records; returns how many were used.

    The records go in as `inputs_embeds` (real visual tokens in the image slots, see `calibration_set`), so
    the batches are given to oneshot as a DataLoader: its own dataset path tokenizes text and knows no
    embeddings."""
    from llmcompressor import oneshot
    from torch.utils.data import DataLoader

    chosen = select_calibration(calibration, params)
    rows = [
        {
            "inputs_embeds": c["inputs_embeds"][: params.max_seq_length].unsqueeze(0),
            "attention_mask": torch.ones(1, min(len(c["input_ids"]), params.max_seq_length), dtype=torch.long),
        }
        for c in chosen
    ]
    loader = DataLoader(rows, batch_size=None, shuffle=False)  # each row is already a batch of one
    oneshot(model=model, recipe=recipe, dataset=loader, num_calibration_samples=len(rows), pipeline="basic")
    return {"calibration_samples": len(rows), "calibration_ids": [c["id"] for c in chosen]}


def _copy_non_llm(src: Path, dst: Path) -> None:
    for name in NON_LLM_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def _linear_widths(model) -> set[int]:
    return {m.in_features for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n}


def run_stage(kind: str, params: Stage, src: Path, dst: Path, calibration: list[dict], data: str | Path) -> dict:
    """Run one parsed stage (kept for callers that name the kind; the stage object knows its own)."""
    if STAGES.get(kind) is not type(params):
        raise ValueError(f"stage {kind!r} given parameters of {type(params).__name__}")
    return params.run(src, dst, calibration, data)
