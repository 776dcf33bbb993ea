"""train(config, frame) -> TrainResult: the SUPERMOE training loop, single process or torchrun.

Tables: Adagrad fused into backward (`_apply_optimizer_in_backward`); dense: AdamW with
warm-up + cosine decay and grad clipping. The validation score (mean AUC, task-weighted like
the loss) drives early stopping and picks the final model (best evaluation). Checkpoints
every K steps hold model, optimizers, scheduler, RNG, step and config; `resume=True`
continues from the latest one and reaches the same result as an uninterrupted run (same
seed: batch order is a function of (seed, epoch)).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from torch.distributed.optim import _apply_optimizer_in_backward

from trainer.batches import (
    DEFAULT_TABLE_CAP,
    EncodedSplit,
    build_input_spec,
    encode_split,
    iterate_batches,
)
from trainer.config import ModelConfig, MoEConfig, TrainConfig, check_loss_options
from trainer.distill import annealing, distill_targets, teacher_probs
from trainer.distributed import (
    DistContext,
    broadcast_float,
    dense_state_dict,
    gather_tables,
    init_distributed,
    shard_model,
    unwrap,
)
from trainer.loss import TaskLoss, labelled_weights
from trainer.model import (
    FINAL_CHECKPOINT,
    HELDOUT_INPUTS,
    SuperMoEModel,
    load_unsharded,
    save_final,
)
from trainer.report import task_metrics, write_report
from userembed.errors import InvalidInputError

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    stopped_early: bool
    best_step: int
    test_metrics: dict[str, dict[str, float]]  # task -> auc, log_loss, prior_log_loss, n
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def test_auc(self) -> dict[str, float]:
        return {t: m["auc"] for t, m in self.test_metrics.items()}


def _lr_lambda(cfg: TrainConfig):  # type: ignore[no-untyped-def]
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        span = max(1, cfg.max_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        cos = 0.5 * (1.0 + math.cos(math.pi * progress))
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cos

    return f


def _sparse_optimizers(model: nn.Module, ctx: DistContext) -> list[Any]:
    if ctx.sharded:
        return [model.fused_optimizer]  # type: ignore[attr-defined]
    sparse = unwrap(model).sparse_arch
    return [o for p in sparse.parameters() for o in getattr(p, "_in_backward_optimizers", [])]


@torch.no_grad()
def predict(
    model: nn.Module, split: EncodedSplit, cfg: TrainConfig, ctx: DistContext
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Eval-mode probabilities (N, T) and per-MoE-layer expert load over the whole split.

    Sharded: every rank scores the whole split (forward is collective), so all get all rows.
    """
    model.eval()
    spec = cfg.model.input_spec
    probs: list[np.ndarray] = []
    load_sums: list[Tensor] = []
    for batch in iterate_batches(split, spec, cfg.batch_size * 2):
        b = batch.to(ctx.device)
        out, _ = model(b.seq_kjt, b.profile_kjt, None)
        probs.append(torch.sigmoid(out.task_logits).float().cpu().numpy())
        n_real = (b.seq_kjt.to_dict()[spec.sequence_features[0].name].values() != 0).sum()
        weight = float(n_real) + len(b.labels)  # events + CLS tokens routed
        for i, s in enumerate(out.router_stats):
            w = s.expert_load.cpu() * weight
            if len(load_sums) <= i:
                load_sums.append(w)
            else:
                load_sums[i] += w
    model.train()
    loads = [(s / s.sum().clamp(min=1e-12)).numpy() for s in load_sums]
    return np.concatenate(probs, axis=0), loads


def _checkpoint_path(run_dir: Path, ctx: DistContext) -> Path:
    return run_dir / CHECKPOINT_DIR / f"latest-rank{ctx.rank}.pt"


def has_checkpoint(run_dir: str | Path) -> bool:
    """Whether a run has trained steps to resume (rank 0's checkpoint; every rank has its own)."""
    return _checkpoint_path(Path(run_dir), DistContext()).exists()


def _save_checkpoint(
    path: Path, model: nn.Module, dense_opt: Any, sched: Any, ctx: DistContext, state: dict
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {
        "model": model.state_dict(),
        "dense_optimizer": dense_opt.state_dict(),
        "sparse_optimizers": [o.state_dict() for o in _sparse_optimizers(model, ctx)],
        "scheduler": sched.state_dict(),
        "torch_rng": torch.get_rng_state(),
        **state,
    }
    tmp = path.with_suffix(".tmp")
    torch.save(blob, tmp)
    tmp.replace(path)  # atomic: a kill mid-write leaves the previous checkpoint intact
    logger.info("checkpoint step %d -> %s", state["step"], path)


def validation_score(
    metrics: dict[str, dict[str, float]], tasks: tuple[str, ...], weights: np.ndarray
) -> float:
    """Task-weighted mean validation AUC over tasks whose AUC is defined (equal weights: the
    plain mean). With 'labelled' weights a task with 64 labelled validation rows, whose AUC
    moves by several points between checkpoints on noise alone, cannot pick the model."""
    auc = np.array([metrics[t]["auc"] for t in tasks], dtype=np.float64)
    ok = np.isfinite(auc) & (weights > 0)
    if not ok.any():
        return float("nan")
    return float(np.sum(weights[ok] * auc[ok]) / np.sum(weights[ok]))


def _split(frame: pd.DataFrame, name: str) -> pd.DataFrame:
    part = frame[frame["split"] == name]
    if part.empty:
        raise InvalidInputError(f"training frame has no '{name}' rows")
    return part


def train(
    config: TrainConfig,
    frame: pd.DataFrame,
    resume: bool = False,
    stop_after_steps: int | None = None,
    on_trained: Callable[[nn.Module, DistContext], None] | None = None,
) -> TrainResult:
    """Train on `frame` (the feast_ops.training_frame layout) and write the run dir.

    stop_after_steps: end the process's work right after that step (after its checkpoint),
    as a kill would; used to test resume. Returns a result with no test metrics then.
    on_trained: called on every rank with the (possibly sharded) model after the last step.
    """
    ctx = init_distributed()
    cfg = config
    mcfg = cfg.model
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = mcfg.input_spec
    tasks = mcfg.task_names
    train_part = _split(frame, "train")
    train_split = encode_split(train_part, spec, tasks)
    if cfg.teachers:
        train_split.teacher = teacher_probs(cfg.teachers, train_part, tasks, log=ctx.is_main)
        if ctx.is_main:
            logger.info("distilling from teachers: %s", cfg.teachers)
    val_split = encode_split(_split(frame, "validation"), spec, tasks)
    test_split = encode_split(_split(frame, "test"), spec, tasks)
    if ctx.is_main:
        (run_dir / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        logger.info(
            "train %d / validation %d / test %d rows, tasks %s, world size %d",
            len(train_split),
            len(val_split),
            len(test_split),
            ",".join(tasks),
            ctx.world_size,
        )

    weights = cfg.task_weights
    if cfg.task_weighting == "labelled":
        weights = labelled_weights(train_split.labels)
        if ctx.is_main:
            logger.info(
                "task weights from labelled rows: %s",
                " ".join(f"{t}={w:.3f}" for t, w in zip(tasks, weights, strict=True)),
            )
    torch.manual_seed(cfg.seed)
    model: nn.Module = SuperMoEModel(
        mcfg, TaskLoss(len(tasks), cfg.loss, cfg.task_weighting, weights), ctx.device
    )
    _apply_optimizer_in_backward(
        torch.optim.Adagrad, unwrap(model).sparse_arch.parameters(), {"lr": cfg.sparse_lr}
    )
    if ctx.sharded:
        model = shard_model(unwrap(model), ctx)
    inner = unwrap(model)
    dense_params = list(inner.dense_arch.parameters()) + list(inner.task_loss.parameters())
    dense_opt = torch.optim.AdamW(dense_params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(dense_opt, _lr_lambda(cfg))

    state: dict[str, Any] = {
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
    ckpt = _checkpoint_path(run_dir, ctx)
    if resume:
        if not ckpt.exists():
            raise InvalidInputError(f"--resume: no checkpoint at {ckpt}")
        blob = torch.load(ckpt, map_location=ctx.device, weights_only=False)
        model.load_state_dict(blob["model"])
        dense_opt.load_state_dict(blob["dense_optimizer"])
        for o, s in zip(_sparse_optimizers(model, ctx), blob["sparse_optimizers"], strict=True):
            o.load_state_dict(s)
        sched.load_state_dict(blob["scheduler"])
        torch.set_rng_state(blob["torch_rng"])
        state.update({k: blob[k] for k in state if k in blob})
        logger.info("resumed from %s at step %d", ckpt, state["step"])

    sel_weights = inner.task_loss.selection_weights()
    model.train()
    stopped_early = False
    t0 = time.perf_counter()
    start_step = state["step"]
    window_loss = torch.zeros(len(tasks))
    window_aux = torch.zeros(2)
    window_n = 0
    done = state["step"] >= cfg.max_steps
    while not done:
        batches = iterate_batches(
            train_split,
            spec,
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
                targets = distill_targets(
                    b.labels,
                    b.teacher,
                    annealing(state["step"], cfg.max_steps, cfg.distill_label_share),
                )
            out, loss = model(b.seq_kjt, b.profile_kjt, targets)
            assert loss is not None
            aux = inner.aux_loss(out)
            (loss.total + aux).backward()  # tables are updated here (fused optimizer)
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(dense_params, cfg.grad_clip)
            dense_opt.step()
            sched.step()
            dense_opt.zero_grad(set_to_none=True)
            state["step"] += 1
            state["batch_in_epoch"] = i + 1
            step = state["step"]
            window_loss += loss.per_task.detach().cpu()
            window_aux += torch.stack([out.balance_loss, out.z_loss]).detach().cpu()
            window_n += 1
            state["dropped"] = [float(s.dropped) for s in out.router_stats]

            if step % cfg.log_every == 0 or step == cfg.max_steps:
                per_task = (window_loss / window_n).tolist()
                state["history"]["train"].append(
                    {
                        "step": step,
                        "loss": dict(zip(tasks, per_task, strict=True)),
                        "balance": float(window_aux[0] / window_n),
                        "z": float(window_aux[1] / window_n),
                    }
                )
                if ctx.is_main:
                    elapsed = time.perf_counter() - t0
                    rate = (step - start_step) * cfg.batch_size * ctx.world_size / elapsed
                    eta = (cfg.max_steps - step) * elapsed / max(1, step - start_step)
                    logger.info(
                        "step %d/%d loss %s balance %.3f z %.3f lr %.2e %.0f samples/s ETA %.0fs",
                        step,
                        cfg.max_steps,
                        " ".join(f"{t}={v:.4f}" for t, v in zip(tasks, per_task, strict=True)),
                        window_aux[0] / window_n,
                        window_aux[1] / window_n,
                        sched.get_last_lr()[0],
                        rate,
                        eta,
                    )
                window_loss.zero_()
                window_aux.zero_()
                window_n = 0

            if step % cfg.eval_every == 0 or step == cfg.max_steps:
                probs, _ = predict(model, val_split, cfg, ctx)
                metrics = task_metrics(probs, val_split.labels, tasks)
                # Rank 0's figure decides for all: the branches below hold collectives.
                val_score = broadcast_float(validation_score(metrics, tasks, sel_weights), ctx)
                state["history"]["validation"].append(
                    {
                        "step": step,
                        "val_score": val_score,
                        "auc": {t: m["auc"] for t, m in metrics.items()},
                    }
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
                    stopped_early = True
                    logger.info("early stop at step %d", step)

            done = stopped_early or step >= cfg.max_steps
            if step % cfg.checkpoint_every == 0 or done:
                if done:
                    state["batch_in_epoch"] = i + 1
                _save_checkpoint(ckpt, model, dense_opt, sched, ctx, state)
            if stop_after_steps is not None and step >= stop_after_steps and not done:
                return TrainResult(run_dir, step, False, state["best_step"], {})
            if done:
                break
        else:
            state["epoch"] += 1
            state["batch_in_epoch"] = 0

    if on_trained is not None:
        on_trained(model, ctx)
    # Final model = best validation evaluation, written as full tables + DenseArch state.
    result_metrics: dict[str, dict[str, float]] = {}
    report: dict[str, Any] = {}
    if ctx.is_main:
        final = run_dir / FINAL_CHECKPOINT
        save_final(final, mcfg, state["best_tables"], state["best_dense"])
        # Real held-out rows for the export's onnxruntime-vs-torch parity check.
        keep = np.arange(min(len(test_split), 512))
        heldout = {name: seq[keep] for name, seq in test_split.sequences.items()}
        heldout["profile"] = test_split.profile[keep]
        np.savez(run_dir / HELDOUT_INPUTS, **heldout)  # type: ignore[arg-type]
        best = load_unsharded(final)
        best_ctx = DistContext()
        probs, loads = predict(best, test_split, cfg, best_ctx)
        best.eval()
        result_metrics = task_metrics(probs, test_split.labels, tasks)
        report = write_report(
            run_dir,
            cfg,
            result_metrics,
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
            " ".join(f"{t} AUC={m['auc']:.4f}" for t, m in result_metrics.items()),
        )
    return TrainResult(
        run_dir, state["step"], stopped_early, state["best_step"], result_metrics, report
    )


MODEL_OPTIONS = {f.name for f in fields(ModelConfig)} - {"input_spec", "task_names", "moe"}
MOE_OPTIONS = {f.name for f in fields(MoEConfig)}


def check_options(options: dict[str, Any]) -> None:
    """Refuse unknown option names and loss settings TrainConfig would refuse, before the
    training frame is built (a minute or more)."""
    train_names = {f.name for f in fields(TrainConfig)} - {"run_dir", "model"}
    unknown = set(options) - train_names - MODEL_OPTIONS - MOE_OPTIONS
    if unknown:
        raise InvalidInputError(f"unknown training options: {sorted(unknown)}")
    check_loss_options(
        options.get("loss", "indicator"),
        options.get("task_weighting", "fixed"),
        options.get("task_weights"),
    )


def config_for(
    frame: pd.DataFrame,
    tasks: tuple[str, ...],
    profile_features: tuple[str, ...],
    run_dir: str | Path,
    sequence_length: int = 50,
    table_cap: int = DEFAULT_TABLE_CAP,
    **options: Any,
) -> TrainConfig:
    """A TrainConfig sized from the data; options name TrainConfig, ModelConfig or MoEConfig
    fields (unknown names are rejected)."""
    check_options(options)
    spec = build_input_spec(frame, profile_features, sequence_length, table_cap)
    model_kw = {k: options.pop(k) for k in list(options) if k in MODEL_OPTIONS}
    moe_kw = {k: options.pop(k) for k in list(options) if k in MOE_OPTIONS}
    model = ModelConfig(input_spec=spec, task_names=tasks, moe=MoEConfig(**moe_kw), **model_kw)
    return TrainConfig(run_dir=str(run_dir), model=model, **options)


def train_from_feast(
    run_dir: Path,
    resume: bool = False,
    engine: str = "auto",
    tasks: tuple[str, ...] | None = None,
    distill: bool = False,
    **options: Any,
) -> TrainResult:
    """`userembed train`: the frame of the last `data build` via Feast's point-in-time join.
    tasks: a subset of the data set's tasks (default all), e.g. a single-task teacher.
    distill: first train `distill_teachers` single-task teachers per task under
    <run_dir>/teachers/, then the model distilled from them (trainer/distill.py); a resumed run
    finishes what was cut short."""
    from trainer.distill import own_teachers, train_teachers
    from userembed import feast_ops
    from userembed.pipeline_cli import load_built

    if not resume:
        check_options(options)
    labels, spec = load_built()
    if tasks is not None:
        unknown = [t for t in tasks if t not in spec.tasks]
        if unknown:
            raise InvalidInputError(
                f"unknown tasks {unknown}: this data set has {', '.join(spec.tasks)}"
            )
    store = feast_ops.open_store()
    frame = feast_ops.training_frame(store, labels, spec, engine=engine)
    if resume:
        cfg = TrainConfig.from_dict(json.loads((run_dir / "train_config.json").read_text()))
    else:
        cfg = config_for(
            frame,
            tasks or tuple(spec.tasks),
            tuple(spec.model_profile_features),
            run_dir,
            sequence_length=spec.sequence_length,
            **options,
        )
        if distill:
            cfg = cfg.with_(teachers=own_teachers(cfg))
    own = bool(cfg.teachers) and cfg.teachers == own_teachers(cfg)
    if own:
        if init_distributed().is_main:  # the config a resume reads, before the teachers
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        train_teachers(cfg, frame)
    # A distilled run cut short while training its teachers has no checkpoint of its own yet.
    return train(cfg, frame, resume=resume and (has_checkpoint(run_dir) or not own))
