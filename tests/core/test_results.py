"""Results files: built from eval metrics, refuse samples, markdown regenerated from the JSON alone."""

import json
from pathlib import Path

import pytest

from emoverse import results


def _metrics(tmp_path, limit=None):
    m = {
        "limit": limit,
        "split": "test",
        "records": {"mer/meld": 3},
        "results": {
            "emoverse/score": {"mer.weighted_f1": 0.64, "mer.accuracy": 0.66, "mer.n": 3},
            "tfidf-lr": {"mer.weighted_f1": 0.47, "mer.accuracy": 0.52, "mer.n": 3},
            "majority": {"mer.weighted_f1": 0.30, "mer.accuracy": 0.48, "mer.n": 3},
        },
        "ci": {"emoverse/score": {"mer.weighted_f1": [0.62, 0.66]}},
    }
    p = tmp_path / "metrics.json"
    p.write_text(json.dumps(m))
    return p


def test_results_rows_targets_and_baselines(tmp_path):
    res = results.build([_metrics(tmp_path)])
    row = next(r for r in res["rows"] if r["group"] == "mer" and r["metric"] == "weighted_f1")
    assert row["primary"] and row["target"] == 0.63 and row["meets_target"] is True
    assert (
        row["beats_every_baseline"] is True
        and row["best_baseline"] == ["tfidf-lr", 0.47]
        or row["best_baseline"] == ("tfidf-lr", 0.47)
    )
    out, md = results.write(res, tmp_path / "r.json")
    text = md.read_text()
    assert "0.640 [0.620, 0.660]" in text and "≥ 0.63 (met)" in text
    # the markdown is a pure function of the JSON: regenerating gives the same file
    again = results.markdown(json.loads(out.read_text()))
    assert again == text


def test_results_label_sampled_evals(tmp_path):
    res = results.build([_metrics(tmp_path, limit=100)])
    assert all(r["sample_limit"] == 100 for r in res["rows"])
    assert "mer: a seeded random sample of at most 100 test records per source" in results.markdown(res)


def test_readme_table_matches_the_results_files():
    """README's results table is exactly what `emoverse results --readme` generates from docs/results."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    if not (root / "docs" / "results" / "emoverse-nano.json").is_file():
        pytest.skip("no docs/results/emoverse-nano.json yet")
    text = (root / "README.md").read_text(encoding="utf-8")
    table = text.split(results.BEGIN, 1)[1].split(results.END, 1)[0].strip()
    assert table == results.readme_table(root / "docs" / "results").strip()
    assert len(text.splitlines()) <= 200


def test_compression_rows_in_the_readme_table():
    """The README's compression rows come from compression.json: size ratio and per-task paired ratio + CI,
    its verdict against 99% and the identical answers, against the reference the report names."""
    from emoverse import results

    report = {
        "size_reference_bytes": 600e6,
        "rows": [
            {"variant": "teacher", "bytes": 600e6, "size_ratio": 1.0, "paired": {}},
            {
                "variant": "w4",
                "bytes": 100e6,
                "size_ratio": 6.0,
                "paired": {
                    "msa": {
                        "ratio": 0.98,
                        "ratio_ci": [0.97, 0.99],
                        "verdict_99": "inconclusive",
                        "identical_answers": 0.953,
                    }
                },
                "latency": {"msa": {"p90_ms": 81.4}},
            },
        ],
    }
    lines = results.compression_table(report)
    row = next(line for line in lines if line.startswith("| w4 |"))
    assert "| 100.0 | 6.00 |" in row and "98.0% [97.0%, 99.0%] ?, 95% same, p90 81 ms" in row
    assert row.count("| – ") == 4 and "ratio to **teacher**" in lines[0]
    assert "p90 ms where benched" in lines[0]  # a report that does not say which machine timed it
    report["latency_from"] = {"bench": "runs/b/report.json", "cpu": "CPU A", "cores": 2, "records_per_task": 5}
    head = results.compression_table(report, "compression-a.json")[0]
    assert "`docs/results/compression-a.json`" in head
    assert "p90 ms from one bench run on CPU A, 2 cores, 5 test records per task and source" in head
    report["latency_from"] = [  # two runs of one machine (compare --bench A --bench B)
        {"bench": "a.json", "cpu": "CPU A", "cores": 2, "records_per_task": 50, "tasks": ["fer", "mer", "msa"]},
        {"bench": "b.json", "cpu": "CPU A", "cores": 2, "records_per_task": 10, "tasks": ["ecpe", "eri"]},
    ]
    head = results.compression_table(report, "compression-a.json")[0]
    assert (
        "p90 ms on CPU A, 2 cores: fer, mer, msa from `a.json` (50 per task and source); ecpe, eri from `b.json`"
        in head
    )


def test_readme_renders_compression_reports_timed_on_another_machine(tmp_path):
    """compression.json first, then each compression-*.json that joined a bench run; other compare reports
    (no bench: e.g. a ROUGE-L side table) stay out of the README."""
    row = {"variant": "teacher", "bytes": 6e8, "size_ratio": 1.0, "paired": {}}
    base = {"size_reference_bytes": 6e8, "rows": [row]}
    nano = json.loads((Path(__file__).resolve().parents[2] / "docs/results/emoverse-nano.json").read_text())
    (tmp_path / "emoverse-nano.json").write_text(json.dumps(nano))
    (tmp_path / "compression.json").write_text(json.dumps(base))
    (tmp_path / "compression-rouge.json").write_text(json.dumps(base))
    timed = {**base, "latency_from": {"bench": "b.json", "cpu": "CPU B", "cores": 2, "records_per_task": 10}}
    (tmp_path / "compression-b.json").write_text(json.dumps(timed))
    text = results.readme_table(tmp_path)
    assert text.index("`docs/results/compression.json`") < text.index("`docs/results/compression-b.json`")
    assert "compression-rouge.json" not in text


def test_throughput_line_reads_the_flagged_release_row(tmp_path):
    """The README's throughput sentence: per machine, the row flagged `release` (older files: named
    "(release)") against the first row, and the lever that row ends on."""
    rows = [
        {"name": "original", "tokens_per_s": 100.0, "speedup_vs_original": 1.0},
        {"name": "+ eager attention", "tokens_per_s": 250.0, "speedup_vs_original": 2.5},
        {"name": "+ no LoRA dropout", "tokens_per_s": 320.0, "speedup_vs_original": 3.2, "release": True},
        {"name": "+ torch.compile", "tokens_per_s": 290.0, "speedup_vs_original": 2.9, "release": False},
    ]
    (tmp_path / "train-throughput-a.json").write_text(json.dumps({"cpu": "CPU A", "variants": rows}))
    old = [{**r, "name": r["name"] + (" (release)" if i == 1 else "")} for i, r in enumerate(rows[:2])]
    old.append({"name": "+ last", "tokens_per_s": 1.0, "speedup_vs_original": 0.01})
    (tmp_path / "train-throughput-b.json").write_text(json.dumps({"cpu": "CPU B", "variants": old}))
    line = results.throughput_line(tmp_path)
    assert "CPU A, 100 → 320 tokens/s, **3.20×** up to “+ no LoRA dropout”" in line
    assert "CPU B, 100 → 250 tokens/s, **2.50×** up to “+ eager attention”" in line
    assert results.throughput_line(tmp_path / "none") is None


def test_results_file_extended_by_a_later_baseline(tmp_path):
    """A results JSON given as metrics keeps every value, CI, n, date and machine; a baseline evaluated later
    joins its rows (and can take 'beats every baseline' away)."""
    res = results.build([_metrics(tmp_path)])
    res.update(created="2026-01-01", machine={"cpu": "Some CPU", "cores": 2})
    first, _ = results.write(res, tmp_path / "r.json")
    again = results.build([first])
    assert again["rows"] == res["rows"] and again["systems"] == res["systems"]
    assert (again["created"], again["machine"]["cpu"]) == ("2026-01-01", "Some CPU") and len(again["extended"]) == 1
    later = tmp_path / "later.json"
    later.write_text(
        json.dumps(
            {
                "limit": None,
                "split": "test",
                "records": {"mer/meld": 3},
                "results": {"strong": {"mer.weighted_f1": 0.70, "mer.n": 3}},
                "ci": {},
            }
        )
    )
    ext = results.build([first, later])
    row = next(r for r in ext["rows"] if r["group"] == "mer" and r["metric"] == "weighted_f1")
    assert row["systems"]["emoverse/score"] == {"value": 0.64, "ci": [0.62, 0.66]} and row["n"] == 3
    assert row["best_baseline"] in (["strong", 0.70], ("strong", 0.70)) and row["beats_every_baseline"] is False
    assert ext["systems"][-1] == "strong" and [e.get("path") for e in ext["evals"]][-1] == str(later)


def test_throughput_line_reads_only_runs_against_the_original_settings(tmp_path):
    """A bench run with rows skipped (e.g. packing against the release settings) is no "× the original" claim."""
    import json

    from emoverse.results import throughput_line

    def run(name, first, release):
        rows = [
            {"name": first, "tokens_per_s": 100.0, "speedup_vs_original": 1.0},
            {"name": release, "tokens_per_s": 300.0, "speedup_vs_original": 3.0, "release": True},
        ]
        (tmp_path / name).write_text(json.dumps({"cpu": "CPU X", "variants": rows}))

    run("train-throughput.json", "original (fp32)", "+ no LoRA dropout")
    run("train-throughput-ab.json", "+ no LoRA dropout", "+ shared-prefix packing of ECPE")
    line = throughput_line(tmp_path)
    assert "100 → 300 tokens/s, **3.00×**" in line and "train-throughput.json" in line
    assert "train-throughput-ab.json" not in line


def test_readme_marks_compression_measured_on_an_earlier_release(tmp_path):
    """A compare report whose reference bundle was built from another release (bundles/TAG/...) is marked as
    measured on an earlier release; once one built from the current release exists (shown even without a
    bench run), the earlier ones leave the README for a one-line pointer."""
    release = tmp_path / "models" / "emoverse-nano"
    release.mkdir(parents=True)
    (release / "manifest.json").write_text('{"kind": "emoverse-adapter"}')
    tag = results.release_tag(release)
    row = {"variant": "teacher", "bytes": 6e8, "size_ratio": 1.0, "paired": {}}
    nano = json.loads((Path(__file__).resolve().parents[2] / "docs/results/emoverse-nano.json").read_text())
    docs = tmp_path / "docs" / "results"
    docs.mkdir(parents=True)
    (docs / "emoverse-nano.json").write_text(json.dumps(nano))
    old = {"reference": "bundles/0123456789ab/release-fp32", "size_reference_bytes": 6e8, "rows": [row]}
    (docs / "compression.json").write_text(json.dumps(old))
    alone = results.readme_table(docs)  # the release beside docs/ is found by default
    head = next(line for line in alone.splitlines() if "`docs/results/compression.json`" in line)
    assert head.startswith("**Measured on an earlier release** (its bundles: `bundles/0123456789ab/`")
    assert "earlier release" not in results.readme_table(docs, release=tmp_path / "nowhere")
    # once a report of the current release exists, it replaces the earlier ones, which are named in one line
    (docs / "compression-now.json").write_text(json.dumps({**old, "reference": f"bundles/{tag}/release-fp32"}))
    text = results.readme_table(docs)
    now = next(line for line in text.splitlines() if "`docs/results/compression-now.json`" in line)
    assert now.startswith("Compression (") and "| teacher |" in text
    assert text.splitlines()[-1] == "Measured on an earlier release: `docs/results/compression.json`."
    # a paired_by_source.py report of the current release beside them (rows by task, no sizes) is not a table
    paired = {"reference": f"runs/compression/{tag}/eval/a.jsonl", "rows": {"eri": {"ratio": 1.0}}}
    (docs / "compression-now-eri-rouge.json").write_text(json.dumps(paired))
    assert results.readme_table(docs) == text
