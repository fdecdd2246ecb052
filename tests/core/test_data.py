"""The AMT builder on the real raw data: counts, label sets, splits, equality with the paper's files."""

import json
import re
import shutil

import pytest

from emoverse.artifacts import read_manifest, verify
from emoverse.data import build_amt
from emoverse.records import load_records
from emoverse.sources import SourceError
from emoverse.tasks import TASKS


@pytest.mark.real_data
def test_counts_and_manifest(real_amt_dir):
    m = verify(real_amt_dir, kind="amt-data")
    c = m["counts"]
    assert c["mer"]["train"]["total"] == 9989 and c["mer"]["test"]["total"] == 2610
    assert c["mer"]["dev"]["total"] == 1109
    assert c["msa"]["test"]["by_source"]["mosi"] + c["msa"]["test"]["by_source"]["meld"] == c["msa"]["test"]["total"]
    assert c["ecpe"]["test"]["by_source"]["ecf2"] == 1821
    assert c["fer"]["test"]["by_source"]["fer2013"] == 3589
    n_ck = sum(c["fer"][s]["by_source"].get("ckplus", 0) for s in ("train", "dev", "test"))
    assert n_ck == 981
    assert m["dropped"]["mosi: zero sentiment score"] > 0
    assert "meld/train_sent_emo.csv" in m["inputs"]["raw_files"]


@pytest.mark.real_data
def test_label_sets(real_amt_dir):
    for task in ("msa", "mer", "fer"):
        labels = {r.label for r in load_records(real_amt_dir / task)}
        assert labels <= set(TASKS[task].labels), task
    assert {r.label for r in load_records(real_amt_dir / "mer")} == set(TASKS["mer"].labels)
    assert {r.label for r in load_records(real_amt_dir / "msa")} == {"positive", "negative"}


@pytest.mark.real_data
def test_ckplus_split_is_subject_disjoint(real_amt_dir):
    subjects = {}
    for r in load_records(real_amt_dir / "fer"):
        if r.source == "ckplus":
            subjects.setdefault(r.split, set()).add(r.id.split("-")[1].split("_")[0])
    splits = list(subjects)
    assert set(splits) == {"train", "dev", "test"}
    for i, a in enumerate(splits):
        for b in splits[i + 1 :]:
            assert not subjects[a] & subjects[b], (a, b)


@pytest.mark.real_data
def test_ckplus_responses_carry_action_units(real_amt_dir):
    recs = [r for r in load_records(real_amt_dir / "fer" / "train.jsonl") if r.source == "ckplus"]
    with_aus = [r for r in recs if "Facial action units:" in r.response]
    assert len(with_aus) == len(recs)
    assert any("AU4 brow lowerer" in r.response for r in recs)
    assert all(len(r.images) == 1 for r in recs)


@pytest.mark.real_data
def test_queries_equal_the_papers_files(real_amt_dir, real_raw_dir):
    mer = {r.id: r for r in load_records(real_amt_dir / "mer" / "test.jsonl")}
    paper = json.loads((real_raw_dir / "emoverse_repo" / "meld_test_data.json").read_text())
    for p in paper:
        d, u = re.search(r"dia(\d+)_utt(\d+)", p["videos"][0]).groups()
        r = mer[f"meld-mer-test-dia{d}_utt{u}"]
        assert (r.query, r.response) == (p["query"], p["response"])
    ecpe = {r.id: r for r in load_records(real_amt_dir / "ecpe" / "test.jsonl")}
    paper = json.loads((real_raw_dir / "emoverse_repo" / "ecf2_caption_test.json").read_text())
    assert len(paper) == 1821
    for p in paper:
        d, u = re.search(r"dia(\d+)utt(\d+)", p["videos"][0]).groups()
        r = ecpe[f"ecf2-{d}-{u}"]
        assert (r.query, r.response) == (p["query"], p["response"])


def test_build_is_deterministic(amt_dir, raw_dir, tmp_path):
    again = build_amt(raw_dir, tmp_path / "again", sources=["meld", "mosi", "emer"])
    first = read_manifest(amt_dir)
    for name in ("mer/train.jsonl", "eri/test.jsonl"):
        assert again["files"][name] == first["files"][name]


@pytest.mark.real_data
def test_paper_json_loads_as_records(real_raw_dir):
    recs = load_records(real_raw_dir / "emoverse_repo" / "meld_test_data.json")
    assert len(recs) == 2610 and {r.task for r in recs} == {"mer"}


def _copy_source(raw_dir, tmp_path, folder):
    raw = tmp_path / "raw"
    shutil.copytree(raw_dir / folder, raw / folder)
    return raw


def test_truncated_csv_names_file_and_line(raw_dir, tmp_path):
    raw = _copy_source(raw_dir, tmp_path, "cmu_mosi_text")
    p = raw / "cmu_mosi_text" / "label.csv"
    lines = p.read_text().splitlines()
    lines[5] = lines[5].split(",")[0]  # a row cut short
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(SourceError, match=r"label\.csv:6: wrong number of fields"):
        build_amt(raw, tmp_path / "out", sources=["mosi"])
    assert not (tmp_path / "out").exists()
    m = build_amt(raw, tmp_path / "out", sources=["mosi"], skip_bad=True)
    assert len(m["skipped"]) == 1 and "label.csv:6" in m["skipped"][0]


def test_wrong_columns_and_non_utf8(raw_dir, tmp_path):
    raw = _copy_source(raw_dir, tmp_path, "cmu_mosi_text")
    p = raw / "cmu_mosi_text" / "label.csv"
    p.write_text("id,words,label,mode\nx,hi,1.0,train\n")
    with pytest.raises(SourceError, match=r"label\.csv:1: missing column\(s\) \['text'\]"):
        build_amt(raw, tmp_path / "out", sources=["mosi"])
    p.write_bytes(b"id,text,label,mode\nx,caf\xe9,1.0,train\n")
    with pytest.raises(SourceError, match="not UTF-8"):
        build_amt(raw, tmp_path / "out", sources=["mosi"])


def test_corrupt_image_is_named(raw_dir, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(raw_dir / "fer2013_subset", raw / "fer2013_subset")
    n_images = len(list((raw / "fer2013_subset" / "test").rglob("*.jpg")))
    victim = sorted((raw / "fer2013_subset" / "test" / "happy").glob("*.jpg"))[0]
    victim.write_bytes(b"not a jpeg")
    with pytest.raises(SourceError, match=re.escape(victim.name)):
        build_amt(raw, tmp_path / "out", sources=["fer2013"])
    m = build_amt(raw, tmp_path / "out", sources=["fer2013"], skip_bad=True)
    assert m["counts"]["fer"]["test"]["total"] == n_images - 1


def test_unknown_source():
    with pytest.raises(ValueError, match="unknown source"):
        build_amt(".", "/tmp/x", sources=["nope"])


@pytest.mark.real_data
def test_image_folders_are_digested(real_amt_dir):
    imgs = read_manifest(real_amt_dir)["inputs"]["raw_images"]
    assert imgs["ck_plus_48"]["files"] == 981 and imgs["fer2013_subset"]["files"] == 3589


def test_missing_sources_are_named_with_where_to_get_them(raw_dir, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(raw_dir / "meld", raw / "meld")
    with pytest.raises(FileNotFoundError) as e:
        build_amt(raw, tmp_path / "out", sources=["meld", "ecf1", "ckplus"])
    msg = str(e.value)
    assert "ecf1_mecpe is missing" in msg and "NUSTM/MECPE" in msg and "ck_plus_48" in msg and "meld:" not in msg
    assert build_amt(raw, tmp_path / "out", sources=["meld"])["counts"]["mer"]
