"""The prepared GPU check runs anywhere: without CUDA it writes its JSON with every GPU check skipped."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_without_cuda_skips_and_writes_json(tmp_path):
    out = tmp_path / "gpu_check.json"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--out", str(out)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    result = json.loads(out.read_text())
    if not result["cuda"]:
        assert result["training"] == {"skipped": "no CUDA device"} and result["fp8"]["skipped"]
