"""`emoverse export`: a model artifact -> a deployable bundle folder (graphs, tokenizer, runtime config,
label sets, manifest with hashes), checked by parity against PyTorch before it is written."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from emoverse.artifacts import MODEL_KINDS, atomic_dir, manifest_digest, verify, write_manifest
from emoverse.export.gptq_onnx import NotGPTQ, dequantized_llm, gptq_scheme, read_linears, to_matmulnbits
from emoverse.export.onnx_export import export_all
from emoverse.runtime.graphs import runtime_config  # noqa: F401  (the bundle format is the runtime's)
from emoverse.runtime.ort import RUNTIME_FORMAT  # noqa: F401
from emoverse.tasks import TASKS


@torch.no_grad()
def parity(model, bundle_dir: Path, probes: list[tuple[str, list[str], str]]) -> dict:
    """Max |logit| difference between PyTorch and ONNX Runtime on the prompts, and greedy-token agreement."""
    from emoverse.runtime.ort import OrtRuntime

    rt = OrtRuntime(bundle_dir, check=False)
    worst, same = 0.0, 0
    for query, images, task in probes:
        enc = model.prompts.encode(query, None, images, [])
        ids = torch.tensor([enc.input_ids])
        ref = (
            model.llm(inputs_embeds=model.embed(ids, torch.tensor([enc.visual_mask]), enc.media))
            .logits[0]
            .numpy()
        )
        emb = rt.embed(query, images)[None]
        got, _ = rt.forward(emb, np.ones((1, emb.shape[1]), dtype=np.int64), rt.empty_cache(1))
        worst = max(worst, float(np.abs(ref - got[0]).max()))
        n = TASKS[task].max_new_tokens
        same += model.generate(query, images, max_new_tokens=n) == rt.generate(
            query, images, max_new_tokens=n
        )
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


def quantize_embeddings(bundle: Path, graphs: dict[str, str], bits: int) -> None:
    """The tied 49,152 x 576 embedding (input table and output projection; ~20% of SmolLM2's weights) to
    `bits`-bit blocks with onnxruntime's own quantizer: GatherBlockQuantized in the embed graph, MatMulNBits
    for the decoder's remaining float MatMuls (the output projection; GPTQ layers are MatMulNBits already)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    for key, ops, axes in (("embed", ("Gather",), (("Gather", 1),)), ("decoder", ("MatMul",), None)):
        path = bundle / graphs[key]
        tmp = path.with_suffix(".q.onnx")
        q = MatMulNBitsQuantizer(
            str(path), bits=bits, block_size=32, is_symmetric=True, op_types_to_quantize=ops, quant_axes=axes
        )
        q.process()
        q.model.save_model_to_file(str(tmp), use_external_data_format=False)
        os.replace(tmp, path)


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


def quantize_vision_qdq(vision: Path, out: Path, mode: str, pixels: np.ndarray) -> None:
    """nvidia-modelopt ONNX PTQ: explicit Q/DQ nodes (int8 / fp8) that TensorRT turns into low-precision kernels."""
    from modelopt.onnx.quantization import quantize

    quantize(
        str(vision),
        quantize_mode=mode,
        calibration_data={"pixels": pixels},
        output_path=str(out),
        calibration_eps=["cpu"],
        log_level="WARNING",
    )


def calibration_pixels(images: list[str], size: int, n: int = 16) -> np.ndarray:
    from emoverse.runtime.ort import _pixels

    if not images:
        raise ValueError("Q/DQ calibration needs images (pass --data with FER train records)")
    return np.stack([_pixels(p, size) for p in images[:n]])


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
) -> dict:
    from emoverse.export.tensorrt import check_precision, get_target, write_plan
    from emoverse.model import EmoVerse

    tgt = get_target(target)
    if target != "cpu" and precision is not None:
        check_precision(target, tgt, precision)
        if precision not in tgt["precisions"]:
            raise ValueError(f"target {target}: precision {precision!r} not in {tgt['precisions']}")
    if target == "cpu":
        precision = precision or "fp32"
        if precision not in tgt["precisions"]:
            raise ValueError(f"target cpu: precision {precision!r} not in {tgt['precisions']}")
    model_dir = EmoVerse.full_form(model_dir)  # an adapter-form release is expanded once (cached)
    parent = verify(model_dir, kind=MODEL_KINDS)
    llm_cfg = json.loads((model_dir / "llm" / "config.json").read_text())
    gptq = None
    if "quantization_config" in llm_cfg:
        # A compress/ output is exported as it is: GPTQ W4A16 weights go into MatMulNBits unchanged.
        try:
            scheme = gptq_scheme(model_dir / "llm")
        except NotGPTQ as e:
            raise ValueError(
                f"{e}. Export takes full-precision models (quantized for the target here) and GPTQ "
                "W4A16 artifacts (their own 4-bit weights)"
            ) from None
        if target != "cpu":
            raise ValueError(
                f"{model_dir}: GPTQ W4A16 into TensorRT plans ({target}) is not implemented yet; export "
                "it for target cpu (onnxruntime MatMulNBits), or export the full-precision teacher"
            )
        if precision not in ("int4", "fp32"):
            raise ValueError(
                f"{model_dir}: a GPTQ W4A16 artifact exports as int4 (its own weights); got {precision!r}"
            )
        precision = "int4"
        gptq = {"linears": read_linears(model_dir / "llm"), **scheme}
    model = EmoVerse.load(model_dir, check=False).eval()
    if gptq is not None:
        model.llm = dequantized_llm(model_dir / "llm", gptq["linears"])  # q x scale, bit for bit
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
        graphs = {k: str(p.relative_to(tmp)) for k, p in paths.items()}
        model.tokenizer.backend_tokenizer.save(
            str(tmp / "tokenizer.json")
        )  # what the `tokenizers` runtime reads
        cfg = runtime_config(model, graphs)
        (tmp / "runtime.json").write_text(json.dumps(cfg, indent=2) + "\n")
        report = parity(model, tmp, probes)  # the exported fp32 graphs against PyTorch
        if report["max_abs_logit_diff"] > max_abs_diff:
            raise ValueError(
                f"ONNX parity failed: max |logit diff| {report['max_abs_logit_diff']:.2e} > {max_abs_diff}"
            )
        extra: dict = {"parity_fp32": report, "target": target}
        if gptq is not None:
            info = to_matmulnbits(tmp / graphs["decoder"], gptq["linears"])
            if info["unmatched"]:
                raise ValueError(
                    f"GPTQ export: no decoder MatMul carries the weights of {info['unmatched'][:3]}"
                )
            extra["weights_from"] = {
                "artifact": str(model_dir.resolve()),
                "format": "compressed-tensors pack-quantized",
                "group_size": gptq["group_size"],
                "matmulnbits": info,
            }
            extra["parity"] = parity(model, tmp, probes)  # the bundle against the PyTorch compressed artifact
            if extra["parity"]["max_abs_logit_diff"] > 50 * max_abs_diff:
                raise ValueError(f"GPTQ bundle parity failed: {extra['parity']}")
        elif target == "cpu" and precision != "fp32":
            quantize_for_cpu(tmp / graphs["decoder"], precision)
            extra["parity"] = parity(model, tmp, probes)  # what quantization costs, recorded, not gated
        if tgt.get("runtime") == "tensorrt":
            mode = tgt.get("vision_quantization")
            if mode and "vision" in graphs:
                qdq = tmp / "graphs" / f"vision.{mode}.qdq.onnx"
                quantize_vision_qdq(
                    tmp / graphs["vision"],
                    qdq,
                    mode,
                    calibration_pixels(calibration_images or [], model.cfg.image_size),
                )
                graphs["vision"] = str(qdq.relative_to(tmp))
            extra["tensorrt_plan"] = write_plan(tmp, cfg, graphs, target)
            extra["device_files"] = [
                "tensorrt/*.engine",
                "tensorrt/timing.cache",
            ]  # built on the device later
        if embedding_bits is not None:
            if target != "cpu" or embedding_bits not in (4, 8):
                raise ValueError(f"embedding_bits={embedding_bits}: 4 or 8, for target cpu")
            quantize_embeddings(tmp, graphs, embedding_bits)
            extra["embeddings"] = (
                f"int{embedding_bits} (blocks of 32, onnxruntime GatherBlockQuantized/MatMulNBits)"
            )
            extra["parity"] = parity(model, tmp, probes)  # recorded after every quantization step
        if vision_int8:
            if target != "cpu" or "vision" not in graphs:
                raise ValueError("vision_int8: for target cpu and a model with a vision encoder")
            quantize_vision_int8(
                tmp / graphs["vision"], calibration_pixels(calibration_images or [], model.cfg.image_size)
            )
            extra["vision"] = (
                "int8 static (onnxruntime, QDQ, per-channel weights, calibrated on training faces)"
            )
            extra["parity"] = parity(model, tmp, probes)
        extra["precision"] = precision or tgt.get("decoder_precision")
        manifest = write_manifest(
            tmp,
            kind="emoverse-bundle",
            producer={"stage": "export", "target": target, "precision": extra["precision"]},
            inputs={"model": {"path": str(model_dir.resolve()), "digest": manifest_digest(parent)}},
            extra=extra,
        )
    return manifest
