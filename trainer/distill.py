"""Distillation from single-task teachers (after BAM!, Clark et al. 2019).

Each task t may name a teacher: a trained model that predicts t (in the quality benchmark,
t's own single-task model). Its probability p_t(x) on every training row enters the
targets at step s:
    labelled row:    target = lam(s) * y + (1 - lam(s)) * p_t(x),  lam(s) = s / max_steps
    unlabelled row:  target = p_t(x) for the whole run
Teacher annealing (the first line) starts the shared model as a copy of each task's
single-task model and ends in plain supervised learning, free to go past it. The second line
gives a sparsely labelled task a target on every row: on MovieLens-100K the rating tasks
are labelled on 12% of the rows, and without a teacher the other 88% tell the shared
encoder nothing about them. A soft teacher target is not the "unlabelled = negative" of the
plain loss. Tasks without a teacher keep the indicator loss unchanged. docs/model.md has
the measured effect.

`userembed train --distill` trains the teachers itself, one single-task run per task under
<run>/teachers/<task>, with the run's own config (train_teachers); a resumed run finishes the
teachers it was training, then the model.
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


def own_teachers(cfg: TrainConfig) -> dict[str, str]:
    """Task -> <run dir>/teachers/<task>: the teachers `--distill` trains for this run."""
    return {t: str(Path(cfg.run_dir) / TEACHERS_DIR / t) for t in cfg.model.task_names}


def teacher_config(cfg: TrainConfig, task: str) -> TrainConfig:
    """A teacher is the run's own config (data, shape, budget, seed) with one task and no
    teachers, so it is exactly the single-task model the run is compared with."""
    return cfg.with_(
        run_dir=own_teachers(cfg)[task],
        teachers=None,
        model=replace(cfg.model, task_names=(task,)),
    )


def train_teachers(cfg: TrainConfig, frame: pd.DataFrame) -> list[str]:
    """Train the run's own teachers (those under <run dir>/teachers/) that have no final model
    yet, resuming one that was cut short; teachers elsewhere are other runs and are only read.
    Returns the tasks trained. Under torchrun every rank calls this (training is collective)."""
    import torch.distributed as dist

    from trainer.model import FINAL_CHECKPOINT
    from trainer.train import has_checkpoint, train

    own = own_teachers(cfg)
    mine = [t for t, d in (cfg.teachers or {}).items() if own.get(t) == d]
    trained = []
    for i, task in enumerate(mine, 1):
        run_dir = Path(own[task])
        if (run_dir / FINAL_CHECKPOINT).exists():
            logger.info("teacher %d/%d %s: already trained (%s)", i, len(mine), task, run_dir)
            continue
        partial = has_checkpoint(run_dir)
        logger.info(
            "teacher %d/%d %s: %s in %s", i, len(mine), task, "resuming" if partial else "training",
            run_dir,
        )  # fmt: skip
        train(teacher_config(cfg, task), frame, resume=partial)
        trained.append(task)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # rank 0 writes each teacher's model.pt; every rank reads them next
    return trained


def teacher_probs(
    teachers: Mapping[str, str], part: pd.DataFrame, tasks: Sequence[str], batch_size: int = 1024
) -> np.ndarray:
    """(N, T) eval-mode probabilities of each task's teacher on `part`; NaN for a task without
    one. A teacher is a run dir (its final model), scored with its own input spec."""
    from trainer.model import FINAL_CHECKPOINT, load_unsharded, score_rows

    out = np.full((len(part), len(tasks)), np.nan, dtype=np.float32)
    for task, run_dir in teachers.items():
        final = Path(run_dir) / FINAL_CHECKPOINT
        if not final.exists():
            raise InvalidInputError(f"teacher for {task!r}: no trained model at {final}")
        model = load_unsharded(final)
        if task not in model.cfg.task_names:
            raise InvalidInputError(
                f"teacher {run_dir} has tasks {list(model.cfg.task_names)}, not {task!r}"
            )
        _, probs = score_rows(model, part, batch_size)
        out[:, list(tasks).index(task)] = probs[:, model.cfg.task_names.index(task)]
    return out


def annealing(step: int, max_steps: int) -> float:
    """lam: the label's share of the target at `step` (0 = all teacher, 1 = all label)."""
    return min(1.0, step / max(1, max_steps))


def distill_targets(labels: Tensor, teacher: Tensor, lam: float) -> Tensor:
    """labels (B, T), NaN = unlabelled; teacher (B, T), NaN = no teacher -> training targets
    (NaN only where a row has neither)."""
    annealed = lam * labels + (1.0 - lam) * teacher  # NaN where the label is
    soft = torch.where(torch.isnan(labels), teacher, annealed)
    return torch.where(torch.isnan(teacher), labels, soft)
