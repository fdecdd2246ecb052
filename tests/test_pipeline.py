"""`emoverse pipeline` on the tiny recipe: raw data to bench report, then a rerun that skips every stage."""

import json

from emoverse.config import load_config
from emoverse.pipeline import PIPELINES, Pipeline, PipelineConfig


def test_pipeline_runs_then_skips(raw_dir, tmp_path):
    cfg = load_config(PipelineConfig, PIPELINES / "tiny.yaml")
    logs: list[str] = []
    report, failures = Pipeline(cfg, raw_dir, tmp_path, log=logs.append).run()
    assert [r["bundle"] for r in report["results"]] == ["cpu-fp32", "cpu-int8"]
    assert (tmp_path / "bench" / "report.md").is_file() and (tmp_path / "compare" / "compare.md").is_file()
    assert not any("skipped" in x for x in logs)
    logs.clear()
    Pipeline(cfg, raw_dir, tmp_path, log=logs.append).run()
    assert sum("skipped" in x for x in logs) == 5 and not any(
        "running" in x for x in logs
    )  # data, train, fp8, 2 exports
    # a changed export setting redoes that export only
    cfg.exports[1].precision = "int4"
    logs.clear()
    Pipeline(cfg, raw_dir, tmp_path, log=logs.append).run()
    assert [x for x in logs if "running" in x] == [
        f"[pipeline] export-cpu-int8: running -> {tmp_path}/bundles/cpu-int8"
    ]
    state = json.loads((tmp_path / ".pipeline" / "train.json").read_text())
    assert state["digest"]


def test_shipped_pipelines_parse():
    for name in ("tiny", "nano-quick"):
        cfg = load_config(PipelineConfig, PIPELINES / f"{name}.yaml")
        assert cfg.exports


def test_shipped_pipelines_export_what_they_compress():
    """Every shipped pipeline parses through the typed loader and each export names the teacher or one of its
    compress entries; the quick start ships the compressed artifact itself (not a re-quantized teacher)."""
    from emoverse.config import load_config
    from emoverse.pipeline import PIPELINES, PipelineConfig

    for path in sorted(PIPELINES.glob("*.yaml")):
        cfg = load_config(PipelineConfig, path)
        names = {"teacher"} | {c.name for c in cfg.compress}
        assert all(e.model in names for e in cfg.exports), path.name
    release = load_config(PipelineConfig, PIPELINES / "release.yaml")
    cpu = next(e for e in release.exports if e.name == "cpu-w4")
    assert cpu.model == "w4-base-lora" and cpu.precision is None and cpu.embedding_bits == 8 and cpu.int8_activations
