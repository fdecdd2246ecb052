"""W4 base + LoRA artifacts (emoverse/w4lora.py; `emoverse compress --recipe w4-base-lora`) into the bundle's
decoder: each layer's weight base + B·A, with base = d·q + m on its own grid, becomes

    y = MatMulNBits(x; q, d)  +  (x · [E | Aᵀ]) · [(m + 8d)ᵀ ; Bᵀ]

MatMulNBits multiplies by d·(q - 8) (4-bit, default zero point 8: the fast integer kernels), so the block
minima m and the 8d it subtracted come back through E, the (K, K/32) block-sum matrix: Σ_k x_k·c_block(k) =
Σ_blocks (Σ_{k in block} x_k)·c_block. The update shares that small second MatMul (K/32 + r columns), so a
layer costs one 4-bit GEMM and two thin ones. Nothing is requantized: q, d, m are the artifact's bits.
On CPU the layers that read one activation (q/k/v; gate/up) share one MatMulNBits and one correction (their
q, d, m joined along N, each Bᵀ under its own columns), and the sum is split back: exact, and 4 kernels per
decoder layer instead of 7 (onnxruntime's time on a closed-label request was ~20% in the thin correction ops).

CPU (onnxruntime): d and m are stored in fp16, the factors in int8 with fp16 row scales, turned into fp32 by
constant nodes that onnxruntime folds when the session loads (the file keeps the small sizes; the kernels
get fp32). TensorRT: the same algebra with
the base as an INT4 initializer behind a blocked DequantizeLinear (INT4 weight-only), constants in fp32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from emoverse.export.gptq_onnx import (
    INT4_OPSET,
    int4_initializer,
    replace_matched_matmul_groups,
    replace_matched_matmuls,
)
from emoverse.w4lora import factors, pack_nibbles, weight


def _block_sum(k: int, g: int) -> np.ndarray:
    return np.kron(np.eye(k // g, dtype=np.float32), np.ones((g, 1), dtype=np.float32))


def _replace(model, layers: dict[str, dict], accuracy_level: int, tensorrt: bool) -> list[str]:
    from onnx import TensorProto, helper, numpy_helper

    shared: dict[str, object] = {}  # block-sum matrices and constants, one per graph

    def const(name: str, arr: np.ndarray) -> str:
        if name not in shared:
            shared[name] = numpy_helper.from_array(arr, name)
        return name

    def correction(x, e, base, lefts, rights, y0, outputs, sizes=()) -> list:
        """[E | Aᵀ…] on the left, [(m + 8d)ᵀ ; Bᵀ…] on the right, added to the 4-bit product; a fused group's
        sum split back into its layers' outputs."""
        y = outputs[0] if len(outputs) == 1 else base + ".y"
        nodes = [
            helper.make_node("Concat", [e, *lefts], [base + ".left"], axis=1),
            helper.make_node("Concat", rights, [base + ".right"], axis=0),
            helper.make_node("MatMul", [x, base + ".left"], [base + ".h"]),
            helper.make_node("MatMul", [base + ".h", base + ".right"], [base + ".y1"]),
            helper.make_node("Add", [y0, base + ".y1"], [y]),
        ]
        if len(outputs) > 1:
            split = const("w4lora.split." + "_".join(map(str, sizes)), np.array(sizes, dtype=np.int64))
            nodes.append(helper.make_node("Split", [y, split], list(outputs), axis=-1))
        return nodes

    def replace_tensorrt(node, name, layer):
        """INT4 weight-only base behind a blocked DequantizeLinear, fp32 constants (TensorRT's DequantizeLinear
        wants its scale as an initializer; TensorRT fuses the layers of a group itself)."""
        n, k = layer["q"].shape
        g = layer["group_size"]
        base, x = f"{name}.w4", node.input[0]
        d32 = layer["d"].astype(np.float32)
        inits = [numpy_helper.from_array(((layer["m"].astype(np.float32) + 8 * d32).T).copy(), base + ".m8")]
        lefts, rights = [], [base + ".m8"]
        if "a_q" in layer:
            b, a = factors(layer)
            inits += [numpy_helper.from_array(a.T.copy(), base + ".a")]
            inits += [numpy_helper.from_array(b.T.copy(), base + ".b")]
            lefts, rights = [base + ".a"], [base + ".m8", base + ".b"]
        signed = {"q": (layer["q"].astype(np.int16) - 8).astype(np.int8), "group_size": g}
        inits += [int4_initializer(signed, base + ".q"), numpy_helper.from_array(d32.T.copy(), base + ".d")]
        nodes = [
            helper.make_node(
                "DequantizeLinear", [base + ".q", base + ".d"], [base + ".w"], name=base + "_dq", axis=0, block_size=g
            ),
            helper.make_node("MatMul", [x, base + ".w"], [base + ".y0"], name=node.name),
        ]
        e = const(f"w4lora.E{k}x{g}", _block_sum(k, g))
        return nodes + correction(x, e, base, lefts, rights, base + ".y0", [node.output[0]]), inits

    def replace_cpu(group_nodes, names):
        """One MatMulNBits for the layers that read one activation (q/k/v, gate/up: fewer, wider kernels) and one
        correction, from each layer's own tensors joined by nodes onnxruntime folds at load: the file keeps
        every layer's q, d, m and factors as they are (fp16 / int8 on disk, fp32 for the kernels)."""
        group = [layers[n] for n in names]
        x, k, g = group_nodes[0].input[0], group[0]["q"].shape[1], group[0]["group_size"]
        sizes = [layer["q"].shape[0] for layer in group]
        n_total = sum(sizes)
        base = f"{names[0]}.w4" if len(names) == 1 else f"{names[0]}.w4fused"
        f32 = TensorProto.FLOAT
        nodes, inits = [], []

        def joined(suffix: str) -> str:
            parts = [f"{n}.w4.{suffix}" for n in names]
            if len(parts) == 1:
                return parts[0]
            nodes.append(helper.make_node("Concat", parts, [f"{base}.{suffix}cat"], axis=0))
            return f"{base}.{suffix}cat"

        for name, layer in zip(names, group, strict=True):
            n = layer["q"].shape[0]
            inits += [
                numpy_helper.from_array(pack_nibbles(layer["q"]).reshape(n, k // g, g // 2), f"{name}.w4.q"),
                numpy_helper.from_array(layer["d"], f"{name}.w4.d16"),
                numpy_helper.from_array(layer["m"], f"{name}.w4.m16"),
            ]
        q, d16, m16 = joined("q"), joined("d16"), joined("m16")
        flat = const("w4lora.flat", np.array([-1], dtype=np.int64))
        eight = const("w4lora.eight", np.array(8, dtype=np.float32))
        nodes += [
            helper.make_node("Cast", [d16], [base + ".d"], to=f32),
            helper.make_node("Reshape", [base + ".d", flat], [base + ".scales"]),
            helper.make_node("Cast", [m16], [base + ".m"], to=f32),
            helper.make_node("Mul", [base + ".d", eight], [base + ".d8"]),
            helper.make_node("Add", [base + ".m", base + ".d8"], [base + ".m8t"]),
            helper.make_node("Transpose", [base + ".m8t"], [base + ".m8"], perm=[1, 0]),
            helper.make_node(
                "MatMulNBits",
                [x, q, base + ".scales"],
                [base + ".y0"],
                name=group_nodes[0].name + "_nbits",
                domain="com.microsoft",
                K=k,
                N=n_total,
                bits=4,
                block_size=g,
                accuracy_level=accuracy_level,
            ),
        ]
        lefts, rights, offset = [], [base + ".m8"], 0
        for name, layer, n in zip(names, group, sizes, strict=True):
            if "a_q" in layer:  # int8 factors transposed for x·Aᵀ·Bᵀ, their fp16 row scales along the last axis
                for f in ("a", "b"):
                    lb = f"{name}.w4"
                    inits += [
                        numpy_helper.from_array(layer[f"{f}_q"].T.copy(), f"{lb}.{f}8"),
                        numpy_helper.from_array(layer[f"{f}_s"], f"{lb}.{f}16"),
                    ]
                    nodes += [
                        helper.make_node("Cast", [f"{lb}.{f}8"], [f"{lb}.{f}8f"], to=f32),
                        helper.make_node("Cast", [f"{lb}.{f}16"], [f"{lb}.{f}s"], to=f32),
                        helper.make_node("Mul", [f"{lb}.{f}8f", f"{lb}.{f}s"], [f"{lb}.{f}"]),
                    ]
                lefts.append(f"{name}.w4.a")
                if len(names) == 1:
                    rights.append(f"{name}.w4.b")
                else:  # Bᵀ under its own layer's columns of the fused output (zeros elsewhere, made at load)
                    pads = np.array([0, offset, 0, n_total - offset - n], dtype=np.int64)
                    nodes.append(
                        helper.make_node(
                            "Pad", [f"{name}.w4.b", const(f"w4lora.pad.{offset}.{n_total}", pads)], [f"{name}.w4.bpad"]
                        )
                    )
                    rights.append(f"{name}.w4.bpad")
            offset += n
        e = const(f"w4lora.E{k}x{g}", _block_sum(k, g))
        outputs = [m.output[0] for m in group_nodes]
        return nodes + correction(x, e, base, lefts, rights, base + ".y0", outputs, sizes), inits

    if tensorrt:
        replaced = replace_matched_matmuls(model, layers, replace_tensorrt, dequant=weight)
    else:
        replaced = replace_matched_matmul_groups(model, layers, replace_cpu, dequant=weight)
    model.graph.initializer.extend(shared.values())
    return replaced


def to_matmulnbits_lowrank(decoder: Path, layers: dict[str, dict], accuracy_level: int = 0) -> dict:
    """The onnxruntime form, in place. accuracy_level 4 lets MatMulNBits quantize activations to int8."""
    import onnx
    from onnx import helper

    model = onnx.load(str(decoder))
    replaced = _replace(model, layers, accuracy_level, tensorrt=False)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(decoder))
    return _report(layers, replaced, {"accuracy_level": accuracy_level, "form": "MatMulNBits + low-rank correction"})


def to_int4_dequantize_lowrank(src: Path, dst: Path, layers: dict[str, dict]) -> dict:
    """The TensorRT form (INT4 weight-only base + fp32 low-rank correction), opset 21, written to `dst`."""
    import onnx
    from onnx import version_converter

    model = version_converter.convert_version(onnx.load(str(src)), INT4_OPSET)
    model.ir_version = max(model.ir_version, 10)
    replaced = _replace(model, layers, 0, tensorrt=True)
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    return _report(
        layers, replaced, {"form": "INT4 DequantizeLinear (blocked) -> MatMul + low-rank correction, opset 21"}
    )


def _report(layers: dict[str, dict], replaced: list[str], extra: dict) -> dict:
    return {
        "replaced": len(replaced),
        "unmatched": sorted(set(layers) - set(replaced)),
        "group_size": next(iter(layers.values()))["group_size"],
        "adapted": sum("a_q" in layers[n] for n in replaced),
        **extra,
    }
