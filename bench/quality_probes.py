"""The quality benchmark's statistics on data (bench/quality.py): linear probes on user
vectors and raw features, test-split label counts and the standard error of one AUC."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd


def probe_auc(x: np.ndarray, y: np.ndarray, fit: np.ndarray) -> float:
    """Logistic-regression probe fitted on rows `fit`, AUC on the others.

    Binary targets: AUC. Multi-class: macro one-vs-rest AUC over classes with >= 5 rows on
    both sides (rare classes carry no reliable AUC).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler

    keep = y >= 0  # -1 = attribute unknown
    x, y, fit = x[keep], y[keep], fit[keep]
    ev = ~fit
    scaler = StandardScaler().fit(x[fit])
    clf = LogisticRegression(max_iter=500, C=1.0)
    clf.fit(scaler.transform(x[fit]), y[fit])
    proba = clf.predict_proba(scaler.transform(x[ev]))  # (N_eval, C)
    classes = list(clf.classes_)
    if len(classes) == 2:
        return float(roc_auc_score(y[ev] == classes[1], proba[:, 1]))
    aucs = []
    for j, c in enumerate(classes):
        pos = y[ev] == c
        if pos.sum() >= 5 and (y[fit] == c).sum() >= 5 and (~pos).sum() >= 5:
            aucs.append(roc_auc_score(pos, proba[:, j]))
    return float(np.mean(aucs)) if aucs else float("nan")


def probe_rows(frame: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray]:
    """Test-cut rows (one per user) and the probe's fit mask: even user ids fit, odd evaluate."""
    part = frame[frame["split"] == "test"].drop_duplicates("user_id").reset_index(drop=True)
    return part, (part["user_id"].to_numpy() % 2) == 0


def label_counts_on_test(frame: pd.DataFrame, tasks: tuple[str, ...]) -> dict[str, dict[str, int]]:
    """Positives and negatives of each task on the test split (unlabelled rows left out)."""
    test = frame[frame["split"] == "test"]
    out = {}
    for t in tasks:
        y = test[f"label_{t}"].to_numpy(dtype=np.float64)
        out[t] = {"pos": int(np.sum(y == 1.0)), "neg": int(np.sum(y == 0.0))}
    return out


def auc_standard_error(auc: float, pos: int, neg: int) -> float:
    """Standard error of one AUC measured on `pos` positives and `neg` negatives (Hanley and
    McNeil 1982). It is what the test split alone adds to a model's AUC, before any seed
    spread: a gap between two models much smaller than it cannot be told from noise. On
    normal scores it runs up to a quarter above a bootstrap of the split (tests/bench)."""
    if pos < 1 or neg < 1 or not math.isfinite(auc):
        return float("nan")
    q1 = auc / (2.0 - auc)
    q2 = 2.0 * auc * auc / (1.0 + auc)
    a2 = auc * auc
    var = (auc * (1 - auc) + (pos - 1) * (q1 - a2) + (neg - 1) * (q2 - a2)) / (pos * neg)
    return math.sqrt(max(var, 0.0))


def probe_reference(
    part: pd.DataFrame, fit: np.ndarray, heldout: list[str], spec: Any
) -> dict[str, float]:
    """The same probe on raw observable features (category histogram, event-type shares,
    log length, the model's profile attributes one-hot): what behaviour alone reveals."""
    x = raw_features(part, spec)
    return {a: probe_auc(x, part[a].to_numpy(dtype=np.int64), fit) for a in heldout}


def raw_features(part: pd.DataFrame, spec: Any) -> np.ndarray:
    def hist(col: str, size: int) -> np.ndarray:
        out = np.zeros((len(part), size))
        for i, seq in enumerate(part[col]):
            if len(seq):
                v = np.minimum(np.asarray(seq, dtype=np.int64), size - 1)
                out[i] = np.bincount(v, minlength=size) / len(seq)
        return out

    cats = int(max((max(s) for s in part["category_seq"] if len(s)), default=0)) + 1
    kinds = int(max((max(s) for s in part["event_type_seq"] if len(s)), default=0)) + 1
    cols = [
        hist("category_seq", cats),
        hist("event_type_seq", kinds),
        hist("gap_bucket_seq", 16),
        np.log1p(part["seq_len"].to_numpy(dtype=np.float64))[:, None],
    ]
    for f in spec.model_profile_features:
        v = part[f].to_numpy(dtype=np.int64)
        cols.append(np.eye(int(v.max()) + 2)[np.clip(v, -1, None) + 1])
    return np.concatenate(cols, axis=1)
