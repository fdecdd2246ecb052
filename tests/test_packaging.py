"""Install layout: the pipeline folders import as `emoverse.<stage>`, never as bare top-level names."""

import re
from pathlib import Path

import emoverse

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("train", "compress", "export", "runtime", "bench")


def test_stage_packages_are_namespaced():
    import importlib

    for stage in STAGES:
        mod = importlib.import_module(f"emoverse.{stage}")
        assert Path(mod.__file__).parent == ROOT / stage


def test_no_bare_stage_imports_in_source():
    bare = re.compile(rf"^\s*(from|import)\s+({'|'.join(STAGES)})\b", re.M)
    for py in ROOT.glob("**/*.py"):
        if any(part.startswith(".venv") for part in py.parts) or {"build", "runs", "bundles"} & set(py.parts):
            continue
        assert not bare.search(py.read_text()), py


def test_recipes_ship_as_package_data():
    from emoverse.train.trainer import RECIPES

    assert {p.stem for p in RECIPES.glob("*.yaml")} >= {"tiny", "nano-quick", "nano"}
    assert emoverse.__version__


def test_wheel_contains_the_namespaced_stages(tmp_path):
    import subprocess
    import sys
    import zipfile

    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    (whl,) = tmp_path.glob("emoverse_edge-*.whl")
    names = zipfile.ZipFile(whl).namelist()
    assert "emoverse/train/trainer.py" in names and "emoverse/train/recipes/nano-quick.yaml" in names
    assert not any(n.startswith(("train/", "compress/", "export/", "runtime/", "bench/")) for n in names)
