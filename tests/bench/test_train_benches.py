"""The training benchmarks run end to end on the tiny recipe: throughput rows side by side (one flagged as the
release's settings, which the README's sentence reads) and the loss-parity arms through the real trainer."""

import json

from emoverse.bench import train_parity, train_throughput


def test_train_throughput_rows_and_release_flag(small_amt, tmp_path):
    out = tmp_path / "tp.json"
    res = train_throughput.main(
        [
            "--recipe",
            "tiny",
            "--data",
            str(small_amt),
            "--steps",
            "1",
            "--skip",
            "compile",
            "--lora-from-layer",
            "1",
            "--out",
            str(out),
        ]
    )
    names = [v["name"] for v in res["variants"]]
    assert names == [v[0] for v in train_throughput.VARIANTS if "compile" not in v[0]]
    assert [v["name"] for v in res["variants"] if v["release"]] == [train_throughput.RELEASE_ROW]
    assert res["variants"][0]["speedup_vs_original"] == 1.0
    assert all(v["tokens"] > 0 and v["flops_per_token"] > 0 for v in res["variants"])
    eager = next(v for v in res["variants"] if v["name"] == "+ eager attention")
    assert eager["settings"]["attention"] == "eager"
    assert json.loads(out.read_text()) == res


def test_train_parity_arms_train_and_score_dev(small_amt, tmp_path):
    args = f"--recipe tiny --data {small_amt} --steps 2 --dev-per-task 2 --work {tmp_path / 'work'}".split()
    args += ["--out", str(tmp_path / "parity.json")]
    res = train_parity.main(args)
    assert [a["name"] for a in res["arms"]] == [a[0] for a in train_parity.ARMS]
    for arm in res["arms"]:
        assert len(arm["train_losses"]) == 2
        assert set(arm["dev_loss"]) == {*res["dev_tasks"], "mean"} and "eri" not in res["dev_tasks"]
    # a second run starts each arm afresh (no resume from the first run's checkpoints, no appended log)
    again = train_parity.main(args)
    assert [a["train_losses"] for a in again["arms"]] == [a["train_losses"] for a in res["arms"]]
