"""The runtime API over its backends: torch reference == ONNX bundle, batched scoring == one by one,
and the TensorRT backend's wiring (engines from the plan, outputs by name) with a stand-in engine runner."""

import json
from collections import OrderedDict

import numpy as np
import onnxruntime as ort
import pytest

from emoverse.artifacts import ArtifactError
from emoverse.export.bundle import export_bundle
from emoverse.runtime.backends import detect_backend, open_runtime
from emoverse.runtime.ort import Answer, RequestError, session_options
from emoverse.tasks import TASKS


def _requests(face):
    fer, msa, mer = TASKS["fer"], TASKS["msa"], TASKS["mer"]
    return [
        {"task": "msa", "query": msa.query("what a lovely day")},
        {"task": "fer", "query": fer.query(("happy", "anger", "sadness"), False), "images": [face]},
        {"task": "mer", "query": mer.query("you did what? I can't believe it, after all we said")},
        {"task": "msa", "query": msa.query("no")},
    ]


@pytest.mark.parametrize("shape", [(8, 64, 16), (50, 576, 1536)])  # a small GEMM; a prefill group's (AMX tiles)
def test_integer_gemms_are_exact_on_this_cpu(shape):
    """The INT8 prefill decoder's MatMulInteger (u8 activations around 128, s8 weights), opened with the
    runtime's options, equals exact integer math at the extremes where a CPU without VNNI saturates 16-bit
    pair sums (on an AVX2-only AMD EPYC, without the option, every output of this product was wrong). On a CPU
    with VNNI or AMX-INT8 the option is not set, so this checks that its own kernels are exact."""
    from onnx import TensorProto, helper, numpy_helper

    m, k, n = shape
    rng = np.random.default_rng(0)
    x = rng.choice(np.array([1, 255], np.uint8), size=(m, k))
    w = rng.choice(np.array([-127, 127], np.int8), size=(k, n))
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["x", "w", "zp"], ["y"])],
        "u8s8",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [m, n])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(128, np.uint8), "zp")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    opts = session_options(integer_gemms=True)
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, (x.astype(np.int64) - 128) @ w.astype(np.int64))


@pytest.mark.parametrize(
    ("flags", "machine", "saturate"),
    [
        ("fpu avx2 fma", "x86_64", True),  # AMD EPYC Zen 3
        ("avx2 avx512f avx512_bf16", "x86_64", True),  # AVX-512 without VNNI
        ("avx2 avx512f avx512_vnni", "x86_64", False),
        ("avx2 avx_vnni", "AMD64", False),
        ("avx2 avx512f amx_bf16 amx_int8 amx_tile", "x86_64", False),
        (None, "x86_64", True),  # flags unreadable: exact is the safe side
        ("fp asimd asimddp i8mm", "aarch64", False),  # Jetson's CPU: x86's option does not apply
    ],
)
def test_exact_integer_gemms_are_asked_for_only_where_kernels_saturate(tmp_path, flags, machine, saturate):
    from emoverse.runtime.ort import u8s8_gemms_saturate

    cpuinfo = tmp_path / "cpuinfo"
    if flags is not None:
        cpuinfo.write_text(f"model name\t: a CPU\n{'flags' if machine != 'aarch64' else 'Features'}\t: {flags}\n")
    assert u8s8_gemms_saturate(cpuinfo, machine) is saturate


def test_backend_is_detected_from_the_folder(bundle, tiny_model_dir, tmp_path):
    assert detect_backend(bundle) == "onnxruntime" and detect_backend(tiny_model_dir) == "torch"
    with pytest.raises(ValueError, match="neither a bundle"):
        detect_backend(tmp_path)
    with pytest.raises(ValueError, match="unknown backend 'tflite'"):
        open_runtime(bundle, "tflite")


def test_torch_reference_answers_like_the_bundle(tiny_model_dir, runtime, face):
    ref = open_runtime(tiny_model_dir, "torch")
    for r in _requests(face):
        t = TASKS[r["task"]]
        cands = t.candidates(r["query"])
        assert np.allclose(
            ref.score(r["query"], cands, r.get("images", [])),
            runtime.score(r["query"], cands, r.get("images", [])),
            atol=1e-3,
        )
    q = TASKS["ecpe"].query([("neutral", "A", "hi"), ("joy", "B", "great news")], 2)
    assert ref.answer("ecpe", q, mode="generate").text == runtime.answer("ecpe", q, mode="generate").text


def test_scores_equal_the_full_sequence_likelihood(runtime):
    """KV-cached candidate scoring == log-likelihood of prompt + candidate run in one pass without cache."""
    q = TASKS["mer"].query("you did what?")
    cands = TASKS["mer"].candidates(q)
    got = runtime.score(q, cands)
    prompt = runtime.embed(q, [])
    for cand, s in zip(cands, got, strict=True):
        ids = runtime.tok.encode(cand, add_special_tokens=False).ids
        x = np.concatenate([prompt, runtime.token_embeds(np.array([ids]))[0]])[None]
        logits, _ = runtime.forward(x, np.ones((1, x.shape[1]), dtype=np.int64), runtime.empty_cache(1))
        lp = (
            logits[0]
            - np.log(np.exp(logits[0] - logits[0].max(-1, keepdims=True)).sum(-1, keepdims=True))
            - logits[0].max(-1, keepdims=True)
        )
        n = len(prompt)
        assert s == pytest.approx(sum(lp[n - 1 + j, t] for j, t in enumerate(ids)), abs=1e-3)


def test_candidates_scored_with_the_end_of_the_answer(runtime):
    """ECPE's cause sets are scored as whole answers: each set's tokens and then end-of-answer, so the set {1}
    no longer counts the probability of every answer that begins with it ({1, 2}, {1, 3}, ...)."""
    ecpe = TASKS["ecpe"]
    q = ecpe.query([("neutral", "A", "hi"), ("joy", "B", "great news"), ("joy", "A", "yay")], 3)
    cands = ecpe.candidates(q)
    assert ecpe.score_with_end and not TASKS["mer"].score_with_end
    bare, ended = runtime.score(q, cands), runtime.score(q, cands, task=ecpe)
    prompt = runtime.embed(q, [])
    for cand, b, e in zip(cands, bare, ended, strict=True):
        ids = runtime.tok.encode(cand, add_special_tokens=False).ids
        x = np.concatenate([prompt, runtime.token_embeds(np.array([ids]))[0]])[None]
        logits, _ = runtime.forward(
            x, np.ones((1, x.shape[1]), dtype=np.int64), runtime.empty_cache(1), [x.shape[1] - 1]
        )
        row = logits[0, -1]
        end_lp = row[runtime.eos] - row.max() - np.log(np.exp(row - row.max()).sum())
        assert e == pytest.approx(b + end_lp, abs=1e-3)
    assert runtime.answer("ecpe", q).scores == pytest.approx(dict(zip(cands, ended, strict=True)), abs=1e-4)


def test_batched_scoring_equals_one_by_one(runtime, face):
    reqs = _requests(face)
    items = [(r["query"], TASKS[r["task"]].candidates(r["query"]), r.get("images", [])) for r in reqs]
    batched = runtime.score_batch(items)
    for (q, c, im), b in zip(items, batched, strict=True):
        assert np.allclose(runtime.score(q, c, im), b, atol=1e-4)


def test_scoring_in_row_chunks_changes_no_score(runtime, face, monkeypatch):
    """Candidates are teacher-forced SCORE_ROWS at a time (memory); chunks of 2 give the same scores as one pass."""
    import emoverse.runtime.ort as ort

    reqs = _requests(face)
    items = [(r["query"], TASKS[r["task"]].candidates(r["query"]), r.get("images", [])) for r in reqs]
    whole = runtime.score_batch(items)
    monkeypatch.setattr(ort, "SCORE_ROWS", 2)
    for a, b in zip(runtime.score_batch(items), whole, strict=True):
        assert np.allclose(a, b, atol=1e-4)


def _lift_first_tokens(runtime, monkeypatch) -> tuple[dict, list]:
    """The tiny random model's next-token distribution is flat: the tests lift chosen first tokens after the
    prefill ({token id: nats}, edited by the test) and record how many candidates each continuation call
    teacher-forces."""
    lift: dict[int, float] = {}
    calls: list[int] = []
    real_continue, real_prefill = runtime._continue, runtime.prefill

    def lifted_prefill(embs):
        last, cache, mask = real_prefill(embs)
        last = last.copy()
        for tok, add in lift.items():
            last[:, tok] += add
        return last, cache, mask

    monkeypatch.setattr(runtime, "prefill", lifted_prefill)
    monkeypatch.setattr(
        runtime,
        "_continue",
        lambda cand, r, c, m, todo, *a: calls.append(len(todo)) or real_continue(cand, r, c, m, todo, *a),
    )
    return lift, calls


def test_label_answers_scored_branch_and_bound_equal_the_full_argmax(runtime, face, monkeypatch):
    """A label task's answer teacher-forces only the candidates that can still win (a candidate's score is at
    most its first token's log-probability), yet picks what scoring all of them picks; ECPE, whose answer
    needs every set's score, scores all. The random model's next-token distribution is flat, so two
    candidates' first tokens are lifted: the runner-up's bound then still beats the leader's complete score
    (a second pass), the others' does not (never teacher-forced)."""
    lift, rows = _lift_first_tokens(runtime, monkeypatch)
    reqs = _requests(face) + [{"task": "mer", "query": TASKS["mer"].query(w)} for w in ("fine", "ugh")]
    for r in reqs:
        t, images = TASKS[r["task"]], r.get("images", [])
        cands = t.candidates(r["query"])
        lead, runner_up = (runtime.tok.encode(c, add_special_tokens=False).ids[0] for c in cands[-2:])
        lift.clear()
        lift.update({lead: 30.0, runner_up: 29.0})
        full = runtime.score(r["query"], cands, images)
        rows.clear()
        a = runtime.answer(r["task"], r["query"], images)
        assert a.text == cands[int(np.argmax(full))] and a.text in cands[-2:]
        assert rows == [1, 1]  # the leader, then the runner-up whose bound still reaches it; no other
        assert sorted(a.scores) == sorted(cands[-2:])
        for c, s in a.scores.items():
            assert s == pytest.approx(full[cands.index(c)], abs=1e-4)
        assert [b.text for b in runtime.answer_many([r])] == [a.text]
    lift.clear()
    q = TASKS["ecpe"].query([("neutral", "A", "hi"), ("joy", "B", "great news"), ("joy", "A", "yay")], 3)
    assert len(runtime.answer("ecpe", q).scores) == len(TASKS["ecpe"].candidates(q))


def test_answer_many_batches_and_isolates_a_bad_request(runtime, face, tmp_path, monkeypatch):
    reqs = _requests(face)
    bad = {"task": "fer", "query": reqs[1]["query"], "images": [str(tmp_path / "gone.png")]}
    calls = []
    real = runtime.score_embedded
    monkeypatch.setattr(runtime, "score_embedded", lambda embs, *a: calls.append(len(embs)) or real(embs, *a))
    out = runtime.answer_many(reqs[:2] + [bad] + reqs[2:], batch_size=8)
    assert isinstance(out[2], RequestError) and "gone.png" in str(out[2])
    assert calls == [4]  # one batch: the bad image was refused before the prefill
    singles = [runtime.answer(r["task"], r["query"], r.get("images", [])) for r in reqs]
    assert [a.label for a in out[:2] + out[3:]] == [a.label for a in singles]


# -- TensorRT backend ------------------------------------------------------------------------------
class _OrtAsEngine:
    """Stands in for polygraphy's TrtRunner: the "engine" file names the ONNX graph it was built from;
    outputs come back as a dict in reversed order, as an engine may order them differently."""

    def __init__(self, loader, name=None):
        self.loader = loader

    def activate(self):
        path = self.loader().decode()
        self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])

    def infer(self, feed_dict):
        names = [o.name for o in self.session.get_outputs()]
        outs = self.session.run(None, feed_dict)
        return OrderedDict(reversed(list(zip(names, outs, strict=True))))


def test_tensorrt_backend_runs_the_engines_of_its_plan(tiny_model_dir, small_amt, tmp_path, runtime, face, monkeypatch):
    import polygraphy.backend.trt as ptrt

    from emoverse.records import load_records

    images = [i for r in load_records(small_amt / "fer" / "train.jsonl") for i in r.images]
    out = tmp_path / "agx"
    export_bundle(tiny_model_dir, out, target="jetson-agx-orin", calibration_images=images)
    with pytest.raises(ArtifactError, match="engine not built.*build_engines.py"):
        open_runtime(out, "tensorrt")
    plan = json.loads((out / "tensorrt" / "plan.json").read_text())
    for b in plan["builds"]:
        (out / b["engine"]).write_bytes(str(out / b["onnx"]).encode())
    with pytest.raises(RuntimeError, match="cannot load the TensorRT engine"):
        open_runtime(out, "tensorrt")  # no tensorrt here: a clear error, not an ImportError deep inside
    monkeypatch.setattr(ptrt, "TrtRunner", _OrtAsEngine)
    monkeypatch.setattr(ptrt, "EngineFromBytes", lambda load_bytes: load_bytes)
    rt = open_runtime(out, "tensorrt")
    assert {type(g).__name__ for g in (rt.decoder, rt.embedder, rt.vision)} == {"TrtGraph"}
    q = TASKS["msa"].query("what a lovely day")
    assert np.allclose(rt.score(q, ["Positive.", "Negative."]), runtime.score(q, ["Positive.", "Negative."]), atol=1e-4)
    assert isinstance(rt.answer("fer", TASKS["fer"].query(("happy", "anger"), False), [face]), Answer)


def test_tensorrt_backend_needs_a_tensorrt_bundle(bundle):
    with pytest.raises(ArtifactError, match="no tensorrt/plan.json"):
        open_runtime(bundle, "tensorrt")


def test_prefix_cached_prefill_equals_a_full_prefill(runtime, face):
    """The chat prefix's cached KV + the request's own tokens == one pass over the whole prompt."""
    for q, images in [
        (TASKS["msa"].query("fine"), []),
        (TASKS["fer"].query(("happy", "anger"), False), [face]),
    ]:
        emb = runtime.embed(q, images)
        full, _ = runtime.forward(emb[None], np.ones((1, len(emb)), dtype=np.int64), runtime.empty_cache(1))
        last, cache, mask = runtime.prefill([emb])
        assert np.allclose(full[0, -1], last[0], atol=1e-4)
        assert cache[0].shape[2] == len(emb) and mask.sum() == len(emb)
    assert len(runtime._prefix()[0]) > 5  # the system prompt and user-turn opening really are cached


def test_old_bundle_format_is_refused(bundle, tmp_path):
    import shutil

    copy = tmp_path / "old"
    shutil.copytree(bundle, copy)
    cfg = json.loads((copy / "runtime.json").read_text())
    cfg["format"] = "emoverse-runtime/1"
    (copy / "runtime.json").write_text(json.dumps(cfg))
    with pytest.raises(ArtifactError, match="bundle format 'emoverse-runtime/1'.*export the bundle again"):
        open_runtime(copy, check=False)


def test_label_scoring_equals_argmax_of_generation(runtime, face):
    """On a fixed set of prompts, with single-token candidates, the scored label is the token that greedy
    generation restricted to the candidates emits: the two paths agree on the prefill's logits."""
    words = ["yes", "no", "maybe", "happy", "sad"]
    ids = {w: runtime.tok.encode(w, add_special_tokens=False).ids for w in words}
    cands = [w for w in words if len(ids[w]) == 1]
    assert len(cands) >= 3
    allowed_ids = {ids[w][0] for w in cands}

    def only_candidates(text):
        return lambda tid: (tid in allowed_ids) if text == "" else tid == runtime.eos

    for q, images in [
        (TASKS["msa"].query("what a day"), []),
        (TASKS["mer"].query("no way!"), []),
        (TASKS["fer"].query(("happy", "sad"), False), [face]),
    ]:
        scores = runtime.score(q, cands, images)
        generated = runtime.generate(q, images, max_new_tokens=2, allowed=only_candidates)
        assert generated == cands[int(np.argmax(scores))]


def test_generate_many_equals_one_at_a_time_with_grammar(tiny_model_dir):
    """Batched decoding (left-padded prefill, one step per token for all rows) picks, row by row, the
    tokens `stream` picks alone: ECPE under its grammar, ERI free, different lengths and budgets."""
    rt = open_runtime(tiny_model_dir, "torch")
    ecpe, eri = TASKS["ecpe"], TASKS["eri"]
    conv = [
        ("neutral", "A", "hi there"),
        ("joy", "B", "great news, I got the job!"),
        ("surprise", "A", "really?"),
    ]
    items = [
        (ecpe.query(conv, 3), [], 12, rt.grammar_for("ecpe", ecpe.query(conv, 3))),
        (eri.query("leave me alone"), [], 9, None),
        (ecpe.query(conv[:2], 2), [], 5, rt.grammar_for("ecpe", ecpe.query(conv[:2], 2))),
    ]
    batched = rt.generate_many(items)
    alone = [rt.generate(q, i, m, g) for q, i, m, g in items]
    assert batched == alone
    assert all(p.startswith("3_surprise,") for p in batched[0].split(";") if p)


def test_eri_answers_end_with_one_scored_conclusion(tiny_model_dir):
    """ERI through the runtime: the reasoning is cut by the task, then completed by its conclusion phrase and
    the emotion word the model scores best (the best of the candidates' scores after that phrase); streamed
    (the bench's path) and batched (the eval's path) give the same text."""
    rt = open_runtime(tiny_model_dir, "torch")
    eri = TASKS["eri"]
    prefix, options = eri.closing()
    queries = [eri.query("leave me alone"), eri.query("we won, we actually won!")]
    batched = [a.text for a in rt.answer_many([{"task": "eri", "query": q} for q in queries], mode="score")]
    for q, text in zip(queries, batched, strict=True):
        assert "".join(rt.stream(q, [], eri.max_new_tokens, None, eri)).strip() == text
        head, word = text.rsplit(prefix.strip(), 1)
        assert word in options and eri.parse_label(text) in eri.CONCLUSION_WORDS
        assert eri.cut(head) is None or eri.cut(head) >= len(head.rstrip())  # no "therefore" before the conclusion
        scores = rt.score_embedded(
            [
                np.concatenate(
                    [rt.embed(q, []), rt.token_embeds(np.array([rt.tok.encode(head.rstrip() + prefix).ids]))[0]]
                )
            ],
            [options],
        )[0]
        assert word == options[int(np.argmax(scores))]


def test_eval_and_bench_give_the_same_answers(tiny_model_dir, small_amt, tmp_path):
    """`emoverse eval` and the bench answer through the same runtime path: same records, same answers."""
    from emoverse.bench.runner import _answer
    from emoverse.evaluate import evaluate, select_records
    from emoverse.records import load_records

    m = evaluate(str(tiny_model_dir), [str(small_amt)], tmp_path, mode="score", limit=2)
    preds = {}
    for line in (tmp_path / "predictions.jsonl").read_text().splitlines():
        row = json.loads(line)
        preds[row["id"]] = row["prediction"]
    rt = open_runtime(tiny_model_dir, "torch")
    recs = select_records(load_records(small_amt, split="test"), tasks=None, limit=2)
    assert {r.task for r in recs} == {"msa", "mer", "fer", "eri", "ecpe"}
    for r in recs:
        assert _answer(rt, r)[0] == preds[r.id], r.id
    assert m["results"]["emoverse/score"]["ecpe.n"] >= 1


def test_shared_conversation_prefix_computed_once_changes_no_answer(tiny_model_dir):
    """ECPE queries about one conversation share most of their prompt: prefilled once for the batch, the
    answers and scores are those of each prompt alone."""
    rt = open_runtime(tiny_model_dir, "torch")
    ecpe = TASKS["ecpe"]
    conv = [
        ("neutral", "A", "so I was walking down the street the other day"),
        ("joy", "B", "and then what happened"),
        ("surprise", "A", "I found a hundred dollars on the ground!"),
        ("joy", "B", "no way, that is amazing"),
    ]
    qs = [ecpe.query(conv, k) for k in (2, 3, 4)]
    items = [(q, [], 8, rt.grammar_for("ecpe", q)) for q in qs]
    calls = []
    forward = rt.forward
    rt.forward = lambda *a, **k: calls.append(a[0].shape) or forward(*a, **k)
    batched = rt.generate_many(items)
    assert calls[1][0] == 1  # the shared part, at batch 1, before the batch's own rows
    rt.forward = forward
    assert batched == [rt.generate(q, [], 8, g) for q, _, _, g in items]


def test_label_decision_margin_answers_a_clear_leader_without_its_continuation(runtime, monkeypatch):
    """With `label_decision_margin` in runtime.json, a label whose first token leads every other label's by the
    margin is answered without teacher-forcing its remaining tokens (no continuation call; its score is its
    first token's log-probability); a closer race is still scored exactly, as without the margin."""
    lift, calls = _lift_first_tokens(runtime, monkeypatch)
    monkeypatch.setattr(runtime, "label_margin", 2.0)
    q = TASKS["mer"].query("ugh")
    cands = TASKS["mer"].candidates(q)
    lead, runner_up = (runtime.tok.encode(c, add_special_tokens=False).ids[0] for c in cands[-2:])
    lift.update({lead: 30.0, runner_up: 29.0})  # 1 nat apart: scored exactly
    close = runtime.answer("mer", q)
    assert sum(calls) >= 1 and close.text == cands[int(np.argmax(runtime.score(q, cands)))]
    calls.clear()
    lift.update({lead: 34.0})  # 5 nats ahead: decided by its first token
    clear = runtime.answer("mer", q)
    assert sum(calls) == 0 and clear.text == cands[-2] and list(clear.scores) == [cands[-2]]
    # what the margin trades: the random model's flat distribution charges the leader's '.' and end ~11 nats
    # each, more than its 5-nat lead, so exact scoring (no margin) picks the runner-up, after continuations
    monkeypatch.setattr(runtime, "label_margin", None)
    assert runtime.answer("mer", q).text == cands[-1] and sum(calls) >= 1
    # an open task's closing word (ERI: scored like a label after the generated reasoning) is always scored exactly
    monkeypatch.setattr(runtime, "label_margin", 2.0)
    eri = TASKS["eri"]
    prefix, words = eri.closing()
    emb = runtime.embed(eri.query("ugh"), [])
    lift.clear()
    lift.update({runtime.tok.encode(words[0], add_special_tokens=False).ids[0]: 34.0})
    calls.clear()
    decided = runtime._closings([emb], ["It is hard to say."], [eri])[0]
    assert sum(calls) >= 1
    monkeypatch.setattr(runtime, "label_margin", None)
    assert decided == runtime._closings([emb], ["It is hard to say."], [eri])[0]
