"""Distillation from single-task teachers (after BAM!, Clark et al. 2019).

Each task t may name teachers: trained models that predict t (in the quality benchmark, t's
own single-task model at the run's seed and the next ones). The mean of their calibrated
probabilities, p_t(x), on every training row enters the targets at step s:
    labelled row:    target = lam(s) * y + (1 - lam(s)) * p_t(x),
                     lam(s) = min(distill_label_share, s / max_steps)
    unlabelled row:  target = p_t(x) for the whole run
With distill_label_share = 1 the first line is BAM!'s teacher annealing: the shared model
starts as a copy of each task's single-task model and ends in plain supervised learning.
The default, 0, keeps the teacher as the target all run. On MovieLens-100K that measured
better: the teachers are early-stopped single-task models, and the labels the annealing
hands over to are the same few hundred rows those models stopped fitting (12 seeds:
rate_high -0.014 +- 0.009 below its single-task model with annealing, -0.005 +- 0.010
without; docs/model.md). The second line gives a sparsely labelled task a target on every
row: on MovieLens-100K the rating tasks are labelled on 12% of the rows, and without a
teacher the other 88% tell the shared encoder nothing about them. A soft teacher target is
not the "unlabelled = negative" of the plain loss. Tasks without a teacher keep the
indicator loss unchanged.

The teacher's probability is Platt-scaled first: sigmoid(a * logit + b), fitted on the
training rows labelled for t. It keeps the teacher's ranking and gives it the spread its
labels support. Why: an early-stopped teacher can rank well with a nearly flat output. The
MovieLens rate_high teachers stop at step 80 with probabilities 0.82 to 0.88 +- 0.003 on
their training rows. A soft target that flat carries no ranking: the student's rate_high
ranked test users with a Spearman correlation of -0.04 (seed 6) to its teacher's. The fit
gives a = 27 to 36 for those teachers and 1.1 to 1.9 for the other MovieLens ones (seeds 2
and 6). The fit uses the teacher's own training rows: the only labels a training run may
use, plenty for two numbers.

Several teachers per task: `distill_teachers` (3 by default) single-task runs per task, at
seeds seed, seed + 1, ..., and the target is the mean of their calibrated probabilities. An
average of independently trained models ranks better than any one of them (their errors are
partly independent), and the student learns that better ranking. On MovieLens-100K, 24
seeds: with one teacher per task the student was 0.005 and 0.012 AUC below its single-task
models on active and rate_high; with three it is level with or ahead of them on every task
(docs/model.md). The price is training time: three single-task runs per task first.

`userembed train --distill` trains the teachers itself, under <run>/teachers/<task>-s<seed>,
with the run's own config (train_teachers); a resumed run finishes the teachers it was
training, then the model.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from trainer.config import TrainConfig
from userembed.errors import InvalidInputError

logger = logging.getLogger(__name__)

TEACHERS_DIR = "teachers"


def own_teachers(cfg: TrainConfig) -> dict[str, tuple[str, ...]]:
    """Task -> <run dir>/teachers/<task>-s<seed> for seed, seed + 1, ... (distill_teachers of
    them): the teachers `--distill` trains for this run."""
    root = Path(cfg.run_dir) / TEACHERS_DIR
    seeds = [cfg.seed + k for k in range(cfg.distill_teachers)]
    return {t: tuple(str(root / f"{t}-s{s}") for s in seeds) for t in cfg.model.task_names}


def teacher_config(cfg: TrainConfig, task: str, k: int = 0) -> TrainConfig:
    """Teacher k of a task is the run's own config (data, shape, budget) with one task, no
    teachers and seed + k: teacher 0 is exactly the single-task model the run is compared
    with, the others are that model at the next seeds."""
    return cfg.with_(
        run_dir=own_teachers(cfg)[task][k],
        seed=cfg.seed + k,
        teachers=None,
        model=replace(cfg.model, task_names=(task,)),
    )


def train_teachers(cfg: TrainConfig, frame: pd.DataFrame) -> list[str]:
    """Train the run's own teachers (those under <run dir>/teachers/) that have no final model
    yet, resuming one that was cut short; teachers elsewhere are other runs and are only read.
    Returns the teachers trained, as <task>-s<seed>. Under torchrun every rank calls this
    (training is collective)."""
    import torch.distributed as dist

    from trainer.model import FINAL_CHECKPOINT
    from trainer.train import has_checkpoint, train

    own = own_teachers(cfg)
    mine = [
        (task, k)
        for task, dirs in (cfg.teachers or {}).items()
        if own.get(task) == dirs
        for k in range(len(dirs))
    ]
    distributed = dist.is_available() and dist.is_initialized()
    log = logger.info if not distributed or dist.get_rank() == 0 else logger.debug
    trained = []
    for i, (task, k) in enumerate(mine, 1):
        tcfg = teacher_config(cfg, task, k)
        run_dir = Path(tcfg.run_dir)
        name = f"{task} seed {tcfg.seed}"
        if (run_dir / FINAL_CHECKPOINT).exists():
            log("teacher %d/%d %s: already trained (%s)", i, len(mine), name, run_dir)
            continue
        partial = has_checkpoint(run_dir)
        log(
            "teacher %d/%d %s: %s in %s", i, len(mine), name, "resuming" if partial else "training",
            run_dir,
        )  # fmt: skip
        train(tcfg, frame, resume=partial)
        trained.append(f"{task}-s{tcfg.seed}")
    if distributed:
        dist.barrier()  # rank 0 writes each teacher's model.pt; every rank reads them next
    return trained


def teacher_probs(
    teachers: Mapping[str, Sequence[str]],
    part: pd.DataFrame,
    tasks: Sequence[str],
    batch_size: int = 1024,
    calibrate: bool = True,
    log: bool = True,
) -> np.ndarray:
    """(N, T) eval-mode probabilities of each task's teachers on `part`, averaged over the
    task's teachers (a tuple of run dirs, as in TrainConfig); NaN for a task without one. A
    teacher is a run dir (its final model), scored with its own input spec. With `calibrate`,
    each is Platt-scaled on `part`'s own label_<task> rows (pass training rows) before the
    mean. log: whether to log each fit (under torchrun only rank 0 does; every rank fits the
    same)."""
    out = np.full((len(part), len(tasks)), np.nan, dtype=np.float32)
    for task, run_dirs in teachers.items():
        probs = [_one_teacher(task, d, part, batch_size, calibrate, log) for d in run_dirs]
        out[:, list(tasks).index(task)] = np.mean(np.stack(probs), axis=0)
    return out


def _one_teacher(
    task: str, run_dir: str, part: pd.DataFrame, batch_size: int, calibrate: bool, log: bool
) -> np.ndarray:
    from trainer.model import FINAL_CHECKPOINT, load_unsharded, score_rows

    final = Path(run_dir) / FINAL_CHECKPOINT
    if not final.exists():
        raise InvalidInputError(f"teacher for {task!r}: no trained model at {final}")
    model = load_unsharded(final)
    if task not in model.cfg.task_names:
        raise InvalidInputError(
            f"teacher {run_dir} has tasks {list(model.cfg.task_names)}, not {task!r}"
        )
    _, probs = score_rows(model, part, batch_size)
    p = probs[:, model.cfg.task_names.index(task)].astype(np.float64)
    label = f"label_{task}"
    if calibrate and label in part.columns:
        y = part[label].to_numpy(dtype=np.float64)
        z = _logit(p)
        a, b = platt(z, y)
        if log:
            n = int(np.sum(~np.isnan(y)))
            logger.info(
                "teacher %s (%s): calibrated on %d labelled rows, a=%.3g b=%.3g",
                task, run_dir, n, a, b,
            )  # fmt: skip
        p = _sigmoid(a * z + b)
    return p.astype(np.float32)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -60.0, 60.0)))


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1.0 - 1e-6)
    return np.log(p / (1.0 - p))


def platt(z: np.ndarray, y: np.ndarray, iters: int = 50) -> tuple[float, float]:
    """(a, b) of the logistic fit y ~ sigmoid(a * z + b) on the rows where y is not NaN
    (Platt scaling: Newton steps on the log-loss, a tiny ridge keeps it finite when the
    classes separate). a is clamped at 0: a teacher that ranks the wrong way on its own
    training rows gives the base rate, not its reverse. No labelled rows: (1, 0)."""
    m = ~np.isnan(y)
    z, y = z[m], y[m]
    if len(y) == 0:
        return 1.0, 0.0
    x = np.stack([z, np.ones_like(z)], axis=1)
    w = np.array([1.0, 0.0])
    ridge = 1e-6 * len(y)
    for _ in range(iters):
        q = _sigmoid(x @ w)
        grad = x.T @ (q - y) + ridge * w
        hess = (x * (q * (1.0 - q))[:, None]).T @ x + ridge * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    if w[0] < 0:
        prior = float(np.clip(y.mean(), 1e-6, 1 - 1e-6))
        return 0.0, float(np.log(prior / (1 - prior)))
    return float(w[0]), float(w[1])


def annealing(step: int, max_steps: int, label_share: float = 1.0) -> float:
    """lam: the label's share of the target at `step` (0 = all teacher, 1 = all label), rising
    linearly to `label_share` at max_steps."""
    return min(label_share, step / max(1, max_steps))


def distill_targets(labels: Tensor, teacher: Tensor, lam: float) -> Tensor:
    """labels (B, T), NaN = unlabelled; teacher (B, T), NaN = no teacher -> training targets
    (NaN only where a row has neither)."""
    annealed = lam * labels + (1.0 - lam) * teacher  # NaN where the label is
    soft = torch.where(torch.isnan(labels), teacher, annealed)
    return torch.where(torch.isnan(teacher), labels, soft)
