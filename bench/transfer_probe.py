"""The transfer benchmark's probes (bench/transfer.py): folds fixed per seed and task, and a
cross-validated logistic regression scored by AUC, the same for every representation."""

from __future__ import annotations

import math

import numpy as np

from bench.transfer_data import ProbeData

FOLDS = 5
PROBE_CS = (0.01, 0.1, 1.0, 10.0)  # inverse L2 strengths the inner cross-validation picks from


def stratified_folds(y: np.ndarray, seed: int, k: int = FOLDS) -> np.ndarray:
    """Fold id (0..k-1) per row, stratified by the label; -1 where the label is NaN. The same
    for every representation probed at this seed, so their AUCs pair fold by fold."""
    from sklearn.model_selection import StratifiedKFold

    fold = np.full(len(y), -1, dtype=np.int64)
    rows = np.flatnonzero(~np.isnan(y))
    labels = y[rows].astype(np.int64)
    if min(np.bincount(labels, minlength=2)) < k:
        return fold  # too few of one class for k folds: the task is skipped (NaN)
    for i, (_, test) in enumerate(
        StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(rows, labels)
    ):
        fold[rows[test]] = i
    return fold


def probe_auc(x: np.ndarray, y: np.ndarray, fold: np.ndarray) -> float:
    """Mean over folds of the test AUC of a logistic regression fitted on the other folds:
    standardised inputs, the L2 strength picked among PROBE_CS by a 3-fold inner
    cross-validation (a 64-d vector and a 30-d profile each get their best). NaN when the
    folds are empty (a task with too few of one class)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    aucs = []
    for f in range(int(fold.max()) + 1):
        fit, ev = (fold >= 0) & (fold != f), fold == f
        clf = GridSearchCV(
            make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)),
            {"logisticregression__C": list(PROBE_CS)},
            cv=StratifiedKFold(3),
            scoring="roc_auc",
        )
        clf.fit(x[fit], y[fit].astype(np.int64))
        aucs.append(roc_auc_score(y[ev].astype(np.int64), clf.decision_function(x[ev])))
    return float(np.mean(aucs)) if aucs else math.nan


def probe_all(x: np.ndarray, data: ProbeData, folds: dict[str, np.ndarray]) -> dict[str, float]:
    """Probe AUC of representation `x` (rows in data.user_ids order) on every task."""
    return {t: probe_auc(x, data.targets[t], folds[t]) for t in data.targets}
