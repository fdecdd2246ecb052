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


def test_gptq_artifact_refuses_other_precisions_and_gpu_targets(gptq_artifact, tmp_path):
    with pytest.raises(ValueError, match="exports as int4"):
        export_bundle(gptq_artifact, tmp_path / "c", precision="int8")
    with pytest.raises(ValueError, match="not implemented yet"):
        export_bundle(gptq_artifact, tmp_path / "d", target="jetson-agx-orin")


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
