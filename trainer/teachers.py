"""A run's own single-task teachers (`userembed train --distill`): their run folders, configs
and training. Teacher k of a task is the run's own config (data, shape, budget) with that one
task, no teachers and seed + k, under <run>/teachers/<task>-s<seed> (trainer/run_dir.py):
teacher 0 is exactly the single-task model the run is compared with."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch.distributed as dist

from trainer.checkpoint import has_checkpoint
from trainer.config import TrainConfig
from trainer.run_dir import RunDir
from trainer.train import train
from userembed.items import ItemAttributeMap

logger = logging.getLogger(__name__)


def own_teachers(cfg: TrainConfig) -> dict[str, tuple[str, ...]]:
    """Task -> the run folders of its distill_teachers teachers, at seeds seed, seed + 1, ..."""
    run = RunDir(cfg.run_dir)
    seeds = [cfg.seed + k for k in range(cfg.distill_teachers)]
    return {t: tuple(str(run.teacher(t, s)) for s in seeds) for t in cfg.model.task_names}


def teacher_config(cfg: TrainConfig, task: str, k: int = 0) -> TrainConfig:
    """The config of teacher k of `task`. No whole-history objective: a teacher's vector is
    never served, only its task's predictions are used."""
    return cfg.with_(
        run_dir=own_teachers(cfg)[task][k],
        seed=cfg.seed + k,
        teachers=None,
        model=replace(cfg.model, task_names=(task,)),
        summary_loss_weight=0.0,
    )


def train_teachers(
    cfg: TrainConfig, frame: pd.DataFrame, items: ItemAttributeMap | None = None
) -> list[str]:
    """Train the run's own teachers (those under <run dir>/teachers/) that have no final model
    yet, resuming one that was cut short; teachers elsewhere are other runs and are only read.
    Returns the teachers trained, as <task>-s<seed>. Under torchrun every rank calls this
    (training is collective)."""
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
        if RunDir(run_dir).model.exists():
            log("teacher %d/%d %s: already trained (%s)", i, len(mine), name, run_dir)
            continue
        partial = has_checkpoint(run_dir)
        log(
            "teacher %d/%d %s: %s in %s", i, len(mine), name, "resuming" if partial else "training",
            run_dir,
        )  # fmt: skip
        train(tcfg, frame, resume=partial, items=items)
        trained.append(f"{task}-s{tcfg.seed}")
    if distributed:
        dist.barrier()  # rank 0 writes each teacher's model.pt; every rank reads them next
    return trained
