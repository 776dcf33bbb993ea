"""Transfer benchmark: do the served vectors beat a hand-made profile on tasks never trained on?

    .venv/bin/python bench/transfer.py --source movielens --seeds 3 --write-md
    .venv/bin/python bench/transfer.py --source synthetic --users 10000 --seeds 3 --write-md
    .venv/bin/python bench/transfer.py --quick          # tiny: synthetic, 1 seed, 2 models

Per seed and model variant (SUPERMOE as `userembed train` trains it by default, and the MMoE,
PLE and shared-bottom dense archs with the same defaults), through the real path, as a team
would run it: data set -> `userembed data build` (userembed.dataset_build) -> Feast apply +
materialise into a private Redis -> `userembed train` (trainer.feast_run.train_from_feast) ->
`userembed export` into a temporary registry -> `userembed refresh` -> every user's vector
read back from Redis as a downstream team reads it (userembed.vectors: the `current` pointer,
then the user hashes) -> linear probes on user-level tasks the model never trained on
(bench/transfer_data.py defines them): 5-fold stratified cross-validated logistic regression
on standardised inputs, C picked by a 3-fold inner cross-validation among the powers of ten
from 1e-4 to 1e4 (bench/transfer_probe.py), mean AUC over the folds. The
folds are fixed per seed and task, and shared by every representation: the hand-made profile
of the whole history (the reference), and each model's vectors. Also reported: each model's
labelled-task test AUCs (a transfer gain bought with a seesaw shows there), and the CPU time
of each training run. Differences to the profile are paired by seed, with standard errors
over seeds (training and folds) and over users (a bootstrap of the probe users: on a window
task of a hundred users the larger of the two).

Writes bench/results/transfer/transfer_<source>.json and .png; --write-md writes the
generated section of BENCHMARKS.md. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import resource
import shutil
import signal
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench.* as a script

from bench.common import ROOT, log, private_redis
from bench.transfer_data import FUTURE_WEEKS, ProbeData, save_probe_inputs, vectors_path
from bench.transfer_probe import FOLDS, aucs_of, score_all, stratified_folds, user_bootstrap_se
from bench.transfer_report import (
    MODELS,
    PROFILE,
    RECIPES,
    SOURCES,
    headline,
    print_table,
    se_users_of,
    summarise,
    write_outputs,
)

RESULTS = ROOT / "bench" / "results" / "transfer"


@dataclass(frozen=True)
class TransferConfig:
    """One benchmark run. max_steps None and no train_options: `userembed train`'s defaults."""

    source: str = "movielens"
    seeds: int = 3
    models: tuple[str, ...] = MODELS
    users: int = 10_000  # synthetic only; MovieLens-100K has 943
    data_seed: int = 0
    future_weeks: int = FUTURE_WEEKS  # MovieLens: the held-out window after the history
    max_steps: int | None = None
    threads: int = 1  # torch and onnxruntime threads: the machine is shared
    folds: int = FOLDS
    train_options: tuple[tuple[str, Any], ...] = ()  # more `userembed train` options (quick)
    # Where to keep what was probed (user ids, profile, targets, each run's vectors) as .npy
    # files, for a probe of one's own; None = nowhere.
    save_vectors: Path | None = None
    quick: bool = False
    items: bool = False  # build with the source's items table (userembed.items)

    def options(self, model: str, seed: int) -> dict[str, Any]:
        """The `userembed train` options of one run: the arch, the seed, the budget."""
        opts: dict[str, Any] = {**RECIPES[model], "seed": seed, **dict(self.train_options)}
        if self.max_steps is not None:
            opts["max_steps"] = self.max_steps
        return opts


def quick(cfg: TransferConfig) -> TransferConfig:
    """--quick: synthetic, 300 users, one seed, SUPERMOE and MMoE, a few tiny steps."""
    return replace(
        cfg,
        source="synthetic",
        users=300,
        seeds=1,
        models=("supermoe", "mmoe"),
        max_steps=6,
        folds=3,
        train_options=(
            ("batch_size", 32),
            ("eval_every", 3),
            ("checkpoint_every", 6),
            ("embedding_dim", 16),
            ("user_dim", 16),
            ("plots", False),
            *cfg.train_options,
        ),
        quick=True,
    )


# --- the pipeline -------------------------------------------------------------------------------


@contextlib.contextmanager
def workspace(home: Path, redis_url: str) -> Iterator[None]:
    """Point every stage at a private workspace and Redis (the same variables a team sets),
    restoring the environment afterwards."""
    keys = (
        "USEREMBED_HOME",
        "REDIS_URL",
        "USEREMBED_REGISTRY_ROOT",
        "USEREMBED_OFFLINE_DIR",
        "USEREMBED_FEAST_REGISTRY",
    )
    saved = {k: os.environ.get(k) for k in keys}
    for k in keys[2:]:
        os.environ.pop(k, None)
    os.environ["USEREMBED_HOME"] = str(home)
    os.environ["REDIS_URL"] = redis_url
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def build(cfg: TransferConfig, workdir: Path, redis_url: str) -> tuple[ProbeData, Any]:
    """`userembed data build` + Feast apply/materialise of the source; the probe data."""
    from bench.transfer_data import movielens_team_files, synthetic_probe_data
    from userembed import paths
    from userembed.dataset_build import BuildRequest, build_dataset, load_built, serve_online

    if cfg.source == "movielens":
        files, data = movielens_team_files(workdir / "team", cfg.future_weeks, cfg.items)
        req = BuildRequest(
            "parquet",
            events_path=files.events,
            users_path=files.users,
            labels_path=files.labels,
            items_path=files.items,
        )
        log(
            f"movielens: history before {files.window_start:%Y-%m-%d}, future window to "
            f"{files.window_end:%Y-%m-%d}; team files in {files.events.parent}"
        )
        summary = build_dataset(req)
    else:
        summary = build_dataset(
            BuildRequest("synthetic", cfg.users, cfg.data_seed, items=cfg.items)
        )
        # the tables the build wrote: exactly what the pipeline was given
        events = pd.read_parquet(paths.data_dir() / paths.EVENTS_FILE)
        users = pd.read_parquet(paths.data_dir() / paths.USERS_FILE)
        data = synthetic_probe_data(events, users, load_built()[1], cfg.users, cfg.data_seed)
    serve_online(redis_url)
    return data, summary


def cpu_seconds() -> float:
    """CPU time of this process so far, all threads (user + system)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def read_vectors(redis_url: str, model: str, user_ids: np.ndarray) -> np.ndarray:
    """Every user's vector as a downstream team reads it: the model's `current` embedding
    version, then one hash per user (userembed/vectors.py). (N, V) in user_ids order."""
    import redis

    from userembed.vectors import VectorStore

    store = VectorStore(redis.Redis.from_url(redis_url), model)
    version = store.current_version()
    if version is None:
        raise RuntimeError(f"{model}: no current embedding version in Redis")
    got = store.read(version, [str(u) for u in user_ids])
    missing = [str(u) for u, v in zip(user_ids, got, strict=True) if v is None]
    if missing:
        raise RuntimeError(f"{model}: {len(missing)} users have no vector, e.g. {missing[:5]}")
    return np.stack([v.vector for v in got if v is not None])


def run_model(
    model: str, seed: int, cfg: TransferConfig, home: Path, redis_url: str, data: ProbeData
) -> tuple[dict[str, Any], np.ndarray]:
    """Train, export, refresh and read back one variant: its record and its vectors."""
    from refresh.config import RefreshConfig
    from refresh.job import refresh
    from trainer.export import export_model
    from trainer.feast_run import train_from_feast
    from trainer.run_dir import RunDir

    name = f"transfer-{model}"
    run_dir = home / "runs" / f"{model}-s{seed}"
    registry = str(home / "models")
    t0, c0 = time.perf_counter(), cpu_seconds()
    result = train_from_feast(run_dir, **cfg.options(model, seed))
    train_wall, train_cpu = time.perf_counter() - t0, cpu_seconds() - c0
    log(
        f"  {model} seed {seed}: trained {result.steps} steps (best {result.best_step}) in "
        f"{train_wall:.0f}s, {train_cpu / 60:.1f} CPU min; labelled test AUC "
        + " ".join(f"{t}={a:.3f}" for t, a in result.test_auc.items())
    )
    t1 = time.perf_counter()
    exported = export_model(run_dir, registry, name)
    t2 = time.perf_counter()
    refreshed = refresh(
        RefreshConfig(
            model=name,
            redis_url=redis_url,
            registry_root=registry,
            intra_op_threads=cfg.threads,
            progress_every_s=60.0,
        )
    )
    t3 = time.perf_counter()
    vectors = read_vectors(redis_url, name, data.user_ids)
    log(
        f"  {model} seed {seed}: exported {exported.version} in {t2 - t1:.0f}s, refreshed "
        f"{refreshed.users} users in {t3 - t2:.0f}s, read {len(vectors)} vectors of dim "
        f"{vectors.shape[1]} from Redis"
    )
    # What "defaults" meant for this run (the trainer's defaults move; the report keeps them).
    trained = json.loads(RunDir(run_dir).train_config.read_text())
    trained["model"] = {k: v for k, v in trained["model"].items() if k != "input_spec"}
    shutil.rmtree(run_dir, ignore_errors=True)
    record = {
        "model": model,
        "seed": seed,
        "labelled_auc": {t: float(a) for t, a in result.test_auc.items()},
        "steps": result.steps,
        "best_step": result.best_step,
        "train_seconds": round(train_wall, 1),
        "train_cpu_seconds": round(train_cpu, 1),
        "export_seconds": round(t2 - t1, 1),
        "refresh_seconds": round(t3 - t2, 1),
        "vector_dim": int(vectors.shape[1]),
        "train_config": trained,
    }
    return record, vectors


def run(cfg: TransferConfig, workdir: Path) -> dict[str, Any]:
    """Every seed and model of one source; returns the report (records + summary)."""
    import torch

    torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    code = code_version()  # now: the tree may change while the run goes on
    records: list[dict[str, Any]] = []
    home = workdir / "home"
    with private_redis(workdir) as redis_url, workspace(home, redis_url):
        log(f"{cfg.source}: data build, Feast apply + materialise into {redis_url}")
        data, built = build(cfg, workdir, redis_url)
        log(
            f"{cfg.source}: built {built['users']} users, {built['events']} events, "
            f"{built['label_rows']} label rows (tasks {', '.join(built['tasks'])}); "
            f"{len(data.user_ids)} users probed on {len(data.targets)} tasks "
            f"({time.perf_counter() - t0:.0f}s)"
        )
        if cfg.save_vectors is not None:
            save_probe_inputs(cfg.save_vectors, data)
        # out-of-fold probe scores per representation, seed and task: the SE over users
        scores: dict[str, dict[int, dict[str, np.ndarray]]] = {PROFILE: {}}
        folds_by_seed: dict[int, dict[str, np.ndarray]] = {}
        for seed in range(cfg.seeds):
            folds = {t: stratified_folds(y, seed, cfg.folds) for t, y in data.targets.items()}
            folds_by_seed[seed] = folds
            scores[PROFILE][seed] = score_all(data.profile, data, folds)
            aucs = aucs_of(scores[PROFILE][seed], data, folds)
            records.append({"model": PROFILE, "seed": seed, "probe_auc": aucs})
            log(f"seed {seed}: profile mean probe AUC {np.nanmean(list(aucs.values())):.4f}")
            for model in cfg.models:
                rec, vectors = run_model(model, seed, cfg, home, redis_url, data)
                if cfg.save_vectors is not None:
                    np.save(vectors_path(cfg.save_vectors, model, seed), vectors)
                scores.setdefault(model, {})[seed] = score_all(vectors, data, folds)
                rec["probe_auc"] = aucs_of(scores[model][seed], data, folds)
                records.append(rec)
                log(
                    f"seed {seed} {model}: mean probe AUC "
                    f"{np.nanmean(list(rec['probe_auc'].values())):.4f} "
                    f"({time.perf_counter() - t0:.0f}s elapsed)"
                )
    reps = (PROFILE, *cfg.models)
    tasks = list(data.targets)
    se_users = {
        m: user_bootstrap_se(scores[m], scores[PROFILE], data, folds_by_seed) for m in cfg.models
    }
    return {
        "generated": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(["python bench/transfer.py", *sys.argv[1:]]),
        "config": {**asdict(cfg), "save_vectors": cfg.save_vectors and str(cfg.save_vectors)},
        "code": code,
        "source": cfg.source,
        "built": built,
        "probe_users": len(data.user_ids),
        "task_users": {t: int(np.sum(~np.isnan(y))) for t, y in data.targets.items()},
        "task_positive_share": {t: round(float(np.nanmean(y)), 3) for t, y in data.targets.items()},
        "definitions": data.definitions,
        "profile_columns": list(data.profile_columns),
        "total_seconds": round(time.perf_counter() - t0, 1),
        "records": records,
        "summary": summarise(records, reps, tasks, list(built["tasks"]), se_users),
    }


def code_version() -> str | None:
    """The commit the benchmark ran on, and the files of the model code (userembed, trainer,
    refresh, feature_repo) that differed from it, new ones included; None outside a git
    checkout."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True
        ).stdout

    code = ("userembed", "trainer", "refresh", "feature_repo")
    try:
        commit = git("rev-parse", "--short", "HEAD").strip()
        changed = [line[3:] for line in git("status", "--porcelain", "--", *code).splitlines()]
    except (OSError, subprocess.CalledProcessError):
        return None
    if not changed:
        return commit
    listed = ", ".join(changed) if len(changed) <= 4 else f"{len(changed)} files"
    return f"{commit} with uncommitted changes to {listed}"


def _option(text: str, ap: argparse.ArgumentParser) -> tuple[str, Any]:
    """'name=value' -> (name, value as a JSON literal, else the string)."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        ap.error(f"--option {text!r}: expected NAME=VALUE")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


# --- entry point --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", choices=SOURCES, default=TransferConfig.source)
    ap.add_argument("--seeds", type=int, default=TransferConfig.seeds)
    ap.add_argument(
        "--models", default=",".join(MODELS), help="comma list of " + ", ".join(RECIPES)
    )
    ap.add_argument("--users", type=int, default=TransferConfig.users, help="synthetic users")
    ap.add_argument(
        "--data-seed", type=int, default=TransferConfig.data_seed, help="synthetic generator seed"
    )
    ap.add_argument(
        "--future-weeks", type=int, default=TransferConfig.future_weeks, help="MovieLens window"
    )
    ap.add_argument("--max-steps", type=int, default=None, help="default: `userembed train`'s")
    ap.add_argument("--threads", type=int, default=TransferConfig.threads)
    ap.add_argument("--folds", type=int, default=TransferConfig.folds)
    ap.add_argument("--quick", action="store_true", help="tiny: synthetic, 1 seed, 2 models")
    ap.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a `userembed train` option for every model (repeatable), e.g. "
        "summary_loss_weight=0 for an ablation",
    )
    ap.add_argument("--out", type=Path, default=None, help="default bench/results/transfer")
    ap.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    ap.add_argument("--write-md", action="store_true", help="write the BENCHMARKS.md section")
    ap.add_argument(
        "--items", action="store_true", help="with the items table (MovieLens: every genre)"
    )
    ap.add_argument(
        "--save-vectors",
        type=Path,
        default=None,
        help="keep the probed inputs and every run's vectors as .npy files in this folder",
    )
    ap.add_argument(
        "--from-json", type=Path, default=None, help="render a saved report again, run nothing"
    )
    args = ap.parse_args(argv)
    # A kill runs the finally blocks: the private redis-server is stopped, not orphaned.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.from_json is not None:
        report = json.loads(args.from_json.read_text())
        report["summary"] = summarise(
            report["records"],
            (PROFILE, *report["config"]["models"]),
            list(report["definitions"]),
            list(report["built"]["tasks"]),
            se_users_of(report["summary"]),  # needs the runs' scores: kept, not recomputed
        )
        write_outputs(report, args.out or args.from_json.parent, args.write_md)
        print_table(report)
        print(json.dumps(headline(report)))
        return 0
    models = tuple(m for m in args.models.split(",") if m)
    unknown = [m for m in models if m not in RECIPES]
    if unknown:
        ap.error(f"unknown models {unknown}; expected {', '.join(RECIPES)}")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    # torch / fbgemm deprecation notices would bury the progress lines
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    cfg = TransferConfig(
        source=args.source,
        seeds=args.seeds,
        models=models,
        users=args.users,
        data_seed=args.data_seed,
        future_weeks=args.future_weeks,
        max_steps=args.max_steps,
        threads=args.threads,
        folds=args.folds,
        train_options=tuple(_option(o, ap) for o in args.option),
        save_vectors=args.save_vectors,
        items=args.items,
    )
    if args.quick:
        cfg = quick(cfg)
    out = args.out or (Path(tempfile.mkdtemp(prefix="transfer-quick-")) if args.quick else RESULTS)
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="transfer-"))
        )
        report = run(cfg, workdir)
    write_outputs(report, out, args.write_md and not args.quick)
    print_table(report)
    print(json.dumps(headline(report)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
