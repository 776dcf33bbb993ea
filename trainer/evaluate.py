"""Scoring a model: eval-mode predictions, per-task metrics, the validation score that picks
the final model, and the test figures of the saved one."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import log_loss, roc_auc_score
from torch import Tensor, nn

from trainer.batches import EncodedSplit, encode_split, iterate_batches
from trainer.config import TrainConfig
from trainer.distributed import DistContext, broadcast_float
from trainer.future_loss import FutureTotals, future_loss_of
from trainer.model import SuperMoEModel, load_unsharded
from userembed.items import ItemAttributeMap

Metrics = dict[str, dict[str, float]]  # task -> auc, log_loss, prior_log_loss, n


@torch.no_grad()
def predict(
    model: nn.Module,
    split: EncodedSplit,
    cfg: TrainConfig,
    ctx: DistContext,
    future: FutureTotals | None = None,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Eval-mode probabilities (N, T) and per-MoE-layer expert load over the whole split;
    `future` pools the self-supervised objective over the same forward passes.

    Sharded: every rank scores the whole split (forward is collective), so all get all rows.
    """
    model.eval()
    spec = cfg.model.input_spec
    probs: list[np.ndarray] = []
    load_sums: list[Tensor] = []
    for batch in iterate_batches(split, spec, cfg.batch_size * 2):
        b = batch.to(ctx.device)
        out, loss = model(b.seq_kjt, b.profile_kjt, None, b.future_kjt, long_term=b.long_term)
        if future is not None and loss is not None and loss.future is not None:
            future.add(loss.future)
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


def task_metrics(probs: np.ndarray, labels: np.ndarray, task_names: Sequence[str]) -> Metrics:
    """Per task over its labelled rows: AUC, log-loss, and the prior's log-loss as baseline."""
    out: Metrics = {}
    for j, t in enumerate(task_names):
        y = labels[:, j]
        keep = ~np.isnan(y)
        y, p = y[keep], np.clip(probs[keep, j], 1e-7, 1 - 1e-7)
        if len(y) == 0 or y.min() == y.max():
            out[t] = {
                "auc": float("nan"),
                "log_loss": float("nan"),
                "prior_log_loss": float("nan"),
                "n": float(len(y)),
            }
            continue
        prior = float(y.mean())
        out[t] = {
            "auc": float(roc_auc_score(y, p)),
            "log_loss": float(log_loss(y, p, labels=[0, 1])),
            "prior_log_loss": float(log_loss(y, np.full_like(p, prior), labels=[0, 1])),
            "n": float(len(y)),
        }
    return out


def one_class_tasks(labels: np.ndarray, task_names: Sequence[str]) -> dict[str, str]:
    """Tasks whose labelled rows (N, T) hold one class or none -> what they hold ("64 labelled
    rows, all 1"). Their AUC is undefined on that split, so a validation score cannot use them.
    """
    out: dict[str, str] = {}
    for j, t in enumerate(task_names):
        y = labels[:, j][~np.isnan(labels[:, j])]
        if len(y) == 0:
            out[t] = "no labelled row"
        elif y.min() == y.max():
            out[t] = f"{len(y)} labelled rows, all {y[0]:g}"
    return out


def validation_score(metrics: Metrics, tasks: tuple[str, ...], weights: np.ndarray) -> float:
    """Task-weighted mean validation AUC over tasks whose AUC is defined (equal weights: the
    plain mean). With 'labelled' weights a task with 64 labelled validation rows, whose AUC
    moves by several points between checkpoints on noise alone, cannot pick the model."""
    auc = np.array([metrics[t]["auc"] for t in tasks], dtype=np.float64)
    ok = np.isfinite(auc) & (weights > 0)
    if not ok.any():
        return float("nan")
    return float(np.sum(weights[ok] * auc[ok]) / np.sum(weights[ok]))


def validate(
    model: nn.Module,
    split: EncodedSplit,
    cfg: TrainConfig,
    ctx: DistContext,
    weights: np.ndarray,
    future: FutureTotals | None = None,
) -> tuple[float, Metrics]:
    """(validation score, per-task metrics) of the training model; `future` gets the
    self-supervised objective's figures. Without a labelled task whose validation rows hold
    both classes the score is the objective's in-batch AUC (trainer/future_loss.py), NaN when
    that is off too. Collective when sharded; rank 0's score is every rank's, since the
    decisions it drives hold collectives."""
    future = future if future is not None else FutureTotals()
    probs, _ = predict(model, split, cfg, ctx, future)
    metrics = task_metrics(probs, split.labels, cfg.model.task_names)
    score = validation_score(metrics, cfg.model.task_names, weights)
    if not np.isfinite(score):
        score = future.score()
    return broadcast_float(score, ctx), metrics


def final_metrics(
    final: Path, split: EncodedSplit, cfg: TrainConfig, future: FutureTotals | None = None
) -> tuple[Metrics, list[np.ndarray]]:
    """(per-task test metrics, expert load per MoE layer) of the saved final model, unsharded;
    `future` gets its self-supervised objective's figures."""
    best = load_unsharded(final, future_loss_of(cfg))
    probs, loads = predict(best, split, cfg, DistContext(), future)
    best.eval()
    return task_metrics(probs, split.labels, cfg.model.task_names), loads


@torch.no_grad()
def score_rows(
    model: SuperMoEModel, part: Any, batch_size: int = 1024, items: ItemAttributeMap | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Eval-mode (user vectors (N, V), task probabilities (N, T)) of an unsharded model on
    training-frame rows `part` (a DataFrame), encoded with the model's own input spec (and
    item attribute map: RunDir.items())."""
    model.eval()
    spec = model.cfg.input_spec
    vectors, probs = [], []
    for b in iterate_batches(encode_split(part, spec, (), items), spec, batch_size):
        o, _ = model(b.seq_kjt, b.profile_kjt, None, long_term=b.long_term)
        vectors.append(o.user_vector.numpy())
        probs.append(torch.sigmoid(o.task_logits).numpy())
    if not vectors:
        return np.zeros((0, model.cfg.user_dim), np.float32), np.zeros(
            (0, len(model.cfg.task_names)), np.float32
        )
    return np.concatenate(vectors), np.concatenate(probs)
