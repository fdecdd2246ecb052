"""Deployment targets (export/targets.yaml), read through the typed config loader, and the one place where
the precision of each graph in a bundle is decided: `resolve_precision`. Export, the TensorRT plan and the
bench's estimates all ask it; none decides on its own."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from emoverse.config import RecipeError, load_config

TARGETS_FILE = Path(__file__).parent / "targets.yaml"

# The lowest CUDA compute capability with hardware for each precision (FP8 tensor cores: Ada 8.9, Hopper 9.0;
# INT4 weight-only GEMMs: Ampere 8.0 and later, nvidia-modelopt's support matrix).
MIN_COMPUTE_CAPABILITY = {"fp8": 8.9, "int4": 8.0, "int8": 6.1, "fp16": 5.3}


@dataclass
class Profiles:
    """[min, opt, max] of each dynamic dimension (TensorRT optimization profiles)."""

    batch: list[int] = field(default_factory=lambda: [1, 1, 1])
    seq: list[int] = field(default_factory=lambda: [1, 128, 2048])
    past: list[int] = field(default_factory=lambda: [0, 256, 2048])
    images: list[int] = field(default_factory=lambda: [1, 1, 4])


@dataclass
class Target:
    runtime: str = "onnxruntime"  # onnxruntime | tensorrt
    precisions: list[str] = field(default_factory=lambda: ["fp32"])  # what a full-precision model exports to
    default_precision: str = "fp32"  # the decoder's, when export is not told
    vision_quantization: str | None = None  # TensorRT: Q/DQ mode of the vision graph
    compute_capability: str | None = None
    memory_gb: float | None = None
    memory_bandwidth_gbs: float | None = None
    peak_tflops: dict[str, float] = field(default_factory=dict)
    dla_cores: int = 0
    profiles: Profiles = field(default_factory=Profiles)


def load_targets(path: Path = TARGETS_FILE) -> dict[str, dict]:
    """{name: target as a dict}; each entry checked against `Target` (unknown keys, wrong types) and its own
    precisions against its compute capability, so a wrong file fails when read, naming the entry."""
    doc = yaml.safe_load(Path(path).read_text())
    if not isinstance(doc, dict):
        raise RecipeError(f"{path}: expected a mapping of targets")
    out = {}
    for name, entry in doc.items():
        target = asdict(load_config(Target, entry, where=f"{path}: {name}"))
        if target["runtime"] not in ("onnxruntime", "tensorrt"):
            raise RecipeError(f"{path}: {name}.runtime: onnxruntime or tensorrt, got {target['runtime']!r}")
        if target["default_precision"] not in target["precisions"]:
            raise RecipeError(f"{path}: {name}.default_precision: not in its precisions {target['precisions']}")
        for precision in [*target["precisions"], target["vision_quantization"]]:
            if precision:
                check_precision(name, target, precision)
        out[name] = target
    return out


def get_target(name: str) -> dict:
    targets = load_targets()
    if name not in targets:
        raise ValueError(f"unknown target {name!r}; known: {', '.join(targets)}")
    return targets[name]


def check_precision(name: str, target: dict, precision: str) -> None:
    """Refuse a precision the target's GPU has no kernels for, naming its compute capability."""
    cc = target.get("compute_capability")
    need = MIN_COMPUTE_CAPABILITY.get(precision)
    if cc is not None and need is not None and float(cc) < need:
        raise ValueError(
            f"target {name}: {precision.upper()} needs CUDA compute capability >= {need}; this device "
            f"is {cc} (e.g. Jetson Orin is 8.7, H100 9.0): use int8 or fp16 for {name}"
        )


def resolve_precision(
    name: str, requested: str | None, *, own_weights: str | None = None, fp8: bool = False
) -> dict[str, str | None]:
    """The precision of each graph of a bundle for target `name`: {"decoder": ..., "vision": ...}.

    An artifact that carries its own quantized weights (`own_weights`: "int4" for GPTQ W4A16 and W4 base + LoRA,
    "int8" for INT8 weight-only) has a decoder of that precision on every target that lists it (MatMulNBits
    on CPU, weight-only DequantizeLinear for TensorRT), and asking for anything else is refused. Otherwise
    the decoder takes `requested`, or the target's default, from the target's list."""
    target = get_target(name)
    if requested:
        check_precision(name, target, requested)  # first, so FP8 on Orin is refused for its compute capability
    if fp8:  # a ModelOpt FP8 artifact: its own E4M3 weights and input scales, for FP8 tensor cores only
        check_precision(name, target, "fp8")  # Orin: refused for its compute capability
        if target["runtime"] != "tensorrt" or "fp8" not in target["precisions"]:
            raise ValueError(
                f"target {name}: a ModelOpt FP8 artifact exports for TensorRT on FP8 hardware (h100); "
                "measure it on CPU in PyTorch (`emoverse eval` emulates its numerics)"
            )
        if requested not in (None, "fp8"):
            raise ValueError(f"a ModelOpt FP8 artifact exports with its own FP8 weights; got --precision {requested}")
        return {"decoder": "fp8", "vision": target["vision_quantization"]}
    if own_weights:
        if requested not in (None, own_weights):
            raise ValueError(
                f"an artifact with its own {own_weights} weights exports with them; --precision {requested} "
                "would quantize it again (export the full-precision teacher for other precisions)"
            )
        decoder = own_weights
        if decoder not in target["precisions"]:
            raise ValueError(f"target {name}: an {decoder} artifact needs one of {target['precisions']}")
    else:
        decoder = requested or target["default_precision"]
        if decoder not in target["precisions"]:
            raise ValueError(f"target {name}: precision {decoder!r} not in {target['precisions']}")
        if target["runtime"] == "tensorrt" and decoder != "fp16":
            # TensorRT builds low-precision GEMMs from pre-quantized weights (explicit Q/DQ); its implicit
            # calibration is deprecated, so a full-precision model is not quantized here
            raise ValueError(
                f"target {name}: a {decoder} decoder plan is built from a compressed artifact's own weights "
                "(int4: `emoverse compress --recipe gptq-w4a16`, then export that); a full-precision model "
                "exports as fp16"
            )
    check_precision(name, target, decoder)
    return {"decoder": decoder, "vision": target["vision_quantization"]}
