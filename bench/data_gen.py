"""Benchmark: synthetic users -> raw tables -> point-in-time feature tables.

Prints wall time and peak memory (RSS) per stage; the last line is one JSON object of figures.
With --check-auc N it also fits a logistic regression on hand-made observable features
(category histogram, counts, event-type shares, gaps, profile) of N users at the test cut and
prints its test AUC beside the Bayes-optimal AUC the spec reports (needs scikit-learn: the
`train` extra).

    .venv/bin/python bench/data_gen.py --users 1000000
    .venv/bin/python bench/data_gen.py --users 100000 --check-auc
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from userembed.datasets.synthetic import TASKS, auc, generate_synthetic, true_probabilities
from userembed.features import DEFAULT_SEQUENCE_LENGTH
from userembed.snapshots import write_feature_tables


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def observable_features(
    events: pd.DataFrame, users: pd.DataFrame, cut: pd.Timestamp, spec
) -> np.ndarray:
    """Hand-made features from what a model sees: the last 50 events before `cut` + profile."""
    n = len(users)
    ev = events[events["event_timestamp"] < cut]
    ev = ev.groupby("user_id", sort=False).tail(DEFAULT_SEQUENCE_LENGTH)
    uid = ev["user_id"].to_numpy()
    c = int(events["category_id"].max()) + 1
    hist = np.zeros((n, c))
    np.add.at(hist, (uid, ev["category_id"].to_numpy()), 1)
    cnt = hist.sum(1)
    frac = hist / np.maximum(cnt, 1)[:, None]
    ent = -(frac * np.log(np.where(frac > 0, frac, 1.0))).sum(1)
    et = np.zeros((n, 4))
    np.add.at(et, (uid, ev["event_type"].to_numpy()), 1)
    ts = ev["event_timestamp"].astype("int64").to_numpy() / 1e9
    same = uid[1:] == uid[:-1]
    lg, ng = np.zeros(n), np.zeros(n)
    np.add.at(lg, uid[1:][same], np.log1p(np.diff(ts)[same] / 60))
    np.add.at(ng, uid[1:][same], 1)
    clicks, carts = et[:, 1:].sum(1), et[:, 2:].sum(1)
    prof = pd.get_dummies(users[list(spec.model_profile_features)].astype(str)).to_numpy(float)
    top2 = np.sort(frac, 1)[:, -2:].sum(1)
    return np.column_stack(
        [frac, ent, np.log1p(cnt), et / np.maximum(cnt, 1)[:, None], lg / np.maximum(ng, 1),
         np.log((carts + 0.5) / (clicks + 1)), np.log((clicks + 0.5) / (cnt + 1)), top2,
         (hist > 0).sum(1), prof]
    )  # fmt: skip


def check_auc(num_users: int, seed: int) -> dict[str, dict[str, float]]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    events, users, labels, spec = generate_synthetic(num_users, seed)
    cut = pd.Timestamp(spec.test_cuts[0])
    x = StandardScaler().fit_transform(observable_features(events, users, cut, spec))
    test = labels[labels["label_timestamp"] == cut].sort_values("user_id")
    probs = true_probabilities(num_users, seed)
    half = np.random.default_rng(seed + 1).random(num_users) < 0.5  # fit on one half
    out = {}
    for task in TASKS:
        y = test["label_" + task].to_numpy()
        fit = half & ~np.isnan(y)
        p = LogisticRegression(max_iter=1000).fit(x[fit], y[fit]).predict_proba(x)[:, 1]
        out[task] = {
            "bayes_auc_spec": spec.bayes_auc[task],
            "bayes_auc_half": round(auc(probs[task][~half], y[~half]), 4),
            "logreg_auc_half": round(auc(p[~half], y[~half]), 4),
        }
        print(task, out[task], flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="default: a temporary folder")
    parser.add_argument("--check-auc", action="store_true", help="logistic-regression sanity check")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    if args.check_auc:
        print(json.dumps({"users": args.users, "auc": check_auc(args.users, args.seed)}))
        return
    t0 = time.perf_counter()
    events, users, labels, spec = generate_synthetic(args.users, args.seed)
    gen_s = time.perf_counter() - t0
    print(
        f"generate: {gen_s:.1f}s, {len(events):,} events, peak RSS {peak_rss_gib():.2f} GiB",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        t1 = time.perf_counter()
        summary = write_feature_tables(events, users, spec, out)
        tables_s = time.perf_counter() - t1
        size = sum(p.stat().st_size for p in out.glob("*.parquet")) / 2**30
    print(f"feature tables: {tables_s:.1f}s, peak RSS {peak_rss_gib():.2f} GiB", flush=True)
    figures = {
        "users": args.users,
        "events": len(events),
        "mean_events_per_user": round(len(events) / args.users, 1),
        "label_rows": len(labels),
        "behavior_rows": summary["behavior_rows"],
        "generate_s": round(gen_s, 1),
        "feature_tables_s": round(tables_s, 1),
        "total_s": round(time.perf_counter() - t0, 1),
        "peak_rss_gib": round(peak_rss_gib(), 2),
        "parquet_gib": round(size, 2),
        "bayes_auc": dict(spec.bayes_auc),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
