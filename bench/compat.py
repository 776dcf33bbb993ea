"""Compatibility benchmark: does a downstream model trained on one model version's vectors keep
working on the next version's vectors, raw or through the refresh's map (refresh/compat.py)?

    .venv/bin/python bench/transfer.py --source movielens --models supermoe --seeds 4 \\
        --save-vectors /tmp/compat_vecs --out /tmp/compat_out        # the vectors (minutes)
    .venv/bin/python bench/compat.py --vectors /tmp/compat_vecs       # this (a minute or two)

Two trainings of the same recipe with different seeds stand for an "old" and a "new" model
version (the worst case of a retrain: nothing but the data is shared). For every ordered pair
of seeds (old, new) and every MovieLens transfer task (bench/transfer_data.py): a logistic
regression is trained on the old version's vectors exactly as bench/transfer_probe.py trains
its probes (standardised inputs, C by a 3-fold inner cross-validation, 5 stratified folds),
then scored on the held-out fold fed (a) the old vectors themselves, (b) the new vectors raw,
(c) the new vectors mapped into the old space by each method the refresh offers, the map
fitted as the refresh fits it (`fit_map`: on 80% of the shared users, no labels).

Reported per representation: mean test AUC over tasks, and the share of the old vectors'
AUC kept, as an AUC-0.5 share: mean_t(AUC_x - 0.5) / mean_t(AUC_old - 0.5) (1: all kept, 0:
chance). Differences mapped - raw are paired by seed pair, with standard errors over pairs (the
pairs share seeds, so the errors are optimistic). Also the maps' held-out cosine. Writes
bench/results/compat_<source>.json; the last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from itertools import permutations
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench.* as a script

from bench.common import ROOT, log, write_section
from bench.transfer_data import load_probe_inputs, load_vectors
from bench.transfer_probe import FOLDS, fitted_probes, fold_auc, scores_of, stratified_folds
from refresh.compat import fit_map, mean_cosine
from refresh.config import COMPAT_METHODS

OLD, RAW = "old", "new_raw"
REPS = (OLD, RAW, *(f"new_{m}" for m in COMPAT_METHODS))


def load(folder: Path, model: str) -> tuple[dict[str, np.ndarray], dict[int, np.ndarray]]:
    """Targets by task and each seed's vectors (rows in user_ids.npy order)."""
    return load_probe_inputs(folder).targets, load_vectors(folder, model)


def _mean_se(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    se = float(a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else math.nan
    return {"mean": round(float(a.mean()), 4), "se": round(se, 4), "n": len(a)}


def run(folder: Path, model: str, folds: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    targets, vectors = load(folder, model)
    seeds = sorted(vectors)
    if len(seeds) < 2:
        raise SystemExit(f"{folder}: vectors of at least two seeds of {model} are needed")
    fold_of = {t: stratified_folds(y, 0, folds) for t, y in targets.items()}
    tasks = [t for t in targets if fold_of[t].max() >= 0]
    probes: dict[tuple[int, str], list[Any]] = {}
    for s in seeds:  # the downstream models: one per old version and task
        for t in tasks:
            probes[s, t] = fitted_probes(vectors[s], targets[t], fold_of[t])
        log(f"probes of seed {s} trained ({time.perf_counter() - t0:.0f}s)")
    pairs: list[dict[str, Any]] = []
    for old_s, new_s in permutations(seeds, 2):
        old, new = vectors[old_s], vectors[new_s]
        inputs = {OLD: old, RAW: new}
        fit_cos = {}
        for method in COMPAT_METHODS:
            m = fit_map(new, old, f"s{old_s}", method, f"s{old_s}")
            inputs[f"new_{method}"] = m.apply(new)
            fit_cos[method] = m.info.fit_cosine
        auc = {
            rep: {
                t: fold_auc(scores_of(probes[old_s, t], x, fold_of[t]), targets[t], fold_of[t])
                for t in tasks
            }
            for rep, x in inputs.items()
        }
        lift = {rep: float(np.mean([a[t] - 0.5 for t in tasks])) for rep, a in auc.items()}
        pairs.append(
            {
                "old_seed": old_s,
                "new_seed": new_s,
                "auc": {rep: {t: round(v, 4) for t, v in a.items()} for rep, a in auc.items()},
                "mean_auc": {
                    rep: round(float(np.mean(list(a.values()))), 4) for rep, a in auc.items()
                },
                "kept": {rep: round(lift[rep] / lift[OLD], 4) for rep in auc},
                "raw_cosine": round(mean_cosine(new, old), 4),
                "fit_cosine": fit_cos,
            }
        )
        log(f"old s{old_s} new s{new_s}: kept {pairs[-1]['kept']}")
    summary: dict[str, Any] = {
        "mean_auc": {rep: _mean_se([p["mean_auc"][rep] for p in pairs]) for rep in REPS},
        "kept": {rep: _mean_se([p["kept"][rep] for p in pairs]) for rep in REPS},
        "fit_cosine": {m: _mean_se([p["fit_cosine"][m] for p in pairs]) for m in COMPAT_METHODS},
        "raw_cosine": _mean_se([p["raw_cosine"] for p in pairs]),
        "kept_mapped_minus_raw": {
            m: _mean_se([p["kept"][f"new_{m}"] - p["kept"][RAW] for p in pairs])
            for m in COMPAT_METHODS
        },
        "kept_procrustes_minus_lstsq": _mean_se(
            [p["kept"]["new_procrustes"] - p["kept"]["new_lstsq"] for p in pairs]
        ),
    }
    return {
        "generated": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(["python bench/compat.py", *sys.argv[1:]]),
        "model": model,
        "seeds": seeds,
        "users": int(len(next(iter(vectors.values())))),
        "tasks": tasks,
        "kept_definition": "mean_t(AUC_x - 0.5) / mean_t(AUC_old - 0.5), AUC of a probe "
        "trained on the old version's vectors",
        "seconds": round(time.perf_counter() - t0, 1),
        "pairs": pairs,
        "summary": summary,
    }


def print_table(report: dict[str, Any]) -> None:
    s = report["summary"]
    log(f"{len(report['pairs'])} ordered seed pairs, {len(report['tasks'])} tasks")
    for rep in REPS:
        a, k = s["mean_auc"][rep], s["kept"][rep]
        log(
            f"  {rep:16s} AUC {a['mean']:.4f} +- {a['se']:.4f}   kept {k['mean']:.3f} +- {k['se']:.3f}"
        )


MD_BEGIN = (
    "<!-- compat:begin (generated by bench/compat.py --write-md; edits here are replaced) -->"
)
MD_END = "<!-- compat:end -->"
LABELS = {
    OLD: "old vectors (the reference)",
    RAW: "new vectors, raw",
    "new_lstsq": "new vectors, least-squares map (**default**)",
    "new_procrustes": "new vectors, Procrustes map",
}


def render_md(report: dict[str, Any]) -> str:
    """The generated part of BENCHMARKS.md's compatibility section."""
    s = report["summary"]

    def ms(d: dict[str, float], digits: int = 3) -> str:
        return f"{d['mean']:.{digits}f} ± {d['se']:.{digits}f}"

    rows = [
        f"| {LABELS[rep]} | {ms(s['mean_auc'][rep], 4)} | {ms(s['kept'][rep])} |"
        for rep in (OLD, RAW, "new_lstsq", "new_procrustes")
    ]
    diffs = [
        f"| least squares - raw | {ms(s['kept_mapped_minus_raw']['lstsq'])} |",
        f"| Procrustes - raw | {ms(s['kept_mapped_minus_raw']['procrustes'])} |",
        f"| Procrustes - least squares | {ms(s['kept_procrustes_minus_lstsq'])} |",
    ]
    return "\n".join(
        [
            MD_BEGIN,
            "",
            f"Generated {report['generated']} by `{report['command']}`. Model {report['model']}, "
            f"seeds {report['seeds']} ({len(report['pairs'])} ordered old/new pairs), "
            f"{report['users']} users, {len(report['tasks'])} tasks, {report['seconds']} s. "
            "Kept: " + report["kept_definition"] + ". Mean ± standard error over pairs.",
            "",
            "| fed to the old version's probe | mean AUC over tasks | AUC-0.5 share kept |",
            "| --- | ---: | ---: |",
            *rows,
            "",
            "| paired difference in share kept | mean ± se |",
            "| --- | ---: |",
            *diffs,
            "",
            f"Held-out mean cosine of mapped new vectors to the old ones: least squares "
            f"{ms(s['fit_cosine']['lstsq'])}, Procrustes {ms(s['fit_cosine']['procrustes'])}; "
            f"raw {ms(s['raw_cosine'])}.",
            "",
            MD_END,
        ]
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vectors", type=Path, help="a bench/transfer.py --save-vectors folder")
    ap.add_argument("--model", default="supermoe")
    ap.add_argument("--folds", type=int, default=FOLDS)
    ap.add_argument("--source", default="movielens", help="names the result file only")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--write-md", action="store_true", help="write the BENCHMARKS.md section")
    ap.add_argument(
        "--from-json", type=Path, default=None, help="render a saved report again, run nothing"
    )
    args = ap.parse_args(argv)
    if args.from_json is not None:
        report = json.loads(args.from_json.read_text())
    else:
        if args.vectors is None:
            ap.error("--vectors is needed (or --from-json)")
        report = run(args.vectors, args.model, args.folds)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"compat_{args.source}.json").write_text(json.dumps(report, indent=1))
    print_table(report)
    if args.write_md:
        write_section(render_md(report), MD_BEGIN, MD_END)
    last = {
        "kept": report["summary"]["kept"],
        "mapped_minus_raw": report["summary"]["kept_mapped_minus_raw"],
    }
    print(json.dumps({"bench": "compat", "pairs": len(report["pairs"]), **last}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
