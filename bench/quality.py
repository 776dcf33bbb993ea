"""Quality benchmark: SUPERMOE against single-task and multi-task baselines, same data and budget.

    .venv/bin/python bench/quality.py --dataset all --seeds 3 --users 20000 --steps 300
    .venv/bin/python bench/quality.py --smoke           # seconds: tiny data, a few steps

For each data set (synthetic with planted structure, MovieLens-100K) it builds the training
frame once (datasets -> userembed.snapshots point-in-time feature tables -> bench/pit_join.py's
merge_asof join over the parquet files the Feast views read, which gives the offline stores'
frame), then trains with trainer.train.train, per seed:
single-task models (the SUPERMOE model on one task each), shared-bottom, MMoE, PLE
(trainer/baselines.py), the dense transformer (SUPERMOE without MoE layers, FFN width = k x
expert width so active compute matches), SUPERMOE with the plain summed loss, with
labelled-share task weights, distilled from single-task models (per task, the mean of the
single-task models at the seed and the next `distill_teachers - 1` seeds), and SUPERMOE with
the task-indicator loss. Every model gets the same steps, batch size, learning rate,
validation-driven model selection and early stopping.

Reports per-task test AUC (mean +- std over seeds), their average, the seesaw count (tasks
more than 0.005 below the single-task model), each multi-task model's difference to the
single-task model paired by seed (mean +- standard error), the Bayes-optimal AUC
(synthetic), and linear probes (logistic regression on the frozen, L2-normalised user
vectors of each multi-task model) for profile attributes held out of training. Writes
bench/results/quality.json, bench/results/quality.png and the generated section of
BENCHMARKS.md; every finished run is appended to bench/results/quality_runs.jsonl, and
--resume skips runs already there. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench.* as a script

from bench.common import ROOT, doc_path, write_section
from bench.quality_data import (
    QualityConfig,
    load_frame,
    model_config,
    train_config,
    user_vectors,
)
from bench.quality_probes import label_counts_on_test, probe_auc, probe_reference, probe_rows
from bench.quality_report import BEGIN, END, MULTI_TASK_MODELS, chart, headline, markdown, summarise

logger = logging.getLogger("bench.quality")

RESULTS = ROOT / "bench" / "results"


# --- running -----------------------------------------------------------------------------------


def plan(tasks: tuple[str, ...], seeds: tuple[int, ...]) -> list[tuple[str, int]]:
    """(model, seed) runs, seed-major so a partial run already covers every model."""
    models = [f"single:{t}" for t in tasks] + list(MULTI_TASK_MODELS)
    return [(m, s) for s in seeds for m in models]


def load_done(
    path: Path, dataset: str, qc: QualityConfig, frame_rows: dict[str, int]
) -> dict[tuple[str, int], dict]:
    """Finished runs from the JSONL log whose budget and frame (rows per split) match this
    run's: a data set whose definition changed is trained again, not mixed with old runs."""
    done: dict[tuple[str, int], dict] = {}
    if not path.exists():
        return done
    budget = _budget(qc)
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if (
            rec["dataset"] == dataset
            and rec["budget"] == budget
            and rec.get("frame_rows") == frame_rows
            and _record_teachers(rec) == _distill_teachers(rec["model"], qc)
        ):
            done[(rec["model"], rec["seed"])] = rec
    return done


def _budget(qc: QualityConfig) -> dict[str, Any]:
    d = asdict(qc)
    # distill_teachers is not budget: only the distilled model's records carry it (load_done)
    for k in ("datasets", "seeds", "threads", "distill_teachers"):
        d.pop(k)
    return d


def run_dataset(
    name: str,
    qc: QualityConfig,
    workdir: Path,
    log_path: Path,
    resume: bool,
    seed_list: tuple[int, ...] | None = None,
    model_list: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """Train every (model, seed) of one data set; seed_list / model_list: only these seeds /
    models (the rest must come from the log), so several processes can share one benchmark."""
    from trainer.train import train

    t0 = time.perf_counter()
    frame, spec = load_frame(name, qc, workdir)
    counts = {str(k): int(v) for k, v in frame["split"].value_counts().items()}
    logger.info("%s: frame %d rows %s (%.1fs)", name, len(frame), counts, time.perf_counter() - t0)
    probe_part, probe_fit = probe_rows(frame)
    heldout = [f for f in spec.heldout_profile_features if f in probe_part.columns]
    done = load_done(log_path, name, qc, counts) if resume else {}
    seeds = tuple(range(qc.seeds))
    runs = [
        r
        for r in plan(tuple(spec.tasks), seeds)
        if (seed_list is None or r[1] in seed_list) and (model_list is None or r[0] in model_list)
    ]
    records = [rec for key, rec in done.items() if key not in runs and (seed_list or model_list)]
    started = time.perf_counter()
    n_new = 0
    for i, (model, seed) in enumerate(runs):
        if (model, seed) in done:
            records.append(done[(model, seed)])
            continue
        run_dir = _run_dir(workdir, name, model, seed)
        mcfg = model_config(model, frame, spec, qc)
        teachers = None
        if model == "supermoe_distilled":
            teachers = _teachers(frame, spec, qc, workdir, name, seed)
        cfg = train_config(model, mcfg, seed, run_dir, qc, teachers)
        if model.startswith("single:"):  # also a teacher: maybe trained as one already
            with _run_lock(run_dir):
                result = _train_or_reuse(cfg, frame)
        else:  # the teachers' time is in their own single-task records
            t1 = time.perf_counter()
            trained = train(cfg, frame)
            seconds = time.perf_counter() - t1
            result = (trained.test_auc, trained.steps, trained.best_step, seconds)
        test_auc, steps, best_step, seconds = result
        rec: dict[str, Any] = {
            "dataset": name,
            "model": model,
            "seed": seed,
            "budget": _budget(qc),
            "distill_teachers": _distill_teachers(model, qc),
            "frame_rows": counts,
            "test_auc": test_auc,
            "steps": steps,
            "best_step": best_step,
            "seconds": round(seconds, 1),
            "probe_auc": {},
        }
        if not model.startswith("single:"):
            vecs = user_vectors(run_dir, probe_part)
            rec["probe_auc"] = {
                a: probe_auc(vecs, probe_part[a].to_numpy(dtype=np.int64), probe_fit)
                for a in heldout
            }
        records.append(rec)
        with log_path.open("a") as fh:
            fh.write(json.dumps(rec) + "\n")
        if not model.startswith("single:"):  # single-task runs are the distilled model's teachers
            shutil.rmtree(run_dir, ignore_errors=True)
        n_new += 1
        elapsed = time.perf_counter() - started
        left = len(runs) - i - 1
        logger.info(
            "%s %d/%d %s seed %d: %s mean %.4f probe %s in %.0fs (ETA %.0fs)",
            name,
            i + 1,
            len(runs),
            model,
            seed,
            " ".join(f"{t}={a:.4f}" for t, a in rec["test_auc"].items()),
            float(np.nanmean(list(rec["test_auc"].values()))),
            {a: round(v, 4) for a, v in rec["probe_auc"].items()},
            seconds,
            elapsed / n_new * left,
        )
    return {
        "dataset": name,
        "spec_name": spec.name,
        "tasks": list(spec.tasks),
        "heldout": heldout,
        "bayes_auc": dict(spec.bayes_auc),
        "frame_rows": counts,
        "test_labels": label_counts_on_test(frame, tuple(spec.tasks)),
        # NaN: a single-task run reused from a --workdir that kept no training time
        "train_seconds_total": round(float(np.nansum([r["seconds"] for r in records])), 1),
        "probe_users": {"fit": int(probe_fit.sum()), "eval": int((~probe_fit).sum())},
        "summary": summarise(records, tuple(spec.tasks), heldout),
        "probe_reference": probe_reference(probe_part, probe_fit, heldout, spec),
    }


def _run_dir(workdir: Path, dataset: str, model: str, seed: int) -> Path:
    return workdir / "runs" / dataset / f"{model.replace(':', '-')}-s{seed}"


def _distill_teachers(model: str, qc: QualityConfig) -> int | None:
    """Teachers per task of this model's runs: None but for the distilled model."""
    return qc.distill_teachers if model == "supermoe_distilled" else None


def _record_teachers(rec: dict) -> int | None:
    """A logged run's teachers per task; distilled records written before teacher ensembles
    carry none and had one."""
    return rec.get("distill_teachers", 1 if rec["model"] == "supermoe_distilled" else None)


def _teachers(
    frame: pd.DataFrame, spec: Any, qc: QualityConfig, workdir: Path, dataset: str, seed: int
) -> dict[str, tuple[str, ...]]:
    """Task -> run dirs of the single-task models at seeds seed .. seed + distill_teachers - 1:
    each the one this process trained, or one --workdir kept from an earlier invocation with
    the same config, else trained here (a --resume that took its record from the log, or a
    seed past the last one benchmarked). Teacher 0 is exactly the model the distilled one is
    compared with; the others are the same model at the next seeds, which is what
    `userembed train --distill` trains as well (trainer/distill.py)."""
    teachers: dict[str, tuple[str, ...]] = {}
    for task in spec.tasks:
        model = f"single:{task}"
        dirs = []
        for s in range(seed, seed + qc.distill_teachers):
            run_dir = _run_dir(workdir, dataset, model, s)
            cfg = train_config(model, model_config(model, frame, spec, qc), s, run_dir, qc)
            with _run_lock(run_dir):
                _train_or_reuse(cfg, frame, f"{dataset} seed {seed}: teacher {model} seed {s}")
            dirs.append(str(run_dir))
        teachers[task] = tuple(dirs)
    return teachers


@contextlib.contextmanager
def _run_lock(run_dir: Path) -> Iterator[None]:
    """Hold run_dir for this process. A single-task run is also a teacher, of its own seed
    and of the seeds before it, so two processes sharing a --workdir with the seeds split
    between them can reach the same run at once: the second waits, then reuses it."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with (run_dir.parent / f"{run_dir.name}.lock").open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # released when the file closes
        yield


SECONDS_FILE = "bench_seconds.json"


def _train_or_reuse(
    cfg: Any, frame: pd.DataFrame, what: str = ""
) -> tuple[dict[str, float], int, int, float]:
    """(test AUC per task, steps, best step, training seconds) of cfg's run: read from its
    run dir when that holds a finished run of exactly this config, else trained there (under
    _run_lock; `what` names it in the log). Training is deterministic on one machine, so both
    give the same figures."""
    from trainer.run_dir import RunDir
    from trainer.train import train

    run_dir = Path(cfg.run_dir)
    if not _trained_with(run_dir, cfg):
        if what:
            logger.info("%s: training", what)
        shutil.rmtree(run_dir, ignore_errors=True)
        t0 = time.perf_counter()
        train(cfg, frame)
        (run_dir / SECONDS_FILE).write_text(json.dumps(time.perf_counter() - t0))
    report = json.loads(RunDir(run_dir).report.read_text())
    seconds_file = run_dir / SECONDS_FILE
    seconds = json.loads(seconds_file.read_text()) if seconds_file.exists() else math.nan
    auc = {t: m["auc"] for t, m in report["test"].items()}
    return auc, int(report["steps"]), int(report["best_step"]), float(seconds)


def _trained_with(run_dir: Path, cfg: Any) -> bool:
    """Whether run_dir holds a finished run of exactly this config: budget, seed and model
    shape, including the vocabulary sizes taken from the data (a --workdir kept from an
    earlier invocation may hold runs of another budget). The saved config is read back as a
    TrainConfig, so a field added since it was written takes its default."""
    from trainer.run_dir import RunDir
    from userembed.errors import InvalidInputError

    run = RunDir(run_dir)
    if not run.model.exists() or not run.train_config.exists():
        return False
    try:
        saved = run.read_config()
        return bool(saved == cfg.sized_like(saved))
    except (TypeError, KeyError, ValueError, InvalidInputError):  # an incompatible layout
        return False


# --- entry point -------------------------------------------------------------------------------


def run(
    qc: QualityConfig,
    out_dir: Path,
    resume: bool,
    write_md: bool,
    seed_list: tuple[int, ...] | None = None,
    model_list: tuple[str, ...] | None = None,
    workdir: Path | None = None,
) -> dict[str, Any]:
    """Run (or, with resume and a complete log, just render) the benchmark. workdir: where
    feature tables and the single-task runs (the distilled model's teachers) are kept; a
    temporary folder when None. Teachers found there that match the budget are reused."""
    import torch

    torch.set_num_threads(qc.threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / ("quality_runs_smoke.jsonl" if qc.smoke else "quality_runs.jsonl")
    t0 = time.perf_counter()
    datasets = []
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="quality-")))
        for name in qc.datasets:
            datasets.append(run_dataset(name, qc, workdir, log_path, resume, seed_list, model_list))
    if (
        seed_list is not None or model_list is not None
    ):  # a share of the seeds: the full render comes later (--resume)
        return {"total_seconds": round(time.perf_counter() - t0, 1), "datasets": datasets}
    suffix = "_smoke" if qc.smoke else ""
    report = {
        "generated": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(["python bench/quality.py", *sys.argv[1:]]),
        "config": asdict(qc),
        "total_seconds": round(time.perf_counter() - t0, 1),
        "datasets": datasets,
        "chart": doc_path(out_dir / f"quality{suffix}.png"),
    }
    (out_dir / f"quality{suffix}.json").write_text(json.dumps(report, indent=2) + "\n")
    chart(report, out_dir / f"quality{suffix}.png")
    if write_md:
        write_section(markdown(report), BEGIN, END)
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="all", choices=["synthetic", "movielens", "all"])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--users", type=int, default=20_000, help="synthetic users")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--patience", type=int, default=3)
    ap.add_argument("--sequence-length", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--val-users", type=int, default=3_000)
    ap.add_argument("--seed-list", default=None, help="comma list: train only these seeds")
    ap.add_argument("--models", default=None, help="comma list: train only these (single:<task>)")
    ap.add_argument(
        "--out", type=Path, default=None, help="default bench/results (smoke: a temp dir)"
    )
    ap.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="keep feature tables and single-task runs here (default: a temp dir); a later "
        "run with the same folder reuses them as the distilled model's teachers",
    )
    ap.add_argument("--resume", action="store_true", help="skip runs in the JSONL log")
    ap.add_argument("--no-md", action="store_true", help="do not touch BENCHMARKS.md")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes; never writes BENCHMARKS.md")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("trainer", "userembed", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    datasets = ("synthetic", "movielens") if args.dataset == "all" else (args.dataset,)
    qc = QualityConfig(
        datasets=datasets,
        seeds=args.seeds,
        users=args.users,
        steps=args.steps,
        batch_size=args.batch_size,
        eval_every=args.eval_every,
        patience=args.patience,
        sequence_length=args.sequence_length,
        threads=args.threads,
        val_users=args.val_users,
    )
    if args.smoke:
        qc = replace(
            qc, seeds=1, users=300, steps=4, batch_size=32, eval_every=2,
            sequence_length=12, embedding_dim=16, user_dim=16, smoke=True,
        )  # fmt: skip
    if args.out is None:
        args.out = Path(tempfile.mkdtemp(prefix="quality-smoke-")) if args.smoke else RESULTS
    seed_list = None if args.seed_list is None else tuple(int(x) for x in args.seed_list.split(","))
    model_list = None if args.models is None else tuple(args.models.split(","))
    report = run(
        qc, args.out, args.resume, not (args.smoke or args.no_md), seed_list, model_list,
        args.workdir,
    )  # fmt: skip
    if seed_list is not None or model_list is not None:
        print(
            json.dumps(
                {
                    "total_seconds": report["total_seconds"],
                    "seeds": args.seed_list,
                    "models": args.models,
                }
            )
        )
        return 0
    print(json.dumps(headline(report)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
