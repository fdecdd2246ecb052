"""Weight-quantized compressed-tensors artifacts (`pack-quantized`: GPTQ W4A16 from `emoverse compress --recipe
gptq-w4a16`, INT8 weight-only from `--recipe int8-weight-only`) into ONNX Runtime's `MatMulNBits`, from the
artifact's own weights and scales: no second quantization, so the bundle computes with exactly the weights
compress/ made and measured. INT8 per-channel scales become blocks of 32 that repeat the channel's scale
(MatMulNBits wants power-of-two blocks; the repetition is exact).

How: the LLM is rebuilt in fp32 with weight = q x scale (the artifact's dequantization, bit for bit), the
graphs are exported as for any model, then every decoder MatMul whose constant weight equals one of those
dequantized matrices is replaced by MatMulNBits holding that layer's q (as unsigned 4-bit, zero point 8) and
scales. Matching is by value, so it does not depend on how the exporter names initializers.

The packing is written by hand: onnxruntime's MatMulNBitsQuantizer only quantizes float weights itself (its
round-to-nearest or its own GPTQ), and has no entry point for weights that are already quantized.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from emoverse.llm_files import empty_fp32_llm, load_fitting, quantization_config, read_tensors
from emoverse.w4lora import pack_nibbles, unpack_nibbles


class NotGPTQ(ValueError):
    pass


def gptq_scheme(llm_dir: Path) -> dict:
    """The weight scheme of a compressed-tensors artifact — 4-bit symmetric groups (GPTQ W4A16) or 8-bit
    symmetric per channel (INT8 weight-only) — or NotGPTQ saying what it is."""
    cfg = quantization_config(llm_dir)
    if cfg.get("quant_method") != "compressed-tensors" or cfg.get("format") != "pack-quantized":
        raise NotGPTQ(
            f"{llm_dir}: not a compressed-tensors pack-quantized artifact "
            f"({cfg.get('quant_method')}/{cfg.get('format')})"
        )
    groups = list(cfg.get("config_groups", {}).values())
    w = groups[0].get("weights") if len(groups) == 1 else None
    if groups and len(groups) == 1 and (groups[0].get("input_activations") or groups[0].get("output_activations")):
        raise NotGPTQ(f"{llm_dir}: quantizes activations too (MatMulNBits export takes weight-only schemes)")
    four = w and w.get("num_bits") == 4 and w.get("strategy") == "group"
    eight = w and w.get("num_bits") == 8 and w.get("strategy") == "channel"
    if not (four or eight) or not w.get("symmetric") or w.get("type") != "int":
        raise NotGPTQ(
            f"{llm_dir}: MatMulNBits export takes symmetric int weights, 4-bit in groups or 8-bit per channel; "
            f"this has {w}"
        )
    if eight:
        return {"bits": 8, "group_size": None, "ignore": cfg.get("ignore", [])}
    g = int(w["group_size"])
    if g < 16 or g & (g - 1):
        raise NotGPTQ(f"{llm_dir}: group_size {g}: MatMulNBits needs a power of two >= 16")
    return {"bits": 4, "group_size": g, "ignore": cfg.get("ignore", [])}


CHANNEL_BLOCK = 32  # MatMulNBits block for per-channel INT8: every block of a row repeats the row's scale


def read_linears(llm_dir: Path) -> dict[str, dict]:
    """{module name: {"q": int8 (N, K), "scale": float32 (N, K / group), "group_size": g, "bits": b}}; a
    per-channel scheme is one group of K (scale (N, 1))."""
    from compressed_tensors.compressors import unpack_from_int32

    scheme = gptq_scheme(llm_dir)
    state = read_tensors(llm_dir)
    out = {}
    for key in state:
        if key.endswith(".weight_packed"):
            name = key[: -len(".weight_packed")]
            shape = torch.Size(state[name + ".weight_shape"].tolist())
            q = unpack_from_int32(state[key], scheme["bits"], shape)
            out[name] = {
                "q": q.to(torch.int8).numpy(),
                "scale": state[name + ".weight_scale"].float().numpy(),
                "group_size": scheme["group_size"] or int(shape[1]),
                "bits": scheme["bits"],
            }
    if not out:
        raise NotGPTQ(f"{llm_dir}: no packed weights found")
    return out


def dequantize(layer: dict) -> np.ndarray:
    """The artifact's own dequantization: q x scale of its group, in fp32."""
    return (layer["q"].astype(np.float32) * np.repeat(layer["scale"], layer["group_size"], axis=1)).astype(np.float32)


def dequantized_llm(llm_dir: Path, linears: dict[str, dict]):
    """The LLM as a plain fp32 transformers model whose quantized Linears hold q x scale exactly."""
    model = empty_fp32_llm(llm_dir)
    state = read_tensors(llm_dir)
    weights = {
        k: v.float()
        for k, v in state.items()
        if not k.endswith((".weight_packed", ".weight_scale", ".weight_shape", ".weight_zero_point", ".weight_g_idx"))
    }
    for name, layer in linears.items():
        weights[name + ".weight"] = torch.from_numpy(dequantize(layer))
    return load_fitting(model, weights, llm_dir).eval()


def nbits_block(layer: dict) -> int:
    """The MatMulNBits block of a layer: its group, or CHANNEL_BLOCK for a per-channel (one group of K) scale."""
    return layer["group_size"] if layer["group_size"] < layer["q"].shape[1] else CHANNEL_BLOCK


def pack(layer: dict) -> tuple[np.ndarray, np.ndarray]:
    """MatMulNBits inputs B (N, K/block, block·bits/8) uint8 — 4-bit: two values per byte, low nibble first —
    stored as q + 2^(bits-1) (MatMulNBits' default zero point), and scales (N * K/block,)."""
    q, g, bits = layer["q"], nbits_block(layer), layer.get("bits", 4)
    n, k = q.shape
    u = (q.astype(np.int16) + 2 ** (bits - 1)).astype(np.uint8).reshape(n, k // g, g)
    if bits == 4:
        u = pack_nibbles(u)
    scale = np.repeat(layer["scale"], layer["group_size"] // g, axis=1)  # a channel's scale in each block
    return u, scale.astype(np.float32).reshape(-1)


def unpack(packed: np.ndarray, scales: np.ndarray, n: int, k: int, g: int, bits: int = 4) -> np.ndarray:
    """MatMulNBits B + scales -> the (N, K) fp32 weight onnxruntime multiplies with (for checking)."""
    u = (unpack_nibbles(packed) if bits == 4 else packed).reshape(n, k // g, g).astype(np.int16)
    q = u - 2 ** (bits - 1)
    return (q.astype(np.float32) * scales.reshape(n, k // g, 1)).reshape(n, k).astype(np.float32)


def weight_digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a, dtype=np.float32).tobytes()).hexdigest()


def replace_matched_matmuls(model, linears: dict[str, dict], replace, dequant=None) -> list[str]:
    """Swap every decoder MatMul whose constant weight equals a layer's dequantized weight (`dequant`: GPTQ's
    q x scale by default, FP8 x scale for ModelOpt; matched by value, so it does not depend on how the exporter
    names initializers) for `replace(node, name, layer)` -> (nodes, initializers). Returns the layer names
    replaced; initializers left unused are dropped."""
    return replace_matched_matmul_groups(
        model, linears, lambda nodes, names: replace(nodes[0], names[0], linears[names[0]]), dequant, fuse=False
    )


def replace_matched_matmul_groups(model, linears: dict[str, dict], replace, dequant=None, fuse=True) -> list[str]:
    """As `replace_matched_matmuls`, but the matched MatMuls that read the same activation (q/k/v, gate/up) go
    to `replace(nodes, names)` together and their replacement takes the first one's place in the graph (its
    input exists there; its outputs are only read later). fuse=False: one MatMul at a time."""
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    dequant = dequant or dequantize
    by_value = {weight_digest(dequant(layer).T): name for name, layer in linears.items()}
    matched: dict[int, str] = {}
    for i, node in enumerate(graph.node):
        if node.op_type == "MatMul" and node.input[1] in inits:
            arr = numpy_helper.to_array(inits[node.input[1]])
            name = by_value.get(weight_digest(arr)) if arr.ndim == 2 else None
            if name is not None:
                matched[i] = name
    groups: dict[str, list[int]] = {}
    for i in matched:
        groups.setdefault(graph.node[i].input[0] if fuse else str(i), []).append(i)
    at = {members[0]: members for members in groups.values()}
    replaced, used, new_nodes, new_inits = [], set(), [], []
    for i, node in enumerate(graph.node):
        if i in at:
            members = [graph.node[j] for j in at[i]]
            nodes, tensors = replace(members, [matched[j] for j in at[i]])
            new_nodes += nodes
            new_inits += tensors
            replaced += [matched[j] for j in at[i]]
            used |= {m.input[1] for m in members}
        elif i not in matched:
            new_nodes.append(node)
    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.initializer.extend(new_inits)
    still_used = {i for node in graph.node for i in node.input}
    keep = [t for t in graph.initializer if t.name not in used or t.name in still_used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return replaced


def to_matmulnbits(decoder: Path, linears: dict[str, dict], accuracy_level: int = 0) -> dict:
    """ONNX Runtime form, in place: each GPTQ MatMul becomes MatMulNBits holding that layer's q (unsigned 4-bit,
    zero point 8) and scales. Returns {"replaced": n, "unmatched": [...], ...}. accuracy_level 0 keeps fp32
    activations (W4A16-like); 4 lets onnxruntime quantize them to int8."""
    import onnx
    from onnx import helper, numpy_helper

    def replace(node, name, layer):
        n, k = layer["q"].shape
        b, s = pack(layer)
        base = f"{name}.nbits"
        return [
            helper.make_node(
                "MatMulNBits",
                [node.input[0], base + ".B", base + ".scales"],
                list(node.output),
                name=node.name + "_nbits",
                domain="com.microsoft",
                K=k,
                N=n,
                bits=layer.get("bits", 4),
                block_size=nbits_block(layer),
                accuracy_level=accuracy_level,
            )
        ], [numpy_helper.from_array(b, base + ".B"), numpy_helper.from_array(s, base + ".scales")]

    model = onnx.load(str(decoder))
    replaced = replace_matched_matmuls(model, linears, replace)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(decoder))
    first = next(iter(linears.values()))
    return {
        "replaced": len(replaced),
        "unmatched": sorted(set(linears) - set(replaced)),
        "accuracy_level": accuracy_level,
        "bits": first.get("bits", 4),
        "group_size": first["group_size"] if first["group_size"] < first["q"].shape[1] else "channel",
    }


INT4_OPSET = 21  # INT4 tensors and DequantizeLinear's block_size arrived in opset 21 (IR 10)


def int4_initializer(layer: dict, name: str):
    """The layer's q transposed to MatMul's (K, N) layout as an ONNX INT4 tensor: two values per byte, the
    first in the low nibble (the ONNX and TensorRT packing)."""
    from onnx import TensorProto, helper

    qt = np.ascontiguousarray(layer["q"].T)  # (K, N)
    u = (qt.astype(np.uint8) & 0x0F).reshape(-1)  # two's complement low nibble: the signed INT4 value
    if u.size % 2:
        u = np.append(u, np.uint8(0))
    packed = pack_nibbles(u)
    return helper.make_tensor(name, TensorProto.INT4, list(qt.shape), packed.tobytes(), raw=True)


def to_int4_dequantize(src: Path, dst: Path, linears: dict[str, dict]) -> dict:
    """TensorRT form (weight-only): each quantized MatMul's weight becomes the artifact's q as an INT4
    initializer (K, N) behind DequantizeLinear(axis 0, block_size g, no zero point: symmetric) with the
    artifact's scales (K/g, N) — the pre-quantized-weights pattern TensorRT's explicit quantization builds
    INT4 weight-only GEMMs from (Ampere and later: Orin 8.7, H100 9.0); an INT8 per-channel artifact becomes
    an INT8 initializer behind DequantizeLinear(axis 1, scale (N,)), TensorRT's INT8 weight-only pattern. The
    graph is converted to opset 21 with onnx's version converter first. Written to `dst`; `src` is left as it is."""
    import onnx
    from onnx import helper, numpy_helper, version_converter

    def replace(node, name, layer):
        g = layer["group_size"]
        if layer.get("bits", 4) == 8:  # per channel: one scale per output column of the (K, N) weight
            base = f"{name}.int8"
            weight = numpy_helper.from_array(np.ascontiguousarray(layer["q"].T.astype(np.int8)), base + ".weight")
            scale, attrs = layer["scale"][:, 0].astype(np.float32), {"axis": 1}
        else:
            base = f"{name}.int4"
            weight = int4_initializer(layer, base + ".weight")
            scale, attrs = np.ascontiguousarray(layer["scale"].T.astype(np.float32)), {"axis": 0, "block_size": g}
        return [
            helper.make_node(
                "DequantizeLinear",
                [base + ".weight", base + ".scale"],
                [base + ".dequantized"],
                name=node.name + "_dq",
                **attrs,
            ),
            helper.make_node("MatMul", [node.input[0], base + ".dequantized"], list(node.output), name=node.name),
        ], [weight, numpy_helper.from_array(scale, base + ".scale")]

    model = version_converter.convert_version(onnx.load(str(src)), INT4_OPSET)
    model.ir_version = max(model.ir_version, 10)
    replaced = replace_matched_matmuls(model, linears, replace)
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    first = next(iter(linears.values()))
    eight = first.get("bits", 4) == 8
    return {
        "replaced": len(replaced),
        "unmatched": sorted(set(linears) - set(replaced)),
        "form": "INT8 DequantizeLinear (per channel)" if eight else "INT4 DequantizeLinear (blocked, symmetric)",
        "bits": first.get("bits", 4),
        "group_size": "channel" if eight else first["group_size"],
    }
