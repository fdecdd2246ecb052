"""M2SE trainer on a tiny random model: stages, resume equality, recipe errors, DDP (gloo, 2 processes)."""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from safetensors.torch import load_file

from emoverse.artifacts import verify
from emoverse.config import RecipeError, load_config
from emoverse.train.trainer import RECIPES, TrainConfig, Trainer, train


def _trainable(run: Path) -> dict:
    ckpts = sorted((run / "checkpoints").iterdir(), key=lambda p: [int(x) for x in p.name[5:].split("-step")])
    return load_file(ckpts[-1] / "trainable.safetensors")


def test_train_writes_artifact_and_log(tiny_model_dir):
    m = verify(tiny_model_dir, kind="emoverse-model")
    assert m["training"]["steps"] == 6
    assert set(m["inputs"]["data"]["train_files"]) == {"msa", "mer", "fer", "eri", "ecpe"}
    run = tiny_model_dir.parent
    log = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    assert {x["stage"] for x in log} == {"stage1", "stage2"}
    stage2_tasks = {x["task"] for x in log if x["stage"] == "stage2"}
    assert stage2_tasks <= {"msa", "eri", "mer", "ecpe"}


def test_resume_reaches_the_same_weights(small_amt, tmp_path, tiny_config):
    full = tmp_path / "full"
    train(tiny_config(small_amt, full, checkpoint_every=1))
    part = tmp_path / "part"
    assert train(tiny_config(small_amt, part, checkpoint_every=1, halt_after=4)) is None  # "killed" mid stage 2
    assert not (part / "model").exists()
    train(tiny_config(small_amt, part, checkpoint_every=1))
    a, b = _trainable(full), _trainable(part)
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] == b[k]).all(), k  # bit-identical on CPU


def test_sampling_follows_stage_weights(small_amt, tmp_path, tiny_config):
    cfg = tiny_config(small_amt, tmp_path, **{"stages.0.task_weights.fer": 0.0, "stages.0.task_weights.mer": 0.0})
    tr = Trainer(cfg)
    assert {tr.sample_batch(0, s)[0] for s in range(20)} == {"msa"}


def test_unknown_task_in_recipe(small_amt, tmp_path, tiny_config):
    cfg = tiny_config(small_amt, tmp_path, **{"stages.0.task_weights.xyz": 1.0})
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['xyz'\]"):
        Trainer(cfg)


@pytest.mark.parametrize(
    "override,msg",
    [("batch_sise=3", "batch_sise"), ("batch_size=abc", "batch_size"), ("model.lora_r=x", "lora_r")],
)
def test_bad_recipe_values_fail_before_work(override, msg):
    with pytest.raises(RecipeError, match=msg):
        load_config(TrainConfig, RECIPES / "tiny.yaml", [override])


def test_shipped_recipes_parse():
    for name in ("tiny", "nano-quick", "nano", "nano-release"):
        cfg = load_config(TrainConfig, RECIPES / f"{name}.yaml")
        assert len(cfg.stages) == 2
    # the v2 release recipe: one more stage on top of the v1 release, with the face encoder
    cfg = load_config(TrainConfig, RECIPES / "nano-release-face.yaml")
    assert len(cfg.stages) == 1 and cfg.init_from and cfg.model.face_encoder == "mini-xception-fer2013"
    # experiments on top of the v2 release (docs/history.md): one stage each, from the shipped release
    for name in ("exp-v2-faces", "exp-v2-probe"):
        cfg = load_config(TrainConfig, RECIPES / f"{name}.yaml")
        assert len(cfg.stages) == 1 and cfg.init_from == "models/emoverse-nano"
    # the next GPU release: v3 trained on for one time-bounded stage, every task in it, ERI's share raised
    cfg = load_config(TrainConfig, RECIPES / "nano-release-gpu-long.yaml")
    (stage,) = cfg.stages
    assert cfg.init_from == "models/emoverse-nano" and stage.anneal_in_time and stage.max_minutes
    assert set(stage.task_weights) == {"msa", "mer", "fer", "eri", "ecpe"} and stage.task_weights["eri"] > 0.05


def test_a_stage_trains_exactly_the_tasks_its_recipe_names():
    """A stage's task_weights replace the default mix (OmegaConf merges mappings: a default {msa: 1} once
    added MSA to every stage that did not name it)."""
    cfg = load_config(TrainConfig, {"stages": [{"name": "s", "task_weights": {"fer": 1.0}}]})
    assert cfg.stages[0].task_weights == {"fer": 1.0}
    assert load_config(TrainConfig, None).stages[0].task_weights == {"msa": 1.0}
    cfg = load_config(TrainConfig, RECIPES / "exp-v2-probe.yaml")
    assert cfg.stages[0].task_weights == {"fer": 1.0} and cfg.train_lora is False and cfg.model.face_probe_token


def test_ddp_two_cpu_processes(small_amt, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=29533",
        "-m",
        "emoverse.cli",
        "train",
        "--recipe",
        "tiny",
        f"data={small_amt}",
        f"out={out}",
        "threads=1",
    ]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    m = verify(out / "model", kind="emoverse-model")
    assert m["training"]["steps"] == 6


def test_init_from_a_release_keeps_its_weights_and_adds_a_face_projector(small_amt, tmp_path, tiny_config):
    """A run that starts from a release (init_from) begins with its LoRA and projector exactly; a face
    encoder the release lacked gets a fresh projector, named in the summary; a mismatched LoRA is refused."""
    import torch

    from emoverse.model import EmoVerse

    cfg = tiny_config(small_amt, tmp_path / "a")
    parent = EmoVerse.build(cfg.model)
    parent.freeze_base()
    with torch.no_grad():
        for p in parent.trainable_parameters().values():
            p.add_(torch.randn_like(p) * 0.05)
    parent.save_adapter(tmp_path / "parent", producer={"stage": "test"})

    child = Trainer(
        tiny_config(
            small_amt,
            tmp_path / "b",
            init_from=tmp_path / "parent",
            **{"model.face_encoder": "mini-xception-random", "model.face_grid": 2},
        )
    )
    want = parent.trainable_parameters()
    got = child.params
    assert set(want) < set(got)
    for k, v in want.items():
        assert torch.equal(got[k], v), k
    assert {"face_fc1", "face_fc2", "face_norm"} <= set(child.init_info["new_parameters"])
    assert child.init_info["digest"]

    with pytest.raises(ValueError, match="do not fit"):
        Trainer(tiny_config(small_amt, tmp_path / "c", init_from=tmp_path / "parent", **{"model.lora_r": 2}))


def test_a_projector_only_stage_fits_the_face_probe_and_holds_lora(amt_dir, tmp_path, tiny_config):
    """train_lora: false with a face-probe token: the probe is fitted on the FER train faces before step 1 and
    never changes, LoRA stays the parent's bit for bit (text-only answers unchanged), the projector trains but
    for the part `hold` names (the face-label word), which keeps the parent's values."""
    import torch
    from safetensors.torch import load_file

    from emoverse.model import EmoVerse
    from emoverse.train.release import last_checkpoint

    face = {"model.face_encoder": "mini-xception-random", "model.face_grid": 2, "model.face_label_token": True}
    parent = EmoVerse.build(tiny_config(amt_dir, tmp_path / "a", **face).model)
    parent.freeze_base()
    with torch.no_grad():
        for p in parent.trainable_parameters().values():
            p.add_(torch.randn_like(p) * 0.05)
    parent.save_adapter(tmp_path / "parent", producer={"stage": "test"})
    over = {
        **face,
        "model.face_probe_token": True,
        "train_lora": False,
        "init_from": tmp_path / "parent",
        "hold": "[projector.face_label]",
        "stages": "[{name: s, steps: 2, lr: 0.01, warmup_steps: 1, task_weights: {fer: 1.0}}]",
    }
    with pytest.raises(ValueError, match="names no adapter parameter"):
        Trainer(tiny_config(amt_dir, tmp_path / "c", **{**over, "hold": "[projector.face_lable]"}))
    with pytest.raises(ValueError, match="set init_from"):
        Trainer(tiny_config(amt_dir, tmp_path / "d", **{**over, "init_from": "null"}))
    child = Trainer(tiny_config(amt_dir, tmp_path / "b", **over))
    assert child.face_probe_info["records"] > 0
    fitted = child.model.projector.face_probe.weight.detach().clone()
    assert fitted.any()
    train(child.cfg)
    weights = load_file(last_checkpoint(tmp_path / "b") / "trainable.safetensors")
    want = parent.trainable_parameters()
    assert all(torch.equal(weights[k], v) for k, v in want.items() if "lora_" in k)
    assert torch.equal(weights["projector.face_probe.weight"], fitted)
    assert not torch.equal(weights["projector.face_fc1.weight"], want["projector.face_fc1.weight"])
    assert torch.equal(weights["projector.face_label.weight"], want["projector.face_label.weight"])  # held


def test_a_time_annealed_stage_decays_by_its_clock(small_amt, tmp_path, tiny_config, monkeypatch):
    """anneal_in_time: the cosine runs on whichever is further along, steps or the time budget; without it
    the clock changes nothing."""
    import emoverse.train.trainer as trainer_module

    now = [1000.0]
    monkeypatch.setattr(trainer_module.time, "monotonic", lambda: now[0])
    lrs = {}
    for anneal in (False, True):
        cfg = tiny_config(
            small_amt,
            tmp_path / str(anneal),
            **{"stages.0.steps": 100, "stages.0.warmup_steps": 1, "stages.0.max_minutes": 1.0},
            **{"stages.0.anneal_in_time": anneal},
        )
        tr = Trainer(cfg)
        tr._stage_clock = now[0]
        opt, sched = tr._optimizer(cfg.stages[0])
        lambda_at = sched.lr_lambdas[0]
        now[0] += 30.0  # half the budget, one step in
        lrs[anneal] = lambda_at(1)
        now[0] += 60.0  # the budget spent
        lrs[(anneal, "end")] = lambda_at(1)
        now[0] = 1000.0
    assert lrs[False] == lrs[(False, "end")] > 0.99  # step 1 of 100: still at the top
    assert lrs[True] == pytest.approx(0.1 + 0.9 * 0.5)  # halfway by the clock
    assert lrs[(True, "end")] == pytest.approx(0.1)  # the floor once the budget is spent


def test_the_trainer_places_the_model_on_its_device(small_amt, tmp_path, tiny_config):
    import torch

    tr = Trainer(tiny_config(small_amt, tmp_path, device="cpu"))
    assert tr.device == torch.device("cpu") and tr.model.device == torch.device("cpu")
    for bad, msg in (("nodevice", "use auto, cpu"), ("meta", "use auto, cpu")):
        with pytest.raises(ValueError, match=msg):
            Trainer(tiny_config(small_amt, tmp_path / "bad", device=bad))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            Trainer(tiny_config(small_amt, tmp_path / "bad", device="cuda"))


def test_packed_ecpe_batches_train_and_image_tasks_are_refused(small_amt, tmp_path, tiny_config):
    """pack_tasks: ECPE batches arrive as one packed row (and train); a task with images cannot be packed,
    an unknown one is named; both fail before any step."""
    cfg = tiny_config(small_amt, tmp_path / "run", pack_tasks="[ecpe]", pack_max_tokens=4000)
    tr = Trainer(cfg)
    ecpe_steps = [s for s in range(40) if tr.sample_batch(1, s)[0] == "ecpe"]  # stage 2 samples ECPE
    assert ecpe_steps
    task, items = tr.sample_batch(1, ecpe_steps[0])
    batch = tr.collate(task, items)
    assert batch["input_ids"].shape[0] == 1 and batch["attention_mask"].dim() == 4
    assert batch["n_tokens"] == sum(len(e.input_ids) for e in items)
    assert train(cfg) is not None
    with pytest.raises(ValueError, match="pack_tasks: 'fer' has records with images"):
        Trainer(tiny_config(small_amt, tmp_path / "fer", pack_tasks="[fer]"))
    with pytest.raises(ValueError, match=r"pack_tasks: unknown task\(s\) \['xyz'\]"):
        Trainer(tiny_config(small_amt, tmp_path / "xyz", pack_tasks="[xyz]"))


def test_init_from_a_run_model_folder_says_how_to_get_its_adapter(tiny_model_dir, small_amt, tmp_path, tiny_config):
    with pytest.raises(FileNotFoundError, match="emoverse release --run RUN --out DIR"):
        Trainer(tiny_config(small_amt, tmp_path, init_from=str(tiny_model_dir)))


def test_image_views_are_drawn_deterministically_and_change_the_pixels(small_amt, tmp_path, tiny_config):
    """image_views: a drawn FER batch's still images become training views (or stay as they are), the same
    ones for the same step (a resumed run sees the same views); each view has its own cached features and
    other pixels than the image, the same on every load."""
    import numpy as np

    from emoverse.imaging import load_pixels

    cfg = tiny_config(small_amt, tmp_path, image_views=4, **{"stages.0.task_weights": {"fer": 1.0}})
    tr = Trainer(cfg)
    views = [m.view for s in range(12) for e in tr.sample_batch(0, s)[1] for m in e.media]
    assert set(views) - {None} <= {0, 1, 2, 3} and len(set(views) - {None}) > 1 and None in views
    again = [m.view for s in range(12) for e in tr.sample_batch(0, s)[1] for m in e.media]
    assert again == views
    ref = next(m for s in range(12) for e in tr.sample_batch(0, s)[1] for m in e.media if m.view is not None)
    assert ref.key == f"{ref.path}~view{ref.view}"
    size = tr.model.cfg.image_size
    view = load_pixels(ref.path, size, view=ref.view)
    assert view.shape == load_pixels(ref.path, size).shape
    assert not np.allclose(view, load_pixels(ref.path, size)) and np.array_equal(
        view, load_pixels(ref.path, size, view=ref.view)
    )
    assert not np.array_equal(view, load_pixels(ref.path, size, view=ref.view + 1))
    tr.model.media_features([ref], cache=True)
    assert ref.key in tr.model._feature_cache and ref.path not in tr.model._feature_cache
    with pytest.raises(ValueError, match="image_views=-1"):
        Trainer(tiny_config(small_amt, tmp_path / "neg", image_views=-1))
    # off by default: the images as they are
    plain = Trainer(tiny_config(small_amt, tmp_path / "plain", **{"stages.0.task_weights": {"fer": 1.0}}))
    assert {m.view for e in plain.sample_batch(0, 0)[1] for m in e.media} == {None}


def test_bf16_recipe_trains_in_fp32_where_the_cpu_would_emulate_it(small_amt, tmp_path, tiny_config, monkeypatch):
    monkeypatch.setattr("emoverse.artifacts.cpu_runs_bf16", lambda: False)  # e.g. an AVX2-only AMD EPYC
    with pytest.warns(UserWarning, match="no bf16 instructions"):
        tr = Trainer(tiny_config(small_amt, tmp_path / "cpu", device="cpu", precision="bf16"))
    assert tr.precision == "fp32"
    monkeypatch.setattr("emoverse.artifacts.cpu_runs_bf16", lambda: True)
    tr = Trainer(tiny_config(small_amt, tmp_path / "bf16", device="cpu", precision="fp32"))
    assert tr.precision == "fp32"
    tr.cfg = replace(tr.cfg, precision="bf16")  # the throughput bench swaps the config per row
    assert tr.precision == "bf16"
