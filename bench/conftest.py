import os
from pathlib import Path

import pytest
import torch

from emoverse.data import build_amt
from emoverse.records import load_records

ROOT = Path(__file__).resolve().parents[1]
RAW = Path(os.environ.get("EMOVERSE_RAW", ROOT.parent / "shared" / "data" / "raw"))
torch.set_num_threads(int(os.environ.get("EMOVERSE_THREADS", "2")))


@pytest.fixture(scope="session")
def amt_records(tmp_path_factory):
    if not RAW.is_dir():
        pytest.skip(f"raw data not found at {RAW}")

    out = tmp_path_factory.mktemp("amt") / "amt"
    build_amt(RAW, out, sources=["meld", "ckplus"])
    return {t: load_records(out / t / "train.jsonl") for t in ("mer", "fer")}
