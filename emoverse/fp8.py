"""Reading a ModelOpt FP8 checkpoint (the form TensorRT-LLM consumes) back into PyTorch with FP8-exact
numerics, so the core model loader reads every weight format compress/ writes (compress/modelopt_fp8.py
writes it).

transformers does not read modelopt's format (quant_method "modelopt"; TensorRT-LLM does), and modelopt's
own restore needs a pickled state file, so this small reader is written by hand: weights = FP8 values x
weight_scale, and each quantized Linear's input is rounded to E4M3 at its calibrated scale — the numbers
TensorRT-LLM's FP8 GEMM multiplies (its accumulation is higher precision, as here).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from emoverse.llm_files import empty_fp32_llm, load_fitting, read_tensors

FP8_MAX = 448.0  # largest finite E4M3 value


def is_fp8_checkpoint(llm_dir: Path) -> bool:
    return (llm_dir / "hf_quant_config.json").is_file()


def _fake_fp8_input(scale: torch.Tensor):
    def hook(_module, args):
        x = args[0]
        q = (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(x.dtype) * scale
        return (q, *args[1:])

    return hook


def load_fp8_checkpoint(llm_dir: Path):
    """A modelopt FP8 checkpoint as an fp32 transformers model with FP8-exact weights and inputs."""
    model = empty_fp32_llm(llm_dir)
    state = read_tensors(llm_dir)
    weights, input_scales = {}, {}
    for key, t in state.items():
        if key.endswith(".weight_scale"):
            continue
        if key.endswith(".input_scale"):
            input_scales[key[: -len(".input_scale")]] = t.float()
        elif t.dtype == torch.float8_e4m3fn:
            weights[key] = t.float() * state[key[: -len("weight")] + "weight_scale"].float()
        else:
            weights[key] = t.float()
    load_fitting(model, weights, llm_dir)
    modules = dict(model.named_modules())
    for name, scale in input_scales.items():
        modules[name].register_forward_pre_hook(_fake_fp8_input(scale))
    quant = json.loads((llm_dir / "hf_quant_config.json").read_text())["quantization"]
    model.config.emoverse_quantization = {
        "producer": "modelopt",
        "quant_algo": quant["quant_algo"],
        "fp8_linears": len(input_scales),
    }
    return model.eval()
