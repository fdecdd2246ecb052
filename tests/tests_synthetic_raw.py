"""A tiny raw-data tree in every source's real format (the folder layout and file formats of docs/data.md),
so the builder, training, eval, compress, export, runtime, bench and pipeline tests run without the raw
mirror. Contents are made up; formats are the real ones (CSV headers, ECF's text blocks, ECF 2.0's JSON,
CK+48's S<subject>_<seq>_<frame>.png names and label folders, FER2013's label folders, EMER's CSVs)."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

from PIL import Image

MELD_EMOTIONS = ["anger", "sadness", "surprise", "disgust", "joy", "neutral", "fear"]
SENTIMENT = {
    "anger": "negative",
    "sadness": "negative",
    "disgust": "negative",
    "fear": "negative",
    "joy": "positive",
    "surprise": "positive",
    "neutral": "neutral",
}
WORDS = [
    "really",
    "great",
    "terrible",
    "okay",
    "what",
    "no",
    "yes",
    "wow",
    "fine",
    "please",
    "never",
    "today",
]
CK_LABELS = ["anger", "contempt", "disgust", "fear", "happy", "sadness", "surprise"]
FER_FOLDERS = ["angry", "disgust", "fear", "happy", "neutral", "sad", "surprise"]
EMER_EMOTIONS = ["angry", "happy", "sad", "worried", "surprise", "neutral"]


def _sentence(rng: random.Random, n: int = 6) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def _csv(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def _face(path: Path, rng: random.Random, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.frombytes("L", (48, 48), bytes(rng.randrange(256) for _ in range(48 * 48))).save(path, fmt)


def make_raw(root: Path, seed: int = 0) -> Path:
    rng = random.Random(seed)
    root = Path(root)
    # MELD: utterance CSVs per split
    header = [
        "Sr No.",
        "Utterance",
        "Speaker",
        "Emotion",
        "Sentiment",
        "Dialogue_ID",
        "Utterance_ID",
        "Season",
        "Episode",
        "StartTime",
        "EndTime",
    ]
    for split, n in (("train", 21), ("dev", 7), ("test", 14)):
        rows = []
        for i in range(n):
            emo = MELD_EMOTIONS[i % len(MELD_EMOTIONS)]
            rows.append([i + 1, _sentence(rng), "Joey", emo, SENTIMENT[emo], i // 3, i % 3, 1, 1, "0", "1"])
        _csv(root / "meld" / f"{split}_sent_emo.csv", header, rows)
    # CMU-MOSI transcripts: score in [-3, 3], mode train/valid/test
    rows = [
        [f"vid{i}_{i}", _sentence(rng).lower(), round(rng.uniform(-3, 3), 2) or 0.5, mode]
        for i, mode in enumerate(["train"] * 10 + ["valid"] * 3 + ["test"] * 6)
    ]
    _csv(root / "cmu_mosi_text" / "label.csv", ["id", "text", "label", "mode"], rows)
    # CK+48 faces (split by subject hash) and their FACS codes
    facs = []
    for s in range(1, 31):
        label = CK_LABELS[s % len(CK_LABELS)]
        for frame in (1, 2):
            _face(root / "ck_plus_48" / "CK+48" / label / f"S{s:03d}_001_{frame:08d}.png", rng, "PNG")
        facs.append(
            [
                f"S{s:03d}_001",
                "_".join(str(a) for a in sorted(rng.sample([1, 2, 4, 6, 7, 12, 15, 17, 25], 3))),
                label,
                "1",
            ]
        )
    _csv(
        root / "ckplus_facs_netfacs" / "emotions_set_ckplus_aus.csv",
        ["video", "AU.combination", "emotion", "valence"],
        facs,
    )
    # FER2013 PrivateTest folders (test only)
    for i, folder in enumerate(FER_FOLDERS):
        for j in range(2):
            _face(root / "fer2013_subset" / "test" / folder / f"PrivateTest_{i}{j}.jpg", rng, "JPEG")
    # EMER v1 (labelled) and v2 (reasons quoting the subtitle)
    v1, v2 = [], []
    for i in range(16):
        name, emo, sub = f"sample_{i:08d}", EMER_EMOTIONS[i % len(EMER_EMOTIONS)], _sentence(rng)
        reason = f"In the video, the person speaks. Therefore, it is inferred that the emotional state is {emo}."
        v1.append([name, emo, sub, reason])
        v2.append([name, f'In the video, the subtitle says "{sub}" and the person looks {emo}. Therefore, {emo}.'])
    _csv(
        root / "emer_affectgpt" / "dataset-v1" / "gt-eng.csv",
        ["names", "emotions", "subtitles", "reasons"],
        v1,
    )
    _csv(root / "emer_affectgpt" / "dataset-v2" / "final-EMER-reason.csv", ["name", "english"], v2)
    # ECF 1.0 text blocks: "conv_id n", the pairs line, then "idx | speaker | emotion | text | time"
    emos = ["neutral", "joy", "surprise", "anger", "sadness", "neutral"]
    for split, first, convs in (("train", 1, 6), ("dev", 101, 2), ("test", 201, 3)):
        blocks = []
        for c in range(first, first + convs):
            n = 5
            pairs = [(k, k) for k in range(2, n + 1) if emos[k - 1] != "neutral"] + [(3, 2)]
            lines = [f"{c} {n}", ", ".join(f"({a},{b})" for a, b in pairs)]
            lines += [f"{k} | {'AB'[k % 2]} | {emos[k - 1]} | {_sentence(rng)} | 00:00:0{k}" for k in range(1, n + 1)]
            blocks.append("\n".join(lines))
        (root / "ecf1_mecpe").mkdir(parents=True, exist_ok=True)
        (root / "ecf1_mecpe" / f"{split}.txt").write_text("\n".join(blocks) + "\n", encoding="utf-8")
    # ECF 2.0 (SemEval-2024 Task 3) JSON
    convs = []
    for c in range(1, 4):
        utts = [
            {
                "utterance_ID": k,
                "text": _sentence(rng),
                "speaker": "AB"[k % 2],
                "emotion": emos[k - 1],
                "video_name": f"dia{c}utt{k}.mp4",
            }
            for k in range(1, 6)
        ]
        convs.append(
            {
                "conversation_ID": c,
                "conversation": utts,
                "emotion-cause_pairs": [
                    [f"{k}_{emos[k - 1]}", str(k)] for k in range(2, 6) if emos[k - 1] != "neutral"
                ],
            }
        )
    (root / "ecf2_semeval2024_ecac").mkdir(parents=True, exist_ok=True)
    (root / "ecf2_semeval2024_ecac" / "Subtask_2_test.json").write_text(json.dumps(convs), encoding="utf-8")
    return root
