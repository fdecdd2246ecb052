"""Fit the model's face-probe token (`ModelConfig.face_probe_token`) before training: the `face-probe`
baseline's classifier on the same frozen face grid the projector reads, folded into one linear layer and
frozen. Fitted in closed form rather than trained by SGD because SGD through the LLM fits the training
subjects' faces and generalises worse than the regularised probe (docs/history.md)."""

from __future__ import annotations

import numpy as np
import torch

from emoverse.baselines import linear_probe
from emoverse.imaging import load_pixels
from emoverse.model import FACE_PROBE_LABELS, EmoVerse
from emoverse.records import Record

ABSENT_LOGIT = -30.0  # a label no training face has: probability ~1e-13, finite for every backend


def face_grid_features(model: EmoVerse, paths: list[str], batch: int = 64) -> np.ndarray:
    """(N, face_grid^2 * FACE_DIM) the frozen face grid of each image, in the projector's layout."""
    out = []
    for i in range(0, len(paths), batch):
        px = torch.from_numpy(np.stack([load_pixels(p, model.cfg.image_size) for p in paths[i : i + batch]]))
        out.append(model.projector.face_cells(model.vision_features(px)).float().numpy())
    return np.concatenate(out)


def fit_face_probe(model: EmoVerse, records: list[Record]) -> dict:
    """Fit `model.projector.face_probe` on the FER training records (first image, gold label); returns what
    the run manifest records about it."""
    layer = model.projector.face_probe
    if layer is None:
        raise ValueError("this model has no face probe (model.face_probe_token: false)")
    rows = [r for r in records if r.task == "fer" and r.images and r.label]
    if not rows:
        raise ValueError("no FER training records with an image and a label to fit the face probe on")
    labels = [r.label for r in rows]
    if len(set(labels)) < 2:
        raise ValueError(f"the face probe needs FER training faces of at least two labels, got {sorted(set(labels))}")
    feats = face_grid_features(model, [r.images[0] for r in rows])
    clf = linear_probe(feats, labels)
    scaler, lr = clf[0], clf[-1]
    # fold the standardisation into the layer: ((x - mean) / scale) @ W.T + b
    w = lr.coef_ / scaler.scale_
    b = lr.intercept_ - w @ scaler.mean_
    if len(lr.classes_) == 2:  # binary sklearn keeps one row; the softmax over two needs both
        w, b = np.stack([-w[0] / 2, w[0] / 2]), np.array([-b[0] / 2, b[0] / 2])
    weight = torch.zeros(layer.weight.shape)
    bias = torch.full(layer.bias.shape, ABSENT_LOGIT)
    for row, cls in enumerate(lr.classes_):
        weight[FACE_PROBE_LABELS.index(cls)] = torch.from_numpy(w[row]).float()
        bias[FACE_PROBE_LABELS.index(cls)] = float(b[row])
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    return {
        "records": len(rows),
        "classes": [str(c) for c in lr.classes_],
        "train_accuracy": round(float(clf.score(feats, labels)), 4),
        "classifier": "StandardScaler + LogisticRegression(C=0.1), emoverse.baselines.linear_probe",
    }
