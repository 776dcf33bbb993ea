"""Training quality: per-task test AUC of the SUPERMOE model vs Bayes-optimal AUC (synthetic),
vs the plain summed loss, and vs one single-task model per task; synthetic and MovieLens-100K.

Bars: synthetic multi-task AUC within 0.03 of Bayes-optimal; no task more than 0.005 below its
single-task model. The training frame is built in memory with the same point-in-time rule as
Feast (userembed.snapshots: last N events strictly before each cut), not through Feast, to keep
the benchmark to minutes on 2 cores. Last line: one JSON object.

    .venv/bin/python bench/train_quality.py --users 100000
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

logger = logging.getLogger("train_quality")


def frame_from_tables(
    events: pd.DataFrame, users: pd.DataFrame, labels: pd.DataFrame, spec: Any
) -> pd.DataFrame:
    """(events, users, labels, spec) -> the feast_ops.training_frame layout, in memory, with
    the future targets `data build` adds to the labels."""
    from userembed.future_targets import add_future_targets
    from userembed.snapshots import profile_table, snapshot, sort_events

    ids = np.union1d(users["user_id"].to_numpy(np.int64), labels["user_id"].to_numpy(np.int64))
    ev = sort_events(events, ids)
    labels, _ = add_future_targets(events, labels, spec)
    labels["label_timestamp"] = pd.to_datetime(labels["label_timestamp"], utc=True)
    parts = []
    for cut in spec.cut_times:
        beh = snapshot(ev, cut, spec.sequence_length).to_pandas().drop(columns="event_timestamp")
        prof = profile_table(users, ev.user_ids, cut).to_pandas().drop(columns="event_timestamp")
        lab = labels[labels["label_timestamp"] == cut]
        parts.append(lab.merge(beh, on="user_id", how="left").merge(prof, on="user_id"))
    frame = pd.concat(parts, ignore_index=True)
    for f in ("item_seq", "category_seq", "event_type_seq", "gap_bucket_seq"):
        frame[f] = [list(v) if isinstance(v, list | np.ndarray) else [] for v in frame[f]]
    frame["split"] = spec.split_of(frame["label_timestamp"]).to_numpy()
    return frame[frame["split"].notna()].reset_index(drop=True)


def run_one(
    frame: pd.DataFrame,
    tasks: tuple[str, ...],
    profile: tuple[str, ...],
    seq_len: int,
    run_dir: Path,
    **options: Any,
) -> dict[str, float]:
    from trainer.options import config_for
    from trainer.train import train

    keep = [c for c in frame.columns if not c.startswith("label_") or c == "label_timestamp"]
    sub = frame[keep + [f"label_{t}" for t in tasks]]
    sub = sub[sub[[f"label_{t}" for t in tasks]].notna().any(axis=1)]
    cfg = config_for(sub, tasks, profile, run_dir, sequence_length=seq_len, plots=False, **options)
    t0 = time.perf_counter()
    result = train(cfg, sub)
    logger.info("%s: %s in %.0fs", run_dir.name, result.test_auc, time.perf_counter() - t0)
    return result.test_auc


def bench_dataset(
    name: str,
    frame: pd.DataFrame,
    spec: Any,
    workdir: Path,
    single_task: bool,
    plain_loss: bool = True,
    **options: Any,
) -> dict[str, Any]:
    tasks = tuple(spec.tasks)
    profile = tuple(spec.model_profile_features)
    L = spec.sequence_length
    # Small data (MovieLens: ~5 steps an epoch) overfits within one max_steps // 6 interval:
    # evaluate at least once an epoch so early stopping and best-model selection can act.
    epoch_steps = max(1, int((frame["split"] == "train").sum()) // options["batch_size"])
    if epoch_steps < options["eval_every"]:
        # ... and let warm-up and patience be counted in epochs too, not in the large-data steps.
        options = {
            **options,
            "eval_every": max(5, epoch_steps),
            "warmup_steps": 2 * max(5, epoch_steps),
            "patience": 6,
        }
    multi = run_one(frame, tasks, profile, L, workdir / f"{name}-multi", **options)
    plain: dict[str, float] = {}
    if plain_loss:
        plain = run_one(
            frame, tasks, profile, L, workdir / f"{name}-plain", loss="plain", **options
        )
    single: dict[str, float] = {}
    if single_task:
        for t in tasks:
            single[t] = run_one(frame, (t,), profile, L, workdir / f"{name}-single-{t}", **options)[
                t
            ]
    rows = {}
    for t in tasks:
        row: dict[str, float | None] = {
            "multi": multi[t],
            "plain": plain.get(t),
            "single": single.get(t),
        }
        if spec.bayes_auc:
            bayes = float(spec.bayes_auc[t])
            row["bayes"] = bayes
            row["gap_to_bayes"] = bayes - multi[t]
        if t in single:
            row["multi_minus_single"] = multi[t] - single[t]
        rows[t] = row
    return {"rows": len(frame), "tasks": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, default=100_000)
    p.add_argument("--max-steps", type=int, default=1500)
    p.add_argument("--eval-every", type=int, help="default: max(50, max_steps // 6)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--no-single-task", action="store_true")
    p.add_argument("--no-plain", action="store_true", help="skip the plain-loss comparison run")
    p.add_argument("--skip-movielens", action="store_true")
    p.add_argument("--skip-synthetic", action="store_true")
    p.add_argument("--threads", type=int, default=1)  # 2 oversubscribes a shared 2-core box
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    logging.getLogger("torchrec").setLevel(logging.WARNING)
    for h in logging.getLogger().handlers:
        h.addFilter(lambda r: r.name != "root" or r.levelno >= logging.WARNING)
    import torch

    torch.set_num_threads(args.threads)
    from userembed.datasets import generate_synthetic, load_movielens

    options = dict(
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        eval_every=args.eval_every or max(50, args.max_steps // 6),
        checkpoint_every=10**9,
        patience=3,
    )
    out: dict[str, Any] = {
        "users": args.users,
        "max_steps": args.max_steps,
        "frame": "in-memory snapshot join (same rule as Feast)",
    }
    loaders: dict[str, Any] = {}
    if not args.skip_synthetic:
        loaders["synthetic"] = lambda: generate_synthetic(args.users, seed=0)
    if not args.skip_movielens:
        loaders["movielens"] = load_movielens
    with tempfile.TemporaryDirectory() as tmp:
        for name, load in loaders.items():
            events, users, labels, spec = load()
            out[name] = bench_dataset(
                name,
                frame_from_tables(events, users, labels, spec),
                spec,
                Path(tmp),
                not args.no_single_task,
                not args.no_plain,
                **options,
            )
    bars: dict[str, Any] = {}
    if "synthetic" in out:
        syn = out["synthetic"]["tasks"]
        bars["within_0.03_of_bayes"] = all(r["gap_to_bayes"] <= 0.03 for r in syn.values())
    if not args.no_single_task:
        bars["no_task_0.005_below_single"] = all(
            r["multi_minus_single"] >= -0.005
            for ds in ("synthetic", "movielens")
            if ds in out
            for r in out[ds]["tasks"].values()
        )
    out["bars"] = bars
    for ds in ("synthetic", "movielens"):
        if ds not in out:
            continue
        print(f"\n{ds} ({out[ds]['rows']} label rows)")
        print(f"{'task':10} {'multi':>7} {'plain':>7} {'single':>7} {'bayes':>7}")
        for t, r in out[ds]["tasks"].items():
            fmt = lambda v: f"{v:7.4f}" if v is not None else "      -"  # noqa: E731
            print(
                f"{t:10} {fmt(r['multi'])} {fmt(r['plain'])} {fmt(r['single'])} "
                f"{fmt(r.get('bayes'))}"
            )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
