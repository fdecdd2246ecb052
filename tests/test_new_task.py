"""A sixth task is registered in one place (a Task subclass + register_task) and runs through `data validate`,
`eval` (with the majority baseline) and the bench on the tiny model, with no other code changed."""

import json

import pytest

from emoverse.tasks import TASKS, LabelTask, register_task


class SarcasmTask(LabelTask):
    name = "sarcasm"
    tag = "<sarcasm>"
    kind = "sarcasm"
    labels = ("sarcastic", "sincere")
    closed = True
    max_new_tokens = 4


@pytest.fixture
def sarcasm_data(tmp_path):
    task = register_task(SarcasmTask())
    try:
        data = tmp_path / "amt"
        for split, n in (("train", 6), ("test", 4)):
            rows = [
                {
                    "id": f"s-{split}-{i}",
                    "task": "sarcasm",
                    "source": "toy",
                    "split": split,
                    "query": task.query(["Oh great, another Monday.", "Thanks, that really helps."][i % 2]),
                    "response": task.format_label(task.labels[i % 2]),
                    "label": task.labels[i % 2],
                }
                for i in range(n)
            ]
            (data / "sarcasm").mkdir(parents=True, exist_ok=True)
            (data / "sarcasm" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        yield data
    finally:
        TASKS.pop("sarcasm", None)


def test_registering_twice_or_reusing_a_tag_is_refused(sarcasm_data):
    with pytest.raises(ValueError, match="taken"):
        register_task(SarcasmTask())


def test_sixth_task_through_validate_eval_and_bench(sarcasm_data, tiny_model_dir, tmp_path):
    from emoverse.bench.runner import BUDGETS, BenchConfig, run_bench
    from emoverse.evaluate import evaluate
    from emoverse.export.bundle import export_bundle
    from emoverse.validate import validate_files

    problems, n = validate_files([str(sarcasm_data / "sarcasm" / "test.jsonl")], check_media=False)
    assert problems == [] and n == 4
    m = evaluate(str(tiny_model_dir), [str(sarcasm_data)], tmp_path / "eval", mode="score", baselines=["majority"])
    res = m["results"]
    assert res["emoverse/score"]["sarcasm.n"] == 4 and "sarcasm.accuracy" in res["majority"]
    assert "sarcasm.accuracy" in m["ci"]["emoverse/score"]
    bundle = export_bundle(tiny_model_dir, tmp_path / "bundle")
    report, _ = run_bench(
        [tmp_path / "bundle"],
        sarcasm_data,
        BUDGETS,
        "cpu",
        tmp_path / "bench",
        BenchConfig(limit=4, warmup=0),
    )
    assert report["results"][0]["tasks"]["sarcasm"]["n"] == 4 and bundle["precision"] == "fp32"
