"""train(config, frame) -> TrainResult: the training loop, single process or torchrun.

Each step is trainer/step.py's `train_step`. Every `eval_every` steps the validation score
(trainer/evaluate.py) keeps the best model so far, which becomes the final model, and drives
early stopping; every `checkpoint_every` steps trainer/checkpoint.py saves what `resume=True`
needs to reach the same result as an uninterrupted run. Rank 0 then writes the run folder
(trainer/run_dir.py): the final model, the held-out inputs and the report.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from trainer.batches import EncodedSplit, encode_split, iterate_batches
from trainer.checkpoint import load_checkpoint, save_checkpoint
from trainer.config import TrainConfig
from trainer.dense import DenseOutput
from trainer.distill import annealing, distill_targets, teacher_probs
from trainer.distributed import (
    DistContext,
    dense_state_dict,
    gather_tables,
    init_distributed,
    unwrap,
)
from trainer.evaluate import Metrics, final_metrics, validate
from trainer.loss import LossOutput, TaskLoss, labelled_weights
from trainer.model import SuperMoEModel, save_final
from trainer.report import write_report
from trainer.run_dir import HELDOUT_ROWS, RunDir
from trainer.step import prepare, train_step
from userembed.errors import InvalidInputError
from userembed.features import PROFILE_INPUT

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    stopped_early: bool
    best_step: int
    test_metrics: Metrics  # task -> auc, log_loss, prior_log_loss, n
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def test_auc(self) -> dict[str, float]:
        return {t: m["auc"] for t, m in self.test_metrics.items()}


@dataclass
class _Splits:
    train: EncodedSplit
    validation: EncodedSplit
    test: EncodedSplit


def _rows(frame: pd.DataFrame, split: str) -> pd.DataFrame:
    part = frame[frame["split"] == split]
    if part.empty:
        raise InvalidInputError(f"training frame has no '{split}' rows")
    return part


def _encode(cfg: TrainConfig, frame: pd.DataFrame, ctx: DistContext) -> _Splits:
    """The frame's three splits, encoded; the training rows carry the teachers' targets."""
    spec, tasks = cfg.model.input_spec, cfg.model.task_names
    train_rows = _rows(frame, "train")
    train_split = encode_split(train_rows, spec, tasks)
    if cfg.teachers:
        train_split.teacher = teacher_probs(cfg.teachers, train_rows, tasks, log=ctx.is_main)
        if ctx.is_main:
            logger.info("distilling from teachers: %s", cfg.teachers)
    return _Splits(
        train_split,
        encode_split(_rows(frame, "validation"), spec, tasks),
        encode_split(_rows(frame, "test"), spec, tasks),
    )


def _task_weights(
    cfg: TrainConfig, labels: np.ndarray, ctx: DistContext
) -> tuple[float, ...] | None:
    if cfg.task_weighting != "labelled":
        return cfg.task_weights
    weights = labelled_weights(labels)
    if ctx.is_main:
        logger.info(
            "task weights from labelled rows: %s",
            " ".join(f"{t}={w:.3f}" for t, w in zip(cfg.model.task_names, weights, strict=True)),
        )
    return weights


def _initial_state(cfg: TrainConfig) -> dict[str, Any]:
    """The loop's state; checkpoints carry it next to the model and optimiser state."""
    return {
        "step": 0,
        "epoch": 0,
        "batch_in_epoch": 0,
        "best_auc": -1.0,
        "best_step": 0,
        "bad_evals": 0,
        "best_tables": None,
        "best_dense": None,
        "history": {"train": [], "validation": []},
        "dropped": [],
        "config": cfg.to_dict(),
    }


class _Progress:
    """Mean training losses since the last progress line; the line itself (rank 0)."""

    def __init__(self, cfg: TrainConfig, ctx: DistContext, start_step: int) -> None:
        self.cfg, self.ctx, self.start_step = cfg, ctx, start_step
        self.tasks = cfg.model.task_names
        self.t0 = time.perf_counter()
        self.loss = torch.zeros(len(self.tasks))
        self.aux = torch.zeros(2)  # balance, z
        self.n = 0

    def add(self, out: DenseOutput, loss: LossOutput) -> None:
        self.loss += loss.per_task.detach().cpu()
        self.aux += torch.stack([out.balance_loss, out.z_loss]).detach().cpu()
        self.n += 1

    def flush(self, step: int, lr: float) -> dict[str, Any]:
        """The history entry of the window ending at `step`, logged; the window restarts."""
        per_task = (self.loss / self.n).tolist()
        balance, z = float(self.aux[0] / self.n), float(self.aux[1] / self.n)
        if self.ctx.is_main:
            cfg = self.cfg
            elapsed = time.perf_counter() - self.t0
            done = step - self.start_step
            rate = done * cfg.batch_size * self.ctx.world_size / elapsed
            eta = (cfg.max_steps - step) * elapsed / max(1, done)
            logger.info(
                "step %d/%d loss %s balance %.3f z %.3f lr %.2e %.0f samples/s ETA %.0fs",
                step,
                cfg.max_steps,
                " ".join(f"{t}={v:.4f}" for t, v in zip(self.tasks, per_task, strict=True)),
                balance,
                z,
                lr,
                rate,
                eta,
            )
        self.loss.zero_()
        self.aux.zero_()
        self.n = 0
        return {
            "step": step,
            "loss": dict(zip(self.tasks, per_task, strict=True)),
            "balance": balance,
            "z": z,
        }


def _evaluate(
    model: nn.Module,
    split: EncodedSplit,
    cfg: TrainConfig,
    ctx: DistContext,
    weights: np.ndarray,
    state: dict[str, Any],
) -> bool:
    """Score the validation split at state's step, keep the model when it is the best so far;
    -> whether to stop early. Collective when sharded (every rank calls it)."""
    step = state["step"]
    val_score, metrics = validate(model, split, cfg, ctx, weights)
    state["history"]["validation"].append(
        {"step": step, "val_score": val_score, "auc": {t: m["auc"] for t, m in metrics.items()}}
    )
    if val_score > state["best_auc"]:
        state.update(best_auc=val_score, best_step=step, bad_evals=0)
        state["best_tables"] = gather_tables(model, ctx)
        state["best_dense"] = dense_state_dict(model)
    else:
        state["bad_evals"] += 1
    if ctx.is_main:
        logger.info(
            "validation step %d score %.4f (best %.4f at %d) %s",
            step,
            val_score,
            state["best_auc"],
            state["best_step"],
            " ".join(f"{t}={m['auc']:.4f}" for t, m in metrics.items()),
        )
    if cfg.patience and state["bad_evals"] >= cfg.patience:
        logger.info("early stop at step %d", step)
        return True
    return False


def _finish(
    run: RunDir, cfg: TrainConfig, state: dict[str, Any], test: EncodedSplit, stopped_early: bool
) -> tuple[Metrics, dict[str, Any]]:
    """Rank 0: write the final model (the best evaluation: full tables + dense arch state), the
    held-out inputs (real test rows for the export's parity check) and the report."""
    save_final(run.model, cfg.model, state["best_tables"], state["best_dense"])
    keep = np.arange(min(len(test), HELDOUT_ROWS))
    heldout = {name: seq[keep] for name, seq in test.sequences.items()}
    heldout[PROFILE_INPUT] = test.profile[keep]
    np.savez(run.heldout_inputs, **heldout)  # type: ignore[arg-type]
    metrics, loads = final_metrics(run.model, test, cfg)
    report = write_report(
        run.root,
        cfg,
        metrics,
        state["history"],
        loads,
        state["dropped"],
        steps=state["step"],
        best_step=state["best_step"],
        stopped_early=stopped_early,
    )
    logger.info(
        "done: %d steps, best step %d, test %s",
        state["step"],
        state["best_step"],
        " ".join(f"{t} AUC={m['auc']:.4f}" for t, m in metrics.items()),
    )
    return metrics, report


def train(
    config: TrainConfig,
    frame: pd.DataFrame,
    resume: bool = False,
    stop_after_steps: int | None = None,
    on_trained: Callable[[nn.Module, DistContext], None] | None = None,
) -> TrainResult:
    """Train on `frame` (the feast_ops.training_frame layout) and write the run folder.

    stop_after_steps: end the process's work right after that step (after its checkpoint),
    as a kill would; used to test resume. Returns a result with no test metrics then.
    on_trained: called on every rank with the (possibly sharded) model after the last step.
    """
    ctx = init_distributed()
    cfg = config
    run = RunDir(cfg.run_dir)
    run.root.mkdir(parents=True, exist_ok=True)
    tasks = cfg.model.task_names
    splits = _encode(cfg, frame, ctx)
    if ctx.is_main:
        run.write_config(cfg)
        logger.info(
            "train %d / validation %d / test %d rows, tasks %s, world size %d",
            len(splits.train),
            len(splits.validation),
            len(splits.test),
            ",".join(tasks),
            ctx.world_size,
        )
    weights = _task_weights(cfg, splits.train.labels, ctx)
    torch.manual_seed(cfg.seed)
    task_loss = TaskLoss(len(tasks), cfg.loss, cfg.task_weighting, weights)
    model, optim = prepare(SuperMoEModel(cfg.model, task_loss, ctx.device), cfg, ctx)

    state = _initial_state(cfg)
    ckpt = run.checkpoint(ctx.rank)
    if resume:
        load_checkpoint(ckpt, model, optim, ctx, state)
    sel_weights = unwrap(model).task_loss.selection_weights()
    model.train()
    stopped_early = False
    progress = _Progress(cfg, ctx, state["step"])
    done = state["step"] >= cfg.max_steps
    while not done:
        batches = iterate_batches(
            splits.train,
            cfg.model.input_spec,
            cfg.batch_size,
            shuffle_seed=cfg.seed * 1_000_003 + state["epoch"],
            rank=ctx.rank,
            world_size=ctx.world_size,
            drop_last=True,
        )
        for i, batch in enumerate(batches):
            if i < state["batch_in_epoch"]:
                continue  # resumed mid-epoch: skip what was already trained on
            b = batch.to(ctx.device)
            targets = b.labels
            if b.teacher is not None:
                lam = annealing(state["step"], cfg.max_steps, cfg.distill_label_share)
                targets = distill_targets(b.labels, b.teacher, lam)
            out, loss = train_step(model, b, optim, targets)
            state["step"] += 1
            state["batch_in_epoch"] = i + 1
            step = state["step"]
            progress.add(out, loss)
            state["dropped"] = [float(s.dropped) for s in out.router_stats]
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                lr = float(optim.scheduler.get_last_lr()[0])
                state["history"]["train"].append(progress.flush(step, lr))
            if step % cfg.eval_every == 0 or step == cfg.max_steps:
                stopped_early = _evaluate(model, splits.validation, cfg, ctx, sel_weights, state)
            done = stopped_early or step >= cfg.max_steps
            if step % cfg.checkpoint_every == 0 or done:
                save_checkpoint(ckpt, model, optim, ctx, state)
            if stop_after_steps is not None and step >= stop_after_steps and not done:
                return TrainResult(run.root, step, False, state["best_step"], {})
            if done:
                break
        else:
            state["epoch"] += 1
            state["batch_in_epoch"] = 0

    if on_trained is not None:
        on_trained(model, ctx)
    metrics: Metrics = {}
    report: dict[str, Any] = {}
    if ctx.is_main:
        metrics, report = _finish(run, cfg, state, splits.test, stopped_early)
    return TrainResult(run.root, state["step"], stopped_early, state["best_step"], metrics, report)
