"""TaskHeadsArch: one small MLP tower per task, reading only the universal user vector."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class TaskHeadsArch(nn.Module):
    def __init__(self, user_dim: int, task_names: tuple[str, ...], hidden: int) -> None:
        super().__init__()
        self.task_names = task_names
        # The user vector is unit-norm; a learned scale lets logits reach useful magnitudes.
        self.towers = nn.ModuleList(
            nn.Sequential(nn.Linear(user_dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))
            for _ in task_names
        )
        self.input_scale = nn.Parameter(torch.tensor(4.0))

    def forward(self, user_vector: Tensor) -> Tensor:
        """(B, V) -> task logits (B, T) in task_names order."""
        x = user_vector * self.input_scale
        if not self.towers:  # no labelled task: the self-supervised objective trains alone
            return x[:, :0]  # (B, 0), still in the graph of input_scale (DDP)
        return torch.cat([tower(x) for tower in self.towers], dim=-1)
