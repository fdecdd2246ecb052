"""Knowledge distillation as a trainer recipe (train/distill.py) on the tiny 2-layer teacher."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from emoverse.artifacts import ArtifactError, verify
from emoverse.model import EmoVerse
from emoverse.tasks import TASKS
from emoverse.train.distill import DistillConfig, kd_loss, most_influential
from emoverse.train.release import release
from emoverse.train.trainer import Trainer, train


def _student_config(tiny_config, data, out, teacher, **over):
    return tiny_config(data, out, **{"distill.teacher": str(teacher), "checkpoint_every": 1, **over})


def test_same_depth_student_starts_as_its_teacher(tiny_model_dir, small_amt, tmp_path, tiny_config):
    """All layers kept and fresh LoRA (B = 0): the student's response logits are the teacher's, so the KL
    part of the loss is zero at the first step, and the CE part is the teacher's own loss."""
    over = {"distill.kd_weight": 1.0, "length_buckets": "true"}
    tr = Trainer(_student_config(tiny_config, small_amt, tmp_path / "s", tiny_model_dir, **over))
    task, items = tr.sample_batch(0, 0)
    batch = tr.model.prompts.collate(items)
    assert tr.model.llm.config.num_hidden_layers == tr.teacher.llm.config.num_hidden_layers == 2
    with torch.no_grad():
        assert abs(float(tr.loss(tr.model, batch))) < 1e-5
        s_logits, targets = tr.model.response_logits(batch)
        t_logits, _ = tr.teacher.response_logits(batch)
    ce = torch.nn.functional.cross_entropy(t_logits, targets)
    half = kd_loss(s_logits, t_logits, targets, DistillConfig(kd_weight=0.5))
    assert torch.allclose(half, 0.5 * ce, atol=1e-5)


def test_kd_loss_grows_with_disagreement():
    t = torch.tensor([[4.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    y = torch.tensor([0, 1])
    cfg = DistillConfig(kd_weight=1.0, temperature=2.0)
    near = kd_loss(t + 0.1 * torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]), t, y, cfg)
    far = kd_loss(t.flip(-1), t, y, cfg)
    assert 0 < near < far


def test_most_influential_keeps_model_order():
    assert most_influential([0.1, 0.5, 0.2, 0.5], 2) == [1, 3]
    assert most_influential([0.3, 0.3, 0.1], 1) == [0]  # a tie goes to the earlier layer


def test_pruned_student_trains_saves_and_resumes(tiny_model_dir, small_amt, tmp_path, tiny_config):
    full = tmp_path / "full"
    model_dir = train(_student_config(tiny_config, small_amt, full, tiny_model_dir, **{"distill.keep_layers": 1}))
    m = verify(model_dir, kind="emoverse-model")
    d = m["distill"]
    assert d["teacher"]["digest"] and d["teacher_layers"] == 2 and len(d["kept_layers"]) == 1
    assert d["kept_layers"][0] == max(range(2), key=d["layer_importance"].__getitem__)
    assert json.loads((full / "student.json").read_text())["kept_layers"] == d["kept_layers"]
    student = EmoVerse.load(model_dir)
    assert student.llm.config.num_hidden_layers == 1
    assert isinstance(student.generate(TASKS["mer"].query("hi"), max_new_tokens=3), str)
    # killed after 2 steps, resumed: the same student (read back from student.json) and the same weights
    part = tmp_path / "part"
    over = {"distill.keep_layers": 1, "halt_after": 2}
    assert train(_student_config(tiny_config, small_amt, part, tiny_model_dir, **over)) is None
    train(_student_config(tiny_config, small_amt, part, tiny_model_dir, **{"distill.keep_layers": 1}))
    a, b = (_last_trainable(r) for r in (full, part))
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] == b[k]).all(), k
    with pytest.raises(ArtifactError, match="no adapter form"):
        release(full, tmp_path / "rel")


def _last_trainable(run: Path) -> dict:
    ckpts = sorted((run / "checkpoints").iterdir(), key=lambda p: [int(x) for x in p.name[5:].split("-step")])
    return load_file(ckpts[-1] / "trainable.safetensors")


@pytest.mark.parametrize(
    "over,msg",
    [
        ({"distill.keep_layers": 5}, r"keep_layers=5 must be between 1 and 2"),
        ({"init_from": "x"}, "a student starts from its teacher"),
    ],
)
def test_student_recipe_errors(tiny_model_dir, small_amt, tmp_path, tiny_config, over, msg):
    with pytest.raises(ValueError, match=msg):
        Trainer(_student_config(tiny_config, small_amt, tmp_path / "s", tiny_model_dir, **over))


def test_shipped_student_recipe_is_valid():
    from emoverse.config import load_config
    from emoverse.train.trainer import RECIPES, TrainConfig

    cfg = load_config(TrainConfig, RECIPES / "nano-student.yaml", [])
    assert cfg.distill.teacher == "models/emoverse-nano" and 0 < cfg.distill.keep_layers < 30
    assert cfg.init_from is None
