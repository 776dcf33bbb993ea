"""EncoderArch: behaviour sequence + profile embeddings -> universal user vector (plain torch).

Sum of the sequence feature embeddings + learned recency position -> a learned CLS token in
front (always a real key, so users with empty histories get a finite vector) -> pre-norm
transformer blocks with a MoE FFN -> masked mean over CLS + events, concatenated with the
profile embeddings -> projection to V dims -> L2 normalisation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.config import ModelConfig
from trainer.moe import DenseFFN, RouterStats, SparseMoeBlock


class SelfAttention(nn.Module):
    """Multi-head self-attention with a key padding mask, written out for clean ONNX export."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError("embedding_dim must be divisible by num_heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        b, s, d = x.shape
        h = self.num_heads
        qkv = self.qkv(x).reshape(b, s, 3, h, d // h).permute(2, 0, 3, 1, 4)  # (3, B, H, S, dh)
        q, k, v = qkv.unbind(0)
        scores = torch.einsum("bhqd,bhkd->bhqk", q, k) / (d // h) ** 0.5
        # -1e9 rather than -inf: fully padded rows stay finite (CLS keeps one key valid anyway).
        scores = scores.masked_fill(~valid[:, None, None, :], -1e9)
        # No dropout on the (B, H, S, S) probabilities: it was the costliest op of a CPU step;
        # the residual branches keep theirs.
        attn = torch.softmax(scores, dim=-1)
        y = torch.einsum("bhqk,bhkd->bhqd", attn, v).permute(0, 2, 1, 3).reshape(b, s, d)
        return self.out(y)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, use_moe: bool) -> None:
        super().__init__()
        d = cfg.embedding_dim
        self.norm1 = nn.LayerNorm(d)
        self.attn = SelfAttention(d, cfg.num_heads)
        self.norm2 = nn.LayerNorm(d)
        self.use_moe = use_moe
        self.ffn: nn.Module = (
            SparseMoeBlock(d, cfg.moe) if use_moe else DenseFFN(d, cfg.moe.expert_hidden)
        )
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, valid: Tensor) -> tuple[Tensor, RouterStats | None]:
        x = x + self.dropout(self.attn(self.norm1(x), valid))
        b, s, d = x.shape
        flat = self.norm2(x).reshape(b * s, d)  # (B*S, D)
        flat_valid = valid.reshape(b * s)
        stats = None
        if self.use_moe:
            y, stats = self.ffn(flat, flat_valid)
        else:
            y = self.ffn(flat, flat_valid)
        return x + self.dropout(y.reshape(b, s, d)), stats


class EncoderArch(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.embedding_dim
        spec = cfg.input_spec
        self.sequence_names = tuple(f.name for f in spec.sequence_features)
        self.position = nn.Embedding(spec.sequence_length, d)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        nn.init.normal_(self.cls, std=0.02)
        every = max(1, cfg.moe.moe_every)
        # With moe_every=2 the MoE layers are blocks 1, 3, ... (dense first, as in GShard).
        self.blocks = nn.ModuleList(
            TransformerBlock(cfg, use_moe=(i % every) == every - 1) for i in range(cfg.num_layers)
        )
        self.final_norm = nn.LayerNorm(d)
        n_profile = len(spec.profile_features)
        self.project = nn.Sequential(
            nn.Linear(d * (1 + n_profile), 2 * cfg.user_dim),
            nn.GELU(),
            nn.Linear(2 * cfg.user_dim, cfg.user_dim),
        )

    def forward(
        self, seq_emb: dict[str, Tensor], mask: Tensor, profile_emb: Tensor
    ) -> tuple[Tensor, list[RouterStats]]:
        """seq_emb[name] (B, L, D), mask (B, L) bool, profile_emb (B, P, D) -> (B, V), stats."""
        x = seq_emb[self.sequence_names[0]]
        for name in self.sequence_names[1:]:
            x = x + seq_emb[name]
        b, length, d = x.shape
        x = x + self.position.weight[:length].unsqueeze(0)  # (B, L, D)
        x = torch.cat([self.cls.expand(b, 1, d), x], dim=1)  # (B, 1+L, D)
        valid = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)  # (B, 1+L)
        stats: list[RouterStats] = []
        for block in self.blocks:
            x, s = block(x, valid)
            if s is not None:
                stats.append(s)
        x = self.final_norm(x)
        w = valid.to(x.dtype).unsqueeze(-1)  # (B, 1+L, 1)
        pooled = (x * w).sum(dim=1) / w.sum(dim=1)  # (B, D); >= 1 valid (CLS)
        features = torch.cat([pooled, profile_emb.reshape(b, -1)], dim=-1)  # (B, D*(1+P))
        return F.normalize(self.project(features), dim=-1), stats
