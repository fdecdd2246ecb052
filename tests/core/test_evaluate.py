"""Eval on small files: outputs, metric keys, baselines, foreign JSONL, resume from a partial run."""

import json

import pytest

from emoverse.baselines import majority, vader
from emoverse.evaluate import compute_metrics, evaluate, select_records
from emoverse.records import Record, load_records
from emoverse.tasks import TASKS


def test_eval_writes_predictions_and_metrics(tiny_model_dir, small_amt, tmp_path):
    m = evaluate(str(tiny_model_dir), [str(small_amt)], tmp_path, limit=1, baselines=["majority", "vader"])
    res = m["results"]
    assert set(res) == {"emoverse/score", "emoverse/generate", "majority", "vader"}
    for key in (
        "msa.accuracy",
        "msa.f1",
        "mer.accuracy",
        "mer.weighted_f1",
        "fer.accuracy",
        "fer.weighted_f1",
        "eri.rouge_l",
        "ecpe.pair_f1",
    ):
        assert key in res["emoverse/score"] and key in res["emoverse/generate"], key
    assert "fer.au_f1" in res["emoverse/generate"]
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["results"] == json.loads(json.dumps(res))
    assert saved["device"] == "cpu"  # where the answers were computed is part of the record
    preds = [json.loads(x) for x in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert {p["system"] for p in preds} == set(res)
    assert not (tmp_path / "predictions.partial.jsonl").exists()
    # score mode only ever answers with a candidate label
    for p in preds:
        if p["system"] == "emoverse/score" and TASKS[p["task"]].closed:
            assert p["parsed_label"] is not None
    # a scored answer keeps its candidates' scores, and they are the ones its task chose from (so a decision rule
    # can be refitted on them without running the model again)
    scored = [p for p in preds if p["system"] == "emoverse/score" and TASKS[p["task"]].scored]
    assert {p["task"] for p in scored} >= {"msa", "mer", "fer", "ecpe"}
    for p in scored:
        task = TASKS[p["task"]]
        assert p["prediction"] == task.choose(list(p["scores"]), list(p["scores"].values())), p["id"]
    assert not any("scores" in p for p in preds if p["system"] in ("majority", "vader"))


def test_eval_accepts_foreign_jsonl_and_resumes(tiny_model_dir, tmp_path):
    """A hand-written ms-swift JSONL (no id/task/split) is evaluated; a partial run is reused."""
    f = tmp_path / "mine.jsonl"
    rows = [
        {"query": TASKS["msa"].query(t), "response": r} for t, r in [("great", "Positive."), ("awful", "Negative.")]
    ]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    out.mkdir()
    # pretend an interrupted run already answered the first record with a marker answer
    (out / "predictions.partial.jsonl").write_text(
        json.dumps(
            {"system": "emoverse/score", "id": "mine-1", "prediction": "Negative.", "scores": {"Negative.": -0.5}}
        )
        + "\n{cut-off line"
    )
    m = evaluate(str(tiny_model_dir), [str(f)], out, mode="score")
    assert set(m["results"]) == {"emoverse/score"}
    rows = {row["id"]: row for row in map(json.loads, (out / "predictions.jsonl").read_text().splitlines())}
    assert rows["mine-1"]["prediction"] == "Negative."
    assert rows["mine-1"]["scores"] == {"Negative.": -0.5}  # what the interrupted run scored is kept
    assert rows["mine-2"]["prediction"] in rows["mine-2"]["scores"]
    assert m["results"]["emoverse/score"]["msa.n"] == 2


def test_select_records_limit_per_task_and_source(amt_dir):
    recs = load_records(amt_dir / "msa" / "test.jsonl")
    sel = select_records(recs, tasks=["msa"], limit=5)
    assert sorted(r.source for r in sel) == ["meld"] * 5 + ["mosi"] * 5
    assert [r.id for r in sel] == [r.id for r in select_records(recs, tasks=["msa"], limit=5)]  # seeded


def test_per_source_metrics():
    msa = TASKS["msa"]
    recs = [
        Record(f"r{i}", "msa", src, "test", msa.query("x"), lbl, lbl.lower().rstrip("."))
        for i, (src, lbl) in enumerate([("a", "Positive."), ("a", "Negative."), ("b", "Positive.")])
    ]
    m = compute_metrics(recs, {"r0": "Positive.", "r1": "Positive.", "r2": "Positive."})
    assert m["msa.accuracy"] == pytest.approx(2 / 3, abs=1e-4)
    assert m["msa/a.accuracy"] == 0.5 and m["msa/b.accuracy"] == 1.0


def test_baselines():
    msa, ecpe = TASKS["msa"], TASKS["ecpe"]
    recs = [
        Record("m1", "msa", "s", "test", msa.query("I love this, wonderful!"), "Positive.", "positive"),
        Record("m2", "msa", "s", "test", msa.query("terrible, awful, I hate it"), "Negative.", "negative"),
        Record("ecf-1-3", "ecpe", "s", "test", ecpe.query([("joy", "A", "a")] * 3, 3), "3_joy,3", "joy"),
    ]
    v = vader(recs, [])
    assert v == {"m1": "Positive.", "m2": "Negative."}
    maj = majority(recs, [recs[1]])
    assert maj["m1"] == "Negative." and maj["ecf-1-3"] == "3_joy,3"


def test_merge_metrics_side_by_side(tmp_path):
    from emoverse.evaluate import format_table, merge_metrics

    a = {"records": {"msa/x": 2}, "results": {"emoverse/score": {"msa.accuracy": 0.9}}}
    b = {"records": {"msa/x": 2}, "results": {"majority": {"msa.accuracy": 0.5}}}
    c = {"records": {"msa/x": 3}, "results": {"vader": {"msa.accuracy": 0.6}}}
    for name, m in zip("abc", (a, b, c), strict=True):
        (tmp_path / f"{name}.json").write_text(json.dumps(m))
    merged = merge_metrics([tmp_path / "a.json", tmp_path / "b.json"])
    assert "| msa.accuracy | 0.900 | 0.500 |" in format_table(merged)
    with pytest.raises(ValueError, match="different records"):
        merge_metrics([tmp_path / "a.json", tmp_path / "c.json"])


def test_score_mode_alone_still_answers_open_tasks(tiny_model_dir, small_amt, tmp_path):
    m = evaluate(str(tiny_model_dir), [str(small_amt)], tmp_path, mode="score", limit=1, tasks=["eri", "ecpe", "msa"])
    res = m["results"]["emoverse/score"]
    assert "eri.rouge_l" in res and "ecpe.pair_f1" in res and "msa.accuracy" in res


def test_bf16_runs_as_fp32_where_the_cpu_would_emulate_it(tiny_model_dir, small_amt, tmp_path, monkeypatch):
    from emoverse.artifacts import autocast_precision

    monkeypatch.setattr("emoverse.artifacts.cpu_runs_bf16", lambda: False)  # e.g. an AVX2-only AMD EPYC
    with pytest.warns(UserWarning, match="no bf16 instructions"):
        m = evaluate(
            str(tiny_model_dir), [str(small_amt)], tmp_path, mode="score", limit=1, tasks=["msa"], precision="bf16"
        )
    assert (m["precision"], m["precision_requested"]) == ("fp32", "bf16")  # what ran, and what was asked
    assert autocast_precision("bf16", "cuda") == "bf16" and autocast_precision("fp32", "cpu") == "fp32"
    monkeypatch.setattr("emoverse.artifacts.cpu_runs_bf16", lambda: True)
    assert autocast_precision("bf16", "cpu") == "bf16"
