"""Reading an LLM folder's weights by hand, for the quantized forms transformers does not load as plain
fp32 models (ModelOpt FP8 checkpoints, GPTQ weights bound for MatMulNBits): the safetensors tensors, an
empty fp32 model of the folder's architecture, and loading weights into it with a fit check."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def quantization_config(llm_dir: Path) -> dict:
    """The LLM folder's `quantization_config` (compressed-tensors, GPTQ), or {} for a full-precision LLM: the
    one place that reads it, for loading, export and compare."""
    return json.loads((Path(llm_dir) / "config.json").read_text()).get("quantization_config") or {}


def read_tensors(llm_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors files."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in sorted(Path(llm_dir).glob("*.safetensors")):
        state.update(load_file(f))
    return state


def empty_fp32_llm(llm_dir: Path):
    """A randomly initialised fp32 model of the folder's architecture (its quantization config dropped)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(llm_dir)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def load_fitting(model, weights: dict[str, torch.Tensor], llm_dir: Path):
    """Load `weights` into `model`, refusing any that do not fit (a tied lm_head may be absent), then tie."""
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise ValueError(
            f"{llm_dir}: checkpoint does not fit its config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.tie_weights()
    return model
