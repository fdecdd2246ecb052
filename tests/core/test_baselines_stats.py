"""Baselines on hand-made records, the ERI conclusion parser, bootstrap and paired CIs, budget verdicts."""

import numpy as np
import pytest

from emoverse.baselines import BaselineError, ecpe_heuristic, majority, pair_lr, tfidf_lr, utterance
from emoverse.records import Record
from emoverse.stats import bootstrap_ci, paired_ratio, point, verdict
from emoverse.tasks import INVALID, TASKS


def _ecpe(rid: str, k: int, emotion: str, response: str = "") -> Record:
    lines = [(emotion if i == k else "neutral", "A", f"line {i}") for i in range(1, k + 2)]
    return Record(rid, "ecpe", "ecf1", "test", TASKS["ecpe"].query(lines, k), response, emotion)


def _text(rid: str, task: str, text: str, label: str, split: str = "train") -> Record:
    t = TASKS[task]
    return Record(rid, task, "meld", split, t.query(text), t.format_label(label), label)


def test_ecpe_heuristic_names_target_and_previous():
    preds = ecpe_heuristic([_ecpe("a", 3, "joy"), _ecpe("b", 1, "anger")], [])
    assert preds == {"a": "3_joy,3;3_joy,2", "b": "1_anger,1"}
    assert set(TASKS["ecpe"].parse(preds["a"]).pairs) == {"3_joy,3", "3_joy,2"}


def _conversation(rid: str, speakers: str, k: int, response: str, split: str = "train") -> Record:
    lines = [("joy" if i == k else "neutral", sp, f"line {i}") for i, sp in enumerate(speakers, start=1)]
    return Record(rid, "ecpe", "ecf1", split, TASKS["ecpe"].query(lines, k), response, "joy")


def test_ecpe_conversation_is_the_query_inverted():
    lines = [("neutral", "Ross", "Hi: there ."), ("surprise", "Monica Geller", "What ?!"), ("joy", "Ross", "Yes .")]
    query = TASKS["ecpe"].query(lines, 3)
    assert TASKS["ecpe"].conversation(query) == lines
    assert TASKS["ecpe"].query(TASKS["ecpe"].conversation(query), 3) == query
    with pytest.raises(ValueError, match="numbered"):
        TASKS["ecpe"].conversation(query.replace("2_surprise.", "7_surprise."))


def test_pair_lr_learns_the_layout_rule_the_heuristic_misses():
    # planted rule: the cause is the last earlier utterance by the target's own speaker (not the one before)
    train = []
    for i in range(60):
        speakers = "ABAB" if i % 2 else "ABCA"
        k = 4
        cause = 2 if speakers == "ABAB" else 1
        train.append(_conversation(f"t{i}", speakers, k, f"{k}_joy,{cause}"))
    test = [_conversation("x", "ABAB", 4, "4_joy,2", "test"), _conversation("y", "ABCA", 4, "4_joy,1", "test")]
    preds = pair_lr(test, train)
    assert preds == {"x": "4_joy,2", "y": "4_joy,1"}
    assert ecpe_heuristic(test, [])["x"] == "4_joy,4;4_joy,3"  # the rule names neither
    with pytest.raises(BaselineError, match="needs ecpe training records"):
        pair_lr(test, [])
    bad = Record("z", "ecpe", "ecf1", "test", "no conversation here", "", "joy")
    with pytest.raises(BaselineError, match="record z"):
        pair_lr([bad], train)
    beyond = test[0].query.replace("Target utterance:4_joy.", "Target utterance:9_joy.")
    with pytest.raises(BaselineError, match="record w: target utterance 9 is not in"):
        pair_lr([Record("w", "ecpe", "ecf1", "test", beyond, "", "joy")], train)


def test_majority_uses_train_labels_and_refuses_without_them():
    train = [_text("t1", "mer", "x", "joy"), _text("t2", "mer", "y", "joy"), _text("t3", "mer", "z", "anger")]
    test = [_text("q", "mer", "w", "anger", split="test")]
    assert majority(test, train) == {"q": "Joy."}
    with pytest.raises(BaselineError, match="train"):
        majority(test, [])  # never falls back to the test labels


def test_tfidf_lr_learns_words_from_train_split():
    train = [_text(f"p{i}", "msa", f"I love this {w}", "positive") for i, w in enumerate("abcdefgh")]
    train += [_text(f"n{i}", "msa", f"I hate that {w}", "negative") for i, w in enumerate("abcdefgh")]
    test = [
        _text("q1", "msa", "love it", "positive", "test"),
        _text("q2", "msa", "hate it", "negative", "test"),
    ]
    assert tfidf_lr(test, train) == {"q1": "Positive.", "q2": "Negative."}
    assert utterance(test[0].query) == "love it"


@pytest.mark.parametrize(
    "text,label",
    [
        ("He frowns. Therefore, it is inferred that his emotional state is anger.", "angry"),
        ("Therefore, she may be happy.", "happy"),  # hedged, one emotion: counts
        ("Therefore, the person is not angry but sad.", "sad"),  # negated mention dropped
        ("Therefore, he may be happy, sad, angry or surprised.", INVALID),  # several emotions: wrong
        ("Therefore, she seems to encourage him and enjoy it.", INVALID),  # no substring matches (rage, joy)
        ("She smiles widely. She is unhappy though.", "sad"),  # no 'therefore': the last sentence
        ("Therefore, she is happy and joyful.", "happy"),  # two words, one emotion
    ],
)
def test_eri_conclusion_parser(text, label):
    assert TASKS["eri"].parse_label(text) == label


def test_eri_metric_counts_labelled_records_and_rejects_hedging():
    eri = TASKS["eri"]
    gold = ["x. Therefore anger.", "y. Therefore happy.", "z."]
    pred = ["Therefore, he is angry or sad.", "Therefore, happy.", "Therefore, sad."]
    m = eri.metrics(gold, pred, ["angry", "happy", None])
    assert m["label_accuracy"] == 0.5 and m["label_n"] == 2


@pytest.mark.parametrize("task", ["msa", "mer", "fer", "eri", "ecpe"])
def test_stats_point_equals_task_metrics(task):
    t = TASKS[task]
    rng = np.random.default_rng(0)
    if task == "ecpe":
        gold = [f"{k}_joy,{k}" for k in range(1, 40)]
        pred = [f"{k}_joy,{k - int(rng.integers(0, 2))}" for k in range(1, 40)]
        labels = ["joy"] * len(gold)
    elif task == "eri":
        gold = [f"Therefore {w}." for w in rng.choice(["anger", "happy", "sad"], 40)]
        pred = [f"Therefore {w}." for w in rng.choice(["anger", "happy", "sad"], 40)]
        labels = [{"anger": "angry"}.get(g.split()[1][:-1], g.split()[1][:-1]) for g in gold]
    else:
        labels = list(t.labels) if task != "fer" else ["happy", "anger", "sadness"]
        gold = [t.format_label(x) for x in rng.choice(labels, 60)]
        pred = [t.format_label(x) for x in rng.choice(labels, 60)]
        labels = [None] * 60
    full = t.metrics(gold, pred, labels)
    fast = point(t, gold, pred, labels)
    for k, v in fast.items():
        assert v == pytest.approx(full[k], abs=1e-9), k
    ci = bootstrap_ci(t, gold, pred, labels, n_boot=300)
    lo, hi = ci[t.primary]
    assert lo <= full[t.primary] <= hi and hi - lo > 0


def test_paired_ratio_identical_systems_is_exactly_one():
    t = TASKS["mer"]
    gold = [t.format_label(x) for x in ["joy", "anger", "neutral"] * 20]
    pred = [t.format_label(x) for x in ["joy", "neutral", "neutral"] * 20]
    r = paired_ratio(t, gold, pred, pred, [None] * 60)
    assert r["ratio"] == 1.0 and r["ratio_ci"] == [1.0, 1.0]
    worse = [t.format_label("neutral")] * 60
    r2 = paired_ratio(t, gold, pred, worse, [None] * 60)
    assert r2["ratio_ci"][1] < 1.0
    # the point values and their difference come with it: new - reference, inside its own interval
    assert r2["difference"] == pytest.approx(r2["new"] - r2["reference"], abs=1e-4) and r2["difference"] < 0
    assert r2["difference_ci"][0] <= r2["difference"] <= r2["difference_ci"][1]


@pytest.mark.parametrize(
    "ci,verdict_", [([0.995, 1.01], "pass"), ([0.95, 0.98], "fail"), ([0.97, 1.02], "inconclusive")]
)
def test_budget_verdict_from_ci(ci, verdict_):
    assert verdict(ci, 0.99) == verdict_


@pytest.mark.real_weights
@pytest.mark.real_data
@pytest.mark.parametrize("name", ["fer-probe", "face-probe", "fer-head"])
def test_image_probes_learn_ckplus_subjects(name, real_raw_dir):
    """Each probe, fitted on some CK+ subjects' happy/surprise faces, names other subjects' faces far above
    chance (0.5), and answers only with labels the query offers."""
    from emoverse.baselines import run_baseline

    fer = TASKS["fer"]
    query = fer.query(("happy", "surprise", "anger"), False)
    recs = []
    for label in ("happy", "surprise"):
        for p in sorted((real_raw_dir / "ck_plus_48" / "CK+48" / label).glob("*.png")):
            split = "train" if p.name < "S100" else "test"
            recs.append(Record(p.stem, "fer", "ckplus", split, query, fer.format_label(label), label, [str(p)]))
    train = [r for r in recs if r.split == "train"][::2]
    test = [r for r in recs if r.split == "test"][::4]
    preds = run_baseline(name, test, train)
    parsed = [fer.parse_label(preds[r.id]) for r in test]
    assert set(parsed) <= {"happy", "surprise", "anger"}
    assert np.mean([p == r.label for p, r in zip(parsed, test, strict=True)]) > 0.8


def test_fer_head_answers_the_best_offered_label_it_knows(tmp_path, monkeypatch):
    """fer-head takes the encoder's FER2013 logits as they are: its top label when the query offers it, else the
    best offered label the head knows (never "contempt", which FER2013 lacks; never an unoffered label)."""
    import torch
    from PIL import Image

    import emoverse.model
    from emoverse.baselines import run_baseline
    from emoverse.face import FER2013_LABELS

    order = ["neutral", "sadness", "anger", "happy", "fear", "disgust", "surprise"]  # most to least probable
    logits = torch.tensor([[float(7 - order.index(lbl)) for lbl in FER2013_LABELS]])

    class Head(torch.nn.Module):
        def forward(self, px):
            return logits.expand(len(px), -1)

    monkeypatch.setattr(emoverse.model, "load_face", lambda cfg: Head())
    Image.new("RGB", (48, 48), (90, 90, 90)).save(tmp_path / "face.png")
    fer = TASKS["fer"]
    offered = {"a": ("anger", "contempt", "happy"), "b": ("contempt", "sadness", "surprise"), "c": ("happy", "neutral")}
    recs = [
        Record(k, "fer", "ckplus", "test", fer.query(labels, False), "", labels[0], [str(tmp_path / "face.png")])
        for k, labels in offered.items()
    ]
    preds = run_baseline("fer-head", recs, [])
    assert {k: fer.parse_label(v) for k, v in preds.items()} == {"a": "anger", "b": "sadness", "c": "neutral"}


def test_paired_task_stats_by_source_rows_and_chosen_metric():
    """by_source adds one row per source of a task that has several; metrics= picks a non-primary metric."""
    from emoverse.compare import paired_task_stats

    t = TASKS["fer"]

    def rows(answers):
        return {
            f"r{i}": {
                "task": "fer",
                "source": "a" if i < 20 else "b",
                "response": t.format_label(gold),
                "label": gold,
                "prediction": t.format_label(ans),
                "parsed_label": ans,
            }
            for i, (gold, ans) in enumerate(answers)
        }

    gold = ["happy", "sadness"] * 20
    ref = rows(list(zip(gold, gold, strict=True)))
    new = rows([(g, g if i < 20 else "anger") for i, g in enumerate(gold)])  # source b all wrong
    out = paired_task_stats(ref, new, by_source=True, metrics={"fer": "weighted_f1"})
    assert set(out) == {"fer", "fer/a", "fer/b"}
    assert out["fer/a"]["difference"] == 0 and out["fer/a"]["identical_answers"] == 1.0
    assert out["fer/b"]["new"] == 0 and out["fer/b"]["identical_answers"] == 0.0
    assert out["fer"]["metric"] == "weighted_f1" and out["fer"]["n"] == 40
    assert set(paired_task_stats(ref, new)) == {"fer"}  # pooled only, as compare's table uses it
