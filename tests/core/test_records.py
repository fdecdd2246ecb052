import json

import pytest

from emoverse.records import Record, RecordError, load_records, read_records, write_records
from emoverse.tasks import TASKS


def _rec(**kw):
    base = dict(
        id="a",
        task="mer",
        source="t",
        split="test",
        query=TASKS["mer"].query("hi"),
        response="Joy.",
        label="joy",
    )
    return {**base, **kw}


def test_roundtrip(tmp_path):
    r = Record(**_rec())
    write_records(tmp_path / "x.jsonl", [r])
    assert list(read_records(tmp_path / "x.jsonl")) == [r]


@pytest.mark.parametrize(
    "line,msg",
    [
        ("{not json", "invalid JSON"),
        (json.dumps(_rec(task="nope")), "unknown task 'nope'"),
        (json.dumps(_rec(label="happy")), "not one of the mer labels"),
        (json.dumps({"response": "x"}), "missing 'query'"),
        (json.dumps(_rec(images="a.png")), "images must be a list"),
        (json.dumps(_rec(extra_field=1)), "unknown field"),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path, line, msg):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(_rec()) + "\n\n" + line + "\n")
    with pytest.raises(RecordError, match=rf"bad\.jsonl:3: .*{msg}"):
        list(read_records(p))


def test_ms_swift_form_infers_task_and_label(tmp_path):
    p = tmp_path / "swift.json"
    p.write_text(json.dumps([{"query": TASKS["msa"].query("great"), "response": "Positive.", "videos": ["v.mp4"]}]))
    (r,) = list(read_records(p))
    assert (r.task, r.label, r.videos) == ("msa", "positive", ["v.mp4"])


def test_non_utf8_file(tmp_path):
    p = tmp_path / "latin.jsonl"
    p.write_bytes(b'{"query": "caf\xe9"}\n')
    with pytest.raises(RecordError, match="not UTF-8"):
        list(read_records(p))


def test_load_records_missing_path():
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_records("/nonexistent/x.jsonl")


def test_extra_records_need_an_explicit_split(tmp_path):
    """--extra FILE:SPLIT names the split; a record with neither is refused, never silently a test record."""
    import json

    import pytest

    from emoverse.records import RecordError, read_records

    f = tmp_path / "more.jsonl"
    f.write_text(
        json.dumps(
            {
                "query": "The person says: 'hi' <sentiment> Please determine which sentiment label in "
                "the video represents: positive or negative.",
                "response": "Positive.",
            }
        )
        + "\n"
    )
    with pytest.raises(RecordError, match=r"more.jsonl:1: no 'split' field"):
        list(read_records(f, require_split=True))
    assert [r.split for r in read_records(f, split="train", require_split=True)] == ["train"]
