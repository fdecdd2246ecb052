"""GPTQ W4A16 artifacts export as they are: MatMulNBits built from the artifact's own packed weights and
scales (dequantized weights equal bit for bit), parity with the PyTorch compressed artifact, refusals."""

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from emoverse.compress.pipeline import compress
from emoverse.export.bundle import export_bundle
from emoverse.export.gptq_onnx import dequantize, pack, read_linears, unpack


@pytest.fixture(scope="module")
def gptq_artifact(tiny_model_dir, small_amt, tmp_path_factory):
    out = tmp_path_factory.mktemp("gptq") / "art"
    compress(
        "gptq-w4a16",
        tiny_model_dir,
        small_amt,
        out,
        overrides=["stages.0.group_size=32", "stages.0.calibration_samples=5"],
    )
    return out


def test_pack_unpack_roundtrip():
    rng = np.random.default_rng(0)
    layer = {
        "q": rng.integers(-8, 8, (6, 64)).astype(np.int8),
        "scale": rng.random((6, 2)).astype(np.float32),
        "group_size": 32,
    }
    b, s = pack(layer)
    assert b.shape == (6, 2, 16) and b.dtype == np.uint8 and s.shape == (12,)
    assert np.array_equal(unpack(b, s, 6, 64, 32), dequantize(layer))


def test_gptq_bundle_weights_are_the_artifacts_bit_for_bit(gptq_artifact, tmp_path):
    m = export_bundle(gptq_artifact, tmp_path / "b")
    assert m["precision"] == "int4" and m["weights_from"]["matmulnbits"]["unmatched"] == []
    assert m["parity"]["greedy_identical"] == m["parity"]["probes"]
    assert m["parity"]["max_abs_logit_diff"] < 1e-3
    linears = read_linears(gptq_artifact / "llm")
    graph = onnx.load(
        str(tmp_path / "b" / json.loads((tmp_path / "b" / "runtime.json").read_text())["graphs"]["decoder"])
    )
    inits = {t.name: numpy_helper.to_array(t) for t in graph.graph.initializer}
    assert sum(n.op_type == "MatMulNBits" for n in graph.graph.node) == len(linears)
    for name, layer in linears.items():
        n, k = layer["q"].shape
        got = unpack(inits[name + ".nbits.B"], inits[name + ".nbits.scales"], n, k, layer["group_size"])
        assert np.array_equal(got, dequantize(layer)), name


def test_gptq_artifact_refuses_other_precisions(gptq_artifact, tmp_path):
    for target, precision in [("cpu", "int8"), ("cpu", "fp32"), ("jetson-agx-orin", "fp16")]:
        with pytest.raises(ValueError, match="its own int4 weights"):
            export_bundle(gptq_artifact, tmp_path / "c", target=target, precision=precision)
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("target", ["jetson-agx-orin", "h100"])
def test_gptq_into_tensorrt_int4_weight_only(gptq_artifact, small_amt, tmp_path, target):
    """The TensorRT plans get the same INT4 weights: blocked DequantizeLinear on INT4 initializers (opset 21)
    whose values are the artifact's q, scales its scales; the graph passes onnx's checker and, run by
    onnxruntime, matches the PyTorch compressed artifact; the plan builds the decoder with int4 weights."""
    from emoverse.records import load_records

    faces = [i for r in load_records(small_amt / "fer" / "train.jsonl") for i in r.images]
    out = tmp_path / target
    m = export_bundle(gptq_artifact, out, target=target, calibration_images=faces)
    assert m["precision"] == "int4" and m["weights_from"]["dequantize_linear"]["unmatched"] == []
    assert m["parity"]["max_abs_logit_diff"] < 1e-3 and m["parity"]["greedy_identical"] == m["parity"]["probes"]
    rel = json.loads((out / "runtime.json").read_text())["graphs"]["decoder"]
    assert rel.endswith("decoder.int4.qdq.onnx") and not (out / "graphs" / "decoder.onnx").exists()
    graph = onnx.load(str(out / rel))
    onnx.checker.check_model(graph)
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 21
    inits = {t.name: t for t in graph.graph.initializer}
    linears = read_linears(gptq_artifact / "llm")
    dqs = [n for n in graph.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith(".int4.weight")]
    assert len(dqs) == len(linears)
    for name, layer in linears.items():
        w = inits[name + ".int4.weight"]
        assert w.data_type == onnx.TensorProto.INT4
        assert np.array_equal(numpy_helper.to_array(w).astype(np.int8), layer["q"].T), name
        assert np.array_equal(numpy_helper.to_array(inits[name + ".int4.scale"]), layer["scale"].T), name
    dq = dqs[0]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in dq.attribute}
    assert attrs == {"axis": 0, "block_size": 32} and len(dq.input) == 2  # symmetric: no zero point
    plan = json.loads((out / "tensorrt" / "plan.json").read_text())
    decoder = next(b for b in plan["builds"] if b["graph"] == "decoder")
    assert decoder["onnx"] == rel and "int4" in decoder["flags"]


def test_whole_bundle_quantized_smaller_and_still_answers(gptq_artifact, small_amt, tmp_path):
    """GPTQ layers + 8-bit tied embedding / output projection + static INT8 vision: smaller, parity recorded."""
    from emoverse.artifacts import folder_bytes
    from emoverse.records import load_records
    from emoverse.runtime.backends import open_runtime
    from emoverse.tasks import TASKS

    faces = [i for r in load_records(small_amt / "fer" / "train.jsonl") for i in r.images]
    plain = export_bundle(gptq_artifact, tmp_path / "plain")
    small = export_bundle(
        gptq_artifact, tmp_path / "small", embedding_bits=8, vision_int8=True, calibration_images=faces
    )
    assert folder_bytes(tmp_path / "small") < 0.8 * folder_bytes(tmp_path / "plain")
    assert small["embeddings"].startswith("int8") and small["vision"].startswith("int8")
    assert small["parity"]["probes"] == plain["parity"]["probes"] == 2
    fer = TASKS["fer"]
    a = open_runtime(tmp_path / "small").answer("fer", fer.query(fer.labels, False), [faces[0]])
    assert a.label in fer.labels


@pytest.mark.parametrize("bits", [4, 8])
def test_tied_embedding_is_stored_once_and_read_by_both_graphs(tiny_model_dir, tmp_path, bits):
    """The tied table is quantized once into graphs/tied_embedding.bin; the embed graph's GatherBlockQuantized
    and the decoder's output-projection MatMulNBits both read those bytes (external data), and the lookup
    equals the block-wise round-to-nearest of the fp32 table."""
    import onnxruntime as ort

    from emoverse.model import EmoVerse

    out = tmp_path / f"b{bits}"
    m = export_bundle(tiny_model_dir, out, embedding_bits=bits)
    graphs = json.loads((out / "runtime.json").read_text())["graphs"]
    embed = onnx.load(str(out / graphs["embed"]), load_external_data=False)
    decoder = onnx.load(str(out / graphs["decoder"]), load_external_data=False)
    assert [n.op_type for n in embed.graph.node] == ["Cast", "GatherBlockQuantized"]  # fp16 scales -> fp32
    locations = {
        (g, t.name): {e.key: e.value for e in t.external_data}["location"]
        for g, model in (("embed", embed), ("decoder", decoder))
        for t in model.graph.initializer
        if t.data_location == onnx.TensorProto.EXTERNAL
    }
    assert set(locations.values()) == {"tied_embedding.bin"} and ("decoder", "tied.B") in locations
    assert m["embeddings"].startswith(f"int{bits} tied table stored once")
    table = EmoVerse.load(tiny_model_dir).llm.get_input_embeddings().weight.detach().numpy()
    blocks = table.reshape(table.shape[0], -1, 32)
    qmax = 2 ** (bits - 1) - 1
    scale = (np.abs(blocks).max(-1, keepdims=True) / qmax).astype(np.float16).astype(np.float32)
    scale[scale == 0] = 1
    expect = (np.clip(np.round(blocks / scale), -qmax - 1, qmax) * scale).reshape(table.shape)
    ids = np.arange(min(table.shape[0], 50))[None]
    got = ort.InferenceSession(str(out / graphs["embed"])).run(None, {"input_ids": ids})[0][0]
    assert np.allclose(got, expect[ids[0]], atol=1e-6)
    vocab, hidden = table.shape  # bits per weight + an fp16 scale per block of 32 (default zero points): one copy
    assert (out / "graphs" / "tied_embedding.bin").stat().st_size == vocab * hidden * bits // 8 + vocab * (
        hidden // 32
    ) * 2


@pytest.fixture(scope="module")
def int8_artifact(tiny_model_dir, small_amt, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "art"
    compress("int8-weight-only", tiny_model_dir, small_amt, out)
    return out


def test_int8_weight_only_exports_as_its_own_bytes(int8_artifact, small_amt, tmp_path):
    """INT8 weight-only (per-channel) -> CPU MatMulNBits bits=8 whose weights equal the artifact's q x scale bit
    for bit (each channel's scale repeated over blocks of 32), and -> TensorRT INT8 initializers behind a
    per-channel DequantizeLinear; both match the PyTorch artifact."""
    from emoverse.records import load_records

    linears = read_linears(int8_artifact / "llm")
    assert {v["bits"] for v in linears.values()} == {8}
    m = export_bundle(int8_artifact, tmp_path / "cpu")
    assert m["precision"] == "int8" and m["weights_from"]["matmulnbits"]["unmatched"] == []
    assert m["parity"]["max_abs_logit_diff"] < 1e-3
    graphs = json.loads((tmp_path / "cpu" / "runtime.json").read_text())["graphs"]
    graph = onnx.load(str(tmp_path / "cpu" / graphs["decoder"]))
    inits = {t.name: numpy_helper.to_array(t) for t in graph.graph.initializer}
    for node in (n for n in graph.graph.node if n.op_type == "MatMulNBits"):
        attrs = {a.name: a.i for a in node.attribute}
        assert attrs["bits"] == 8 and attrs["block_size"] == 32
        name = node.input[1][: -len(".nbits.B")]
        got = unpack(inits[node.input[1]], inits[node.input[2]], attrs["N"], attrs["K"], 32, bits=8)
        assert np.array_equal(got, dequantize(linears[name])), name
    faces = [i for r in load_records(small_amt / "fer" / "train.jsonl") for i in r.images]
    t = export_bundle(int8_artifact, tmp_path / "orin", target="jetson-agx-orin", calibration_images=faces)
    assert t["precision"] == "int8" and t["parity"]["max_abs_logit_diff"] < 1e-3
    rel = json.loads((tmp_path / "orin" / "runtime.json").read_text())["graphs"]["decoder"]
    trt = onnx.load(str(tmp_path / "orin" / rel))
    onnx.checker.check_model(trt)
    dqs = [n for n in trt.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith(".int8.weight")]
    assert len(dqs) == len(linears)
    with pytest.raises(ValueError, match="own int8 weights"):
        export_bundle(int8_artifact, tmp_path / "again", precision="int4")
