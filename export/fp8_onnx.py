"""ModelOpt FP8 artifacts (what `emoverse compress --recipe modelopt-fp8` writes) into the ONNX form TensorRT
builds FP8 GEMMs from on FP8 hardware (H100; Ada): per quantized Linear, the artifact's own E4M3 weight as a
FLOAT8E4M3FN initializer behind DequantizeLinear(weight_scale), and the input through QuantizeLinear /
DequantizeLinear at the artifact's calibrated input_scale — explicit quantization, so the plan computes with
exactly the operands the PyTorch emulation (emoverse/fp8.py) rounds to. No second quantization.

How: the graphs are exported from the plain fp32 LLM (weights = FP8 x weight_scale, no input rounding), then
every decoder MatMul whose constant weight equals one of those matrices gets its Q/DQ pair and FP8 weight.
Matching is by value, as for GPTQ (export/gptq_onnx.py). onnxruntime runs the result on CPU (float8 Q/DQ,
opset 19), so the parity against the emulated artifact is measured here; TensorRT itself is not executed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from emoverse.export.gptq_onnx import replace_matched_matmuls
from emoverse.fp8 import load_fp8_checkpoint
from emoverse.llm_files import read_tensors

FP8_OPSET = 19  # float8 types in QuantizeLinear / DequantizeLinear


def read_fp8_linears(llm_dir: Path) -> dict[str, dict]:
    """{module name: {"w8": E4M3 bytes (N, K) uint8, "weight_scale": float, "input_scale": float}}."""
    state = read_tensors(llm_dir)
    out = {}
    for key, t in state.items():
        if t.dtype == torch.float8_e4m3fn and key.endswith(".weight"):
            name = key[: -len(".weight")]
            out[name] = {
                "w8": t.view(torch.uint8).numpy(),
                "weight_scale": float(state[name + ".weight_scale"].float()),
                "input_scale": float(state[name + ".input_scale"].float()),
            }
    if not out:
        raise ValueError(f"{llm_dir}: no FP8 weights found")
    return out


def dequantize_fp8(layer: dict) -> np.ndarray:
    """The artifact's weight as the emulation computes it: E4M3 value x weight_scale, fp32 (N, K)."""
    w = torch.from_numpy(layer["w8"]).view(torch.float8_e4m3fn).float() * layer["weight_scale"]
    return w.numpy()


def plain_fp8_llm(llm_dir: Path):
    """The FP8 artifact as a plain fp32 LLM (FP8 x scale weights) without the input-rounding hooks, to export."""
    model = load_fp8_checkpoint(llm_dir)
    for module in model.modules():
        module._forward_pre_hooks.clear()
    return model


def to_fp8_qdq(src: Path, dst: Path, linears: dict[str, dict]) -> dict:
    """Write the decoder with FP8 Q/DQ around every matched MatMul to `dst` (opset 19); `src` is left as it is."""
    import onnx
    from onnx import helper, numpy_helper, version_converter

    model = version_converter.convert_version(onnx.load(str(src)), FP8_OPSET)
    model.ir_version = max(model.ir_version, 9)
    e4m3 = onnx.TensorProto.FLOAT8E4M3FN

    def replace(node, name, layer):
        base = f"{name}.fp8"
        w8 = np.ascontiguousarray(layer["w8"].T)  # (K, N): MatMul's layout
        tensors = [
            helper.make_tensor(base + ".weight", e4m3, list(w8.shape), w8.tobytes(), raw=True),
            numpy_helper.from_array(np.array(layer["weight_scale"], np.float32), base + ".weight_scale"),
            numpy_helper.from_array(np.array(layer["input_scale"], np.float32), base + ".input_scale"),
            helper.make_tensor(base + ".zero", e4m3, [], [0]),
        ]
        nodes = [
            helper.make_node(
                "QuantizeLinear", [node.input[0], base + ".input_scale", base + ".zero"], [base + ".xq"], saturate=1
            ),
            helper.make_node("DequantizeLinear", [base + ".xq", base + ".input_scale", base + ".zero"], [base + ".x"]),
            helper.make_node("DequantizeLinear", [base + ".weight", base + ".weight_scale"], [base + ".w"]),
            helper.make_node("MatMul", [base + ".x", base + ".w"], list(node.output), name=node.name),
        ]
        return nodes, tensors

    replaced = replace_matched_matmuls(model, linears, replace, dequant=dequantize_fp8)
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    return {
        "replaced": len(replaced),
        "unmatched": sorted(set(linears) - set(replaced)),
        "form": "FP8 E4M3 weights (DequantizeLinear) + Q/DQ inputs at the calibrated input_scale, opset 19",
    }
