"""Export targets: CPU precisions run in ONNX Runtime; TensorRT plans match the graphs; Q/DQ placement."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from emoverse.artifacts import verify
from emoverse.export.bundle import export_bundle
from emoverse.export.targets import load_targets
from emoverse.export.tensorrt import trtexec_lines
from emoverse.tasks import TASKS


@pytest.fixture(scope="module")
def fer_images(small_amt):
    from emoverse.records import load_records

    return [i for r in load_records(small_amt / "fer" / "train.jsonl") for i in r.images]


@pytest.mark.parametrize("precision,op", [("int8", "MatMulInteger"), ("int4", "MatMulNBits")])
def test_cpu_quantized_bundles_run(tiny_model_dir, tmp_path, precision, op):
    from emoverse.runtime.ort import OrtRuntime

    m = export_bundle(tiny_model_dir, tmp_path / precision, precision=precision)
    assert m["precision"] == precision and "parity" in m
    ops = {n.op_type for n in onnx.load(str(tmp_path / precision / "graphs" / "decoder.onnx")).graph.node}
    assert op in ops
    ans = OrtRuntime(tmp_path / precision).answer("msa", TASKS["msa"].query("nice"))
    assert ans.label in ("positive", "negative")


def test_unknown_target_and_precision(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown target 'tpu'"):
        export_bundle(tiny_model_dir, tmp_path / "x", target="tpu")
    with pytest.raises(ValueError, match="precision 'fp8' not in"):
        export_bundle(tiny_model_dir, tmp_path / "x", precision="fp8")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("target", ["jetson-agx-orin", "jetson-orin-nano", "h100"])
def test_tensorrt_plan_matches_graphs(tiny_model_dir, tmp_path, fer_images, target):
    out = tmp_path / target
    m = export_bundle(tiny_model_dir, out, target=target, calibration_images=fer_images)
    verify(out, kind="emoverse-bundle")
    plan = json.loads((out / "tensorrt" / "plan.json").read_text())
    tgt = load_targets()[target]
    for b in plan["builds"]:
        graph = onnx.load(str(out / b["onnx"]))
        inputs = {i.name: len(i.type.tensor_type.shape.dim) for i in graph.graph.input}
        assert set(b["shapes"]) == set(inputs), b["graph"]
        for name, (mn, opt, mx) in b["shapes"].items():
            assert len(mn) == len(opt) == len(mx) == inputs[name]
            assert all(a <= o <= c for a, o, c in zip(mn, opt, mx, strict=True)), name
        if b["graph"] == "vision":
            ops = {n.op_type for n in graph.graph.node}
            assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # explicit quantization for TensorRT
            assert tgt["vision_quantization"] in b["flags"]
            assert (b["dla_core"] is not None) == (tgt["dla_cores"] > 0)
    lines = trtexec_lines(plan)
    assert all("--minShapes=" in x and "--fp16" in x for x in lines)
    script = (out / "tensorrt" / "build_engines.py").read_text()
    compile(script, "build_engines.py", "exec")
    assert "build_serialized_network" in script and m["tensorrt_plan"] == plan


def test_int8_qdq_vision_runs_in_onnxruntime(tiny_model_dir, tmp_path, fer_images):
    """polygraphy-style check: the Q/DQ graph TensorRT will consume also runs in ONNX Runtime, close to fp32."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    out = tmp_path / "agx"
    export_bundle(tiny_model_dir, out, target="jetson-agx-orin", calibration_images=fer_images)
    from emoverse.export.bundle import calibration_pixels

    pixels = calibration_pixels(fer_images, 32, n=2)
    with OnnxrtRunner(SessionFromOnnx(str(out / "graphs" / "vision.int8.qdq.onnx"))) as runner:
        q = runner.infer({"pixels": pixels})["visual_tokens"]
    ref = ort.InferenceSession(str(out / "graphs" / "vision.onnx")).run(None, {"pixels": pixels})[0]
    assert q.shape == ref.shape and np.isfinite(q).all()


def test_quantized_artifacts_are_refused(tiny_model_dir, small_amt, tmp_path):
    from emoverse.compress.pipeline import compress

    compress("fp8-dynamic", tiny_model_dir, small_amt, tmp_path / "fp8")
    # only GPTQ W4A16 artifacts export as they are; other quantized forms are named and refused
    with pytest.raises(ValueError, match="not a compressed-tensors pack-quantized artifact"):
        export_bundle(tmp_path / "fp8", tmp_path / "b")


def test_fp8_refused_for_orin_naming_the_compute_capability():
    from emoverse.export.targets import check_precision, get_target

    with pytest.raises(ValueError, match=r"FP8 needs CUDA compute capability >= 8.9; this device is 8.7"):
        check_precision("jetson-agx-orin", get_target("jetson-agx-orin"), "fp8")
    check_precision("h100", get_target("h100"), "fp8")  # Hopper has FP8 tensor cores
    check_precision("jetson-agx-orin", get_target("jetson-agx-orin"), "int8")


def test_fp8_export_for_orin_is_refused_before_any_work(tmp_path):
    from emoverse.export.bundle import export_bundle

    with pytest.raises(ValueError, match="compute capability"):
        export_bundle(tmp_path / "no-model", tmp_path / "out", target="jetson-orin-nano", precision="fp8")
    assert not (tmp_path / "out").exists()


def test_targets_file_is_read_through_the_typed_loader(tmp_path):
    from emoverse.config import RecipeError

    good = load_targets()
    assert good["cpu"]["default_precision"] == "fp32" and good["h100"]["profiles"]["batch"] == [1, 8, 64]
    bad = tmp_path / "targets.yaml"
    bad.write_text("orin:\n  runtime: tensorrt\n  precisions: [fp16]\n  default_precision: fp16\n  dla_core: 2\n")
    with pytest.raises(RecipeError, match="orin.*dla_core"):  # a misspelt key names the entry and the key
        load_targets(bad)
    bad.write_text(
        "orin:\n  runtime: tensorrt\n  precisions: [fp16, fp8]\n  default_precision: fp16\n"
        "  compute_capability: '8.7'\n"
    )
    with pytest.raises(ValueError, match="FP8 needs CUDA compute capability >= 8.9"):
        load_targets(bad)


def test_precision_is_decided_in_one_place():
    from emoverse.export.targets import resolve_precision

    assert resolve_precision("cpu", None) == {"decoder": "fp32", "vision": None}
    assert resolve_precision("jetson-agx-orin", None)["decoder"] == "fp16"
    assert resolve_precision("h100", None) == {"decoder": "fp16", "vision": "fp8"}
    for target in ("cpu", "jetson-orin-nano", "jetson-agx-orin", "h100"):  # GPTQ ships its own int4 weights
        assert resolve_precision(target, None, own_weights="int4")["decoder"] == "int4"
    with pytest.raises(ValueError, match="its own int4 weights"):
        resolve_precision("cpu", "int8", own_weights="int4")
    with pytest.raises(ValueError, match="compute capability >= 8.9; this device is 8.7"):
        resolve_precision("jetson-agx-orin", "fp8")
    with pytest.raises(ValueError, match="built from a compressed artifact"):  # no implicit TensorRT calibration
        resolve_precision("jetson-agx-orin", "int8")


def test_modelopt_fp8_artifact_exports_for_h100_only(tiny_model_dir, small_amt, tmp_path, fer_images):
    """FP8 -> H100 plan: the artifact's own E4M3 weights (FLOAT8E4M3FN initializers behind DequantizeLinear) and
    Q/DQ inputs at its calibrated scales; onnxruntime runs the graph against the emulated PyTorch artifact.
    Orin (8.7) is refused for its compute capability, the CPU target for having no FP8 plan."""
    import torch
    from onnx import numpy_helper

    from emoverse.compress.pipeline import compress
    from emoverse.export.fp8_onnx import read_fp8_linears

    art = tmp_path / "fp8"
    compress("modelopt-fp8", tiny_model_dir, small_amt, art, overrides=["stages.0.calibration_samples=5"])
    m = export_bundle(art, tmp_path / "h100", target="h100", calibration_images=fer_images)
    assert m["precision"] == "fp8" and m["weights_from"]["fp8"]["unmatched"] == []
    assert m["parity"]["max_abs_logit_diff"] < 1e-3 and m["parity"]["greedy_identical"] == m["parity"]["probes"]
    rel = json.loads((tmp_path / "h100" / "runtime.json").read_text())["graphs"]["decoder"]
    graph = onnx.load(str(tmp_path / "h100" / rel))
    inits = {t.name: t for t in graph.graph.initializer}
    linears = read_fp8_linears(art / "llm")
    assert sum(n.op_type == "QuantizeLinear" for n in graph.graph.node) == len(linears)
    for name, layer in linears.items():
        w = inits[name + ".fp8.weight"]
        assert w.data_type == onnx.TensorProto.FLOAT8E4M3FN
        assert np.array_equal(np.frombuffer(w.raw_data, np.uint8).reshape(w.dims), layer["w8"].T)
        assert float(numpy_helper.to_array(inits[name + ".fp8.input_scale"])) == layer["input_scale"]
    plan = json.loads((tmp_path / "h100" / "tensorrt" / "plan.json").read_text())
    assert "fp8" in next(b for b in plan["builds"] if b["graph"] == "decoder")["flags"]
    with pytest.raises(ValueError, match="compute capability"):
        export_bundle(art, tmp_path / "orin", target="jetson-agx-orin")
    with pytest.raises(ValueError, match="FP8 hardware"):
        export_bundle(art, tmp_path / "cpu")
    assert torch.float8_e4m3fn  # the emulation's dtype exists in this torch
