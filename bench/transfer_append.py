"""What the vector lacks that the profile holds: probe the saved vectors with profile columns
appended, on the transfer benchmark's own folds.

    .venv/bin/python bench/transfer.py --source synthetic --users 5000 --seeds 2 \\
        --models supermoe --save-vectors /tmp/vecs --out /tmp/transfer_out   # the vectors
    .venv/bin/python bench/transfer_append.py --vectors /tmp/vecs --seeds 2         # this

For each seed, the saved vectors of one model (`--model`), alone and with columns of the
hand-made profile appended (`--append NAME=COLUMNS`, repeatable; COLUMNS is a comma list of
profile column names or of the groups `counts` (its log_* columns), `categories` (its category
histogram), `attributes` (the profile attributes one-hot) and `profile` (every column)),
probed exactly as bench/transfer.py probes (bench/transfer_probe.py, the same folds per seed
and task). If appending a column closes a task's gap to the profile, the vector holds that
column's information only approximately; if a representation that holds strictly more than
the vector probes lower, the probe pays for width there. Reported: mean probe AUC and the paired difference to the profile (± SE over
seeds, and over users: bench.transfer_probe.user_bootstrap_se), the worst task. The last line
printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench.* as a script

from bench.common import log
from bench.transfer_data import ProbeData, load_probe_inputs, load_vectors
from bench.transfer_probe import aucs_of, score_all, stratified_folds, user_bootstrap_se
from bench.transfer_report import PROFILE, paired

DEFAULT_APPENDS = (
    "log_count=log_count",
    "counts=counts",
    "counts_attributes=counts,attributes",
    "profile=profile",
)
HISTORY_PREFIXES = ("log_", "category_", "event_type")  # columns of the history, not attributes


def columns_of(data: ProbeData, spec: str) -> list[int]:
    """Profile column indices of a comma list of column names and groups."""
    names = list(data.profile_columns)
    out: list[str] = []
    for name in spec.split(","):
        if name == "profile":
            out += names
        elif name == "counts":
            out += [c for c in names if c.startswith("log_")]
        elif name == "categories":
            out += [c for c in names if c.startswith("category_")]
        elif name == "attributes":
            out += [c for c in names if not c.startswith(HISTORY_PREFIXES)]
        elif name in names:
            out.append(name)
        else:
            raise SystemExit(f"unknown profile column {name!r}; columns: {names}")
    return [names.index(c) for c in dict.fromkeys(out)]


def run(folder: Path, model: str, seeds: int, appends: dict[str, str]) -> dict[str, Any]:
    """Per representation and seed, the probe AUC per task; summary against the profile."""
    data = load_probe_inputs(folder)
    vectors = load_vectors(folder, model)
    if missing := [s for s in range(seeds) if s not in vectors]:
        raise SystemExit(f"{folder}: no {model} vectors of seeds {missing}")
    cols = {name: columns_of(data, spec) for name, spec in appends.items()}
    reps = (PROFILE, model, *(f"{model}+{name}" for name in appends))
    scores: dict[str, dict[int, dict[str, np.ndarray]]] = {r: {} for r in reps}
    aucs: dict[str, dict[int, dict[str, float]]] = {r: {} for r in reps}
    folds_by_seed = {}
    for seed in range(seeds):
        folds = {t: stratified_folds(y, seed) for t, y in data.targets.items()}
        folds_by_seed[seed] = folds
        vec = vectors[seed]
        scores[PROFILE][seed] = score_all(data.profile, data, folds)
        scores[model][seed] = score_all(vec, data, folds)
        for name, idx in cols.items():
            x = np.concatenate([vec, data.profile[:, idx]], axis=1)
            scores[f"{model}+{name}"][seed] = score_all(x, data, folds)
        for rep in reps:
            aucs[rep][seed] = aucs_of(scores[rep][seed], data, folds)
        log(f"seed {seed}: {len(reps)} representations probed")
    tasks = list(data.targets)
    summary = {}
    for rep in reps[1:]:
        d = paired(aucs[rep], aucs[PROFILE], tasks)
        se_users = user_bootstrap_se(scores[rep], scores[PROFILE], data, folds_by_seed)
        worst = min(tasks, key=lambda t: d[t]["mean"] if not math.isnan(d[t]["mean"]) else 1.0)
        summary[rep] = {
            "mean_auc": float(np.mean([np.nanmean(list(a.values())) for a in aucs[rep].values()])),
            "delta_vs_profile": {**d["mean"], "se_users": se_users["mean"]},
            "worst_task": {"task": worst, "delta": d[worst]["mean"]},
            "per_task": {t: d[t]["mean"] for t in tasks},
            "per_task_se_users": {t: se_users[t] for t in tasks},
        }
    return {"model": model, "seeds": seeds, "appended": appends, "summary": summary}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--vectors", type=Path, required=True, help="bench/transfer.py --save-vectors")
    ap.add_argument("--seeds", type=int, required=True)
    ap.add_argument("--model", default="supermoe")
    ap.add_argument("--append", action="append", default=None, metavar="NAME=COLUMNS")
    args = ap.parse_args(argv)
    appends = dict(a.partition("=")[::2] for a in (args.append or DEFAULT_APPENDS))
    result = run(args.vectors, args.model, args.seeds, appends)
    for rep, s in result["summary"].items():
        d, w = s["delta_vs_profile"], s["worst_task"]
        print(
            f"{rep:32s} mean {s['mean_auc']:.4f}  vs profile {d['mean']:+.4f} ± {d['se']:.4f}"
            f" (users ± {d['se_users']:.4f})  worst {w['task']} {w['delta']:+.4f}"
            f" (users ± {s['per_task_se_users'][w['task']]:.4f})"
        )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
