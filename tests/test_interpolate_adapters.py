"""scripts/interpolate_adapters.py on two tiny adapters: every trainable tensor at the interpolated point, the
result an adapter that loads; another model config or an alpha outside [0, 1] refused."""

from pathlib import Path

import pytest
import torch
from script_modules import load_script
from tiny_models import TINY

from emoverse.model import EmoVerse, ModelConfig


def _script():
    return load_script("interpolate_adapters")


def _adapter(out: Path, seed: int, **cfg) -> dict:
    torch.manual_seed(seed)
    m = EmoVerse.build(ModelConfig(**{**TINY, **cfg}))
    m.freeze_base()
    with torch.no_grad():
        for p in m.trainable_parameters().values():
            p.add_(torch.randn_like(p) * 0.05)
    m.save_adapter(out, producer={"stage": "test"})
    return {k: v.detach().clone() for k, v in m.trainable_parameters().items()}


def test_interpolated_adapter_lies_between_its_two_parents(tmp_path):
    script = _script()
    a, b = _adapter(tmp_path / "a", 1), _adapter(tmp_path / "b", 2)
    moved = script.interpolate(str(tmp_path / "a"), str(tmp_path / "b"), 0.25, str(tmp_path / "mix"))
    assert moved == len(a)
    mix = EmoVerse.load_unmerged(tmp_path / "mix").trainable_parameters()
    for k in a:
        assert torch.allclose(mix[k], 0.75 * a[k] + 0.25 * b[k], atol=1e-6), k
    with pytest.raises(ValueError, match="must lie in"):
        script.interpolate(str(tmp_path / "a"), str(tmp_path / "b"), 1.5, str(tmp_path / "no"))
    _adapter(tmp_path / "other", 3, lora_r=TINY.get("lora_r", 8) * 2)
    with pytest.raises(ValueError, match="different model configs"):
        script.interpolate(str(tmp_path / "a"), str(tmp_path / "other"), 0.5, str(tmp_path / "no"))
