"""The `emoverse` command: help on every subcommand, clear errors with exit code 2."""

import subprocess
import sys

import pytest

from emoverse.cli import main


def run(*args):
    return subprocess.run([sys.executable, "-m", "emoverse.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "args", [[], ["data"], ["data", "build"], ["data", "validate"], ["train"], ["eval"], ["table"]]
)
def test_help(args):
    r = run(*args, "--help")
    assert r.returncode == 0 and "usage: emoverse" in r.stdout


def test_unknown_recipe(capsys):
    assert main(["train", "--recipe", "no-such-recipe"]) == 2
    err = capsys.readouterr().err
    assert "no-such-recipe" in err and "nano-quick" in err


def test_bad_override(capsys):
    assert main(["train", "--recipe", "tiny", "batch_size=many"]) == 2
    assert "batch_size" in capsys.readouterr().err


def test_missing_raw_dir(capsys, tmp_path):
    assert main(["data", "build", "--raw", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "raw data directory not found" in capsys.readouterr().err


def test_eval_missing_model(capsys, tmp_path):
    f = tmp_path / "r.jsonl"
    f.write_text("")
    assert main(["eval", "--model", str(tmp_path), "--data", str(f), "--out", str(tmp_path / "o")]) == 2


def test_validate_reports_bad_lines(tmp_path, capsys):
    f = tmp_path / "r.jsonl"
    f.write_text(
        '{"query": "q <emotion>", "response": "Joy.", "task": "mer"}\n{oops\n'
        '{"query": "q", "response": "x", "task": "mer", "label": "happy"}\n'
    )
    assert main(["data", "validate", str(f), "--no-media"]) == 1
    out = capsys.readouterr().out
    assert "r.jsonl:2: invalid JSON" in out and "r.jsonl:3:" in out and "3 records checked, 2 problem(s)" in out


def test_run_streams_eri_as_its_answer(bundle, capsys):
    """`emoverse run --stream` applies ERI's answer form like `answer` does: the same text, streamed."""
    args = ["run", "--bundle", str(bundle), "--task", "eri", "--text", "leave me alone"]
    assert main(args) == 0
    whole = capsys.readouterr().out.strip()
    assert main([*args, "--stream"]) == 0
    assert capsys.readouterr().out.strip() == whole
    assert "Therefore, it is inferred that the person's emotional state is" in whole
