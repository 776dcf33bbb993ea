"""Distillation from single-task teachers: the training targets of a distilled run.

Each task may name teachers (TrainConfig.teachers), trained models that predict it. The mean
of their calibrated probabilities p_t(x) on a training row enters the targets at step s:
    labelled row:    target = lam(s) * y + (1 - lam(s)) * p_t(x),
                     lam(s) = min(distill_label_share, s / max_steps)
    unlabelled row:  target = p_t(x) for the whole run
Tasks without a teacher keep their labels. So a sparsely labelled task gets a target on every
row, and the shared model learns each task's single-task ranking. distill_label_share = 1 is
teacher annealing (BAM!, Clark et al., ACL 2019); the default 0 keeps the teacher as the target
all run, since the teachers are early-stopped and annealing would hand the target back to the
labels they stopped fitting.

Each teacher is Platt-scaled on the training rows labelled for its task before the mean: an
early-stopped teacher can rank well with a nearly flat output, and a flat soft target carries
no ranking. Several teachers per task average out their partly independent errors.
trainer/teachers.py trains a run's own teachers (`--distill`); docs/model.md has the figures.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from trainer.evaluate import score_rows
from trainer.model import load_unsharded
from trainer.run_dir import RunDir
from userembed.errors import InvalidInputError

logger = logging.getLogger(__name__)


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
    final = RunDir(run_dir).model
    if not final.exists():
        raise InvalidInputError(f"teacher for {task!r}: no trained model at {final}")
    model = load_unsharded(final)
    if task not in model.cfg.task_names:
        raise InvalidInputError(
            f"teacher {run_dir} has tasks {list(model.cfg.task_names)}, not {task!r}"
        )
    _, probs = score_rows(model, part, batch_size, RunDir(run_dir).items())
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
