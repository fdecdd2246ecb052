"""Shared fixtures: a synthetic raw-data tree in every source's real format (tests run anywhere), the real
raw mirror for `real_data` tests (skipped when absent; a failure instead when EMOVERSE_REQUIRE_RAW=1, as in
CI), built AMT folders, a tiny trained model."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))  # tests_synthetic_raw
RAW = Path(os.environ.get("EMOVERSE_RAW", ROOT.parent / "shared" / "data" / "raw"))

torch.set_num_threads(int(os.environ.get("EMOVERSE_TEST_THREADS", "2")))


REQUIRE_RAW = os.environ.get("EMOVERSE_REQUIRE_RAW") == "1"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "real_data" in item.keywords and not RAW.is_dir() and not REQUIRE_RAW:
            item.add_marker(pytest.mark.skip(reason=f"raw data not found at {RAW} (set EMOVERSE_RAW)"))


@pytest.fixture(scope="session")
def real_raw_dir() -> Path:
    """The real raw mirror (tests of the real sources' contents)."""
    if not RAW.is_dir():
        if REQUIRE_RAW:
            pytest.fail(f"EMOVERSE_REQUIRE_RAW=1 but the raw data is not at {RAW}")
        pytest.skip(f"raw data not found at {RAW}")
    return RAW


@pytest.fixture(scope="session")
def real_amt_dir(real_raw_dir, tmp_path_factory) -> Path:
    from emoverse.data import build_amt

    out = tmp_path_factory.mktemp("real-amt") / "amt"
    build_amt(real_raw_dir, out)
    return out


@pytest.fixture(scope="session")
def raw_dir(tmp_path_factory) -> Path:
    """A synthetic raw tree in every source's real format: what the builder and every later stage need."""
    from tests_synthetic_raw import make_raw

    return make_raw(tmp_path_factory.mktemp("raw") / "raw")


@pytest.fixture(scope="session")
def amt_dir(raw_dir, tmp_path_factory) -> Path:
    from emoverse.data import build_amt

    out = tmp_path_factory.mktemp("amt") / "amt"
    build_amt(raw_dir, out)
    return out


@pytest.fixture(scope="session")
def small_amt(amt_dir, tmp_path_factory) -> Path:
    """A few records per task and split, in the same folder layout (fast training/eval)."""
    from emoverse.records import load_records, write_records

    out = tmp_path_factory.mktemp("small") / "amt"
    for f in sorted(amt_dir.rglob("*.jsonl")):
        recs = load_records(f)
        by_source: dict[str, list] = {}
        for r in recs:
            by_source.setdefault(r.source, []).append(r)
        keep = [r for rs in by_source.values() for r in rs[:3]]
        write_records(out / f.parent.name / f.name, keep)
    return out


def _tiny_train_config(data: Path, out: Path, **over):
    from emoverse.config import load_config
    from emoverse.train.trainer import RECIPES, TrainConfig

    overrides = [f"data={data}", f"out={out}"] + [f"{k}={v}" for k, v in over.items()]
    return load_config(TrainConfig, RECIPES / "tiny.yaml", overrides)


@pytest.fixture(scope="session")
def tiny_model_dir(small_amt, tmp_path_factory) -> Path:
    from emoverse.train.trainer import train

    out = tmp_path_factory.mktemp("tiny") / "run"
    model = train(_tiny_train_config(small_amt, out))
    assert model is not None
    return model


@pytest.fixture(scope="session")
def tiny_config():
    """tiny_config(data, out, key=value...) -> TrainConfig from the shipped tiny recipe."""
    return _tiny_train_config


@pytest.fixture()
def face(tmp_path) -> str:
    """A small grey face-sized PNG."""
    from PIL import Image

    p = tmp_path / "face.png"
    Image.new("L", (48, 48), 128).save(p)
    return str(p)


@pytest.fixture(scope="session")
def bundle(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model exported as a cpu fp32 bundle (export, runtime and bench tests share it)."""
    from emoverse.export.bundle import export_bundle

    out = tmp_path_factory.mktemp("bundle") / "cpu"
    export_bundle(tiny_model_dir, out)
    return out


@pytest.fixture(scope="session")
def runtime(bundle):
    from emoverse.runtime.backends import open_runtime

    return open_runtime(bundle)
