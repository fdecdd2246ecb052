"""kill -9 in the middle of real runs: no half-written artifact is ever taken for one, and `train`
resumes from its last checkpoint to the same final weights as an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from emoverse.artifacts import ArtifactError, verify


def _train_cmd(data, out, steps=8):
    return [
        sys.executable,
        "-m",
        "emoverse.cli",
        "train",
        "--recipe",
        "tiny",
        f"data={data}",
        f"out={out}",
        "checkpoint_every=1",
        f"stages.0.steps={steps}",
        f"stages.1.steps={steps}",
        "threads=1",
    ]


def _run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]


def _kill_when(cmd, ready, timeout=300, poll=0.05):
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    t0 = time.monotonic()
    while not ready():
        assert proc.poll() is None, "finished before it could be killed"
        assert time.monotonic() - t0 < timeout
        time.sleep(poll)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_kill_during_train_then_resume_is_bit_identical(small_amt, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    _run(_train_cmd(small_amt, full))
    ckpts = part / "checkpoints"
    _kill_when(_train_cmd(small_amt, part), lambda: ckpts.is_dir() and len(list(ckpts.glob("stage1-*"))) >= 1)
    assert not (part / "model").exists()
    _run(_train_cmd(small_amt, part))
    a = load_file(full / "model" / "projector.safetensors")
    b = load_file(part / "model" / "projector.safetensors")
    assert all((a[k] == b[k]).all() for k in a)
    a = load_file(full / "model" / "llm" / "model.safetensors")
    b = load_file(part / "model" / "llm" / "model.safetensors")
    assert all((a[k] == b[k]).all() for k in a)


def test_kill_during_data_build_leaves_no_artifact(raw_dir, tmp_path):
    # the synthetic raw tree builds in well under a second: a busy machine can finish the build between two
    # polls, so the kill is tried afresh a few times until it lands while the temporary folder exists
    for attempt in range(5):
        where = tmp_path / str(attempt)
        where.mkdir()
        out = where / "amt"
        cmd = [sys.executable, "-m", "emoverse.cli", "data", "build", "--raw", str(raw_dir), "--out", str(out)]
        try:
            _kill_when(cmd, lambda w=where: any(p.name.startswith(".amt.tmp-") for p in w.iterdir()), poll=0.002)
        except AssertionError as e:
            if "finished before" in str(e):
                continue
            raise
        break
    else:
        pytest.fail("data build finished before it could be killed, five times")
    assert not out.exists()
    with pytest.raises(ArtifactError):
        verify(out)


def test_kill_during_compress_leaves_no_artifact(tiny_model_dir, small_amt, tmp_path):
    out = tmp_path / "q"
    cmd = [
        sys.executable,
        "-m",
        "emoverse.cli",
        "compress",
        "--recipe",
        "gptq-w4a16",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(small_amt),
        "--out",
        str(out),
        "--eval-limit",
        "0",
    ]
    started = Path(tmp_path)
    _kill_when(cmd, lambda: any(p.name.startswith("emoverse-compress-") for p in started.iterdir()), timeout=300)
    assert not out.exists()


def test_kill_during_export_leaves_no_bundle(tiny_model_dir, tmp_path):
    out = tmp_path / "bundle"
    cmd = [sys.executable, "-m", "emoverse.cli", "export", "--model", str(tiny_model_dir), "--out", str(out)]
    _kill_when(cmd, lambda: any(p.name.startswith(".bundle.tmp-") for p in tmp_path.iterdir()))
    assert not out.exists()


def test_kill_during_bench_keeps_the_previous_report(tiny_model_dir, small_amt, tmp_path):
    from emoverse.export.bundle import export_bundle

    export_bundle(tiny_model_dir, tmp_path / "b")
    out = tmp_path / "report"
    out.mkdir()
    (out / "report.json").write_text('{"previous": true}')
    cmd = [
        sys.executable,
        "-m",
        "emoverse.cli",
        "bench",
        "--bundle",
        str(tmp_path / "b"),
        "--data",
        str(small_amt),
        "--out",
        str(out),
        "--limit",
        "5",
        "--repetitions",
        "500",  # far longer than the 6 s before the kill, on any machine
    ]
    t0 = time.monotonic()
    _kill_when(cmd, lambda: time.monotonic() - t0 > 6)
    assert (out / "report.json").read_text() == '{"previous": true}'  # untouched until a run completes
