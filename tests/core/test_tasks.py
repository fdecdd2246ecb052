import numpy as np
import pytest

from emoverse.tasks import INVALID, TASKS, get_task, infer_task


def test_msa_metrics_hand_computed():
    t = TASKS["msa"]
    gold = ["Positive.", "Positive.", "Negative.", "Negative."]
    pred = ["Positive.", "Negative.", "Negative.", "I think positive"]
    m = t.metrics(gold, pred, [None] * 4)
    assert m["accuracy"] == 0.5
    # per-class F1: positive P=1/2 R=1/2 -> .5 ; negative .5 ; weighted by support 2/2 -> .5
    assert m["f1"] == pytest.approx(0.5)


def test_mer_joy_label_is_scored():
    """The paper's scorer lists 'Happy.' and crashes on MELD's 'Joy.'; ours scores it."""
    t = TASKS["mer"]
    m = t.metrics(["Joy.", "Anger.", "Neutral."], ["Joy.", "Joy.", "nonsense"], [None] * 3)
    assert m["accuracy"] == pytest.approx(1 / 3)
    # joy: P=1/2 R=1 F=2/3 (support 1); anger F=0; neutral F=0 -> weighted = 2/9
    assert m["weighted_f1"] == pytest.approx(2 / 9)


def test_parse_label_first_whole_word():
    t = TASKS["mer"]
    assert t.parse_label("Fear. Maybe surprise.") == "fear"
    assert t.parse_label("fearless") == INVALID


def test_candidates_follow_the_query():
    fer = TASKS["fer"]
    q = fer.query(("anger", "happy", "sadness"), with_aus=True)
    assert fer.candidates(q) == ["Anger.", "Happy.", "Sadness."]
    mer = TASKS["mer"]
    assert len(mer.candidates(mer.query("hi"))) == 7


def test_fer_au_f1_hand_computed():
    fer = TASKS["fer"]
    gold = [fer.response("happy", [6, 12]), fer.response("anger", [4, 7, 23])]
    pred = ["Happy. Facial action units: AU6 cheek raiser, AU25 lips part.", "Anger. AU4, AU7."]
    m = fer.metrics(gold, pred, ["happy", "anger"])
    # tp = 1 + 2 = 3, fp = 1, fn = 1 + 1 = 2 -> F1 = 6 / (6 + 1 + 2)
    assert m["au_f1"] == pytest.approx(6 / 9)
    assert m["accuracy"] == 1.0


def test_ecpe_pair_and_weighted_f1_hand_computed():
    t = TASKS["ecpe"]
    gold = ["5_surprise,2;5_surprise,5", "7_joy,7", ""]
    pred = ["5_surprise,5", "7_joy,6;7_joy,7", "3_anger,3"]
    m = t.metrics(gold, pred, [None] * 3)
    # gold 3 pairs, pred 4 pairs (the one on the empty-gold record counts), hits 2 -> F1 = 4/7
    assert m["pair_f1"] == pytest.approx(4 / 7)
    # surprise: g2 p1 h1 -> 2/3 ; joy: g1 p2 h1 -> 2/3 ; anger: g0 -> weight 0 -> WF1 = 2/3
    assert m["weighted_f1"] == pytest.approx(2 / 3)


def test_ecpe_parse_tolerates_spacing_and_duplicates():
    t = TASKS["ecpe"]
    assert t.parse("5_Surprise, 2 ; 5_surprise,2;x").pairs == ("5_surprise,2",)


def test_eri_label_accuracy_reads_the_conclusion():
    t = TASKS["eri"]
    pred = [
        "He smiles. Therefore, his emotional state is happy.",
        "She was happy before. Therefore she is angry.",
    ]
    m = t.metrics(["x", "y"], pred, ["happy", "sad"])
    assert m["label_accuracy"] == 0.5
    assert 0 <= m["rouge_l"] <= 1


def test_unknown_task_and_label_errors():
    with pytest.raises(ValueError, match="unknown task 'xyz'"):
        get_task("xyz")
    with pytest.raises(ValueError, match="not one of the mer labels"):
        TASKS["mer"].check_label("happy")


def test_infer_task_from_tag():
    assert infer_task(TASKS["mer"].query("hi")) == "mer"
    assert infer_task(TASKS["ecpe"].query([("joy", "A", "hi")], 1)) == "ecpe"
    assert infer_task("what is this") is None


def test_ecpe_grammar_owned_by_the_task():
    ecpe = TASKS["ecpe"]
    q = ecpe.query([("neutral", "A", "x"), ("joy", "B", "y"), ("joy", "A", "z")], 3)
    g = ecpe.grammar(q)
    assert g.ok_prefix("") and g.ok_prefix("3_jo") and g.ok_prefix("3_joy,2;3_joy,")
    assert not g.ok_prefix("3_sad") and not g.ok_prefix("3_joy,4") and not g.ok_prefix("2_joy,1")
    assert g.complete("3_joy,3;3_joy,2") and not g.complete("3_joy,") and not g.complete("")
    assert TASKS["msa"].grammar(TASKS["msa"].query("x")) is None


def test_ecpe_candidates_are_every_cause_set_in_the_window():
    ecpe = TASKS["ecpe"]
    utts = [("neutral", "A", "a"), ("joy", "B", "b"), ("joy", "A", "c"), ("sadness", "B", "d"), ("joy", "A", "e")]
    assert ecpe.candidates(ecpe.query(utts, 1)) == ["1_neutral,1"]
    cands = ecpe.candidates(ecpe.query(utts, 5))
    assert len(cands) == 2**ecpe.window - 1 and len(set(cands)) == len(cands)
    assert "5_joy,3;5_joy,4;5_joy,5" in cands and "5_joy,4;5_joy,5" in cands and "5_joy,2" not in cands
    g = ecpe.grammar(ecpe.query(utts, 5))
    assert all(g.complete(c) for c in cands)  # each one an answer the grammar accepts


def test_ecpe_keeps_the_causes_whose_posterior_marginal_reaches_the_threshold():
    ecpe = TASKS["ecpe"]
    cands = ["3_joy,2", "3_joy,3", "3_joy,2;3_joy,3"]
    # P({3}) = 0.5, P({2,3}) = 0.4, P({2}) = 0.1: marginals 3 -> 0.9, 2 -> 0.5; both reach the threshold,
    # while the single most probable set names only 3 (what greedy decoding answers).
    scores = list(np.log([0.1, 0.5, 0.4]))
    assert ecpe.choose(cands, scores) == "3_joy,2;3_joy,3"
    assert TASKS["msa"].choose(cands, scores) == "3_joy,3"  # label tasks: the most probable candidate
    # P({3}) = 0.8: cause 2's marginal 0.15 stays out
    assert ecpe.choose(cands, list(np.log([0.05, 0.8, 0.15]))) == "3_joy,3"
    # no cause reaches it (five nearly equally likely single causes, each ~0.2 < 0.25): the best one, never
    # an empty answer
    assert ecpe.threshold > 0.21
    flat = [f"5_joy,{c}" for c in range(1, 6)]
    assert ecpe.choose(flat, [0.0, 0.01, -0.01, 0.0, 0.0]) == "5_joy,2"
    # a shift of every score (an unnormalised log-probability) changes nothing
    assert ecpe.choose(cands, [s - 50.0 for s in scores]) == "3_joy,2;3_joy,3"


@pytest.mark.parametrize(
    "text, end",
    [
        ("He frowned and spoke loudly.", None),
        ("He frowned and spoke loudly. Therefore, he is angry.", len("He frowned and spoke loudly. ")),
        ("He frowned. therefore", len("He frowned. ")),
        ("The theretofore quiet man frowned.", None),  # a word that only contains the letters
        ("In the video he smiles a lot. In the video he smiles a lot", None),  # 7 words repeated: not yet a loop
        (
            "In the video he smiles a lot now. In the video he smiles a lot now",
            len("In the video he smiles a lot now. In the video he smiles a lot now"),
        ),
    ],
)
def test_eri_reasoning_ends_at_therefore_or_a_loop(text, end):
    """ERI's answer form: generated reasoning ends before its "therefore" (the scored conclusion follows) or
    once it repeats a run of LOOP_WORDS words (kept as written)."""
    eri = TASKS["eri"]
    assert eri.LOOP_WORDS == 8
    assert eri.cut(text) == end


def test_eri_closing_names_each_training_label_once():
    """The scored conclusion offers one word per ERI training label, each parsed back to that label."""
    eri = TASKS["eri"]
    prefix, options = eri.closing()
    parsed = [eri.parse_label("He frowned." + prefix + o) for o in options]
    assert parsed == list(eri.CONCLUSION_WORDS)
