"""TensorRT: build plans for a bundle's graphs, and the builder that executes them where TensorRT exists.

Engines must be built on the device they run on (a Jetson's engine does not run on an H100), so a bundle
carries the plan (`tensorrt/plan.json`), a self-contained `tensorrt/build_engines.py` and the equivalent
`trtexec` lines; `build_engine` below is the same code, run when `tensorrt` and a GPU are present.
TensorRT cannot be installed on the machines this project is developed on: everything up to the
`build_serialized_network` call is tested here (plan, profiles, ONNX validity), the call itself is not.
"""

from __future__ import annotations

import json
from pathlib import Path

from emoverse.export.targets import get_target


def input_shapes(runtime_cfg: dict, graph: str, profiles: dict) -> dict[str, list[list[int]]]:
    """min/opt/max shape of every input of a bundle graph, from the target's profile bounds."""
    n_layers, kv_heads, head_dim = runtime_cfg["kv_shape"]
    b, s, p = profiles["batch"], profiles["seq"], profiles["past"]
    if graph == "vision":
        size = runtime_cfg["image_size"]
        return {"pixels": [[n, 3, size, size] for n in profiles["images"]]}
    if graph == "embed":
        return {"input_ids": [[b[i], s[i]] for i in range(3)]}
    hidden = runtime_cfg.get("hidden_size")
    shapes = {
        "inputs_embeds": [[b[i], s[i], hidden] for i in range(3)],
        "attention_mask": [[b[i], p[i] + s[i]] for i in range(3)],
        "position_ids": [[b[i], s[i]] for i in range(3)],
        "logits_index": [[1], [1], [s[2]]],
    }  # prefill/decode: 1 position; candidate pass: up to seq
    for layer in range(n_layers):
        for kind in ("key", "value"):
            shapes[f"past_{kind}_{layer}"] = [[b[i], kv_heads, p[i], head_dim] for i in range(3)]
    return shapes


def build_plan(runtime_cfg: dict, graphs: dict[str, str], target_name: str, precision: dict) -> dict:
    """One engine build per graph: precision flags, DLA placement, optimization profile. `precision` is
    `resolve_precision`'s {"decoder": ..., "vision": ...}; "int4" means the decoder graph carries pre-quantized
    INT4 weights (GPTQ) behind DequantizeLinear nodes."""
    target = get_target(target_name)
    if target.get("runtime") != "tensorrt":
        raise ValueError(f"target {target_name!r} runs on {target.get('runtime')}, not TensorRT")
    builds = []
    for graph, onnx_path in graphs.items():
        precision_here = {"vision": precision.get("vision"), "decoder": precision["decoder"]}.get(graph) or "fp16"
        flags = ["fp16"] + ([precision_here] if precision_here != "fp16" else [])
        use_dla = graph == "vision" and target.get("dla_cores", 0) > 0
        builds.append(
            {
                "graph": graph,
                "onnx": onnx_path,
                "engine": f"tensorrt/{graph}.engine",
                "flags": flags,
                "dla_core": 0 if use_dla else None,
                "gpu_fallback": use_dla,
                "shapes": input_shapes(runtime_cfg, graph, target["profiles"]),
                "workspace_mb": 2048 if target.get("memory_gb", 8) <= 8 else 8192,
            }
        )
    return {
        "target": target_name,
        "compute_capability": target.get("compute_capability"),
        "timing_cache": "tensorrt/timing.cache",
        "builds": builds,
    }


def _shape_arg(shapes: dict[str, list[list[int]]], which: int) -> str:
    return ",".join(f"{name}:{'x'.join(map(str, s[which]))}" for name, s in shapes.items())


def trtexec_lines(plan: dict) -> list[str]:
    lines = []
    for b in plan["builds"]:
        sh = b["shapes"]
        cmd = [
            f"trtexec --onnx={b['onnx']} --saveEngine={b['engine']}",
            f"--minShapes={_shape_arg(sh, 0)}",
            f"--optShapes={_shape_arg(sh, 1)}",
            f"--maxShapes={_shape_arg(sh, 2)}",
            f"--memPoolSize=workspace:{b['workspace_mb']}M",
            f"--timingCacheFile={plan['timing_cache']}",
        ]
        cmd += [f"--{f}" for f in b["flags"]]
        if b["dla_core"] is not None:
            cmd += [f"--useDLACore={b['dla_core']}", "--allowGPUFallback"]
        lines.append(" ".join(cmd))
    return lines


def build_engine(
    build: dict, root: Path, timing_cache: Path | None = None
) -> Path:  # pragma: no cover - needs TensorRT
    """Build one engine with the TensorRT Python API (TensorRT 10)."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(root / build["onnx"])):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"{build['onnx']}: TensorRT ONNX parser failed: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, build["workspace_mb"] << 20)
    for flag in build["flags"]:
        config.set_flag(
            {
                "fp16": trt.BuilderFlag.FP16,
                "int8": trt.BuilderFlag.INT8,
                "fp8": trt.BuilderFlag.FP8,
                "int4": trt.BuilderFlag.INT4,
            }[flag]
        )
    if build["dla_core"] is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = build["dla_core"]
        if build["gpu_fallback"]:
            config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    profile = builder.create_optimization_profile()
    for name, (mn, opt, mx) in build["shapes"].items():
        profile.set_shape(name, mn, opt, mx)
    config.add_optimization_profile(profile)
    cache_bytes = timing_cache.read_bytes() if timing_cache and timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise RuntimeError(f"{build['onnx']}: TensorRT engine build failed (see the log above)")
    out = root / build["engine"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(bytes(engine))
    if timing_cache:
        timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return out


BUILD_SCRIPT = '''#!/usr/bin/env python3
"""Build this bundle's TensorRT engines on the device that will run them (needs the `tensorrt` package).
Usage: python3 tensorrt/build_engines.py   (from the bundle folder). Generated by emoverse export."""
from __future__ import annotations

import json
import sys
from pathlib import Path

root = Path(__file__).resolve().parents[1]
plan = json.loads((root / "tensorrt" / "plan.json").read_text())
{builder}

for b in plan["builds"]:
    print("building", b["engine"], "flags", b["flags"], file=sys.stderr)
    build_engine(b, root, root / plan["timing_cache"])
'''


def write_plan(
    bundle_tmp: Path,
    runtime_cfg: dict,
    graphs: dict[str, str],
    target_name: str,
    precision: dict,
) -> dict:
    import inspect

    plan = build_plan(runtime_cfg, graphs, target_name, precision)
    d = bundle_tmp / "tensorrt"
    d.mkdir(parents=True, exist_ok=True)
    (d / "plan.json").write_text(json.dumps(plan, indent=2) + "\n")
    (d / "trtexec.sh").write_text(
        "#!/bin/sh\n# Equivalent trtexec commands (run from the bundle folder)\nset -e\n"
        "mkdir -p tensorrt\n" + "\n".join(trtexec_lines(plan)) + "\n"
    )
    source = inspect.getsource(build_engine).replace("  # pragma: no cover - needs TensorRT", "")
    (d / "build_engines.py").write_text(BUILD_SCRIPT.format(builder=source))
    return plan
