"""The transfer benchmark's probes (bench/transfer.py): folds fixed per seed and task, a
cross-validated logistic regression scored by AUC, the same for every representation, and the
standard error of a paired difference over users (a bootstrap of the probe users)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from bench.transfer_data import ProbeData

FOLDS = 5
# Inverse L2 strengths the inner cross-validation picks from: every power of ten over
# sklearn LogisticRegressionCV's default range. At 1e-4 the fit is already the C -> 0 limit
# (the centroid-difference direction), at 1e4 all but unregularised, so neither end cuts a
# probe short; a grid with its floor at 0.01 had the floor picked in most folds of the
# 132-user window tasks, for the vectors and the profile alike (docs/model.md).
PROBE_CS = tuple(10.0**k for k in range(-4, 5))
BOOTSTRAP_REPLICATES = 1000  # user resamples behind the standard error over users


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


def fitted_probes(x: np.ndarray, y: np.ndarray, fold: np.ndarray) -> list[Any]:
    """One probe per fold, a logistic regression fitted on the other folds: standardised
    inputs, the L2 strength picked among PROBE_CS by a 3-fold inner cross-validation (so a
    64-d vector and a 30-d profile each get their best)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    out = []
    for f in range(int(fold.max()) + 1):
        fit = (fold >= 0) & (fold != f)
        clf = GridSearchCV(
            make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)),
            {"logisticregression__C": list(PROBE_CS)},
            cv=StratifiedKFold(3),
            scoring="roc_auc",
        )
        clf.fit(x[fit], y[fit].astype(np.int64))
        out.append(clf)
    return out


def scores_of(probes: list[Any], x: np.ndarray, fold: np.ndarray) -> np.ndarray:
    """Out-of-fold decision values: each fold's rows of `x` scored by that fold's probe; NaN
    outside the folds."""
    scores = np.full(len(x), np.nan)
    for f, clf in enumerate(probes):
        scores[fold == f] = clf.decision_function(x[fold == f])
    return scores


def probe_scores(x: np.ndarray, y: np.ndarray, fold: np.ndarray) -> np.ndarray:
    """Out-of-fold decision values of representation `x` for labels `y` (fitted_probes)."""
    return scores_of(fitted_probes(x, y, fold), x, fold)


def fold_auc(scores: np.ndarray, y: np.ndarray, fold: np.ndarray) -> float:
    """Mean over folds of the AUC of the out-of-fold scores; NaN when the folds are empty."""
    from sklearn.metrics import roc_auc_score

    aucs = [
        roc_auc_score(y[fold == f].astype(np.int64), scores[fold == f])
        for f in range(int(fold.max()) + 1)
    ]
    return float(np.mean(aucs)) if aucs else math.nan


def probe_auc(x: np.ndarray, y: np.ndarray, fold: np.ndarray) -> float:
    """Mean over folds of the test AUC of the probe (probe_scores); NaN when the folds are
    empty (a task with too few of one class)."""
    return fold_auc(probe_scores(x, y, fold), y, fold)


def score_all(
    x: np.ndarray, data: ProbeData, folds: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Out-of-fold probe scores of representation `x` (rows in data.user_ids order), per task."""
    return {t: probe_scores(x, data.targets[t], folds[t]) for t in data.targets}


def aucs_of(
    scores: dict[str, np.ndarray], data: ProbeData, folds: dict[str, np.ndarray]
) -> dict[str, float]:
    """Probe AUC per task of score_all's scores."""
    return {t: fold_auc(s, data.targets[t], folds[t]) for t, s in scores.items()}


# --- standard error over users ------------------------------------------------------------------


def weighted_auc(scores: np.ndarray, y: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUC of `scores` (n,) for labels `y` (n,) under each row of `weights` (R, n): the
    weighted share of (positive, negative) pairs ordered right, ties counting half (with unit
    weights, exactly roc_auc_score). (R,); NaN where a class has no weight."""
    order = np.argsort(scores, kind="stable")
    s, pos = scores[order], y[order] == 1
    w = weights[:, order].astype(np.float64)
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # first row of each tied group
    neg_g = np.add.reduceat(w * ~pos, starts, axis=1)  # (R, G) negative weight per group
    pos_g = np.add.reduceat(w * pos, starts, axis=1)
    below = np.cumsum(neg_g, axis=1) - neg_g  # negatives strictly below each group
    pairs = pos_g.sum(axis=1) * neg_g.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, (pos_g * (below + 0.5 * neg_g)).sum(axis=1) / pairs, np.nan)


def user_bootstrap_se(
    a: dict[int, dict[str, np.ndarray]],
    b: dict[int, dict[str, np.ndarray]],
    data: ProbeData,
    folds: dict[int, dict[str, np.ndarray]],
    replicates: int = BOOTSTRAP_REPLICATES,
    seed: int = 0,
) -> dict[str, float]:
    """Standard error over users of the paired difference a minus b (probe AUC averaged over
    seeds, per task and for the mean over tasks): the probe users resampled (Poisson(1)
    weights, one draw per user shared by every seed, task and both representations) and the
    out-of-fold scores of score_all re-scored. The SE over seeds says how much training and
    folds move a difference; this one how much the choice of users does, which on a task of
    a hundred users is the larger."""
    rng = np.random.default_rng(seed)
    # counts 0..~10: uint8 keeps 1,000 draws of 100,000 users at 100 MB
    weights = rng.poisson(1.0, size=(replicates, len(data.user_ids))).astype(np.uint8)
    seeds = sorted(set(a) & set(b))
    diffs = {}
    for t, y in data.targets.items():
        per_seed = []
        for s in seeds:
            fold = folds[s][t]
            per_fold = [
                weighted_auc(a[s][t][rows], y[rows], weights[:, rows])
                - weighted_auc(b[s][t][rows], y[rows], weights[:, rows])
                for rows in (fold == f for f in range(int(fold.max()) + 1))
            ]
            per_seed.append(np.mean(per_fold, axis=0) if per_fold else np.full(replicates, np.nan))
        diffs[t] = np.mean(per_seed, axis=0)  # (R,)
    out = {t: _nanstd(d) for t, d in diffs.items()}
    out["mean"] = _nanstd(np.nanmean(np.stack(list(diffs.values())), axis=0))
    return out


def _nanstd(values: np.ndarray) -> float:
    v = values[~np.isnan(values)]
    return float(v.std(ddof=1)) if len(v) > 1 else math.nan
