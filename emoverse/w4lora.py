"""The W4 base + LoRA form (`emoverse compress --recipe w4-base-lora` writes it; the model loader and export
read it): every linear layer of the base LLM on its own 4-bit grid, bit for bit, and the fine-tune's
low-rank update beside it as int8 factors (rows with fp16 scales).

Why this form: SmolLM2-135M ships as a Q4_1 GGUF, so each base weight already IS d·q + m (q 4-bit, blocks of
32 along the input, d and m fp16). The release's LoRA update moves weights by ~1% of their range, far below
the grid's step (1/15 of a block's range): requantizing the merged weights (GPTQ) rounds most of the update
away, which is where the quantized model lost FER. Keeping the base on its grid and the update as rank-r
factors stores the teacher at ~5 bits per base weight, exact up to the int8 rounding of the update
(~0.3% of an update that is ~1% of a weight).

The grid is read back from the base's fp32 weights rather than from the GGUF file: it works for any base
whose weights are on such a grid (checked bit for bit, refused otherwise) and needs no GGUF tensor-name or
row-permutation mapping. Written by hand: no quantization library has a "keep the base's own grid, keep the
adapter unmerged" format (compressed-tensors' asymmetric zero points are integers; Q4_1's min is not).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from emoverse.llm_files import empty_fp32_llm, load_fitting, quantization_config, read_tensors

FORMAT = "emoverse-w4-base-lora"
LEVELS = 15  # 4-bit unsigned: q in 0..15


class NotOnGrid(ValueError):
    pass


def find_grid(weight: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(q uint8 (N, K) in 0..15, d fp16 (N, K/group), m fp16 (N, K/group)) with weight == d·q + m exactly
    (fp32, as GGUF dequantizes), or None when the weight is not on such a grid. Q4_1 puts each block's
    minimum at q = 0 and its maximum at q = 15, so m = min and d = (max - min) / 15, rounded to fp16."""
    n, k = weight.shape
    if k % group:
        return None
    blocks = weight.reshape(n, k // group, group)
    lo, hi = blocks.min(-1), blocks.max(-1)
    m = lo.astype(np.float16)
    d = ((hi - lo) / np.float32(LEVELS)).astype(np.float16)
    d32, m32 = d.astype(np.float32)[..., None], m.astype(np.float32)[..., None]
    q = np.clip(np.rint((blocks - m32) / np.where(d32 == 0, 1, d32)), 0, LEVELS).astype(np.uint8)
    if not np.array_equal(d32 * q.astype(np.float32) + m32, blocks):
        return None
    return q.reshape(n, k), d, m


def dequantize(layer: dict) -> np.ndarray:
    """The base weight d·q + m in fp32 (the GGUF dequantization, bit for bit)."""
    q, g = layer["q"], layer["group_size"]
    n, k = q.shape
    d = layer["d"].astype(np.float32)[..., None]
    m = layer["m"].astype(np.float32)[..., None]
    return (d * q.reshape(n, k // g, g).astype(np.float32) + m).reshape(n, k)


def quantize_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per row, fp16 scales: (q int8, scale fp16) with x ≈ q · scale."""
    scale = (np.abs(x).max(-1) / 127).astype(np.float16)
    scale[scale == 0] = 1
    q = np.clip(np.rint(x / scale.astype(np.float32)[:, None]), -127, 127).astype(np.int8)
    return q, scale


def factors(layer: dict) -> tuple[np.ndarray, np.ndarray]:
    """The update's factors in fp32: B (N, r), A (r, K), dequantized from int8 rows and fp16 scales."""
    b = layer["b_q"].astype(np.float32) * layer["b_s"].astype(np.float32)[:, None]
    a = layer["a_q"].astype(np.float32) * layer["a_s"].astype(np.float32)[:, None]
    return b, a


def merged(layer: dict) -> np.ndarray:
    """The weight the model computes with: base + B·A (fp32). Export matches graph weights against this."""
    w = dequantize(layer)
    if "a_q" in layer:
        b, a = factors(layer)
        w = w + b @ a
    return w.astype(np.float32)


def weight(layer: dict) -> np.ndarray:
    """`merged(layer)`, computed once and kept in the layer: the PyTorch model and export's by-value matcher
    must see the very same array."""
    if "weight" not in layer:
        layer["weight"] = merged(layer)
    return layer["weight"]


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """Values 0..15 -> bytes, pairs along the last axis, the first in the low nibble: the one 4-bit layout of
    this artifact, MatMulNBits, GatherBlockQuantized and ONNX INT4 tensors (export packs with this too)."""
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    """pack_nibbles' inverse: (..., M) bytes -> (..., 2M) values 0..15."""
    return np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1).astype(np.uint8)


def low_rank(delta: np.ndarray, max_rank: int) -> tuple[np.ndarray, np.ndarray, float]:
    """B (N, r), A (r, K) with B·A ≈ delta, r the numerical rank (<= max_rank), and the relative residual.
    A LoRA update merged in fp32 has rank <= its r up to rounding, which the SVD recovers. The singular
    values are split evenly between the factors, so both quantize to int8 rows with similar ranges."""
    u, s, vt = np.linalg.svd(delta.astype(np.float64), full_matrices=False)
    r = int((s > s[0] * 1e-4).sum()) if s[0] > 0 else 0
    if r > max_rank:
        raise NotOnGrid(f"rank {r} > max_rank {max_rank}")
    root = np.sqrt(s[:r])
    b, a = u[:, :r] * root, root[:, None] * vt[:r]
    residual = float(np.linalg.norm(delta - b @ a) / max(np.linalg.norm(delta), 1e-30))
    return b, a, residual


def is_w4_lora(llm_dir: Path) -> bool:
    return quantization_config(llm_dir).get("quant_method") == FORMAT


def _linear_names(state: dict[str, torch.Tensor]) -> list[str]:
    return sorted(
        k[: -len(".weight")] for k, v in state.items() if v.ndim == 2 and "embed" not in k and "lm_head" not in k
    )


def write(
    merged_llm: Path,
    base_llm: Path,
    out_llm: Path,
    *,
    group_size: int = 32,
    max_rank: int = 64,
    tolerance: float = 1e-3,
) -> dict:
    """Write `merged_llm` (a fine-tuned LLM folder) as base grid + int8 low-rank update into `out_llm`; the base
    layers come from `base_llm`, and each must be on a 4-bit grid of `group_size` (else NotOnGrid naming it)."""
    from safetensors.numpy import save_file

    tuned, base = read_tensors(merged_llm), read_tensors(base_llm)
    tensors: dict[str, np.ndarray] = {}
    ranks, worst = {}, 0.0
    linears = _linear_names(tuned)
    for name in linears:
        if name + ".weight" not in base:
            raise NotOnGrid(f"{base_llm}: has no {name}.weight (not the base of {merged_llm})")
        w_base = base[name + ".weight"].float().numpy()
        grid = find_grid(w_base, group_size)
        if grid is None:
            raise NotOnGrid(
                f"{base_llm}: {name}.weight is not on a 4-bit grid of {group_size} (d·q + m, fp16 d and m): "
                "w4_base_lora keeps a base that is already 4-bit (e.g. a Q4_1 GGUF) as it is"
            )
        q, d, m = grid
        tensors[f"{name}.q4"] = pack_nibbles(q)
        tensors[f"{name}.d"], tensors[f"{name}.m"] = d, m
        delta = tuned[name + ".weight"].float().numpy() - dequantize({"q": q, "d": d, "m": m, "group_size": group_size})
        if np.any(delta):
            try:
                b, a, residual = low_rank(delta, max_rank)
            except NotOnGrid as e:
                raise NotOnGrid(
                    f"{merged_llm}: {name}: the update over the base has {e}: not a LoRA fine-tune"
                ) from None
            if residual > tolerance:
                raise NotOnGrid(f"{merged_llm}: {name}: a rank-{len(a)} update leaves {residual:.1e} of it unexplained")
            # int8 rows + fp16 scales: the update is ~1% of a weight, so int8's 0.4% of it is ~4e-5 of the
            # weight, and it halves the update's bytes against fp16 (the bundle's 6x size budget is tight)
            (b_q, b_s), (a_q, a_s) = quantize_rows(b), quantize_rows(a)
            tensors |= {f"{name}.lora_b": b_q, f"{name}.lora_b_scale": b_s}
            tensors |= {f"{name}.lora_a": a_q, f"{name}.lora_a_scale": a_s}
            b8, a8 = factors({"b_q": b_q, "b_s": b_s, "a_q": a_q, "a_s": a_s})
            rounding = float(np.linalg.norm(b8 @ a8 - b @ a) / np.linalg.norm(delta))
            ranks[name], worst = len(a), max(worst, residual, rounding)
    linear_keys = {f"{name}.weight" for name in linears}
    for key, value in tuned.items():  # norms, the embedding table: as they are
        if key not in linear_keys:
            tensors[key] = value.float().numpy()
    out_llm.mkdir(parents=True, exist_ok=True)
    for f in Path(merged_llm).iterdir():  # tokenizer, generation config
        if f.is_file() and f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copy2(f, out_llm / f.name)
    config = json.loads((Path(merged_llm) / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": FORMAT,
        "bits": 4,
        "group_size": group_size,
        "adapter_dtype": "int8 rows, fp16 scales",
        "ignore": ["lm_head"],
    }
    (out_llm / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, str(out_llm / "model.safetensors"))
    return {
        "layers": len(linears),
        "adapted_layers": len(ranks),
        "max_rank": max(ranks.values(), default=0),
        "worst_update_residual": worst,
        "group_size": group_size,
    }


def read_layers(llm_dir: Path) -> dict[str, dict]:
    """{module name: {"q", "d", "m", "group_size"[, "a_q", "a_s", "b_q", "b_s"]}} of a w4_base_lora LLM folder."""
    cfg = quantization_config(llm_dir)
    if cfg.get("quant_method") != FORMAT:
        raise ValueError(f"{llm_dir}: not a {FORMAT} artifact ({cfg.get('quant_method')})")
    state = read_tensors(llm_dir)
    layers = {}
    for key in state:
        if key.endswith(".q4"):
            name = key[:-3]
            layer = {
                "q": unpack_nibbles(state[key].numpy()),
                "d": state[name + ".d"].numpy(),
                "m": state[name + ".m"].numpy(),
                "group_size": int(cfg["group_size"]),
            }
            if name + ".lora_a" in state:
                for f in ("a", "b"):
                    layer[f"{f}_q"] = state[f"{name}.lora_{f}"].numpy()
                    layer[f"{f}_s"] = state[f"{name}.lora_{f}_scale"].numpy()
            layers[name] = layer
    return layers


def load_w4_lora(llm_dir: Path, layers: dict[str, dict] | None = None):
    """The LLM as a plain fp32 transformers model computing with base + B·A (what the bundle is checked
    against); `layers` from read_layers may be given so the caller matches the very same arrays."""
    layers = layers if layers is not None else read_layers(llm_dir)
    state = read_tensors(llm_dir)
    own = (".q4", ".d", ".m", ".lora_a", ".lora_b", ".lora_a_scale", ".lora_b_scale")
    weights = {k: v.float() for k, v in state.items() if not k.endswith(own)}
    for name, layer in layers.items():
        weights[name + ".weight"] = torch.from_numpy(weight(layer))
    return load_fitting(empty_fp32_llm(llm_dir), weights, llm_dir).eval()
