"""The whole-history objective: the user vector keeps the user's long-term summary readable.

A downstream team reads our vectors with a linear model, so what the vector must not lose is
what a linear map can get back. This objective asks exactly that: a linear decoder from the
served (L2-normalised) user vector reconstructs the user's standardised long-term features
(category and event-type histograms, activity windows, distinct counts, tenure, recency;
userembed.features.encode_long_term) with a mean squared error. The labelled tasks and the
future objective keep only what they need of a user; this term keeps the rest of the whole
history in the vector, in a form a team's logistic regression reads (bench/transfer.py
measures it). The decoder trains with the model and is not exported.

Targets: the long-term input standardised by the objective's own LongTermNorm (statistics of
the training split, spreads floored at TrainConfig.summary_min_scale), so every column counts
about equally, a rare genre's share included, and the target never moves with the model. The
vector is scaled by sqrt(V) before the decoder, so unit-variance targets need weights of order
one (AdamW's weight decay would otherwise hold a decoder of a unit vector below the targets'
scale).
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from trainer.config import TrainConfig
from trainer.encoder import LongTermNorm


class SummaryLoss(nn.Module):
    """Linear decoder user vector (B, V) -> standardised long-term features (B, H); MSE."""

    def __init__(self, user_dim: int, width: int, weight: float) -> None:
        super().__init__()
        self.weight = weight
        self.scale = math.sqrt(user_dim)
        self.norm = LongTermNorm(width)
        self.decode = nn.Linear(user_dim, width)

    def forward(self, user_vector: Tensor, long_term: Tensor) -> Tensor:
        """() mean squared error over rows and columns."""
        target = self.norm(long_term).detach()
        return F.mse_loss(self.decode(user_vector * self.scale), target)


def summary_loss_of(cfg: TrainConfig) -> SummaryLoss | None:
    """The objective of a run; None when its weight is 0 or the model has no long-term input."""
    width = cfg.model.input_spec.long_term_width
    if cfg.summary_loss_weight <= 0 or not width:
        return None
    return SummaryLoss(cfg.model.user_dim, width, cfg.summary_loss_weight)
