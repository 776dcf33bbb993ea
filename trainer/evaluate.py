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
from trainer.model import SuperMoEModel, load_unsharded

Metrics = dict[str, dict[str, float]]  # task -> auc, log_loss, prior_log_loss, n


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
    model: nn.Module, split: EncodedSplit, cfg: TrainConfig, ctx: DistContext, weights: np.ndarray
) -> tuple[float, Metrics]:
    """(validation score, per-task metrics) of the training model. Collective when sharded;
    rank 0's score is every rank's, since the decisions it drives hold collectives."""
    probs, _ = predict(model, split, cfg, ctx)
    metrics = task_metrics(probs, split.labels, cfg.model.task_names)
    return broadcast_float(validation_score(metrics, cfg.model.task_names, weights), ctx), metrics


def final_metrics(
    final: Path, split: EncodedSplit, cfg: TrainConfig
) -> tuple[Metrics, list[np.ndarray]]:
    """(per-task test metrics, expert load per MoE layer) of the saved final model, unsharded."""
    best = load_unsharded(final)
    probs, loads = predict(best, split, cfg, DistContext())
    best.eval()
    return task_metrics(probs, split.labels, cfg.model.task_names), loads


@torch.no_grad()
def score_rows(
    model: SuperMoEModel, part: Any, batch_size: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """Eval-mode (user vectors (N, V), task probabilities (N, T)) of an unsharded model on
    training-frame rows `part` (a DataFrame), encoded with the model's own input spec."""
    model.eval()
    spec = model.cfg.input_spec
    vectors, probs = [], []
    for b in iterate_batches(encode_split(part, spec, ()), spec, batch_size):
        o, _ = model(b.seq_kjt, b.profile_kjt, None)
        vectors.append(o.user_vector.numpy())
        probs.append(torch.sigmoid(o.task_logits).numpy())
    if not vectors:
        return np.zeros((0, model.cfg.user_dim), np.float32), np.zeros(
            (0, len(model.cfg.task_names)), np.float32
        )
    return np.concatenate(vectors), np.concatenate(probs)
