"""One training step, and the optimisers it steps: where the model learns.

Tables: Adagrad fused into backward (`_apply_optimizer_in_backward`; under DMP TorchRec's
fused TBE), so `backward()` itself updates them. Dense parameters, the task loss's and the
future objective's included: AdamW with linear warm-up then cosine decay to `min_lr_ratio`, and grad-norm clipping. The
training loop (trainer/train.py) and the speed benchmarks run this same step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.distributed.optim import _apply_optimizer_in_backward

from trainer.batches import Batch
from trainer.config import TrainConfig
from trainer.dense import DenseOutput
from trainer.distributed import DistContext, shard_model, unwrap
from trainer.loss import LossOutput
from trainer.model import SuperMoEModel


@dataclass
class Optimizers:
    """The dense side's optimiser and schedule; the tables' Adagrad runs inside backward."""

    dense_params: list[nn.Parameter]
    dense: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    grad_clip: float = 0.0  # max grad norm of the dense parameters; 0 = no clipping


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """Step -> learning-rate factor: linear warm-up, then cosine decay to min_lr_ratio over a
    sized config's max_steps (`TrainConfig.sized`)."""
    span = max(1, cfg.total_steps - cfg.warmup_steps)

    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        cos = 0.5 * (1.0 + math.cos(math.pi * progress))
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cos

    return f


def prepare(
    model: SuperMoEModel, cfg: TrainConfig, ctx: DistContext
) -> tuple[nn.Module, Optimizers]:
    """Fuse the tables' Adagrad into backward, shard under torchrun (DMP), build AdamW and its
    schedule -> (the model to train, wrapped when sharded; its optimisers)."""
    _apply_optimizer_in_backward(
        torch.optim.Adagrad, model.sparse_arch.parameters(), {"lr": cfg.sparse_lr}
    )
    trained: nn.Module = shard_model(model, ctx) if ctx.sharded else model
    inner = unwrap(trained)
    params = list(inner.dense_arch.parameters()) + list(inner.task_loss.parameters())
    for objective in (inner.future_loss, inner.summary_loss):
        if objective is not None:
            params += list(objective.parameters())
    dense = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(dense, lr_lambda(cfg))
    return trained, Optimizers(params, dense, scheduler, cfg.grad_clip)


def train_step(
    model: nn.Module, batch: Batch, optim: Optimizers, targets: Tensor | None = None
) -> tuple[DenseOutput, LossOutput]:
    """One optimisation step on `batch` (already on the model's device): forward, task loss +
    the future loss when the batch has future targets + MoE aux loss, backward (updates the
    tables), clip, AdamW step, schedule step.
    targets: (B, T), NaN = unlabelled; default the batch's labels (distillation passes its own).
    """
    out, loss = model(
        batch.seq_kjt,
        batch.profile_kjt,
        batch.labels if targets is None else targets,
        batch.future_kjt,
        long_term=batch.long_term,
    )
    assert loss is not None
    (loss.total + unwrap(model).aux_loss(out)).backward()  # tables are updated here (fused)
    if optim.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(optim.dense_params, optim.grad_clip)
    optim.dense.step()
    optim.scheduler.step()
    optim.dense.zero_grad(set_to_none=True)
    return out, loss
