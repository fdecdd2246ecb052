"""scripts/ecpe_offsets.py on hand-made answers: per-offset gold / predicted / hits per system."""

from script_modules import load_script


def _script():
    return load_script("ecpe_offsets")


def test_offsets_count_gold_predicted_and_hits_by_system():
    gold = {"a": "3_joy,3;3_joy,2", "b": "2_anger,1", "c": "4_fear,4"}
    rows = [
        {"system": "rule", "task": "ecpe", "id": "a", "prediction": "3_joy,3;3_joy,2"},
        {"system": "rule", "task": "ecpe", "id": "b", "prediction": "2_anger,2;2_anger,1"},
        {"system": "rule", "task": "ecpe", "id": "c", "prediction": "4_fear,4;4_fear,3"},
        {"system": "model", "task": "ecpe", "id": "a", "prediction": "3_joy,3"},
        {"system": "model", "task": "ecpe", "id": "b", "prediction": "2_anger,1"},
        {"system": "model", "task": "mer", "id": "b", "prediction": "Joy."},  # another task: ignored
    ]
    out = _script().offsets(gold, rows)
    rule, model = out["rule"]["by_offset"], out["model"]["by_offset"]
    assert rule["0"] == {"gold": 2, "predicted": 3, "hits": 2, "precision": 0.667, "recall": 1.0}
    assert rule["1"] == {"gold": 2, "predicted": 3, "hits": 2, "precision": 0.667, "recall": 1.0}
    assert out["rule"]["pair_f1"] == 0.8 and out["rule"]["records"] == 3  # 2 * 4 hits / (4 gold + 6 predicted)
    assert model["1"] == {"gold": 2, "predicted": 1, "hits": 1, "precision": 1.0, "recall": 0.5}
    assert out["model"]["records"] == 2
