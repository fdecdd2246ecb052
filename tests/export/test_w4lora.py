"""W4 base + LoRA: the base's own 4-bit grid kept bit for bit, the fine-tune's update beside it, through
compress -> the PyTorch artifact -> the CPU bundle (MatMulNBits + low-rank correction) and the TensorRT
graph (INT4 DequantizeLinear + the same correction); refusals for a base off the grid or a full-rank update."""

import copy
import dataclasses
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from emoverse.compress.pipeline import compress
from emoverse.export.bundle import export_bundle
from emoverse.model import EmoVerse, load_llm
from emoverse.w4lora import NotOnGrid, dequantize, find_grid, merged, read_layers


def snap_q4_1(w: np.ndarray, group: int = 32) -> np.ndarray:
    """What llama.cpp's Q4_1 does to a weight, dequantized: blocks of `group`, d = (max - min) / 15, m = min,
    both stored fp16, q = round((w - min) / d)."""
    n, k = w.shape
    b = w.reshape(n, k // group, group)
    lo, hi = b.min(-1, keepdims=True), b.max(-1, keepdims=True)
    q = np.clip(np.floor((b - lo) / ((hi - lo) / 15) + 0.5), 0, 15)
    d, m = ((hi - lo) / 15).astype(np.float16).astype(np.float32), lo.astype(np.float16).astype(np.float32)
    return (d * q + m).reshape(n, k).astype(np.float32)


@pytest.fixture(scope="module")
def grid_model(tiny_model_dir, tmp_path_factory):
    """The tiny trained model moved onto a base whose linear layers are on a Q4_1 grid (as SmolLM2's GGUF
    is): returns (base LLM folder, full-form model = that base + the tiny model's own LoRA update)."""
    root = tmp_path_factory.mktemp("grid")
    tiny = EmoVerse.load(tiny_model_dir)
    random_base = load_llm(tiny.cfg, vocab_size=tiny.llm.config.vocab_size)  # the init its LoRA was trained on
    base = copy.deepcopy(random_base)
    with torch.no_grad():
        for name, mod in base.named_modules():
            if isinstance(mod, torch.nn.Linear) and "lm_head" not in name:
                mod.weight.copy_(torch.from_numpy(snap_q4_1(mod.weight.numpy())))
        for (_, tuned), (_, init), (_, grid) in zip(
            tiny.llm.named_parameters(), random_base.named_parameters(), base.named_parameters(), strict=True
        ):
            tuned.copy_(grid + (tuned - init))  # the same update, over the grid base
    base.save_pretrained(root / "base")
    tiny.tokenizer.save_pretrained(root / "base")
    tiny.cfg = dataclasses.replace(tiny.cfg, llm=str(root / "base"))
    tiny.save(root / "model", producer={"stage": "test"})
    return root / "base", root / "model"


@pytest.fixture(scope="module")
def w4_artifact(grid_model, small_amt, tmp_path_factory):
    out = tmp_path_factory.mktemp("w4lora") / "art"
    compress("w4-base-lora", grid_model[1], small_amt, out)
    return out


def test_find_grid_recovers_q4_1_exactly_and_refuses_off_grid():
    rng = np.random.default_rng(0)
    w = snap_q4_1(rng.standard_normal((8, 64)).astype(np.float32))
    q, d, m = find_grid(w, 32)
    assert q.max() == 15 and q.min() == 0 and d.dtype == np.float16 and m.dtype == np.float16
    assert np.array_equal(dequantize({"q": q, "d": d, "m": m, "group_size": 32}), w)  # bit for bit
    off = w.copy()
    off[3, 5] += 1e-4  # one weight off the grid
    assert find_grid(off, 32) is None
    assert find_grid(w, 48) is None  # 64 is not a whole number of blocks of 48


def test_compress_keeps_the_base_bits_and_the_update(grid_model, w4_artifact):
    base_dir, model_dir = grid_model
    from emoverse.llm_files import read_tensors

    base = read_tensors(base_dir)
    layers = read_layers(w4_artifact / "llm")
    assert layers and all(np.array_equal(dequantize(v), base[k + ".weight"].numpy()) for k, v in layers.items())
    stage = json.loads((w4_artifact / "manifest.json").read_text())["producer"]["stages"][0]
    assert stage["type"] == "w4_base_lora" and stage["adapted_layers"] > 0 and stage["max_rank"] <= 4
    assert stage["worst_update_residual"] < 0.02  # int8 rows of the update
    teacher, art = EmoVerse.load(model_dir), EmoVerse.load(w4_artifact)
    ids = torch.tensor([teacher.tokenizer("a lovely day at the beach")["input_ids"]])
    with torch.no_grad():
        ref, got = teacher.llm(ids).logits, art.llm(ids).logits
    assert (ref - got).abs().max() < 1e-3 * ref.abs().max()
    tuned = dict(teacher.llm.named_parameters())
    # the update is kept: the artifact's weights are far closer to the teacher than its base is
    name = next(k for k, v in layers.items() if "a_q" in v)
    w_teacher = tuned[name + ".weight"].detach().numpy()
    assert np.abs(merged(layers[name]) - w_teacher).max() < 0.05 * np.abs(dequantize(layers[name]) - w_teacher).max()


def test_cpu_bundle_is_matmulnbits_on_the_artifacts_bits(w4_artifact, tmp_path):
    out = tmp_path / "cpu"
    m = export_bundle(w4_artifact, out, embedding_bits=8)
    assert m["parity_after"]["int4 decoder"]["max_abs_logit_diff"] < 1e-3
    assert m["weights_from"]["matmulnbits"]["unmatched"] == []
    graphs = json.loads((out / "runtime.json").read_text())["graphs"]
    decoder = onnx.load(str(out / graphs["decoder"]), load_external_data=False)
    inits = {t.name: t for t in decoder.graph.initializer}
    layers = read_layers(w4_artifact / "llm")
    nbits = [n for n in decoder.graph.node if n.op_type == "MatMulNBits" and n.input[1] != "tied.B"]
    made_by = {o: n for n in decoder.graph.node for o in n.output}
    covered = []
    for node in nbits:  # a layer's own q, or the layers of one input joined (q/k/v, gate/up) by a Concat
        sources = [node.input[1]] if node.input[1] in inits else list(made_by[node.input[1]].input)
        for source in sources:
            name = source[: -len(".w4.q")]
            q = layers[name]["q"]
            packed = numpy_helper.to_array(inits[source])  # (N, K/32, 16): two 4-bit values per byte
            unpacked = np.stack([packed & 0x0F, packed >> 4], -1).reshape(q.shape)
            assert np.array_equal(unpacked, q)  # the artifact's own bits, not a second quantization
            assert np.array_equal(numpy_helper.to_array(inits[name + ".w4.d16"]), layers[name]["d"])
            covered.append(name)
    assert sorted(covered) == sorted(layers)
    assert len(nbits) < len(layers)  # fused: one 4-bit kernel per group of layers that read one activation


def test_tensorrt_graph_is_int4_weight_only_on_the_same_bits(w4_artifact, small_amt, tmp_path):
    from emoverse.records import load_records

    faces = [i for r in load_records(small_amt / "fer" / "train.jsonl") for i in r.images]
    out = tmp_path / "orin"
    m = export_bundle(w4_artifact, out, target="jetson-agx-orin", calibration_images=faces)
    assert m["precision"] == "int4" and m["parity_after"]["int4 decoder"]["max_abs_logit_diff"] < 1e-3
    graphs = json.loads((out / "runtime.json").read_text())["graphs"]
    decoder = onnx.load(str(out / graphs["decoder"]))
    onnx.checker.check_model(decoder)
    inits = {t.name: t for t in decoder.graph.initializer}
    for name, layer in read_layers(w4_artifact / "llm").items():
        w = inits[name + ".w4.q"]  # q - 8 as signed INT4 (K, N): DequantizeLinear's symmetric form, scale d
        assert w.data_type == onnx.TensorProto.INT4
        assert np.array_equal(numpy_helper.to_array(w).astype(np.int16), layer["q"].T.astype(np.int16) - 8), name
    assert "int4" in json.dumps(m["tensorrt_plan"])


def test_refuses_a_base_off_the_grid_and_a_full_rank_update(grid_model, tiny_model_dir, small_amt, tmp_path):
    from emoverse.w4lora import write

    base_dir, model_dir = grid_model
    # the tiny model's own random base is not on any 4-bit grid: named, nothing written
    with pytest.raises(NotOnGrid, match="not on a 4-bit grid"):
        write(tiny_model_dir / "llm", tiny_model_dir / "llm", tmp_path / "a")
    with pytest.raises(NotOnGrid, match="rank"):
        compress("w4-base-lora", model_dir, small_amt, tmp_path / "b", overrides=["stages.0.max_rank=1"])
    assert not (tmp_path / "b").exists()


def test_int8_weight_nodes_build_the_artifacts_merged_weight_at_load(w4_artifact):
    """The load-time nodes of the INT8 prefill decoder: base d·q + m from the stored nibbles plus B·A, times the
    smoothing vector, per-row int8 — equal to the same computed in numpy from the artifact's layers."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from emoverse.export import w4lora_onnx

    layers = read_layers(w4_artifact / "llm")
    names = [n for n in layers if n.endswith(("q_proj", "k_proj", "v_proj"))][:3]  # one fused group
    group = [(n, layers[n]) for n in names]
    assert any("a_q" in layer for _, layer in group)  # the update is in it
    k = group[0][1]["q"].shape[1]
    s = np.random.default_rng(0).uniform(0.5, 2.0, k).astype(np.float32)
    consts = w4lora_onnx.int8_constants()
    nodes = [node for name, layer in group if "a_q" in layer for node in w4lora_onnx.factor_nodes(name)]
    nodes += w4lora_onnx._int8_weight_nodes(group, "smooth", "g", consts)
    inits = [numpy_helper.from_array(s, "smooth")]
    for name, layer in group:
        inits += w4lora_onnx.w4_tensors(name, layer)  # as the 4-bit decoder stores them
    inits += [numpy_helper.from_array(v, name) for name, v in consts.items()]
    graph = helper.make_graph(
        nodes,
        "w8",
        [],
        [
            helper.make_tensor_value_info("g.w8", TensorProto.INT8, [None, None]),
            helper.make_tensor_value_info("g.w8s", TensorProto.FLOAT, [None]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    w8, scale = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})
    w = np.concatenate([merged(layer) for _, layer in group]) * s  # (N, K)
    ref_scale = np.maximum(np.abs(w).max(1), 1e-8) / 127
    np.testing.assert_allclose(scale, ref_scale, rtol=1e-5)
    ref = np.clip(np.rint(w / ref_scale[:, None]), -127, 127)
    diff = np.abs(w8.T.astype(np.int16) - ref.astype(np.int16))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3  # a float tie may round the other way; nothing more


def test_int8_prefill_bundle_shares_the_4bit_weights_and_serves_prompts(w4_artifact, small_amt, tmp_path):
    import onnxruntime as ort

    from emoverse.export.bundle import SHARED_WEIGHTS_FILE, calibration_prompts
    from emoverse.runtime.ort import (
        LOAD_TIME_SUFFIXES,
        OrtRuntime,
        decoder_weight_bytes,
        load_time_tensors,
        session_options,
    )

    records = calibration_prompts(small_amt, per_task=2)
    assert [r.task for r in records[:5]] == ["msa", "mer", "fer", "eri", "ecpe"]  # round-robin over tasks
    out = tmp_path / "p8"
    m = export_bundle(w4_artifact, out, embedding_bits=8, int8_prefill=True, calibration_records=records)
    info = m["int8_prefill"]
    assert info["calibration"]["records"] == len(records) and len(info["calibration"]["ids"]) == len(records)
    assert info["calibration"]["tasks"] == sorted({"msa", "mer", "fer", "eri", "ecpe"})
    graphs = json.loads((out / "runtime.json").read_text())["graphs"]
    dec = onnx.load(str(out / graphs["decoder"]), load_external_data=False)
    pre = onnx.load(str(out / graphs["decoder_prefill"]), load_external_data=False)
    where = {
        t.name: {e.key: e.value for e in t.external_data} for t in dec.graph.initializer if t.name.endswith(".w4.q")
    }
    read = [t for t in pre.graph.initializer if t.name.endswith(".w4.q")]
    assert read and all({e.key: e.value for e in t.external_data} == where[t.name] for t in read)  # same bytes
    assert all(where[t.name]["location"] == SHARED_WEIGHTS_FILE for t in read)
    # no int8 weight matrix is stored: the prefill graph's own tensors are small vectors
    assert max(len(t.raw_data) for t in pre.graph.initializer if t.HasField("raw_data")) < 64 * 1024
    files = {out / graphs["decoder"], out / graphs["decoder_prefill"]}
    files |= {(out / graphs["decoder"]).parent / f for f in (SHARED_WEIGHTS_FILE, "tied_embedding.bin")}
    assert decoder_weight_bytes(out, graphs) == sum(f.stat().st_size for f in files)  # shared file counted once
    # the weights are built when the session loads: no node of the optimized graph reads the 4-bit bytes
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(out / graphs["decoder_prefill"]), opts, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False)
    assert not [n for n in optimized.graph.node if any(i.endswith(".w4.q") for i in n.input)]
    assert any(n.op_type in ("MatMulInteger", "MatMulIntegerToFloat") for n in optimized.graph.node)

    rt = OrtRuntime(out)
    # the runtime computes the load-time int8 weights itself (bounded memory), and its prefill session answers
    # as onnxruntime's own folding of the same file does, bit for bit
    built = onnx.load_from_string(load_time_tensors(out / graphs["decoder_prefill"]))
    assert not [n for n in built.graph.node if n.output[0].endswith(LOAD_TIME_SUFFIXES)]
    assert {t.name for t in built.graph.initializer} >= {
        n.output[0] for n in pre.graph.node if n.output[0].endswith(LOAD_TIME_SUFFIXES)
    }
    assert load_time_tensors(out / graphs["decoder"]) is None  # nothing to build: the file is opened as is
    folded = ort.InferenceSession(  # the runtime's options: u8s8 GEMMs exact on CPUs without VNNI too
        str(out / graphs["decoder_prefill"]), session_options(integer_gemms=True), providers=["CPUExecutionProvider"]
    )
    rng = np.random.default_rng(0)
    feeds = {
        "inputs_embeds": rng.standard_normal((2, 9, rt.embed("x", []).shape[1])).astype(np.float32),
        "attention_mask": np.ones((2, 9), np.int64),
        "position_ids": np.tile(np.arange(9), (2, 1)),
        "logits_index": np.arange(9),
    }
    for i in range(rt.n_layers):
        feeds[f"past_key_{i}"] = feeds[f"past_value_{i}"] = rt.empty_cache(2)[0]
    for a, b in zip(rt.prefill_decoder.run(None, feeds), folded.run(None, feeds), strict=True):
        np.testing.assert_array_equal(a, b)

    calls = {"decoder": [], "decoder_prefill": []}
    for key, attr in (("decoder", "decoder"), ("decoder_prefill", "prefill_decoder")):
        session = getattr(rt, attr)

        class Counting:
            def __init__(self, s, log):
                self.s, self.log = s, log

            def run(self, names, feeds):
                self.log.append(feeds["inputs_embeds"].shape[1])
                return self.s.run(names, feeds)

        setattr(rt, attr, Counting(session, calls[key]))
    text = rt.generate("hello there", max_new_tokens=4)
    assert isinstance(text, str)
    assert calls["decoder_prefill"] and all(t > 1 for t in calls["decoder_prefill"])  # prompts: int8
    assert all(t == 1 for t in calls["decoder"])  # decode steps: the 4-bit kernels
    # int8 prompts track the 4-bit decoder's logits closely (not bit-exact by design)
    emb = rt.embed("a longer prompt about how the day went", [])[None]
    mask = np.ones((1, emb.shape[1]), dtype=np.int64)
    got, _ = rt.forward(emb, mask, rt.empty_cache(1))
    rt.prefill_decoder = None
    ref, _ = rt.forward(emb, mask, rt.empty_cache(1))
    assert np.corrcoef(got.ravel(), ref.ravel())[0, 1] > 0.99


def test_int8_prefill_refusals(w4_artifact, tiny_model_dir, small_amt, tmp_path):
    from emoverse.export.bundle import calibration_prompts

    records = calibration_prompts(small_amt, per_task=1)
    with pytest.raises(ValueError, match="target cpu"):
        export_bundle(
            w4_artifact, tmp_path / "a", target="jetson-agx-orin", int8_prefill=True, calibration_records=records
        )
    with pytest.raises(ValueError, match="calibration records"):
        export_bundle(w4_artifact, tmp_path / "b", int8_prefill=True)
    with pytest.raises(ValueError, match="w4-base-lora"):
        export_bundle(tiny_model_dir, tmp_path / "c", int8_prefill=True, calibration_records=records)
    with pytest.raises(ValueError, match="add int8_prefill"):
        export_bundle(w4_artifact, tmp_path / "d", int8_prefill_tasks=("msa",))
    with pytest.raises(ValueError, match="'sentiment'"):
        export_bundle(
            w4_artifact,
            tmp_path / "e",
            int8_prefill=True,
            calibration_records=records,
            int8_prefill_tasks=("sentiment",),
        )
    assert not any((tmp_path / x).exists() for x in "abcde")


def test_int8_prefill_for_named_tasks_only(w4_artifact, small_amt, tmp_path):
    """Per-task precision: with int8_prefill_tasks=('msa',), MSA requests answer exactly as the bundle whose every
    request takes the INT8 prefill decoder, MER requests exactly as the 4-bit decoder alone (prefix cache included),
    also when both are batched together; the INT8 decoder never sees a MER call."""
    from emoverse.export.bundle import calibration_prompts
    from emoverse.runtime.ort import OrtRuntime
    from emoverse.tasks import TASKS

    records = calibration_prompts(small_amt, per_task=1)
    m = export_bundle(
        w4_artifact, tmp_path / "mix", embedding_bits=8, int8_prefill=True, calibration_records=records,
        int8_prefill_tasks=("msa",),
    )  # fmt: skip
    assert m["int8_prefill"]["tasks"] == ["msa"]
    assert json.loads((tmp_path / "mix" / "runtime.json").read_text())["int8_prefill_tasks"] == ["msa"]
    mix = OrtRuntime(tmp_path / "mix")
    every = OrtRuntime(tmp_path / "mix")
    every.int8_prefill_tasks = None  # the same graphs, every request on the INT8 prefill decoder
    exact = OrtRuntime(tmp_path / "mix")
    exact.prefill_decoder = None  # the same graphs, the 4-bit decoder only
    calls: list[int] = []
    session = mix.prefill_decoder

    class Counting:
        def run(self, names, feeds):
            calls.append(feeds["inputs_embeds"].shape[1])
            return session.run(names, feeds)

    mix.prefill_decoder = Counting()
    texts = ["what a lovely day", "I am so angry with you", "fine, whatever", "that was scary"]
    reqs = [{"task": t, "query": TASKS[t].query(x)} for x in texts for t in ("mer", "msa")]
    for r in reqs:
        n = len(calls)
        got = mix.answer(r["task"], r["query"]).scores
        ref = (every if r["task"] == "msa" else exact).answer(r["task"], r["query"]).scores
        assert got == ref  # bit for bit: the same graph, the same prefix cache
        assert (len(calls) > n) == (r["task"] == "msa")
    batched = mix.answer_many(reqs, batch_size=8)  # both tasks in one call: batched apart, by decoder
    for task, ref_rt in (("msa", every), ("mer", exact)):
        mine = [a.scores for a, r in zip(batched, reqs, strict=True) if r["task"] == task]
        assert mine == [a.scores for a in ref_rt.answer_many([r for r in reqs if r["task"] == task], batch_size=8)]
    assert mix.answer("msa", reqs[1]["query"]).scores != exact.answer("msa", reqs[1]["query"]).scores


def test_int8_prefill_keeps_named_projections_on_4bit_kernels(w4_artifact, small_amt, tmp_path):
    """Mixed precision: groups named in int8_prefill_keep stay MatMulNBits in the prefill decoder (reading the
    shared 4-bit bytes); the other groups become int8 GEMMs."""
    from emoverse.export.bundle import calibration_prompts

    records = calibration_prompts(small_amt, per_task=1)
    m = export_bundle(
        w4_artifact, tmp_path / "k", int8_prefill=True, calibration_records=records, int8_prefill_keep=("down_proj",)
    )
    info = m["int8_prefill"]
    assert info["groups_kept_4bit"] > 0 and info["kept_4bit"] == ["down_proj"]
    pre = onnx.load(str(tmp_path / "k" / "graphs" / "decoder_prefill.onnx"), load_external_data=False)
    nbits = [n for n in pre.graph.node if n.op_type == "MatMulNBits" and ".w4" in n.input[1]]
    assert nbits and all("down_proj" in n.input[1] for n in nbits)
    assert len(nbits) == info["groups_kept_4bit"]
    assert sum(n.op_type == "MatMulInteger" for n in pre.graph.node) == info["groups"]
