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
from emoverse.runtime.ort import drop_unread_initializers
from emoverse.w4lora import factors, pack_nibbles, weight


def _block_sum(k: int, g: int) -> np.ndarray:
    return np.kron(np.eye(k // g, dtype=np.float32), np.ones((g, 1), dtype=np.float32))


def w4_tensors(name: str, layer: dict) -> list:
    """A layer's stored tensors in the CPU graphs, named `{name}.w4.*`: q as MatMulNBits packs it (N, K/g, g/2),
    d and m in fp16, and (adapted layers) the int8 factors transposed for x·Aᵀ·Bᵀ with their fp16 row scales.
    The 4-bit decoder and the INT8 prefill decoder both read these, by these names."""
    from onnx import numpy_helper

    n, k = layer["q"].shape
    g = layer["group_size"]
    out = [
        numpy_helper.from_array(pack_nibbles(layer["q"]).reshape(n, k // g, g // 2), f"{name}.w4.q"),
        numpy_helper.from_array(layer["d"], f"{name}.w4.d16"),
        numpy_helper.from_array(layer["m"], f"{name}.w4.m16"),
    ]
    if "a_q" in layer:
        for f in ("a", "b"):
            out += [
                numpy_helper.from_array(layer[f"{f}_q"].T.copy(), f"{name}.w4.{f}8"),
                numpy_helper.from_array(layer[f"{f}_s"], f"{name}.w4.{f}16"),
            ]
    return out


def factor_nodes(name: str) -> list:
    """Load-time nodes (folded by onnxruntime) making an adapted layer's fp32 Aᵀ (K, r) and Bᵀ (r, N),
    `{name}.w4.a` / `{name}.w4.b`, from its int8 factors and fp16 row scales (`w4lora.factors`, transposed)."""
    from onnx import TensorProto, helper

    lb = f"{name}.w4"
    nodes = []
    for f in ("a", "b"):
        nodes += [
            helper.make_node("Cast", [f"{lb}.{f}8"], [f"{lb}.{f}8f"], to=TensorProto.FLOAT),
            helper.make_node("Cast", [f"{lb}.{f}16"], [f"{lb}.{f}s"], to=TensorProto.FLOAT),
            helper.make_node("Mul", [f"{lb}.{f}8f", f"{lb}.{f}s"], [f"{lb}.{f}"]),
        ]
    return nodes


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
            inits += w4_tensors(name, layer)
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
            if "a_q" in layer:
                nodes += factor_nodes(name)
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


# -- INT8 prefill graph ----------------------------------------------------------------------------------------
# Measured on the Intel Xeon (AMX), one decoder call over 50 new tokens: MatMulNBits at accuracy level 4
# 104.6 ms, int8 x int8 (MatMulInteger u8s8, AMX) 41.3 ms; one decode step (1 token) 18.0 vs 21.9 ms. So a
# bundle may carry a second decoder for calls of more than one token (prompts, candidate continuations), with
# the same layers as int8 GEMMs, while decode steps keep the 4-bit kernels. Its int8 weights are not stored:
# load-time nodes build them from the very 4-bit tensors the other decoder reads (one copy on disk, in a file
# both graphs reference), so the bundle keeps its size. The runtime computes those nodes itself when it opens
# the graph (runtime.ort.load_time_tensors: onnxruntime's own folding of them held ~8 GB); plain onnxruntime
# still opens the file, folding them.


def _int8_weight_nodes(group: list[tuple[str, dict]], smooth: str, key: str, consts: dict[str, np.ndarray]) -> list:
    """Load-time nodes (all inputs constant; runtime.ort.load_time_tensors computes them): a group's merged
    weight base + B·A from its stored tensors (`w4_tensors`; the factors as the graph's `factor_nodes` make
    them), times the smoothing vector along K, quantized per output row to int8 (symmetric, round to nearest)
    -> `{key}.w8` (K, N) int8 and `{key}.w8s` (N,) fp32 row scales (the runtime's LOAD_TIME_SUFFIXES).
    Constants it names are added to `consts` (`int8_constants()` first)."""
    from onnx import TensorProto, helper

    f32, i32 = TensorProto.FLOAT, TensorProto.INT32
    nodes, parts = [], []
    for name, layer in group:
        n, k = layer["q"].shape
        g = layer["group_size"]
        p = f"{name}.w8"
        nodes += [  # nibbles: low first (pack_nibbles), in int32 (opset 17 has no bitwise ops)
            helper.make_node("Cast", [f"{name}.w4.q"], [p + ".q32"], to=i32),
            helper.make_node("Div", [p + ".q32", "w8.sixteen"], [p + ".hi"]),
            helper.make_node("Mul", [p + ".hi", "w8.sixteen"], [p + ".hi16"]),
            helper.make_node("Sub", [p + ".q32", p + ".hi16"], [p + ".lo"]),
            helper.make_node("Unsqueeze", [p + ".lo", "w8.last"], [p + ".lo1"]),
            helper.make_node("Unsqueeze", [p + ".hi", "w8.last"], [p + ".hi1"]),
            helper.make_node("Concat", [p + ".lo1", p + ".hi1"], [p + ".pairs"], axis=-1),
            helper.make_node("Reshape", [p + ".pairs", _const(consts, "w8.shape", (n, k // g, g))], [p + ".qi"]),
            helper.make_node("Cast", [p + ".qi"], [p + ".qf"], to=f32),
            helper.make_node("Cast", [f"{name}.w4.d16"], [p + ".d"], to=f32),
            helper.make_node("Cast", [f"{name}.w4.m16"], [p + ".m"], to=f32),
            helper.make_node("Unsqueeze", [p + ".d", "w8.last"], [p + ".d1"]),
            helper.make_node("Unsqueeze", [p + ".m", "w8.last"], [p + ".m1"]),
            helper.make_node("Mul", [p + ".d1", p + ".qf"], [p + ".dq"]),  # d·q + m: w4lora.dequantize's order
            helper.make_node("Add", [p + ".dq", p + ".m1"], [p + ".base3"]),
            helper.make_node("Reshape", [p + ".base3", _const(consts, "w8.shape", (n, k))], [p + ".base"]),
        ]
        w = p + ".base"
        if "a_q" in layer:  # + B·A, from the fp32 Aᵀ (K, r) and Bᵀ (r, N) the 4-bit graph's `factor_nodes` make
            nodes += [
                helper.make_node("MatMul", [f"{name}.w4.a", f"{name}.w4.b"], [p + ".abt"]),
                helper.make_node("Transpose", [p + ".abt"], [p + ".ba"], perm=[1, 0]),
                helper.make_node("Add", [p + ".base", p + ".ba"], [p + ".w"]),
            ]
            w = p + ".w"
        parts.append(w)
    nodes += [
        helper.make_node("Concat", parts, [key + ".w"], axis=0)
        if len(parts) > 1
        else helper.make_node("Identity", parts, [key + ".w"]),
        helper.make_node("Mul", [key + ".w", smooth], [key + ".ws"]),
        helper.make_node("Abs", [key + ".ws"], [key + ".wabs"]),
        helper.make_node("ReduceMax", [key + ".wabs"], [key + ".wmax"], axes=[1], keepdims=1),
        helper.make_node("Max", [key + ".wmax", "w8.tiny"], [key + ".wmax1"]),
        helper.make_node("Div", [key + ".wmax1", "w8.q127"], [key + ".wsc"]),
        helper.make_node("Div", [key + ".ws", key + ".wsc"], [key + ".wd"]),
        helper.make_node("Round", [key + ".wd"], [key + ".wr"]),
        helper.make_node("Clip", [key + ".wr", "w8.m127", "w8.q127"], [key + ".wc"]),
        helper.make_node("Cast", [key + ".wc"], [key + ".wi"], to=TensorProto.INT8),
        helper.make_node("Transpose", [key + ".wi"], [key + ".w8"], perm=[1, 0]),
        helper.make_node("Reshape", [key + ".wsc", "w8.last"], [key + ".w8s"]),
    ]
    return nodes


def int8_constants() -> dict[str, np.ndarray]:
    """The scalars the INT8 nodes share (one initializer each per graph)."""
    return {
        "w8.sixteen": np.array(16, np.int32),
        "w8.last": np.array([-1], np.int64),
        "w8.tiny": np.array(1e-8, np.float32),
        "w8.q127": np.array(127, np.float32),
        "w8.m127": np.array(-127, np.float32),
        "w8.q128": np.array(128, np.float32),
        "w8.zp128": np.array(128, np.uint8),
    }


def _const(consts: dict[str, np.ndarray], prefix: str, values: tuple[int, ...]) -> str:
    """An int64 vector constant (a shape, split sizes), named by its values: one per distinct value."""
    name = f"{prefix}.{'_'.join(map(str, values))}"
    consts[name] = np.array(values, dtype=np.int64)
    return name


def _int8_matmul_nodes(x: str, key: str, outputs: list[str], sizes: list[int], consts: dict[str, np.ndarray]) -> list:
    """Per call: x scaled by 1/smoothing, each row (token) quantized symmetrically to int8 with its own scale
    (stored as uint8 around 128, the u8·s8 kernels onnxruntime runs on AMX/VNNI), one integer GEMM, rescaled
    by the row and weight scales; a group's output split back into its layers."""
    from onnx import TensorProto, helper

    y = outputs[0] if len(outputs) == 1 else key + ".y"
    nodes = [
        helper.make_node("Mul", [x, key + ".inv_smooth"], [key + ".xs"]),
        helper.make_node("Abs", [key + ".xs"], [key + ".xabs"]),
        helper.make_node("ReduceMax", [key + ".xabs"], [key + ".xmax"], axes=[-1], keepdims=1),
        helper.make_node("Max", [key + ".xmax", "w8.tiny"], [key + ".xmax1"]),
        helper.make_node("Div", [key + ".xmax1", "w8.q127"], [key + ".xsc"]),
        helper.make_node("Div", [key + ".xs", key + ".xsc"], [key + ".xd"]),
        helper.make_node("Round", [key + ".xd"], [key + ".xr"]),
        helper.make_node("Add", [key + ".xr", "w8.q128"], [key + ".xu"]),
        helper.make_node("Cast", [key + ".xu"], [key + ".xq"], to=TensorProto.UINT8),
        helper.make_node("MatMulInteger", [key + ".xq", key + ".w8", "w8.zp128"], [key + ".y32"]),
        helper.make_node("Cast", [key + ".y32"], [key + ".yf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", [key + ".xsc", key + ".w8s"], [key + ".ysc"]),
        helper.make_node("Mul", [key + ".yf", key + ".ysc"], [y]),
    ]
    if len(outputs) > 1:
        nodes.append(helper.make_node("Split", [y, _const(consts, "w8.split", tuple(sizes))], outputs, axis=-1))
    return nodes


def w4_groups(model) -> list[dict]:
    """The W4 + LoRA groups of an onnxruntime-form decoder (`to_matmulnbits_lowrank`): for each, its input
    activation, its layer names, and the nodes whose outputs are the layers' outputs (the correction's Add, or
    the Split of a fused group). Read from the graph, so any bundle of that form can take an INT8 prefill."""
    by_out = {o: n for n in model.graph.node for o in n.output}
    first_reader: dict[tuple[str, str], object] = {}  # (op, first input) -> node: one pass, not one per group
    for n in model.graph.node:
        if n.input:
            first_reader.setdefault((n.op_type, n.input[0]), n)
    groups = []
    for node in model.graph.node:
        if node.op_type != "MatMulNBits" or ".w4" not in node.input[1]:
            continue
        b = node.input[1]
        names = [i[: -len(".w4.q")] for i in by_out[b].input] if b.endswith("cat") else [b[: -len(".w4.q")]]
        base = node.output[0][: -len(".y0")]
        add = first_reader[("Add", node.output[0])]
        split = first_reader.get(("Split", add.output[0]))
        outputs = list(split.output) if split is not None else list(add.output)
        groups.append({"x": node.input[0], "names": names, "key": base, "outputs": outputs, "last": split or add})
    return groups


def to_int8_prefill(
    src: Path,
    dst: Path,
    layers: dict[str, dict],
    absmax: dict[str, np.ndarray],
    alpha: float,
    keep_4bit: tuple[str, ...] = (),
) -> dict:
    """From an onnxruntime-form W4 + LoRA decoder (`src`), the INT8 prefill decoder (`dst`): every group's
    4-bit GEMM + correction becomes one int8 GEMM with per-token int8 activations. `absmax`: each group input's
    per-channel max |x| on calibration prompts, for SmoothQuant's migration (Xiao et al. 2023): s_k =
    max|x_k|^alpha / max|w_k|^(1-alpha), x/s in the graph, W·s folded into the weights, so an activation
    channel with outliers no longer sets every token's int8 step. `keep_4bit`: projection names (e.g.
    'down_proj') whose groups keep the 4-bit kernels (mixed precision). The lm head and everything else are as
    in `src`, reading the same initializers."""
    import onnx
    from onnx import numpy_helper

    consts = int8_constants()
    model = onnx.load(str(src), load_external_data=False)  # the tied table stays in its file, shared
    groups = w4_groups(model)
    replaced_at: dict[int, list] = {}
    index = {id(n): i for i, n in enumerate(model.graph.node)}
    inits = []
    kept = [g for g in groups if any(n.endswith(keep_4bit) for n in g["names"])]  # endswith(()) is False
    groups = [g for g in groups if g not in kept]
    for grp in groups:
        group = [(n, layers[n]) for n in grp["names"]]
        w = np.concatenate([weight(layer) for _, layer in group], axis=0)  # (N, K): only for the smoothing
        x_max = np.maximum(absmax[grp["x"]].astype(np.float32), 1e-5)
        w_max = np.maximum(np.abs(w).max(0), 1e-5)
        s = (x_max**alpha / w_max ** (1 - alpha)).astype(np.float32)
        key = grp["key"] + ".int8"
        inits += [numpy_helper.from_array(s, key + ".smooth"), numpy_helper.from_array(1 / s, key + ".inv_smooth")]
        sizes = [layer["q"].shape[0] for _, layer in group]
        replaced_at[index[id(grp["last"])]] = _int8_weight_nodes(
            group, key + ".smooth", key, consts
        ) + _int8_matmul_nodes(grp["x"], key, grp["outputs"], sizes, consts)
    new_nodes = []
    for i, node in enumerate(model.graph.node):
        new_nodes += replaced_at.get(i, [node])
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    model.graph.initializer.extend(inits)
    model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items())
    _prune(model)
    onnx.save(model, str(dst))
    onnx.checker.check_model(str(dst))  # by path: the tied table it names is read from beside it
    return {
        "groups": len(groups),
        "groups_kept_4bit": len(kept),
        "kept_4bit": list(keep_4bit),
        "smoothing_alpha": alpha,
        "form": "int8 weights built at load from the 4-bit tensors (base + B·A, SmoothQuant, per-row scales); "
        "int8 activations per token; MatMulInteger u8s8",
    }


def _prune(model) -> None:
    """Drop nodes whose outputs nothing reads (the replaced groups' 4-bit kernels and corrections) and the
    initializers left unused."""
    live = {o.name for o in model.graph.output}
    keep = []
    for node in reversed(list(model.graph.node)):
        if any(o in live for o in node.output):
            keep.append(node)
            live |= set(node.input)
    del model.graph.node[:]
    model.graph.node.extend(reversed(keep))
    drop_unread_initializers(model.graph)
