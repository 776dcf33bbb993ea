"""Multi-task loss with task indicators, and the naive summed loss kept for comparison.

indicator: L_t = sum_{i: y_it labelled} BCE(z_it, y_it) / #{i: y_it labelled}; 0 (with exactly
zero gradient) when no sample in the batch is labelled for t. Each task is averaged over its
own labelled samples, so a sparsely labelled task is not drowned by the dense ones and
unlabelled samples are never pushed towards "negative" (the seesaw of the plain loss).
plain: unlabelled = negative, every task averaged over the whole batch.
Total = sum_t w_t L_t (fixed; 'labelled': w_t = labelled rows of t / those of the most
labelled task, from the training split) or sum_t exp(-s_t) L_t + s_t (uncertainty, Kendall
et al. 2018), plus the self-supervised future loss (trainer/future_loss.py), the whole-history
loss (trainer/summary_loss.py) and the MoE auxiliary losses (all added by the model). With no task the task part is 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.config import LOSS_KINDS, WEIGHTINGS
from trainer.future_loss import FutureOutput


@dataclass
class LossOutput:
    # () task loss after weighting + future_loss_weight * the future loss (aux losses not
    # included; trainer/model.py adds the future part)
    total: Tensor
    per_task: Tensor  # (T,) unweighted L_t
    labelled: Tensor  # (T,) number of labelled samples per task
    future: FutureOutput | None = None  # the self-supervised objective, when the batch has it
    summary: Tensor | None = None  # () the whole-history objective (trainer/summary_loss.py)


def per_task_losses(logits: Tensor, labels: Tensor, kind: str) -> tuple[Tensor, Tensor]:
    """logits (B, T), labels (B, T) with NaN = unlabelled -> (L_t (T,), labelled counts (T,))."""
    indicator = ~torch.isnan(labels)  # (B, T)
    counts = indicator.sum(dim=0).to(logits.dtype)  # (T,)
    targets = torch.where(indicator, labels, torch.zeros_like(labels))
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")  # (B, T)
    if kind == "indicator":
        # where() instead of a multiply: an unlabelled row gets exactly 0 and no gradient path.
        masked = torch.where(indicator, bce, torch.zeros_like(bce))
        return masked.sum(dim=0) / counts.clamp(min=1.0), counts
    if kind == "plain":
        return bce.mean(dim=0), counts
    raise ValueError(f"unknown loss {kind!r}; expected one of {LOSS_KINDS}")


def labelled_weights(labels: np.ndarray) -> tuple[float, ...]:
    """labels (N, T), NaN = unlabelled -> w_t = n_t / max_t n_t. Each task still averages over
    its own labelled rows; the weight then gives a task the pull its label count earns, so a
    task labelled on 12% of the rows (MovieLens: ratings of the users active in the window) does
    not steer the shared vector as hard as one labelled on every row. A task with no labels
    gets weight 0 (it has no loss anyway)."""
    counts = (~np.isnan(labels)).sum(axis=0).astype(np.float64)
    top = counts.max() if counts.size else 0.0
    if top == 0:
        return tuple(1.0 for _ in counts)
    return tuple(float(c / top) for c in counts)


class TaskLoss(nn.Module):
    def __init__(
        self,
        num_tasks: int,
        kind: str = "indicator",
        weighting: str = "fixed",
        weights: tuple[float, ...] | None = None,
    ) -> None:
        super().__init__()
        if kind not in LOSS_KINDS:
            raise ValueError(f"unknown loss {kind!r}; expected one of {LOSS_KINDS}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown task weighting {weighting!r}; expected one of {WEIGHTINGS}")
        self.kind = kind
        self.weighting = weighting
        w = torch.ones(num_tasks) if weights is None else torch.tensor(weights, dtype=torch.float)
        if w.shape != (num_tasks,):
            raise ValueError(f"task_weights needs {num_tasks} values")
        self.weights: Tensor
        self.register_buffer("weights", w)
        self.log_vars = nn.Parameter(torch.zeros(num_tasks)) if weighting == "uncertainty" else None

    def selection_weights(self) -> np.ndarray:
        """Weights of the validation score (weighted mean AUC): the loss's own task weights, so
        early stopping and model choice judge the objective the model is trained on; equal
        weights under uncertainty weighting (its s_t drift during training)."""
        if self.log_vars is not None:
            return np.ones(self.weights.shape[0])
        return self.weights.detach().cpu().numpy().astype(np.float64)

    def forward(self, logits: Tensor, labels: Tensor) -> LossOutput:
        per_task, counts = per_task_losses(logits, labels, self.kind)
        if self.log_vars is not None:
            present = (counts > 0).to(logits.dtype)  # no label: no loss, no push on s_t
            total = (present * (torch.exp(-self.log_vars) * per_task + self.log_vars)).sum()
        else:
            total = (self.weights * per_task).sum()
        return LossOutput(total=total, per_task=per_task, labelled=counts)
