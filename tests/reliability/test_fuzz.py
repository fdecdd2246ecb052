"""Property tests: whatever bytes a user feeds the record parser or a raw-source reader, the answer is a
valid record or a clear error naming the file — never a crash with another exception."""

import json
import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emoverse.records import RecordError, read_records, record_from_dict
from emoverse.sources import BuildReport, SourceError
from emoverse.sources.mosi import read_mosi
from emoverse.tasks import TASKS

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
    max_leaves=10,
)
record_like = st.fixed_dictionaries(
    {},
    optional={
        "id": json_values,
        "task": st.sampled_from(["msa", "mer", "fer", "eri", "ecpe", "xyz"]) | json_values,
        "query": st.sampled_from([TASKS["mer"].query("hi"), "", "q <sentiment>"]) | json_values,
        "response": st.sampled_from(["Joy.", "Positive.", ""]) | json_values,
        "label": st.sampled_from(["joy", "happy", None]) | json_values,
        "images": json_values,
        "videos": json_values,
        "split": json_values,
        "source": json_values,
    },
)


@settings(max_examples=300, deadline=None)
@given(record_like)
def test_record_from_dict_is_valid_or_value_error(obj):
    try:
        rec = record_from_dict(obj)
    except ValueError:
        return
    assert rec.task in TASKS and isinstance(rec.query, str) and rec.query.strip()
    assert isinstance(rec.images, list) and isinstance(rec.videos, list)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.text(alphabet=string.printable, max_size=60) | record_like.map(json.dumps), max_size=5))
def test_jsonl_reader_names_the_line(tmp_path, lines):
    p = tmp_path / "f.jsonl"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    try:
        list(read_records(p))
    except RecordError as e:
        assert str(e).startswith(f"{p}:")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=300) | st.text(max_size=300).map(lambda t: ("id,text,label,mode\n" + t).encode()))
def test_mosi_reader_on_arbitrary_bytes(tmp_path, blob):
    (tmp_path / "cmu_mosi_text").mkdir(exist_ok=True)
    (tmp_path / "cmu_mosi_text" / "label.csv").write_bytes(blob)
    for skip_bad in (False, True):
        try:
            for rec in read_mosi(tmp_path, BuildReport(skip_bad=skip_bad)):
                assert rec.task == "msa" and rec.label in ("positive", "negative")
        except SourceError as e:
            assert "label.csv" in str(e)


ecf_line = st.sampled_from(
    [
        "1 3",
        "(1,1),(2,1)",
        "1 | A | joy | hi | t",
        "2 | B | neutral | ok | t",
        "x | y",
        "",
        "3 | C | happy | no | t",
        "99 2",
        "1 | A | joy |  | t",
    ]
) | st.text(max_size=30)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(ecf_line, max_size=12))
def test_ecf1_reader_on_arbitrary_lines(tmp_path, lines):
    from emoverse.sources.ecf import read_ecf1

    (tmp_path / "ecf1_mecpe").mkdir(exist_ok=True)
    for name in ("train.txt", "dev.txt", "test.txt"):
        (tmp_path / "ecf1_mecpe" / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    try:
        for rec in read_ecf1(tmp_path, BuildReport(skip_bad=False)):
            assert rec.task == "ecpe" and rec.label in TASKS["ecpe"].labels
    except SourceError as e:
        assert ".txt:" in str(e)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.tuples(
            st.text(max_size=15),
            st.sampled_from(["joy", "anger", "happy", ""]),
            st.sampled_from(["positive", "neutral", "bad"]),
            st.text(max_size=3),
        ),
        max_size=5,
    )
)
def test_meld_reader_on_arbitrary_rows(tmp_path, rows):
    import csv
    import io

    from emoverse.sources.meld import FILES, read_meld

    (tmp_path / "meld").mkdir(exist_ok=True)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["Utterance", "Emotion", "Sentiment", "Dialogue_ID", "Utterance_ID"])
    w.writerows(rows)
    for name in FILES.values():
        (tmp_path / "meld" / name).write_text(buf.getvalue(), encoding="utf-8")
    for skip_bad in (False, True):
        try:
            for rec in read_meld(tmp_path, BuildReport(skip_bad=skip_bad)):
                assert rec.task in ("mer", "msa") and rec.query.strip()
        except SourceError as e:
            assert "_sent_emo.csv:" in str(e)
