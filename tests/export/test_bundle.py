"""ONNX export of the tiny model: valid graphs, parity with PyTorch, manifest; runtime behaviour on it."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from emoverse.artifacts import ArtifactError, verify
from emoverse.model import EmoVerse
from emoverse.tasks import TASKS


def test_bundle_is_valid_and_verified(bundle):
    m = verify(bundle, kind="emoverse-bundle")
    for name in ("vision", "embed", "decoder"):
        model = onnx.load(str(bundle / "graphs" / f"{name}.onnx"))
        onnx.checker.check_model(model)
        assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert m["parity_fp32"]["max_abs_logit_diff"] < 1e-3
    cfg = json.loads((bundle / "runtime.json").read_text())
    assert cfg["tasks"]["mer"]["labels"] == list(TASKS["mer"].labels)
    dec = onnx.load(str(bundle / "graphs" / "decoder.onnx"))
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in dec.graph.input}
    assert dims["inputs_embeds"][:2] == ["batch", "seq"] and dims["past_key_0"][2] == "past"


@torch.no_grad()
def test_runtime_matches_torch(tiny_model_dir, runtime, face):
    model = EmoVerse.load(tiny_model_dir).eval()
    fer = TASKS["fer"]
    q = fer.query(("happy", "anger", "sadness"), False)
    ref = model.score(q, fer.candidates(q), [face])
    got = runtime.score(q, fer.candidates(q), [face])
    assert np.allclose(ref, got, atol=1e-3)
    mer_q = TASKS["mer"].query("you did what?")
    assert runtime.generate(mer_q, [], 8) == model.generate(mer_q, [], max_new_tokens=8)


def test_kv_cache_decode_equals_full_forward(runtime):
    emb = runtime.embed(TASKS["msa"].query("fine"), [])[None]
    n = emb.shape[1]
    full, _ = runtime.forward(emb, np.ones((1, n), dtype=np.int64), runtime.empty_cache(1))
    first, cache = runtime.forward(emb[:, : n - 3], np.ones((1, n - 3), dtype=np.int64), runtime.empty_cache(1))
    rest, _ = runtime.forward(emb[:, n - 3 :], np.ones((1, n), dtype=np.int64), cache)
    assert np.allclose(full[0, -3:], rest[0], atol=1e-4)
    assert np.allclose(full[0, : n - 3], first[0], atol=1e-4)


def test_ecpe_output_follows_the_grammar(runtime):
    ecpe = TASKS["ecpe"]
    utts = [("neutral", "A", "hi"), ("joy", "B", "great news"), ("surprise", "A", "really?")]
    ans = runtime.answer("ecpe", ecpe.query(utts, 3))
    pairs = ecpe.parse(ans.text).pairs
    assert ans.text == "" or all(p.startswith("3_surprise,") and 1 <= int(p.split(",")[1]) <= 3 for p in pairs)
    assert ans.text == ";".join(pairs)


def test_bad_requests_are_named_and_serving_continues(runtime, face, tmp_path):
    from emoverse.runtime.ort import RequestError

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    res = runtime.answer_many(
        [
            {
                "task": "fer",
                "query": TASKS["fer"].query(("happy", "anger"), False),
                "images": [str(tmp_path / "gone.png")],
            },
            {"task": "fer", "query": TASKS["fer"].query(("happy", "anger"), False), "images": [str(bad)]},
            {"task": "nope", "query": "x"},
            {"task": "mer", "query": "word " * 5000},
            {"task": "fer", "query": TASKS["fer"].query(("happy", "anger"), False), "images": [face]},
        ]
    )
    assert [type(r).__name__ for r in res] == ["RequestError"] * 4 + ["Answer"]
    assert "gone.png: image file not found" in str(res[0]) and "bad.png: unreadable" in str(res[1])
    assert "unknown task 'nope'" in str(res[2]) and "over the bundle's max_length" in str(res[3])
    assert res[4].label in ("happy", "anger")
    with pytest.raises(RequestError, match="2 <image> placeholders but only 1"):
        runtime.answer("fer", "<image><image> q", [face])


def test_tampered_bundle_is_refused(bundle, tmp_path):
    import shutil

    from emoverse.runtime.ort import OrtRuntime

    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    cfg = json.loads((copy / "runtime.json").read_text())
    cfg["eos_token_id"] = 0
    (copy / "runtime.json").write_text(json.dumps(cfg))
    with pytest.raises(ArtifactError, match="runtime.json does not match"):
        OrtRuntime(copy)


def test_runtime_imports_no_torch(bundle):
    code = (
        "import sys; from emoverse.runtime.ort import OrtRuntime; OrtRuntime(sys.argv[1]).answer('msa', "
        "\"The person says: 'ok' <sentiment> Please determine which sentiment label in the video represents: "
        "positive or negative.\"); bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
        "assert not bad, bad"
    )
    r = subprocess.run([sys.executable, "-c", code, str(bundle)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_concurrent_requests_match_sequential(runtime):
    """Several threads share one runtime; answers equal the sequential ones, memory stays flat."""
    from concurrent.futures import ThreadPoolExecutor

    from emoverse.bench.runner import rss_mb

    reqs = [("msa", TASKS["msa"].query(f"sentence number {i}")) for i in range(12)]
    reqs += [("mer", TASKS["mer"].query(f"line {i}")) for i in range(12)]
    sequential = [runtime.answer(t, q).text for t, q in reqs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(lambda r: runtime.answer(*r).text, reqs))
    assert concurrent == sequential
    for t, q in reqs[:5]:  # warm
        runtime.answer(t, q)
    before = rss_mb()
    for _ in range(10):
        for t, q in reqs:
            runtime.answer(t, q)
    assert rss_mb() - before < 50  # 240 requests: no growth beyond allocator noise


def test_external_data_cannot_escape_the_bundle(bundle, tmp_path):
    import shutil

    from emoverse.runtime.ort import OrtRuntime, check_graph_paths

    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    model = onnx.load(str(copy / "graphs" / "embed.onnx"))
    init = model.graph.initializer[0]
    init.data_location = onnx.TensorProto.EXTERNAL
    del init.external_data[:]
    init.external_data.add(key="location", value="../../../../etc/passwd")
    (copy / "graphs" / "embed.onnx").write_bytes(model.SerializeToString())  # onnx.save would refuse it
    with pytest.raises(ArtifactError, match="escapes the bundle folder"):
        check_graph_paths(copy, "graphs/embed.onnx")
    cfg = json.loads((copy / "runtime.json").read_text())
    cfg["graphs"]["embed"] = "../../elsewhere.onnx"
    (copy / "runtime.json").write_text(json.dumps(cfg))
    with pytest.raises(ArtifactError, match="escapes the bundle folder"):
        OrtRuntime(copy, check=False)


@torch.no_grad()
def test_vision_graph_equals_torch_and_keeps_relu6(tiny_model_dir, runtime, face):
    """Regression: efficientnet-lite's set_swish(False) turned Lite's ReLU6 into swish in the exported graph."""
    from emoverse.imaging import load_pixels

    model = EmoVerse.load(tiny_model_dir).eval()
    px = np.stack([load_pixels(face, runtime.cfg["image_size"])])
    ref = model.projector(model.vision_features(torch.from_numpy(px))).numpy()
    assert np.abs(runtime.vision.run(None, {"pixels": px})[0] - ref).max() < 1e-4
    graph = onnx.load(str(runtime.dir / "graphs" / "vision.onnx"))
    ops = {n.op_type for n in graph.graph.node}
    assert "Clip" in ops and "Sigmoid" not in ops  # ReLU6 as Clip; no swish (x * sigmoid(x)) in Lite
    m = verify(runtime.dir, kind="emoverse-bundle")
    assert m["parity_fp32"]["probes"] == 2  # a text probe and an image probe gate the export


def test_vision_int8_weights_keep_fp32_activations(tiny_model_dir, tmp_path, face):
    """--vision-int8-weights: every Conv weight of the vision graph is stored as int8 per output channel and
    cast back by constant nodes (no QuantizeLinear on activations); the encoder's tokens stay within the
    weight rounding of the fp32 ones, and the bundle answers image requests."""
    from onnx import numpy_helper

    from emoverse.export.bundle import export_bundle
    from emoverse.runtime.ort import OrtRuntime

    ref = export_bundle(tiny_model_dir, tmp_path / "fp32")
    m = export_bundle(tiny_model_dir, tmp_path / "w8", vision_int8_weights=True)
    assert m["vision"].startswith("int8 weights per output channel") and "int8 vision weights" in m["parity_after"]
    graphs = json.loads((tmp_path / "w8" / "runtime.json").read_text())["graphs"]
    vision = onnx.load(str(tmp_path / "w8" / graphs["vision"]))
    ops = {n.op_type for n in vision.graph.node}
    assert "QuantizeLinear" not in ops and "Cast" in ops
    int8 = [numpy_helper.to_array(t) for t in vision.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    made_by_mul = {o for n in vision.graph.node if n.op_type == "Mul" for o in n.output}
    convs = [n for n in vision.graph.node if n.op_type == "Conv"]
    assert all(n.input[1] in made_by_mul for n in convs)  # every Conv weight is cast back from int8
    assert len(int8) >= len(convs) and all(np.abs(q).max() == 127 for q in int8)  # each tensor's max hits 127
    pixels = np.random.default_rng(0).random((1, 3, 32, 32)).astype(np.float32)
    a = OrtRuntime(tmp_path / "fp32").visual_tokens(pixels)
    b = OrtRuntime(tmp_path / "w8").visual_tokens(pixels)
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max() and not np.array_equal(a, b)
    assert ref["precision"] == "fp32"
    with pytest.raises(ValueError, match="not with vision_int8"):
        export_bundle(tiny_model_dir, tmp_path / "both", vision_int8=True, vision_int8_weights=True)


def test_compact_names_keeps_the_graph_and_its_interface(bundle, tmp_path):
    """Export writes cpu graphs with short intermediate names (a third of a decoder graph's bytes): the same
    graph, so outputs are bit-identical; graph inputs, outputs and initializers keep their names; the
    tokenizer is stored without pretty-printing and still loads."""
    import shutil

    import onnxruntime as ort
    from tokenizers import Tokenizer

    from emoverse.export.bundle import compact_names

    m = verify(bundle, kind="emoverse-bundle")
    assert m["graph_bytes_saved_by_compact_names"] > 0
    assert "\n" not in (bundle / "tokenizer.json").read_text()[:1000]
    assert Tokenizer.from_file(str(bundle / "tokenizer.json")).encode("a lovely day").ids
    dec = onnx.load(str(bundle / "graphs" / "decoder.onnx"))
    assert all(not n.name for n in dec.graph.node)
    assert max(len(o) for n in dec.graph.node for o in n.output if o not in {x.name for x in dec.graph.output}) < 8

    # a graph with the exporter's long names, compacted again by hand: same outputs
    long = tmp_path / "long.onnx"
    renamed = onnx.load(str(bundle / "graphs" / "decoder.onnx"))
    inter = {o for n in renamed.graph.node for o in n.output} - {o.name for o in renamed.graph.output}
    for k, n in enumerate(renamed.graph.node):
        n.name = f"/llm/model/{n.op_type}_{k}"
        for seq in (n.input, n.output):
            for i, name in enumerate(seq):
                if name in inter:
                    seq[i] = f"/llm/model/layers.0/{name}_output_0"
    onnx.save(renamed, str(long))
    short = tmp_path / "short.onnx"
    shutil.copy(long, short)
    assert compact_names(short) > 0 and short.stat().st_size < long.stat().st_size
    rng = np.random.default_rng(0)
    s_long, s_short = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (long, short))
    assert [i.name for i in s_long.get_inputs()] == [i.name for i in s_short.get_inputs()]
    assert [o.name for o in s_long.get_outputs()] == [o.name for o in s_short.get_outputs()]
    feeds = {}
    for i in s_long.get_inputs():
        shape = [{"batch": 2, "seq": 5, "past": 3, "total": 8}.get(d, d) if isinstance(d, str) else d for d in i.shape]
        if i.name == "logits_index":
            feeds[i.name] = np.arange(5, dtype=np.int64)
        elif i.name == "position_ids":
            feeds[i.name] = np.tile(np.arange(3, 8), (2, 1))
        elif i.type == "tensor(int64)":
            feeds[i.name] = np.ones(shape, dtype=np.int64)
        else:
            feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
    for a, b in zip(s_long.run(None, feeds), s_short.run(None, feeds), strict=True):
        np.testing.assert_array_equal(a, b)


def test_grouped_attention_equals_transformers_eager():
    """The decoder graph's GQA attention (no repeat_kv copies) computes what transformers' eager attention
    computes, masked and unmasked, for 1 and several new tokens over a cache."""
    from types import SimpleNamespace

    from transformers.models.llama.modeling_llama import eager_attention_forward

    from emoverse.runtime.graphs import grouped_attention_forward

    g = torch.Generator().manual_seed(0)
    module = SimpleNamespace(num_key_value_groups=3, training=False)
    for t, s in ((1, 7), (4, 9)):
        q = torch.randn(2, 9, t, 8, generator=g)
        k, v = torch.randn(2, 3, s, 8, generator=g), torch.randn(2, 3, s, 8, generator=g)
        mask = torch.zeros(2, 1, t, s)
        mask[0, :, :, :2] = torch.finfo(torch.float32).min  # left padding of the first row
        for i in range(t):  # causal: each new token's row differs, so the groups' rows must line up with it
            mask[:, :, i, s - t + i + 1 :] = torch.finfo(torch.float32).min
        for m in (None, mask):
            want, _ = eager_attention_forward(module, q, k, v, m, scaling=0.35)
            got, _ = grouped_attention_forward(module, q, k, v, m, scaling=0.35)
            assert got.shape == want.shape == (2, t, 9, 8)
            assert torch.allclose(got, want, atol=1e-6)


def test_decoder_graph_has_no_kv_copies(runtime):
    """The exported decoder reads the cached K/V as they are: no Expand or Tile (repeat_kv's copies) takes
    anything computed from the cache (the ones there are broadcast the rotary frequencies and tile the mask)."""
    graph = onnx.load(str(runtime.dir / runtime.cfg["graphs"]["decoder"]), load_external_data=False).graph
    from_cache = {i.name for i in graph.input if i.name.startswith("past_")}
    for n in graph.node:  # topological order: one pass collects everything computed from the cache
        if any(i in from_cache for i in n.input):
            from_cache.update(n.output)
    copies = [n for n in graph.node if n.op_type in ("Expand", "Tile")]
    assert copies and not [n for n in copies if n.input[0] in from_cache]


def test_label_decision_margin_is_a_bundle_setting(tiny_model_dir, tmp_path):
    """The export writes the margin (and the ERI closing's source) into runtime.json, so eval and bench answer
    alike through the runtime that reads it; a margin that is not positive is refused before anything is
    written."""
    from emoverse.export.bundle import export_bundle
    from emoverse.runtime.backends import open_runtime

    export_bundle(tiny_model_dir, tmp_path / "b", label_decision_margin=2.0, closing_from_cache=True)
    cfg = json.loads((tmp_path / "b" / "runtime.json").read_text())
    assert cfg["label_decision_margin"] == 2.0 and cfg["closing_from_cache"] is True
    rt = open_runtime(tmp_path / "b")
    assert rt.label_margin == 2.0 and rt.closing_from_cache
    with pytest.raises(ValueError, match="label_decision_margin must be > 0"):
        export_bundle(tiny_model_dir, tmp_path / "bad", label_decision_margin=0.0)
    assert not (tmp_path / "bad").exists()


def test_closing_from_the_decoding_cache_scores_as_a_second_prefill(runtime, monkeypatch):
    """ERI's conclusion scored from the decoding cache (cut back to the tokens the text shares with what was
    generated) gets the scores a second prefill of prompt + text gets — fp32, so equal up to kernel rounding —
    alone and batched, with every text cut inside its generated tokens."""
    import emoverse.runtime.ort as ort_module

    eri = TASKS["eri"]
    monkeypatch.setattr(type(eri), "cut", lambda self, text: len(text) - 3 if len(text) > 12 else None)
    scored = []
    score_from = ort_module.OrtRuntime._score_from

    def spy(self, *args):
        scored.append(score_from(self, *args))
        return scored[-1]

    monkeypatch.setattr(ort_module.OrtRuntime, "_score_from", spy)
    queries = [eri.query(s) for s in ("I lost my keys again.", "We won the final!", "Why did nobody call me back?")]
    answers, scores = {}, {}
    for from_cache in (False, True):
        monkeypatch.setattr(runtime, "closing_from_cache", from_cache)
        scored.clear()
        single = [runtime.generate(q, [], 40, task=eri) for q in queries]
        answers[from_cache] = single, runtime.generate_many([(q, [], 40, None, eri) for q in queries])
        scores[from_cache] = np.array([row for call in scored for row in call])
    assert answers[True] == answers[False]
    assert scores[True].shape == (6, len(eri.closing()[1]))  # three alone, three batched
    np.testing.assert_allclose(scores[True], scores[False], atol=1e-4)


def _decoder_nodes(path) -> dict:
    graph = onnx.load(str(path), load_external_data=False).graph
    consts = {t.name for t in graph.initializer} | {n.output[0] for n in graph.node if n.op_type == "Constant"}
    return {
        "shape": sum(n.op_type == "Shape" for n in graph.node),
        "reshape_targets_computed": sum(n.op_type == "Reshape" and n.input[1] not in consts for n in graph.node),
        "nodes": len(graph.node),
    }


def test_shape_folding_keeps_the_decoder_bit_identical(tiny_model_dir, tmp_path):
    """The exporter's run-time shape arithmetic becomes constants: every Reshape of the decoder gets a constant
    target, and its outputs stay bit-identical at shapes the fold's own check did not use."""
    import shutil

    from emoverse.export.onnx_export import _first_difference, export_all, fold_shape_arithmetic

    decoder = export_all(EmoVerse.load(tiny_model_dir).eval(), tmp_path / "graphs")["decoder"]
    exported = tmp_path / "exported.onnx"
    shutil.copy(decoder, exported)
    report = fold_shape_arithmetic(decoder)
    assert "skipped" not in report and report["constant_reshapes"] > 0, report
    before, after = _decoder_nodes(exported), _decoder_nodes(decoder)
    assert before["reshape_targets_computed"] > 0 and after["reshape_targets_computed"] == 0
    assert after["shape"] < before["shape"] and after["nodes"] == before["nodes"] - report["nodes_removed"]
    assert _first_difference(exported, decoder, ((2, 6, 3), (1, 1, 11), (4, 2, 0))) is None
    assert not list(tmp_path.glob("graphs/*.folded.onnx"))


def test_shape_folding_refuses_a_graph_whose_outputs_change(tiny_model_dir, tmp_path, monkeypatch):
    """The check that guards the fold finds a changed output, and a fold that fails it leaves the exported
    graph as it was."""

    from emoverse.export import onnx_export

    decoder = onnx_export.export_all(EmoVerse.load(tiny_model_dir).eval(), tmp_path / "graphs")["decoder"]
    changed = tmp_path / "changed.onnx"
    model = onnx.load(str(decoder))
    norm = next(t for t in model.graph.initializer if t.name.endswith("norm.weight"))
    norm.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(norm) * 1.001, norm.name))
    onnx.save(model, str(changed))
    assert onnx_export._first_difference(decoder, changed, ((1, 2, 1),)).startswith("logits at batch 1")
    exported = decoder.read_bytes()
    monkeypatch.setattr(onnx_export, "_first_difference", lambda a, b, shapes: "logits at batch 1")
    report = onnx_export.fold_shape_arithmetic(decoder)
    assert "skipped" in report and decoder.read_bytes() == exported
    assert not list(tmp_path.glob("graphs/*.folded.onnx"))


def test_bundle_records_its_shape_folding(bundle):
    m = verify(bundle, kind="emoverse-bundle")
    assert m["decoder_shape_folding"]["constant_reshapes"] > 0
    assert _decoder_nodes(bundle / "graphs" / "decoder.onnx")["reshape_targets_computed"] == 0
