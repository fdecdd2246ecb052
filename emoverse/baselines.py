"""Baselines that could embarrass the model, scored on the same records in the same eval run.

Each baseline is a function (records to answer, training records) -> {record id: answer text}, registered by
name in BASELINES; answers are in the task's own response form, so the task's parser and metrics score them
exactly as they score the model. All of them learn from the training split only; none looks at test labels.

- majority: each task's majority answer from the train split (ECPE: the target causes itself; ERI: majority emotion)
- vader: VADER lexicon polarity for MSA
- heuristic: each task's rule-based answer where it has one (ECPE: "the target and the one before it")
- pair-lr: ECPE as a classical classifier: logistic regression over every (target, earlier utterance) pair's
  position, speaker and emotion features, fitted on the train split (what the conversation's layout alone
  predicts, without reading the words)
- tfidf-lr: TF-IDF word/bigram features + logistic regression (scikit-learn) for MSA and MER
- fer-probe: logistic regression on the frozen scene encoder's mean-pooled image features
- face-probe: the same on the frozen face encoder's 4 x 4 map (the linear probe on the features the model's
  face tokens carry: the bar its FER path must at least match)
- fer-head: the frozen face encoder's own FER2013 classifier, zero-shot (fits nothing): on FER2013's test split
  it is in domain (it was trained on FER2013's training split), so it is the bar the model's FER2013 answers,
  which read the same encoder, must reach
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable

from emoverse.imaging import load_pixels
from emoverse.records import Record
from emoverse.tasks import TASKS

QUOTED = re.compile(r"The person says: '(.*)' <", re.S)


class BaselineError(ValueError):
    pass


def utterance(query: str) -> str:
    """The quoted utterance of an MSA/MER/ERI query (the whole query when none is quoted)."""
    m = QUOTED.search(query)
    return m.group(1) if m else query


def _need_train(train: list[Record], task: str, name: str) -> list[Record]:
    rows = [r for r in train if r.task == task]
    if not rows:
        raise BaselineError(
            f"baseline {name!r} needs {task} training records (the train split of the data "
            "folder); it is never fitted on the records it is scored on"
        )
    return rows


def majority(records: list[Record], train: list[Record]) -> dict[str, str]:
    """Each task's majority answer (`Task.majority_answer`) from its training split: the most frequent label
    among those the query offers; ECPE: the target causes itself; ERI: the majority emotion in reason form."""
    preds: dict[str, str] = {}
    counts: dict[str, tuple[Counter, Counter]] = {}
    for task in sorted({r.task for r in records}):
        rows = [r for r in train if r.task == task]
        counts[task] = (Counter(r.label for r in rows if r.label), Counter(r.response for r in rows))
    for r in records:
        labels, responses = counts[r.task]
        try:
            preds[r.id] = TASKS[r.task].majority_answer(r.query, labels, responses)
        except IndexError:  # the task's majority needs training answers and there are none
            _need_train([], r.task, "majority")
        except ValueError as e:
            raise BaselineError(f"record {r.id}: {e}") from None
    return preds


def ecpe_heuristic(records: list[Record], train: list[Record]) -> dict[str, str]:
    """Each task's rule-based answer where it has one (`Task.heuristic_answer`): ECPE's "the target and the
    utterance before it are the causes"."""
    preds = {}
    for r in records:
        try:
            answer = TASKS[r.task].heuristic_answer(r.query)
        except ValueError as e:
            raise BaselineError(f"record {r.id}: {e}") from None
        if answer is not None:
            preds[r.id] = answer
    return preds


def pair_features(query: str) -> tuple[int, str, list[tuple[int, dict[str, float]]]]:
    """(target index, target emotion, [(candidate index, features)]) for every utterance up to the target."""
    task = TASKS["ecpe"]
    k, emotion = task.target(query)
    utts = task.conversation(query)
    if not 1 <= k <= len(utts):
        raise ValueError(f"target utterance {k} is not in the conversation's {len(utts)} utterances")
    t_emo, t_speaker, _ = utts[k - 1]
    rows = []
    for c in range(1, k + 1):
        c_emo, c_speaker, text = utts[c - 1]
        near = min(k - c, 3)  # offsets beyond 3 share a bucket in the interactions (few gold pairs there)
        same = float(c_speaker == t_speaker)
        feats = {
            f"offset={min(k - c, 6)}": 1.0,
            f"cause_emotion={c_emo}": 1.0,
            f"target_emotion={t_emo}": 1.0,
            f"offset{near}&cause_emotion={c_emo}": 1.0,
            f"offset{near}&target_emotion={t_emo}": 1.0,
            f"offset{near}&same_speaker": same,
            "same_speaker": same,
            "same_emotion": float(c_emo == t_emo),
            "first_utterance": float(c == 1),
            "cause_words": min(len(text.split()), 40) / 40,
            "utterances_before": min(k - 1, 10) / 10,
        }
        rows.append((c, feats))
    return k, emotion, rows


def pair_answers(records: list[tuple[Record, tuple]], proba, threshold: float) -> dict[str, str]:
    """Each (record, `pair_features`) pair's causes with probability >= threshold (the most probable one when
    none is), ascending; `proba` runs over all their candidate rows in order."""
    preds, i = {}, 0
    for r, (k, emotion, rows) in records:
        p = proba[i : i + len(rows)]
        i += len(rows)
        keep = [c for (c, _), pc in zip(rows, p, strict=True) if pc >= threshold] or [rows[int(p.argmax())][0]]
        preds[r.id] = ";".join(f"{k}_{emotion},{c}" for c in sorted(keep))
    return preds


PAIR_THRESHOLDS = tuple(t / 20 for t in range(2, 13))  # 0.10 ... 0.60


def best_pair_threshold(records: list[tuple[Record, tuple]], proba) -> float:
    """The inclusion threshold of PAIR_THRESHOLDS whose `pair_answers` score the best pair F1 on these records."""
    task = TASKS["ecpe"]
    gold = [r.response for r, _ in records]

    def f1(threshold: float) -> float:
        pred = pair_answers(records, proba, threshold)
        return task.metrics(gold, [pred[r.id] for r, _ in records], [None] * len(records))["pair_f1"]

    return max(PAIR_THRESHOLDS, key=f1)


def featurise_pairs(records: list[Record]) -> list[tuple[Record, tuple]]:
    """(record, `pair_features`) of each ECPE record; a query that is not an ECPE conversation names its record."""
    out = []
    for r in records:
        try:
            out.append((r, pair_features(r.query)))
        except ValueError as e:
            raise BaselineError(f"record {r.id}: {e}") from None
    return out


class PairLayoutModel:
    """`pair-lr`'s fitted parts: logistic regression on each (target, candidate) pair's layout features
    (`pair_features`: offset, same speaker, both emotions and their interactions with the offset), fitted on ECPE
    training records, and the inclusion threshold that maximises pair F1 on those records themselves (a
    low-capacity model: in-sample is close to held-out)."""

    def __init__(self, train: list[Record]):
        from sklearn.feature_extraction import DictVectorizer
        from sklearn.linear_model import LogisticRegression

        task = TASKS["ecpe"]
        fit = featurise_pairs(_need_train(train, "ecpe", "pair-lr"))
        x, y = [], []
        for r, (k, emotion, rows) in fit:
            gold = set(task.parse(r.response).pairs)
            x += [f for _, f in rows]
            y += [f"{k}_{emotion},{c}" in gold for c, _ in rows]
        if len(set(y)) < 2:
            raise BaselineError("baseline 'pair-lr' needs ECPE training records with and without cause pairs")
        self.vec = DictVectorizer()
        self.clf = LogisticRegression(max_iter=3000).fit(self.vec.fit_transform(x), y)
        self.threshold = best_pair_threshold(fit, self.proba(fit))

    def proba(self, featurised: list[tuple[Record, tuple]]):
        """P(cause) of every candidate row of `featurise_pairs` output, in order."""
        return self.clf.predict_proba(self.vec.transform([f for _, (_, _, rows) in featurised for _, f in rows]))[:, 1]


def pair_lr(records: list[Record], train: list[Record]) -> dict[str, str]:
    """ECPE by `PairLayoutModel` fitted on the train split: what the conversation's layout alone predicts."""
    todo = [r for r in records if r.task == "ecpe"]
    if not todo:
        return {}
    model = PairLayoutModel(train)
    scored = featurise_pairs(todo)
    return pair_answers(scored, model.proba(scored), model.threshold)


def vader(records: list[Record], train: list[Record]) -> dict[str, str]:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    sia = SentimentIntensityAnalyzer()
    msa = TASKS["msa"]
    return {
        r.id: msa.format_label("positive" if sia.polarity_scores(utterance(r.query))["compound"] >= 0 else "negative")
        for r in records
        if r.task == "msa"
    }


def tfidf_lr(records: list[Record], train: list[Record]) -> dict[str, str]:
    """TF-IDF (words and bigrams, sublinear tf) + logistic regression per text task, fitted on its train split."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    preds = {}
    for task in ("msa", "mer"):
        todo = [r for r in records if r.task == task]
        if not todo:
            continue
        rows = _need_train(train, task, "tfidf-lr")
        clf = make_pipeline(
            TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1),
            LogisticRegression(max_iter=2000, C=4.0),
        )
        clf.fit([utterance(r.query) for r in rows], [r.label for r in rows])
        for r, lbl in zip(todo, clf.predict([utterance(r.query) for r in todo]), strict=True):
            preds[r.id] = TASKS[task].format_label(str(lbl))
    return preds


def image_features(
    paths: list[str],
    image_size: int = 224,
    batch: int = 64,
    encoder: str = "scene",
) -> np.ndarray:  # noqa: F821
    """Frozen features of the model's encoders, with its input scaling: "scene" = mean-pooled ImageNet
    EfficientNet-Lite0 (1280); "face" = the FER2013 mini-Xception's whole 4 x 4 map, as the model's face
    tokens see it (2048); "face-head" = that encoder's own FER2013 logits (7, FER2013_LABELS order)."""
    import numpy as np
    import torch

    # lazy: only these probes need the encoders (torch); the CLI imports this module to list the
    # baselines, and `emoverse run` on an onnxruntime-only install must not need torch
    from emoverse.model import ModelConfig, load_face, load_vision

    if encoder in ("face", "face-head"):
        net = load_face(ModelConfig(face_encoder="mini-xception-fer2013"))

        def features(px):
            return net(px) if encoder == "face-head" else net.features(px).flatten(1)
    else:
        net = load_vision(ModelConfig()).eval()

        def features(px):
            return net.extract_features(px).mean(dim=(2, 3))

    out = []
    with torch.no_grad():
        for i in range(0, len(paths), batch):
            px = torch.from_numpy(np.stack([load_pixels(p, image_size) for p in paths[i : i + batch]]))
            out.append(features(px).numpy())
    return np.concatenate(out) if out else np.zeros((0, 1), dtype=np.float32)


def face_probe(records: list[Record], train: list[Record]) -> dict[str, str]:
    """`fer_probe` on the face encoder's 4 x 4 map: what a linear classifier gets from the face features the
    model reads (the bar its FER path must reach)."""
    return fer_probe(records, train, encoder="face")


def linear_probe(features, labels: list[str]):
    """The probe's classifier (standardised features, L2 logistic regression), fitted: the face-probe
    baseline and the model's fitted face-probe token (`train/face_probe.py`) share it."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=0.1)).fit(features, labels)


def fer_probe(records: list[Record], train: list[Record], encoder: str = "scene") -> dict[str, str]:
    """Logistic regression on frozen mean-pooled features of the FER training faces; each test face gets the
    most probable label among those its query offers."""
    import numpy as np

    todo = [r for r in records if r.task == "fer" and r.images]
    if not todo:
        return {}
    rows = [r for r in _need_train(train, "fer", "fer-probe") if r.images and r.label]
    clf = linear_probe(image_features([r.images[0] for r in rows], encoder=encoder), [r.label for r in rows])
    proba = clf.predict_proba(image_features([r.images[0] for r in todo], encoder=encoder))
    classes = list(clf.classes_)
    fer = TASKS["fer"]
    preds = {}
    for r, p in zip(todo, proba, strict=True):
        allowed = _offered_labels(r.query)
        best = max(
            (lbl for lbl in allowed if lbl in classes),
            key=lambda lbl: p[classes.index(lbl)],
            default=classes[int(np.argmax(p))],
        )
        preds[r.id] = fer.format_label(best)
    return preds


def _offered_labels(query: str) -> list[str]:
    """The FER labels a query offers (its candidates, as labels)."""
    return [c.lower().rstrip(".") for c in TASKS["fer"].candidates(query)]


def fer_head(records: list[Record], train: list[Record]) -> dict[str, str]:
    """The face encoder's FER2013 head on each test face: the most probable of the labels its query offers
    that the head knows (CK+'s "contempt" is not a FER2013 label); `train` is not used."""
    from emoverse.face import FER2013_LABELS

    todo = [r for r in records if r.task == "fer" and r.images]
    if not todo:
        return {}
    logits = image_features([r.images[0] for r in todo], encoder="face-head")
    preds = {}
    for r, row in zip(todo, logits, strict=True):
        known = [lbl for lbl in _offered_labels(r.query) if lbl in FER2013_LABELS] or list(FER2013_LABELS)
        preds[r.id] = TASKS["fer"].format_label(max(known, key=lambda lbl: row[FER2013_LABELS.index(lbl)]))
    return preds


BASELINES: dict[str, Callable[[list[Record], list[Record]], dict[str, str]]] = {
    "majority": majority,
    "vader": vader,
    "heuristic": ecpe_heuristic,
    "pair-lr": pair_lr,
    "tfidf-lr": tfidf_lr,
    "fer-probe": fer_probe,
    "face-probe": face_probe,
    "fer-head": fer_head,
}


def run_baseline(name: str, records: list[Record], train: list[Record]) -> dict[str, str]:
    if name not in BASELINES:
        raise BaselineError(f"unknown baseline {name!r}; known: {', '.join(BASELINES)}")
    return BASELINES[name](records, train)
