"""Trainer tests share 2 cores with the rest of CI: one intra-op thread avoids oversubscription."""

from __future__ import annotations

import torch

torch.set_num_threads(1)
