"""`emoverse export`: a model artifact -> a deployable bundle folder (graphs, tokenizer, runtime config,
label sets, manifest with hashes), checked by parity against PyTorch before it is written."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from emoverse.artifacts import MODEL_KINDS, atomic_dir, manifest_digest, verify, write_manifest
from emoverse.export.fp8_onnx import plain_fp8_llm, read_fp8_linears, to_fp8_qdq
from emoverse.export.gptq_onnx import (
    NotGPTQ,
    dequantized_llm,
    gptq_scheme,
    read_linears,
    to_int4_dequantize,
    to_matmulnbits,
)
from emoverse.export.onnx_export import export_all, fold_shape_arithmetic
from emoverse.export.targets import check_precision, get_target, resolve_precision
from emoverse.export.tensorrt import write_plan
from emoverse.export.w4lora_onnx import to_int4_dequantize_lowrank, to_int8_prefill, to_matmulnbits_lowrank
from emoverse.fp8 import is_fp8_checkpoint
from emoverse.imaging import load_pixels
from emoverse.llm_files import quantization_config
from emoverse.model import EmoVerse
from emoverse.runtime.graphs import runtime_config  # noqa: F401  (the bundle format is the runtime's)
from emoverse.runtime.ort import RUNTIME_FORMAT, TIED_FILE, OrtRuntime  # noqa: F401  (format: the runtime owns it)
from emoverse.tasks import TASKS
from emoverse.w4lora import is_w4_lora, load_w4_lora, pack_nibbles, read_layers


@torch.no_grad()
def parity(model, bundle_dir: Path, probes: list[tuple[str, list[str], str]]) -> dict:
    """Max |logit| difference between PyTorch and ONNX Runtime on the prompts, and greedy-token agreement."""
    rt = OrtRuntime(bundle_dir, check=False)
    worst, same = 0.0, 0
    for query, images, task in probes:
        enc = model.prompts.encode(query, None, images, [])
        ids = torch.tensor([enc.input_ids])
        ref = model.llm(inputs_embeds=model.embed(ids, torch.tensor([enc.visual_mask]), enc.media)).logits[0].numpy()
        emb = rt.embed(query, images)[None]
        got, _ = rt.forward(emb, np.ones((1, emb.shape[1]), dtype=np.int64), rt.empty_cache(1))
        worst = max(worst, float(np.abs(ref - got[0]).max()))
        n = TASKS[task].max_new_tokens
        same += model.generate(query, images, max_new_tokens=n) == rt.generate(query, images, max_new_tokens=n)
    return {"max_abs_logit_diff": worst, "greedy_identical": same, "probes": len(probes)}


def quantize_for_cpu(decoder: Path, precision: str) -> None:
    """ORT weight quantization of the decoder in place: int8 = dynamic INT8, int4 = MatMulNBits (block 32)."""
    tmp = decoder.with_suffix(".q.onnx")
    if precision == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(decoder), str(tmp), weight_type=QuantType.QInt8)
    elif precision == "int4":
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        q = MatMulNBitsQuantizer(str(decoder), bits=4, block_size=32, is_symmetric=True, accuracy_level=4)
        q.process()
        q.model.save_model_to_file(str(tmp), use_external_data_format=False)
    else:
        raise ValueError(f"unknown CPU precision {precision!r} (fp32, int8, int4)")
    os.replace(tmp, decoder)


def quantize_embeddings(
    bundle: Path, graphs: dict[str, str], bits: int, block: int = 32, accuracy_level: int = 0
) -> dict:
    """The tied 49,152 x 576 table (input embedding and output projection; ~20% of SmolLM2's weights) as ONE
    `bits`-bit copy that both graphs read: the embed graph's Gather becomes GatherBlockQuantized, the decoder's
    output projection MatMulNBits, and both point at the same bytes of `graphs/tied_embedding.bin` (ONNX
    external data with offsets). The two ops lay out a row-blocked table identically — data (V, H) = B
    (V, H/block, block·bits/8), scales (V, H/block), zero points (V, H/block) — so the table is stored once,
    where quantizing each graph separately stores it twice.

    Symmetric round-to-nearest per block of 32 along the hidden size, written by hand: onnxruntime's
    MatMulNBitsQuantizer quantizes each graph on its own (two copies) and leaves 8-bit Gathers in fp32."""
    import onnx
    from onnx import external_data_helper, helper

    embed_path, decoder_path = bundle / graphs["embed"], bundle / graphs["decoder"]
    embed, decoder = onnx.load(str(embed_path)), onnx.load(str(decoder_path))
    inits = {t.name: t for t in embed.graph.initializer}
    gather = next(n for n in embed.graph.node if n.op_type == "Gather" and n.input[0] in inits)
    table = onnx.numpy_helper.to_array(inits[gather.input[0]]).astype(np.float32)  # (V, H)
    vocab, hidden = table.shape
    dec_inits = {t.name: t for t in decoder.graph.initializer}
    head = next(
        n
        for n in decoder.graph.node
        if n.op_type == "MatMul"
        and n.input[1] in dec_inits
        and tuple(dec_inits[n.input[1]].dims) == (hidden, vocab)
        and np.array_equal(onnx.numpy_helper.to_array(dec_inits[n.input[1]]).T, table)
    )
    blocks = table.reshape(vocab, hidden // block, block)
    qmax = 2 ** (bits - 1) - 1
    # fp16 scales (cast to fp32 by a constant node both graphs fold on load): half the bytes, and exact for a
    # GGUF Q8_0 table, whose scales are fp16. Rounded first, so q is computed with the scale that ships.
    scale = (np.abs(blocks).max(-1) / qmax).astype(np.float16)
    scale[scale == 0] = 1.0
    zero = 2 ** (bits - 1)  # unsigned storage around the middle: both ops' default zero point, so none is stored
    u = (np.clip(np.round(blocks / scale.astype(np.float32)[..., None]), -qmax - 1, qmax) + zero).astype(np.uint8)
    if bits == 4:
        u = pack_nibbles(u)  # two per byte, first in the low nibble
    parts = {"data": u.reshape(vocab, -1), "scales": scale}
    offsets, blob = {}, b""
    for key, arr in parts.items():
        offsets[key] = (len(blob), arr.nbytes)
        blob += arr.tobytes()
    (decoder_path.parent / TIED_FILE).write_bytes(blob)  # inside the bundle's temporary folder: atomic with it

    def external(name: str, key: str, dtype: int, dims: tuple[int, ...]):
        t = onnx.TensorProto(name=name, data_type=dtype, dims=list(dims), raw_data=b"")
        external_data_helper.set_external_data(t, TIED_FILE, offset=offsets[key][0], length=offsets[key][1])
        t.ClearField("raw_data")  # the bytes live in TIED_FILE only
        return t

    u8, f16 = onnx.TensorProto.UINT8, onnx.TensorProto.FLOAT16
    cast = helper.make_node("Cast", ["tied.scales16"], ["tied.scales"], to=onnx.TensorProto.FLOAT)
    n_blocks = hidden // block
    embed.graph.initializer.remove(inits[gather.input[0]])
    embed.graph.initializer.extend(
        [
            external("tied.data", "data", u8, parts["data"].shape),
            external("tied.scales16", "scales", f16, (vocab, n_blocks)),
        ]
    )
    nodes = list(embed.graph.node)
    nodes[nodes.index(gather)] = helper.make_node(
        "GatherBlockQuantized",
        ["tied.data", gather.input[1], "tied.scales"],
        list(gather.output),
        domain="com.microsoft",
        bits=bits,
        block_size=block,
        gather_axis=0,
        quantize_axis=1,
    )
    del embed.graph.node[:]
    embed.graph.node.extend([cast, *nodes])
    decoder.graph.initializer.remove(dec_inits[head.input[1]])
    decoder.graph.initializer.extend(
        [
            external("tied.B", "data", u8, (vocab, n_blocks, block * bits // 8)),
            external("tied.scales16", "scales", f16, (vocab * n_blocks,)),
        ]
    )
    nodes = list(decoder.graph.node)
    nodes[nodes.index(head)] = helper.make_node(
        "MatMulNBits",
        [head.input[0], "tied.B", "tied.scales"],
        list(head.output),
        name=head.name + "_nbits",
        domain="com.microsoft",
        K=hidden,
        N=vocab,
        bits=bits,
        block_size=block,
        accuracy_level=accuracy_level,
    )
    del decoder.graph.node[:]
    decoder.graph.node.extend([cast, *nodes])
    for model, path in ((embed, embed_path), (decoder, decoder_path)):
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        onnx.save(model, str(path))
    rel = f"{Path(graphs['decoder']).parent}/{TIED_FILE}"
    return {"bits": bits, "block_size": block, "file": rel, "bytes": len(blob)}


def quantize_vision_int8(vision: Path, pixels: np.ndarray) -> None:
    """Static INT8 of the vision graph (weights per channel, activations calibrated on training faces) with
    onnxruntime's quantizer, in place."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Faces(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"pixels": p[None]} for p in pixels])

        def get_next(self):
            return next(self.items, None)

    tmp = vision.with_suffix(".q.onnx")
    quantize_static(
        str(vision),
        str(tmp),
        Faces(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        weight_type=QuantType.QInt8,
        activation_type=QuantType.QUInt8,
    )
    os.replace(tmp, vision)


def quantize_vision_weights_int8(vision: Path) -> int:
    """Weight-only INT8 of the vision graph, in place: each Conv/MatMul/Gemm weight stored as int8 per output
    channel (symmetric) + fp32 scales, turned back into fp32 by Cast → Mul nodes onnxruntime folds when the
    session loads. Activations stay fp32, so the only rounding is the weights' (static INT8 also rounds every
    activation, which is what moved FER answers). Returns the number of weights quantized.

    Written by hand: onnxruntime's quantizers either quantize activations too (static/dynamic QDQ) or handle
    MatMul only (MatMulNBits); a weight-only Conv has no entry point there."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(vision))
    inits = {t.name: t for t in model.graph.initializer}
    axis_of = {}
    for node in model.graph.node:
        if node.op_type in ("Conv", "MatMul", "Gemm") and len(node.input) > 1 and node.input[1] in inits:
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            axis_of[node.input[1]] = 0 if node.op_type == "Conv" or (node.op_type == "Gemm" and trans_b) else -1
    nodes = []
    for name, axis in axis_of.items():
        w = numpy_helper.to_array(inits[name])
        if w.dtype != np.float32 or w.ndim < 2:
            continue
        moved = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
        scale = (np.abs(moved).max(1) / 127).astype(np.float32)
        scale[scale == 0] = 1
        shape = [1] * w.ndim
        shape[axis] = -1
        scale = scale.reshape(shape)
        q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
        model.graph.initializer.remove(inits[name])
        model.graph.initializer.extend(
            [numpy_helper.from_array(q, name + ".i8"), numpy_helper.from_array(scale, name + ".s")]
        )
        nodes += [
            helper.make_node("Cast", [name + ".i8"], [name + ".f"], to=onnx.TensorProto.FLOAT),
            helper.make_node("Mul", [name + ".f", name + ".s"], [name]),
        ]
    graph_nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes + graph_nodes)  # constants first: the graph stays topologically sorted
    onnx.checker.check_model(model)
    onnx.save(model, str(vision))
    return len(nodes) // 2


def quantize_vision_qdq(vision: Path, out: Path, mode: str, pixels: np.ndarray) -> None:
    """nvidia-modelopt ONNX PTQ: explicit Q/DQ nodes (int8 / fp8) that TensorRT turns into low-precision kernels.

    Run in a child process: modelopt patches onnxruntime.quantization's classes in the process that imports
    it, after which onnxruntime's own quantize_static (the CPU bundle's INT8 vision) fails on the Pad outputs
    ("Quantization parameters are not specified"): the order-dependent test failure this fixes."""
    import subprocess
    import sys

    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "pixels.npy", pixels)
        code = (
            "import sys, numpy as np\n"
            "from modelopt.onnx.quantization import quantize\n"
            "quantize(sys.argv[1], quantize_mode=sys.argv[2], calibration_data={'pixels': np.load(sys.argv[3])},"
            " output_path=sys.argv[4], calibration_eps=['cpu'], log_level='WARNING')\n"
        )
        args = [sys.executable, "-c", code, str(vision), mode, str(Path(tmp) / "pixels.npy"), str(out)]
        proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"{vision}: modelopt {mode} Q/DQ quantization failed:\n{proc.stderr[-3000:]}")


VISION_NOISE = 0.5  # a visual token this far (relative L2) from its fp32 value carries no image information


def vision_token_error(fp32: Path, quantized: Path, pixels: np.ndarray) -> dict:
    """Relative L2 error of each visual-token position of a quantized vision graph against its fp32 graph on
    `pixels`; refused (ValueError) when a position's tokens are noise. Why: the tokens a quantized encoder
    makes reach the LLM only as embeddings, where a broken one shows as wrong answers at eval time, hours
    later (v3's first static-INT8 vision bundle: face tokens at 0.998, FER at 31.5% of the teacher)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    ref, got = (
        ort.InferenceSession(str(g), opts, providers=["CPUExecutionProvider"]).run(None, {"pixels": pixels})[0]
        for g in (fp32, quantized)
    )
    err = np.linalg.norm(got - ref, axis=(0, 2)) / np.maximum(np.linalg.norm(ref, axis=(0, 2)), 1e-12)
    out = {"images": len(pixels), "per_token": [round(float(e), 4) for e in err], "max": round(float(err.max()), 4)}
    if not np.isfinite(err).all() or err.max() > VISION_NOISE:
        raise ValueError(
            f"{quantized.name}: the quantized vision graph's tokens are noise at positions "
            f"{[i for i, e in enumerate(err) if not e <= VISION_NOISE]} (relative error {out['max']} against fp32 on "
            f"{len(pixels)} held-out training images); not shipped"
        )
    return out


def held_out_pixels(images: list[str], size: int, n: int = 16) -> np.ndarray:
    """Training images after the calibration ones (the first n), for checking a calibrated graph; the
    calibration images themselves when there are no others."""
    return calibration_pixels(images[n:] if len(images) > n else images, size, n)


def calibration_pixels(images: list[str], size: int, n: int = 16) -> np.ndarray:
    if not images:
        raise ValueError("Q/DQ calibration needs images (pass --data with FER train records)")
    return np.stack([load_pixels(p, size) for p in images[:n]])


def _check(model, bundle: Path, probes: list, extra: dict, step: str) -> None:
    """Parity of the bundle as it stands against the PyTorch model: the manifest's `parity` (the bundle as
    shipped, once every step is done) and `parity_after[step]`, so what each step costs can be read from it."""
    extra["parity"] = extra.setdefault("parity_after", {})[step] = parity(model, bundle, probes)


def _require_all_matched(info: dict, what: str) -> None:
    if info["unmatched"]:
        raise ValueError(f"{what} export: no decoder MatMul carries the weights of {info['unmatched'][:3]}")


def _replace_decoder(bundle: Path, graphs: dict[str, str], cfg: dict, new: Path) -> None:
    """Ship `new` as the decoder graph (the full-precision one it was converted from is dropped)."""
    (bundle / graphs["decoder"]).unlink()
    graphs["decoder"] = str(new.relative_to(bundle))
    cfg["graphs"] = dict(graphs)
    (bundle / "runtime.json").write_text(json.dumps(cfg, indent=2) + "\n")


def export_bundle(
    model_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    target: str = "cpu",
    precision: str | None = None,
    probes: list[tuple[str, list[str], str]] | None = None,
    max_abs_diff: float = 1e-3,
    calibration_images: list[str] | None = None,
    overwrite: bool = False,
    embedding_bits: int | None = None,
    vision_int8: bool = False,
    vision_int8_weights: bool = False,
    int8_activations: bool = False,
    int8_prefill: bool = False,
    calibration_records: list | None = None,
    smoothing_alpha: float = 0.5,
    int8_prefill_keep: tuple[str, ...] = (),
    int8_prefill_tasks: tuple[str, ...] | None = None,
    label_decision_margin: float | None = None,
    closing_from_cache: bool = False,
) -> dict:
    """int8_activations (cpu, 4/8-bit weights): MatMulNBits accuracy level 4, onnxruntime quantizes each
    activation row to int8 and multiplies with integer kernels (VNNI/AMX where the CPU has them): faster,
    not bit-exact; parity records what it costs.

    int8_prefill (cpu, W4 base + LoRA artifacts): a second decoder for calls of more than one token, its layers
    int8 GEMMs whose weights are built at load (by the runtime) from the same 4-bit tensors (stored once), smoothed
    (SmoothQuant, `smoothing_alpha`) with activation ranges from `calibration_records` (training records of
    every task). Not bit-exact: a requantization of base + B·A; the manifest lists the records it used.
    `int8_prefill_keep`: projections (e.g. 'down_proj') that stay on the 4-bit kernels in that decoder.
    `int8_prefill_tasks`: the tasks whose requests take that decoder (runtime.json; None: every request); the
    others keep the 4-bit decoder for every call — per-task precision, for a task whose latency budget needs
    the INT8 prefill beside one whose agreement does not allow it (docs/deployment.md).
    `label_decision_margin` (nats, > 0): written to runtime.json; the runtime answers a closed label by its first
    token when it leads by this much (docs/deployment.md); None: exact scoring.
    `closing_from_cache`: written to runtime.json; the runtime completes an ERI answer's conclusion from its
    decoding cache instead of a second prefill of prompt + text (faster; not bit-identical)."""
    tgt = get_target(target)
    if label_decision_margin is not None and label_decision_margin <= 0:  # refused before any export work
        raise ValueError(f"label_decision_margin must be > 0 nats, not {label_decision_margin}")
    if int8_prefill and target != "cpu":
        raise ValueError(f"int8_prefill: for target cpu (onnxruntime's integer kernels), not {target}")
    if int8_prefill and not calibration_records:
        raise ValueError("int8_prefill: needs calibration records (--calibration-data: an AMT folder)")
    if int8_prefill_tasks is not None:
        if not int8_prefill:
            raise ValueError("int8_prefill_tasks: names the tasks of an INT8 prefill decoder; add int8_prefill")
        unknown = sorted(set(int8_prefill_tasks) - set(TASKS))
        if unknown or not int8_prefill_tasks:
            raise ValueError(f"int8_prefill_tasks: {unknown or 'none given'}; tasks are {sorted(TASKS)}")
    if vision_int8 and vision_int8_weights:
        raise ValueError("vision_int8_weights: one vision quantization, not with vision_int8 (static) as well")
    if precision:  # before any work: e.g. FP8 for Orin is refused for its compute capability
        check_precision(target, tgt, precision)
    model_dir = EmoVerse.full_form(model_dir)  # an adapter-form release is expanded once (cached)
    parent = verify(model_dir, kind=MODEL_KINDS)
    gptq = None
    fp8 = is_fp8_checkpoint(model_dir / "llm")
    w4 = read_layers(model_dir / "llm") if is_w4_lora(model_dir / "llm") else None
    if int8_prefill and w4 is None:
        raise ValueError(
            f"{model_dir}: int8_prefill takes W4 base + LoRA artifacts (emoverse compress --recipe w4-base-lora)"
        )
    if quantization_config(model_dir / "llm") and not fp8 and w4 is None:
        # A compress/ output is exported as it is: GPTQ W4A16 weights go into the graphs unchanged.
        try:
            scheme = gptq_scheme(model_dir / "llm")
        except NotGPTQ as e:
            raise ValueError(
                f"{e}. Export takes full-precision models (quantized for the target here), GPTQ W4A16, INT8 "
                "weight-only and W4 base + LoRA artifacts (their own weights) and ModelOpt FP8 artifacts"
            ) from None
        gptq = scheme
    own_bits = "int4" if w4 is not None else f"int{gptq['bits']}" if gptq is not None else None
    precisions = resolve_precision(target, precision, own_weights=own_bits, fp8=fp8)  # decided there only
    precision = precisions["decoder"]
    if gptq is not None:
        gptq = {"linears": read_linears(model_dir / "llm"), **gptq}
    model = EmoVerse.load(model_dir, check=False).eval()
    if gptq is not None:
        model.llm = dequantized_llm(model_dir / "llm", gptq["linears"])  # q x scale, bit for bit
    if w4 is not None:
        model.llm = load_w4_lora(model_dir / "llm", w4)  # base d·q + m + B·A: the arrays the graph is matched on
    emulated_llm = None
    if fp8:  # graphs from the plain FP8 x scale weights; the emulated artifact is what parity compares with
        fp8_linears = read_fp8_linears(model_dir / "llm")
        emulated_llm, model.llm = model.llm, plain_fp8_llm(model_dir / "llm")
    image_dir = tempfile.TemporaryDirectory()  # the probe image must not land in the bundle
    if probes is None:
        probes = [(TASKS["msa"].query("What a lovely day"), [], "msa")]
        if model.vision is not None:  # the vision graph is checked too, through an image probe
            face = Path(image_dir.name) / "probe.png"
            rng = np.random.default_rng(0)
            Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(face)
            probes.append((TASKS["fer"].query(TASKS["fer"].labels, False), [str(face)], "fer"))
    with image_dir, atomic_dir(out, overwrite=overwrite) as tmp:
        paths = export_all(model, tmp / "graphs")
        shape_folding = fold_shape_arithmetic(paths["decoder"])  # before every decoder form derived from it
        graphs = {k: str(p.relative_to(tmp)) for k, p in paths.items()}
        # what the `tokenizers` runtime reads; not pretty-printed: 1.6 instead of 3.5 MB, the same tokenizer
        model.tokenizer.backend_tokenizer.save(str(tmp / "tokenizer.json"), pretty=False)
        cfg = runtime_config(model, graphs)
        if label_decision_margin is not None:  # the runtime reads it (runtime/ort.py): both eval and bench use it
            cfg["label_decision_margin"] = label_decision_margin
        if closing_from_cache:  # the same: a runtime setting of the bundle, so eval and bench answer alike
            cfg["closing_from_cache"] = True
        (tmp / "runtime.json").write_text(json.dumps(cfg, indent=2) + "\n")
        report = parity(model, tmp, probes)  # the exported fp32 graphs against PyTorch
        if report["max_abs_logit_diff"] > max_abs_diff:
            raise ValueError(
                f"ONNX parity failed: max |logit diff| {report['max_abs_logit_diff']:.2e} > {max_abs_diff}"
            )
        extra: dict = {"parity_fp32": report, "target": target, "decoder_shape_folding": shape_folding}
        if fp8:
            dq = tmp / "graphs" / "decoder.fp8.qdq.onnx"
            info = to_fp8_qdq(tmp / graphs["decoder"], dq, fp8_linears)
            _require_all_matched(info, "FP8")
            _replace_decoder(tmp, graphs, cfg, dq)
            extra["weights_from"] = {"artifact": str(model_dir.resolve()), "format": "modelopt fp8", "fp8": info}
            model.llm = emulated_llm
            _check(model, tmp, probes, extra, "fp8 decoder")
            # Gated on the answers, not the logits: FP8 *activations* turn the 1e-6 differences between two
            # kernels' inputs into whole E4M3 steps (12.5%) wherever a value sits near a rounding boundary, so
            # logits drift by design across 30 layers (SmolLM2: max |diff| ~5 with identical greedy answers)
            if extra["parity"]["greedy_identical"] < extra["parity"]["probes"]:
                raise ValueError(f"FP8 bundle parity failed (greedy answers differ): {extra['parity']}")
        elif own_bits:  # the artifact's own 4/8-bit weights, in the form the target's runtime multiplies
            layers = w4 if w4 is not None else gptq["linears"]
            if target != "cpu":
                # TensorRT: weight-only DequantizeLinear nodes on the artifact's integers; the same graph runs
                # in onnxruntime, so the parity below checks exactly what the plan builds from
                dq = tmp / "graphs" / f"decoder.{own_bits}.qdq.onnx"
                convert = to_int4_dequantize_lowrank if w4 is not None else to_int4_dequantize
                info = convert(tmp / graphs["decoder"], dq, layers)
                _replace_decoder(tmp, graphs, cfg, dq)  # a mismatch below discards the whole folder anyway
            else:
                convert = to_matmulnbits_lowrank if w4 is not None else to_matmulnbits
                info = convert(tmp / graphs["decoder"], layers, accuracy_level=4 if int8_activations else 0)
            _require_all_matched(info, "W4 base + LoRA" if w4 is not None else "GPTQ")
            extra["weights_from"] = {
                "artifact": str(model_dir.resolve()),
                "format": "compressed-tensors pack-quantized"
                if gptq is not None
                else "emoverse w4 base + lora (the base's own 4-bit grid, int8 low-rank update)",
                "group_size": info["group_size"],
                "dequantize_linear" if target != "cpu" else "matmulnbits": info,
            }
            _check(model, tmp, probes, extra, f"{own_bits} decoder")  # against the PyTorch compressed artifact
            # int8 activations are not bit-exact by design: recorded, not gated
            if not int8_activations and extra["parity"]["max_abs_logit_diff"] > 50 * max_abs_diff:
                raise ValueError(f"{own_bits} bundle parity failed: {extra['parity']}")
        elif target == "cpu" and precision != "fp32":
            quantize_for_cpu(tmp / graphs["decoder"], precision)
            _check(model, tmp, probes, extra, "quantized decoder")
        if tgt.get("runtime") == "tensorrt":
            mode = precisions["vision"]
            if mode and "vision" in graphs:
                qdq = tmp / "graphs" / f"vision.{mode}.qdq.onnx"
                quantize_vision_qdq(
                    tmp / graphs["vision"],
                    qdq,
                    mode,
                    calibration_pixels(calibration_images or [], model.cfg.image_size),
                )
                graphs["vision"] = str(qdq.relative_to(tmp))
            extra["tensorrt_plan"] = write_plan(tmp, cfg, graphs, target, precisions)
            extra["device_files"] = [
                "tensorrt/*.engine",
                "tensorrt/timing.cache",
            ]  # built on the device later
        if embedding_bits is not None:
            if target != "cpu" or embedding_bits not in (4, 8):
                raise ValueError(f"embedding_bits={embedding_bits}: 4 or 8, for target cpu")
            info = quantize_embeddings(tmp, graphs, embedding_bits, accuracy_level=4 if int8_activations else 0)
            extra["embeddings"] = (
                f"int{embedding_bits} tied table stored once ({info['file']}, blocks of 32): "
                "GatherBlockQuantized in embed, MatMulNBits for the output projection"
            )
            _check(model, tmp, probes, extra, "quantized tied embedding")
        if vision_int8:
            if target != "cpu" or "vision" not in graphs:
                raise ValueError("vision_int8: for target cpu and a model with a vision encoder")
            vision = tmp / graphs["vision"]
            fp32_vision = vision.with_suffix(".fp32.onnx")
            shutil.copy(vision, fp32_vision)
            quantize_vision_int8(vision, calibration_pixels(calibration_images or [], model.cfg.image_size))
            extra["vision_token_error"] = vision_token_error(
                fp32_vision, vision, held_out_pixels(calibration_images or [], model.cfg.image_size)
            )
            fp32_vision.unlink()
            extra["vision"] = "int8 static (onnxruntime, QDQ, per-channel weights, calibrated on training faces)"
            _check(model, tmp, probes, extra, "int8 vision")
        if vision_int8_weights:
            if target != "cpu" or "vision" not in graphs:
                raise ValueError("vision_int8_weights: for target cpu and a model with a vision encoder")
            n = quantize_vision_weights_int8(tmp / graphs["vision"])
            extra["vision"] = f"int8 weights per output channel ({n} tensors), fp32 activations"
            _check(model, tmp, probes, extra, "int8 vision weights")
        if int8_prefill:
            records = list(calibration_records)
            absmax = activation_absmax(tmp, graphs, records)
            dst = tmp / "graphs" / "decoder_prefill.onnx"
            info = to_int8_prefill(tmp / graphs["decoder"], dst, w4, absmax, smoothing_alpha, tuple(int8_prefill_keep))
            shared = share_initializers(tmp / "graphs", [Path(graphs["decoder"]).name, dst.name])
            graphs["decoder_prefill"] = str(dst.relative_to(tmp))
            cfg["graphs"] = dict(graphs)
            if int8_prefill_tasks is not None:  # the runtime owns the choice (runtime/ort.py); eval and bench read it
                cfg["int8_prefill_tasks"] = sorted(set(int8_prefill_tasks))
            (tmp / "runtime.json").write_text(json.dumps(cfg, indent=2) + "\n")
            ids = sorted(r.id for r in records)
            extra["int8_prefill"] = {
                **info,
                "tasks": cfg.get("int8_prefill_tasks", "all"),
                "shared_weights": {"file": f"graphs/{SHARED_WEIGHTS_FILE}", "bytes": shared},
                "calibration": {
                    "records": len(ids),
                    "tasks": sorted({r.task for r in records}),
                    "ids_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest(),
                    "ids": ids,
                },
            }
            _check(model, tmp, probes, extra, "int8 prefill")  # recorded, not gated: not bit-exact by design
        if target == "cpu":  # TensorRT plans name layers; their graphs keep the exporter's names
            extra["graph_bytes_saved_by_compact_names"] = sum(
                compact_names(tmp / g) for g in dict.fromkeys(graphs.values())
            )
        extra["precision"] = precision
        manifest = write_manifest(
            tmp,
            kind="emoverse-bundle",
            producer={"stage": "export", "target": target, "precision": extra["precision"]},
            inputs={"model": {"path": str(model_dir.resolve()), "digest": manifest_digest(parent)}},
            extra=extra,
        )
    return manifest


SHARED_WEIGHTS_FILE = "decoder_weights.bin"  # beside the graphs: tensors both decoders read (INT8 prefill)


def compact_names(path: Path) -> int:
    """Rewrite the graph at `path` with short names for its intermediate tensors and no node names; returns the
    bytes saved. The exporter's names ('/llm/model/layers.12/self_attn/Reshape_3_output_0') are a third of a
    decoder graph's bytes (1 MB of the 4-bit decoder, 1.5 MB of the INT8 prefill one) and nothing reads them
    after export; graph inputs, outputs, initializers and the runtime's load-time tensors
    (`runtime.ort.LOAD_TIME_SUFFIXES`) keep theirs. Same graph, same kernels: outputs bit-identical (tested)."""
    import onnx

    from emoverse.runtime.ort import LOAD_TIME_SUFFIXES

    before = path.stat().st_size
    model = onnx.load(str(path), load_external_data=False)  # external data stays where it is, by reference
    g = model.graph
    keep = {t.name for t in g.initializer} | {v.name for v in (*g.input, *g.output)} | {""}
    short: dict[str, str] = {}
    for node in g.node:
        node.name = ""
        for i, name in enumerate(node.output):
            if name not in keep and not name.endswith(LOAD_TIME_SUFFIXES):
                short[name] = node.output[i] = f"t{len(short):x}"
        for i, name in enumerate(node.input):
            node.input[i] = short.get(name, name)
        for attr in node.attribute:  # subgraphs (If/Loop) would read outer names: none in these graphs
            if attr.g.node or attr.graphs:
                raise ValueError(f"{path}: a node with a subgraph ({node.op_type}); names left as exported")
    del g.value_info[:]
    onnx.save(model, str(path))
    return before - path.stat().st_size


def calibration_prompts(data: str | os.PathLike, per_task: int = 16, seed: int = 0) -> list:
    """Training records of every task with a train split in an AMT folder, `per_task` each (seeded), round-robin
    over tasks: what inference sees (real images: FER's visual tokens come from the vision graph)."""
    import random

    from emoverse.records import load_records

    by_task = []
    for task in TASKS:
        path = Path(data) / task / "train.jsonl"
        if path.is_file():
            recs = load_records(path)
            random.Random(seed).shuffle(recs)
            by_task.append(recs[:per_task])
    if not by_task:
        raise ValueError(f"{data}: no <task>/train.jsonl to calibrate on")
    return [r for row in zip(*by_task, strict=False) for r in row] + [
        r for recs in by_task for r in recs[min(map(len, by_task)) :]
    ]


def activation_absmax(bundle: Path, graphs: dict[str, str], records: list) -> dict[str, np.ndarray]:
    """Per input channel, max |x| of every W4 group's input activation over the records' prompts, run through
    the bundle as it stands (its own embeddings, vision graph and 4-bit decoder)."""
    import onnx
    import onnxruntime as ort

    from emoverse.export.w4lora_onnx import w4_groups

    path = bundle / graphs["decoder"]
    model = onnx.load(str(path), load_external_data=False)
    xs = sorted({g["x"] for g in w4_groups(model)})
    n_main = len(model.graph.output)
    model.graph.output.extend(onnx.helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, None) for x in xs)
    probe = path.with_name("decoder.calibration.onnx")  # beside it: the external data it names resolve
    onnx.save(model, str(probe))
    absmax: dict[str, np.ndarray] = {}
    try:
        rt = OrtRuntime(bundle, check=False)
        session = ort.InferenceSession(str(probe), providers=["CPUExecutionProvider"])

        class Recording:
            def run(self, names, feeds):
                out = session.run(None, feeds)
                real = feeds["attention_mask"][:, -feeds["inputs_embeds"].shape[1] :].astype(bool)
                for x, v in zip(xs, out[n_main:], strict=True):
                    a = np.abs(v[real]).max(0)
                    absmax[x] = np.maximum(absmax[x], a) if x in absmax else a
                return out[:n_main]

        rt.decoder = Recording()
        for r in records:
            rt.prefill([rt.embed(r.query, list(r.images))])
    finally:
        probe.unlink()
    return absmax


def share_initializers(folder: Path, graph_files: list[str], file: str = SHARED_WEIGHTS_FILE) -> int:
    """Tensors that several graphs in `folder` hold by the same name and bytes, written once to `folder/file` and
    referenced by each graph as external data (the tied table's way). Returns the bytes written."""
    import onnx
    from onnx import external_data_helper

    models = {g: onnx.load(str(folder / g), load_external_data=False) for g in graph_files}
    first = models[graph_files[0]]
    common = {t.name: t.raw_data for t in first.graph.initializer if t.HasField("raw_data") and len(t.raw_data) >= 1024}
    for m in list(models.values())[1:]:
        have = {t.name: t.raw_data for t in m.graph.initializer if t.HasField("raw_data")}
        common = {k: v for k, v in common.items() if have.get(k) == v}
    offsets, blob = {}, bytearray()
    for name, raw in common.items():
        blob += b"\0" * (-len(blob) % 64)  # aligned, as onnx writes external data
        offsets[name] = (len(blob), len(raw))
        blob += raw
    (folder / file).write_bytes(bytes(blob))  # the graphs lie in `folder`: the location is the file's name
    for g, m in models.items():
        for t in m.graph.initializer:
            if t.name in offsets:
                external_data_helper.set_external_data(t, file, offset=offsets[t.name][0], length=offsets[t.name][1])
                t.ClearField("raw_data")  # the bytes live in the shared file only
        onnx.save(m, str(folder / g))
    return len(blob)
