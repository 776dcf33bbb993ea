"""EncoderArch: behaviour sequence + profile embeddings -> universal user vector (plain torch).

Sum of the sequence feature embeddings + learned recency position -> a learned CLS token in
front (always a real key, so users with empty histories get a finite vector) -> pre-norm
transformer blocks with a MoE FFN -> read-out: masked mean over CLS + events, the CLS output,
the log event count and each sequence feature's own bag (mean raw embedding + its squared
norm), concatenated with the profile embeddings and the long-term features of the whole
history (userembed.features.encode_long_term) -> projection to V dims -> L2 normalisation.
Item attributes (userembed.items; seq_emb holds each event's pooled attribute embedding under
the attribute's input name) add to each event's token and get a bag of their own, so an item
never seen in training still tells what kind of item it was.
"""

from __future__ import annotations

import math

import numpy as np
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
        # Fused SDPA: on CPU far cheaper than a written-out einsum/softmax/masked_fill.
        # Boolean mask, True = may attend; CLS keeps one key valid per row, so no row is
        # fully masked (which would give NaN). No dropout on the attention probabilities.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :])
        y = y.permute(0, 2, 1, 3).reshape(b, s, d)  # (B, S, D)
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


def sequence_stats(seq_ids: list[Tensor], mask: Tensor, max_length: int) -> Tensor:
    """Per sequence feature, how many distinct values the history holds: (B, 2 * S).

    seq_ids: (B, L) table rows per feature (0 = padding), mask (B, L) real events, max_length
    the model's sequence length (a constant, so a shorter exported input scales the same). For
    each feature: distinct / events and log(1 + distinct) / log(1 + max_length). Why: a mean of
    embeddings cannot count (it sees shares, not how many different categories), and the count
    of distinct categories is what tells an explorer from a focused user: on the synthetic data
    a logistic regression on distinct count + event count alone reaches explore AUC .753, on the
    summed squared shares (what the bags' norms carry) .724 (bench/data_gen.py features, 20k
    users).
    Exact via pairwise equality, O(L^2) per user: cheap at L = 50 and plain ONNX ops.
    """
    m = mask.to(torch.float32)  # (B, L)
    n_events = m.sum(dim=1, keepdim=True)  # (B, 1)
    log_max = math.log1p(max_length)
    out = []
    for ids in seq_ids:
        same = (ids.unsqueeze(2) == ids.unsqueeze(1)).to(torch.float32)  # (B, L, L)
        freq = (same * m.unsqueeze(1)).sum(dim=2).clamp(min=1.0)  # (B, L) events with my value
        distinct = (m / freq).sum(dim=1, keepdim=True)  # (B, 1): sum over values of 1
        out += [distinct / n_events.clamp(min=1.0), torch.log1p(distinct) / log_max]
    return torch.cat(out, dim=1)


class EncoderArch(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.embedding_dim
        spec = cfg.input_spec
        self.sequence_names = tuple(f.name for f in spec.sequence_features)
        self.attribute_names = spec.item_attribute_inputs  # () without item attributes
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
        self.log_max_events = math.log1p(spec.sequence_length)
        n_seq = len(self.sequence_names)
        self.long_term_width = spec.long_term_width  # H; 0 without the long-term input
        # None without the long-term input: the state dict of such a model stays as it was.
        self.long_term_norm = LongTermNorm(self.long_term_width) if self.long_term_width else None
        # Read-out: masked mean + CLS output + log event count + per-feature bags and distinct
        # counts (sequence_stats), item attribute bags, then profile, then the long-term features.
        n_attr = len(self.attribute_names)
        first = nn.Linear(
            2 * d + 1 + n_seq * (d + 3) + n_attr * (d + 1) + d * n_profile + self.long_term_width,
            2 * cfg.user_dim,
        )
        if self.long_term_width:
            # The long-term columns start with zero weight: at initialisation they add no
            # noise to the vector, and they gain weight only as far as the loss asks for it.
            with torch.no_grad():
                first.weight[:, -self.long_term_width :].zero_()
        self.project = nn.Sequential(first, nn.GELU(), nn.Linear(2 * cfg.user_dim, cfg.user_dim))

    def forward(
        self,
        seq_emb: dict[str, Tensor],
        mask: Tensor,
        profile_emb: Tensor,
        seq_stats: Tensor,
        long_term: Tensor | None = None,
    ) -> tuple[Tensor, list[RouterStats]]:
        """seq_emb[name] (B, L, D), mask (B, L) bool, profile_emb (B, P, D), seq_stats (B, 2S)
        (sequence_stats), long_term (B, H) (required iff the InputSpec has it) -> (B, V),
        stats."""
        x = seq_emb[self.sequence_names[0]]
        for name in (*self.sequence_names[1:], *self.attribute_names):
            x = x + seq_emb[name]
        b, length, d = x.shape
        # Wide path: each sequence feature's own bag (masked mean of its raw embeddings) and the
        # bag's squared norm. With near-orthogonal category rows the norm is sum_c p_c^2, the
        # concentration of the category shares: diversity (explore) the summed tokens blur.
        m = mask.to(x.dtype).unsqueeze(-1)  # (B, L, 1)
        n_events = m.sum(dim=1).clamp(min=1.0)  # (B, 1)
        bags = []
        for name in self.sequence_names:
            bag = (seq_emb[name] * m).sum(dim=1) / n_events  # (B, D)
            bags += [bag, (bag * bag).sum(dim=-1, keepdim=True)]  # (B, D), (B, 1)
        attribute_bags = []
        for name in self.attribute_names:
            bag = (seq_emb[name] * m).sum(dim=1) / n_events  # (B, D)
            attribute_bags += [bag, (bag * bag).sum(dim=-1, keepdim=True)]
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
        count = w.sum(dim=1)  # (B, 1) events + CLS, >= 1
        pooled = (x * w).sum(dim=1) / count  # (B, D)
        # The mean hides how many events there were (activity drives click/churn/explore) and
        # the CLS output carries what attention gathered (e.g. category spread), so both go in.
        log_events = torch.log(count) / self.log_max_events  # (B, 1) log(1 + n events), ~[0, 1]
        parts = [pooled, x[:, 0], log_events, *bags, seq_stats, *attribute_bags]
        parts.append(profile_emb.reshape(b, -1))
        # The whole history beyond the last L events: histograms, counts, recency (scaled to
        # about [0, 1] by the contract, so the projection MLP reads them as they come).
        parts += long_term_parts(self.long_term_norm, long_term)
        features = torch.cat(parts, dim=-1)  # (B, 2D + 1 + S*(D+1) + 2S + P*D + H)
        return F.normalize(self.project(features), dim=-1), stats


class LongTermNorm(nn.Module):
    """Standardises the long-term input (B, H) per column with the statistics of the training
    split (`fit`; train() calls it before the first step) or, unfitted, of the first training
    batch (data-dependent initialisation, as Glow's ActNorm, Kingma & Dhariwal 2018), fixed
    from then on: no batch statistics at inference, so torch, ONNX and any batch
    composition give the same vector, and a batch of one trains. Why: the encoded features
    sit in [0, 1] with spreads from 0.01 (a rare category's share) to 0.3; unscaled, a trait
    only they hold is barely learned in a short run (tests/trainer/test_model.py)."""

    # A nearly constant column is scaled at most 10x (0.01 measured worse on the transfer
    # benchmark: docs/model.md)
    MIN_SCALE = 0.1
    center: Tensor  # (H,) buffers: saved with the dense arch, constants in the ONNX graph
    scale: Tensor
    initialised: Tensor

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width
        self.register_buffer("center", torch.zeros(width))
        self.register_buffer("scale", torch.ones(width))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    def fit(self, long_term: Tensor, min_scale: float) -> None:
        """Fix the statistics from `long_term` (N, H): the whole training split, where the first
        batch would misjudge a rare column's spread (a rare category's share often is 0 on
        every row of a batch)."""
        self._set(long_term.to(torch.float32), min_scale)

    def _set(self, x: Tensor, min_scale: float) -> None:
        with torch.no_grad():
            self.center.copy_(x.mean(dim=0))
            self.scale.copy_(x.std(dim=0, unbiased=False).clamp(min=min_scale))
            self.initialised.fill_(True)

    def forward(self, long_term: Tensor) -> Tensor:
        """(B, H) -> (B, H) standardised."""
        x = long_term.to(torch.float32)
        if self.training and not bool(self.initialised):
            self._set(x, self.MIN_SCALE)
        return (x - self.center) / self.scale


def fit_long_term_norms(module: nn.Module, long_term: np.ndarray | None, min_scale: float) -> None:
    """Every LongTermNorm inside `module` takes its statistics from the training split's
    long-term input (N, H) (None: a model without it; nothing to fit)."""
    if long_term is None or not len(long_term):
        return
    x = torch.from_numpy(np.asarray(long_term, dtype=np.float32))
    for m in module.modules():
        if isinstance(m, LongTermNorm):
            m.fit(x, min_scale)


def long_term_parts(norm: LongTermNorm | None, long_term: Tensor | None) -> list[Tensor]:
    """The read-out's long-term part: [norm(long_term)] for a model with the long-term input
    ((B, H): the projection after it refuses another width), [] for one without."""
    if norm is None:
        return []
    assert long_term is not None, "the model's InputSpec has a long-term input: pass it"
    return [norm(long_term)]
