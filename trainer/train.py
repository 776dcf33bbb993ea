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
from trainer.config import TrainConfig, steps_per_epoch
from trainer.dense import DenseOutput
from trainer.distill import annealing, distill_targets, teacher_probs
from trainer.distributed import (
    DistContext,
    dense_state_dict,
    gather_tables,
    init_distributed,
    unwrap,
)
from trainer.encoder import LongTermNorm, fit_long_term_norms
from trainer.evaluate import Metrics, final_metrics, one_class_tasks, validate
from trainer.future_loss import FUTURE_KINDS, FutureTotals, encode_future, future_loss_of
from trainer.loss import LossOutput, TaskLoss, labelled_weights
from trainer.model import SuperMoEModel, save_final
from trainer.report import write_report
from trainer.run_dir import HELDOUT_ROWS, RunDir
from trainer.step import prepare, train_step
from trainer.summary_loss import summary_loss_of
from userembed.datasets.spec import SPLITS
from userembed.errors import InvalidInputError
from userembed.features import LONG_TERM_INPUT, PROFILE_INPUT
from userembed.items import ItemAttributeMap
from userembed.schema import LABEL_TIMESTAMP

logger = logging.getLogger(__name__)

# The fewest rows a split can have: one of each class, so that its AUC can be defined.
MIN_SPLIT_ROWS = 2


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
    return frame[frame["split"] == split]


def check_splits(frame: pd.DataFrame) -> None:
    """Refuse, in one line, a frame too small to split: each split needs MIN_SPLIT_ROWS rows."""
    counts = {s: int((frame["split"] == s).sum()) for s in SPLITS}
    if min(counts.values()) >= MIN_SPLIT_ROWS:
        return
    times = frame[LABEL_TIMESTAMP].nunique() if LABEL_TIMESTAMP in frame else 0
    raise InvalidInputError(
        f"data set too small to split: {len(frame)} label rows at {times} label times give "
        + " / ".join(f"{s} {n}" for s, n in counts.items())
        + f" rows; each split needs at least {MIN_SPLIT_ROWS} (the oldest label times train, "
        "the second newest validates, the newest tests)"
    )


def _encode(
    cfg: TrainConfig, frame: pd.DataFrame, ctx: DistContext, items: ItemAttributeMap | None
) -> _Splits:
    """The frame's three splits, encoded; the training rows carry the teachers' targets, every
    split the future targets of the self-supervised objective when it is on."""
    spec, tasks = cfg.model.input_spec, cfg.model.task_names
    train_rows = _rows(frame, "train")
    train_split = encode_split(train_rows, spec, tasks, items)
    if cfg.teachers:
        train_split.teacher = teacher_probs(cfg.teachers, train_rows, tasks, log=ctx.is_main)
        if ctx.is_main:
            logger.info("distilling from teachers: %s", cfg.teachers)
    splits = _Splits(
        train_split,
        encode_split(_rows(frame, "validation"), spec, tasks, items),
        encode_split(_rows(frame, "test"), spec, tasks, items),
    )
    if cfg.future_loss_weight > 0:
        for name in ("train", "validation", "test"):
            split = getattr(splits, name)
            split.future = encode_future(
                _rows(frame, name), spec, cfg.future_targets, cfg.future_window_seconds
            )
        if ctx.is_main and train_split.future is not None:
            with_target = {k: float((v != 0).any(1).mean()) for k, v in train_split.future.items()}
            logger.info(
                "future objective: weight %g, %d targets per row, temperature %g; training rows "
                "with a target: %s",
                cfg.future_loss_weight,
                cfg.future_targets,
                cfg.future_temperature,
                " ".join(f"{k}={v:.1%}" for k, v in with_target.items()),
            )
    return splits


def _selection_weights(
    weights: np.ndarray, validation: EncodedSplit, cfg: TrainConfig, ctx: DistContext
) -> np.ndarray:
    """The validation score's task weights, 0 for a task whose validation rows hold one class
    (its AUC is undefined there: it cannot pick the model), named in a warning."""
    tasks = cfg.model.task_names
    skipped = one_class_tasks(validation.labels, tasks)
    if skipped and ctx.is_main:
        if len(skipped) < len(tasks):
            then = "the score is the mean over the other tasks"
        elif cfg.future_loss_weight > 0:
            then = "the score is the self-supervised objective's"
        else:
            then = "nothing is left to score: the final model is the last evaluation's"
        logger.warning(
            "validation score skips %s, whose validation cut holds one class (%s): %s",
            ", ".join(skipped),
            "; ".join(f"{t}: {why}" for t, why in skipped.items()),
            then,
        )
    return np.where([t in skipped for t in tasks], 0.0, weights)


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


def _log_budget(asked: TrainConfig, cfg: TrainConfig, train_rows: int, world_size: int) -> None:
    per_epoch = steps_per_epoch(train_rows, cfg.batch_size, world_size)
    logger.info(
        "budget: %d steps (%s; %d an epoch of %d rows at batch %d x %d processes), "
        "validation every %d steps, early stop after %s, the model picked from step %d on",
        cfg.total_steps,
        f"{cfg.epochs:g} epochs" if asked.max_steps is None else "max_steps given",
        per_epoch,
        train_rows,
        cfg.batch_size,
        world_size,
        cfg.eval_interval,
        f"{cfg.patience} evaluations without gain" if cfg.patience else "never (patience 0)",
        cfg.min_steps,
    )


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
        "best_future": None,  # the future objective's projections (None when it is off)
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
        self.future = torch.zeros(len(FUTURE_KINDS))  # the self-supervised loss per kind
        self.aux = torch.zeros(2)  # balance, z
        self.summary = 0.0  # the whole-history objective
        self.n = 0

    def add(self, out: DenseOutput, loss: LossOutput) -> None:
        self.loss += loss.per_task.detach().cpu()
        if loss.future is not None:
            self.future += loss.future.per_kind.detach().cpu()
        if loss.summary is not None:
            self.summary += float(loss.summary.detach())
        self.aux += torch.stack([out.balance_loss, out.z_loss]).detach().cpu()
        self.n += 1

    def flush(self, step: int, lr: float) -> dict[str, Any]:
        """The history entry of the window ending at `step`, logged; the window restarts."""
        per_task = (self.loss / self.n).tolist()
        future = dict(zip(FUTURE_KINDS, (self.future / self.n).tolist(), strict=True))
        balance, z = float(self.aux[0] / self.n), float(self.aux[1] / self.n)
        summary = self.summary / self.n
        if self.ctx.is_main:
            cfg = self.cfg
            elapsed = time.perf_counter() - self.t0
            done = step - self.start_step
            rate = done * cfg.batch_size * self.ctx.world_size / elapsed
            eta = (cfg.total_steps - step) * elapsed / max(1, done)
            losses = [*zip(self.tasks, per_task, strict=True)]
            if cfg.future_loss_weight > 0:
                losses += list(future.items())
            if cfg.summary_loss_weight > 0:
                losses.append(("summary", summary))
            logger.info(
                "step %d/%d loss %s balance %.3f z %.3f lr %.2e %.0f samples/s ETA %.0fs",
                step,
                cfg.total_steps,
                " ".join(f"{t}={v:.4f}" for t, v in losses),
                balance,
                z,
                lr,
                rate,
                eta,
            )
        self.loss.zero_()
        self.future.zero_()
        self.aux.zero_()
        self.summary = 0.0
        self.n = 0
        entry: dict[str, Any] = {
            "step": step,
            "loss": dict(zip(self.tasks, per_task, strict=True)),
            "balance": balance,
            "z": z,
        }
        if self.cfg.future_loss_weight > 0:
            entry["future_loss"] = future
        if self.cfg.summary_loss_weight > 0:
            entry["summary_loss"] = summary
        return entry


def _future_state(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The future objective's projections (replicated on every rank), CPU copies; None when off."""
    future = unwrap(model).future_loss
    if future is None:
        return None
    return {k: v.detach().cpu().clone() for k, v in future.state_dict().items()}


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
    future = FutureTotals()
    val_score, metrics = validate(model, split, cfg, ctx, weights, future)
    entry = {"step": step, "val_score": val_score, "auc": {t: m["auc"] for t, m in metrics.items()}}
    if cfg.future_loss_weight > 0:
        entry["future"] = future.metrics()
    state["history"]["validation"].append(entry)
    # Before min_steps a score is history only (TrainConfig says why).
    counted = step >= (cfg.min_steps or 0)
    # NaN: nothing on this split can be scored (train() said why): keep the newest model.
    if counted and (val_score > state["best_auc"] or not np.isfinite(val_score)):
        state.update(best_auc=val_score, best_step=step, bad_evals=0)
        state["best_tables"] = gather_tables(model, ctx)
        state["best_dense"] = dense_state_dict(model)
        state["best_future"] = _future_state(model)
    elif counted:
        state["bad_evals"] += 1
    if ctx.is_main:
        best = (
            f"best {state['best_auc']:.4f} at {state['best_step']}"
            if counted
            else f"counts from step {cfg.min_steps}"
        )
        logger.info(
            "validation step %d score %.4f (%s) %s",
            step,
            val_score,
            best,
            " ".join(
                [f"{t}={m['auc']:.4f}" for t, m in metrics.items()]
                + [f"{k}_auc={m['auc']:.4f}" for k, m in entry.get("future", {}).items()]
            ),
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
    save_final(
        run.model, cfg.model, state["best_tables"], state["best_dense"], state["best_future"]
    )
    keep = np.arange(min(len(test), HELDOUT_ROWS))
    heldout = {name: seq[keep] for name, seq in test.sequences.items()}
    heldout[PROFILE_INPUT] = test.profile[keep]
    if test.long_term is not None:
        heldout[LONG_TERM_INPUT] = test.long_term[keep]
    np.savez(run.heldout_inputs, **heldout)  # type: ignore[arg-type]
    future = FutureTotals()
    metrics, loads = final_metrics(run.model, test, cfg, future)
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
        future_test=future.metrics() if cfg.future_loss_weight > 0 else None,
    )
    logger.info(
        "done: %d steps, best step %d, test %s",
        state["step"],
        state["best_step"],
        " ".join(
            [f"{t} AUC={m['auc']:.4f}" for t, m in metrics.items()]
            + [f"{k} AUC={m['auc']:.4f}" for k, m in report.get("future_test", {}).items()]
        ),
    )
    return metrics, report


def train(
    config: TrainConfig,
    frame: pd.DataFrame,
    resume: bool = False,
    stop_after_steps: int | None = None,
    on_trained: Callable[[nn.Module, DistContext], None] | None = None,
    items: ItemAttributeMap | None = None,
) -> TrainResult:
    """Train on `frame` (the feast_ops.training_frame layout) and write the run folder.

    stop_after_steps: end the process's work right after that step (after its checkpoint),
    as a kill would; used to test resume. Returns a result with no test metrics then.
    on_trained: called on every rank with the (possibly sharded) model after the last step.
    items: the item attribute map, required iff the model's InputSpec has item attributes;
    saved in the run folder (RunDir.item_attributes), which versions it with the model.
    """
    ctx = init_distributed()
    cfg = config
    run = RunDir(cfg.run_dir)
    run.root.mkdir(parents=True, exist_ok=True)
    tasks = cfg.model.task_names
    check_splits(frame)
    splits = _encode(cfg, frame, ctx, items)
    cfg = cfg.sized(len(splits.train), ctx.world_size)
    if ctx.is_main:
        run.write_config(cfg)
        if items is not None:
            items.save(run.item_attributes)
        else:  # an earlier run in this folder must not lend its map to this model
            run.item_attributes.unlink(missing_ok=True)
        logger.info(
            "train %d / validation %d / test %d rows, tasks %s, world size %d",
            len(splits.train),
            len(splits.validation),
            len(splits.test),
            ",".join(tasks),
            ctx.world_size,
        )
        _log_budget(config, cfg, len(splits.train), ctx.world_size)
    weights = _task_weights(cfg, splits.train.labels, ctx)
    torch.manual_seed(cfg.seed)
    task_loss = TaskLoss(len(tasks), cfg.loss, cfg.task_weighting, weights)
    inner = SuperMoEModel(
        cfg.model, task_loss, ctx.device, future_loss_of(cfg), summary_loss_of(cfg)
    )
    # statistics of the whole training split, before the replicas copy the dense arch
    fit_long_term_norms(inner.dense_arch, splits.train.long_term, LongTermNorm.MIN_SCALE)
    if inner.summary_loss is not None:
        fit_long_term_norms(inner.summary_loss, splits.train.long_term, cfg.summary_min_scale)
    model, optim = prepare(inner, cfg, ctx)

    state = _initial_state(cfg)
    ckpt = run.checkpoint(ctx.rank)
    if resume:
        load_checkpoint(ckpt, model, optim, ctx, state)
    sel_weights = _selection_weights(
        unwrap(model).task_loss.selection_weights(), splits.validation, cfg, ctx
    )
    model.train()
    stopped_early = False
    progress = _Progress(cfg, ctx, state["step"])
    done = state["step"] >= cfg.total_steps
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
                lam = annealing(state["step"], cfg.total_steps, cfg.distill_label_share)
                targets = distill_targets(b.labels, b.teacher, lam)
            out, loss = train_step(model, b, optim, targets)
            state["step"] += 1
            state["batch_in_epoch"] = i + 1
            step = state["step"]
            progress.add(out, loss)
            state["dropped"] = [float(s.dropped) for s in out.router_stats]
            if step % cfg.log_every == 0 or step == cfg.total_steps:
                lr = float(optim.scheduler.get_last_lr()[0])
                state["history"]["train"].append(progress.flush(step, lr))
            if step % cfg.eval_interval == 0 or step == cfg.total_steps:
                stopped_early = _evaluate(model, splits.validation, cfg, ctx, sel_weights, state)
            done = stopped_early or step >= cfg.total_steps
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
