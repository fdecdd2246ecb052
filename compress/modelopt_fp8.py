"""ModelOpt FP8: the checkpoint form TensorRT-LLM consumes, and a way to measure its accuracy on a CPU.

`quantize_fp8` runs nvidia-modelopt's FP8 PTQ (per-tensor E4M3 weights and static per-tensor E4M3 input
scales from max calibration on AMT records of every task) and writes modelopt's unified HF checkpoint
(`hf_quant_config.json`, FP8 weights with `weight_scale` / `input_scale`) with `export_hf_checkpoint`.

`load_fp8_checkpoint` reads that checkpoint back for evaluation in PyTorch. transformers does not read
modelopt's format (quant_method "modelopt"; TensorRT-LLM does), and modelopt's own restore needs a
pickled state file, so this small reader is written by hand: weights = FP8 values x weight_scale, and each
quantized Linear's input is rounded to E4M3 at its calibrated scale — the numbers TensorRT-LLM's FP8 GEMM
multiplies (its accumulation is higher precision, as here).
"""

from __future__ import annotations

from pathlib import Path

import torch

from emoverse.fp8 import FP8_MAX, is_fp8_checkpoint, load_fp8_checkpoint  # noqa: F401  (the reader is the core's)


def quantize_fp8(model, calibration: list[dict], out: Path, n_samples: int, max_seq_length: int) -> int:
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint

    # inputs_embeds: the visual slots hold the projector's real visual tokens (see calibration_set)
    samples = [c["inputs_embeds"][:max_seq_length].unsqueeze(0) for c in calibration[:n_samples]]

    def forward_loop(m):
        with torch.no_grad():
            for embeds in samples:
                m(inputs_embeds=embeds)

    mtq.quantize(model, mtq.FP8_DEFAULT_CFG, forward_loop)
    export_hf_checkpoint(model, dtype=torch.bfloat16, export_dir=out)
    return len(samples)
