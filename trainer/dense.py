"""DenseArch: everything after the table lookups (plain torch), and DenseOutput, the output
every dense arch returns (SUPERMOE's and the baselines of trainer/baselines.py).

The export rebuilds the encoder as `nn.Embedding` tables followed by this arch unchanged
(trainer/export/rebuild.py), so nothing here may use TorchRec or data-dependent control flow
in eval.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from trainer.config import ModelConfig
from trainer.encoder import EncoderArch
from trainer.heads import TaskHeadsArch
from trainer.moe import RouterStats


@dataclass
class DenseOutput:
    user_vector: Tensor  # (B, V), L2-normalised
    task_logits: Tensor  # (B, T)
    balance_loss: Tensor  # () summed over MoE layers
    z_loss: Tensor  # () summed over MoE layers
    router_stats: list[RouterStats] = field(default_factory=list)  # one per MoE layer


class DenseArch(nn.Module):
    """SUPERMOE's dense arch: EncoderArch (attention + sparse MoE) -> user vector -> task heads."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.encoder = EncoderArch(cfg)
        self.heads = TaskHeadsArch(cfg.user_dim, cfg.task_names, cfg.tower_hidden)

    def forward(
        self,
        seq_emb: dict[str, Tensor],
        mask: Tensor,
        profile_emb: Tensor,
        seq_stats: Tensor,
        long_term: Tensor | None = None,
    ) -> DenseOutput:
        """long_term: (B, H), the encoded long-term features; required iff the InputSpec has
        them (the baselines of trainer/baselines.py take the same inputs)."""
        user_vector, stats = self.encoder(seq_emb, mask, profile_emb, seq_stats, long_term)
        zero = user_vector.new_zeros(())
        return DenseOutput(
            user_vector=user_vector,
            task_logits=self.heads(user_vector),
            balance_loss=sum((s.balance_loss for s in stats), zero),
            z_loss=sum((s.z_loss for s in stats), zero),
            router_stats=stats,
        )
