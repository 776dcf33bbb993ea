"""Multi-task baselines with DenseArch's interface: shared-bottom, MMoE and PLE.

Each takes what DenseArch takes (seq_emb {name: (B, L, D)}, mask (B, L), profile_emb (B, P, D),
seq_stats, long_term (B, H)) and returns the same DenseOutput, so trainer/train.py trains them unchanged; pick one with
`ModelConfig.dense_arch`. None of them attends over the sequence: the input is the masked mean
of each sequence feature, log(1 + #events), the profile embeddings (the usual pooled-input
baseline of the multi-task literature) and the same long-term features as SUPERMOE. `user_vector` is each model's shared representation,
L2-normalised, the vector the linear probes of bench/quality.py read.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.config import ModelConfig
from trainer.dense import DenseOutput
from trainer.encoder import LongTermNorm, long_term_parts

logger = logging.getLogger(__name__)

BASELINE_ARCHS: tuple[str, ...] = ("shared_bottom", "mmoe", "ple")


class PooledInputArch(nn.Module):
    """(seq_emb, mask, profile_emb) -> (B, F): per-feature masked means, log-count, profile."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        spec = cfg.input_spec
        self.sequence_names = tuple(f.name for f in spec.sequence_features)
        d = cfg.embedding_dim
        n_seq = len(self.sequence_names)
        # the same inputs as SUPERMOE's read-out: means, log count, distinct counts, profile,
        # long-term features
        w = spec.long_term_width
        self.long_term_norm = LongTermNorm(w) if w else None
        self.out_dim = d * (n_seq + len(spec.profile_features)) + 1 + 2 * n_seq
        self.out_dim += spec.long_term_width
        self.norm = nn.LayerNorm(self.out_dim)

    def forward(
        self,
        seq_emb: dict[str, Tensor],
        mask: Tensor,
        profile_emb: Tensor,
        seq_stats: Tensor,
        long_term: Tensor | None = None,
    ) -> Tensor:
        w = mask.to(profile_emb.dtype).unsqueeze(-1)  # (B, L, 1)
        count = w.sum(dim=1)  # (B, 1)
        denom = count.clamp(min=1.0)  # empty history -> zero vector, not NaN
        pooled = [(seq_emb[n] * w).sum(dim=1) / denom for n in self.sequence_names]  # (B, D) each
        b = profile_emb.shape[0]
        x = torch.cat(
            [
                *pooled,
                torch.log1p(count),
                seq_stats,
                profile_emb.reshape(b, -1),
                *long_term_parts(self.long_term_norm, long_term),
            ],
            dim=-1,
        )
        return self.norm(x)  # (B, F)


def mlp(in_dim: int, hidden: int, out_dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim)
    )


def towers(dim: int, hidden: int, num_tasks: int) -> nn.ModuleList:
    return nn.ModuleList(mlp(dim, hidden, 1, 0.0) for _ in range(num_tasks))


def task_logits(logits: list[Tensor], shared: Tensor) -> Tensor:
    """Per-task (B, 1) logits -> (B, T); (B, 0) from the shared representation when a model
    has no labelled task (it then trains on the self-supervised objective alone)."""
    return torch.cat(logits, dim=-1) if logits else shared[:, :0]


def _no_router_output(user_vector: Tensor, task_logits: Tensor) -> DenseOutput:
    zero = user_vector.new_zeros(())
    return DenseOutput(
        user_vector=user_vector, task_logits=task_logits, balance_loss=zero, z_loss=zero
    )


class SharedBottomArch(nn.Module):
    """Shared MLP -> V-dim representation -> one tower per task (Caruana 1997)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        v = cfg.user_dim
        self.inputs = PooledInputArch(cfg)
        self.bottom = nn.Sequential(
            mlp(self.inputs.out_dim, 2 * v, 2 * v, cfg.dropout),
            nn.GELU(),
            nn.Linear(2 * v, v),
        )
        self.towers = towers(v, cfg.tower_hidden, len(cfg.task_names))

    def forward(
        self,
        seq_emb: dict[str, Tensor],
        mask: Tensor,
        profile_emb: Tensor,
        seq_stats: Tensor,
        long_term: Tensor | None = None,
    ) -> DenseOutput:
        h = F.gelu(
            self.bottom(self.inputs(seq_emb, mask, profile_emb, seq_stats, long_term))
        )  # (B, V)
        logits = task_logits([t(h) for t in self.towers], h)  # (B, T)
        return _no_router_output(F.normalize(h, dim=-1), logits)


class MMoEArch(nn.Module):
    """Multi-gate mixture of experts (Ma et al., KDD 2018): E shared experts, a softmax gate
    per task. user_vector = the uniform mix of the experts (what every task gate mixes from)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        v = cfg.user_dim
        self.num_experts = cfg.moe.num_experts
        self.inputs = PooledInputArch(cfg)
        f = self.inputs.out_dim
        self.experts = nn.ModuleList(mlp(f, 2 * v, v, cfg.dropout) for _ in range(self.num_experts))
        self.gates = nn.ModuleList(nn.Linear(f, self.num_experts) for _ in cfg.task_names)
        self.towers = towers(v, cfg.tower_hidden, len(cfg.task_names))

    def forward(
        self,
        seq_emb: dict[str, Tensor],
        mask: Tensor,
        profile_emb: Tensor,
        seq_stats: Tensor,
        long_term: Tensor | None = None,
    ) -> DenseOutput:
        x = self.inputs(seq_emb, mask, profile_emb, seq_stats, long_term)  # (B, F)
        experts = torch.stack([F.gelu(e(x)) for e in self.experts], dim=1)  # (B, E, V)
        logits = []
        for gate, tower in zip(self.gates, self.towers, strict=True):
            g = torch.softmax(gate(x), dim=-1)  # (B, E)
            logits.append(tower(torch.einsum("be,bev->bv", g, experts)))
        user_vector = F.normalize(experts.mean(dim=1), dim=-1)  # (B, V)
        return _no_router_output(user_vector, task_logits(logits, user_vector))


class ExtractionLayer(nn.Module):
    """One CGC / PLE extraction layer: task-specific experts per task plus shared experts.

    Task t's gate mixes its own experts and the shared ones; the shared gate (not on the last
    layer, as in the paper) mixes every expert to feed the next layer's shared input.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_tasks: int,
        task_experts: int,
        shared_experts: int,
        dropout: float,
        last: bool,
    ) -> None:
        super().__init__()
        self.num_tasks = num_tasks
        self.per_task = task_experts
        # Flat list, task t owns [t*K, (t+1)*K): nested ModuleLists do not type-check as iterables.
        self.task_experts = nn.ModuleList(
            mlp(in_dim, 2 * out_dim, out_dim, dropout) for _ in range(num_tasks * task_experts)
        )
        self.shared_experts = nn.ModuleList(
            mlp(in_dim, 2 * out_dim, out_dim, dropout) for _ in range(shared_experts)
        )
        self.task_gates = nn.ModuleList(
            nn.Linear(in_dim, task_experts + shared_experts) for _ in range(num_tasks)
        )
        self.shared_gate = (
            None if last else nn.Linear(in_dim, num_tasks * task_experts + shared_experts)
        )

    def forward(self, task_in: list[Tensor], shared_in: Tensor) -> tuple[list[Tensor], Tensor]:
        """task_in T x (B, F), shared_in (B, F) -> task outputs T x (B, V), shared (B, V).

        On the last layer the shared output is the uniform mix of all its experts (no gate).
        """
        shared = [F.gelu(e(shared_in)) for e in self.shared_experts]  # S x (B, V)
        k = self.per_task
        own = [
            [F.gelu(self.task_experts[t * k + j](task_in[t])) for j in range(k)]
            for t in range(self.num_tasks)
        ]
        task_out = []
        for t in range(self.num_tasks):
            pool = torch.stack(own[t] + shared, dim=1)  # (B, K+S, V)
            g = torch.softmax(self.task_gates[t](task_in[t]), dim=-1)  # (B, K+S)
            task_out.append(torch.einsum("be,bev->bv", g, pool))
        everything = torch.stack([h for hs in own for h in hs] + shared, dim=1)  # (B, T*K+S, V)
        if self.shared_gate is None:
            shared_out = everything.mean(dim=1)
        else:
            g = torch.softmax(self.shared_gate(shared_in), dim=-1)  # (B, T*K+S)
            shared_out = torch.einsum("be,bev->bv", g, everything)
        return task_out, shared_out


class PLEArch(nn.Module):
    """Progressive layered extraction (Tang et al., RecSys 2020): stacked CGC layers.

    Layers = min(2, num_layers); shared experts = max(1, num_experts // 2), one task-specific
    expert per task per layer. user_vector = the last layer's uniform mix of all experts.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        v = cfg.user_dim
        t = len(cfg.task_names)
        self.inputs = PooledInputArch(cfg)
        n_layers = max(1, min(2, cfg.num_layers))
        shared = max(1, cfg.moe.num_experts // 2)
        dims = [self.inputs.out_dim] + [v] * n_layers
        self.layers = nn.ModuleList(
            ExtractionLayer(dims[i], dims[i + 1], t, 1, shared, cfg.dropout, i == n_layers - 1)
            for i in range(n_layers)
        )
        self.towers = towers(v, cfg.tower_hidden, t)

    def forward(
        self,
        seq_emb: dict[str, Tensor],
        mask: Tensor,
        profile_emb: Tensor,
        seq_stats: Tensor,
        long_term: Tensor | None = None,
    ) -> DenseOutput:
        x = self.inputs(seq_emb, mask, profile_emb, seq_stats, long_term)  # (B, F)
        task_h, shared_h = [x] * len(self.towers), x
        for layer in self.layers:
            task_h, shared_h = layer(task_h, shared_h)
        logits = task_logits([tw(h) for tw, h in zip(self.towers, task_h, strict=True)], shared_h)
        return _no_router_output(F.normalize(shared_h, dim=-1), logits)


def build_baseline(cfg: ModelConfig) -> nn.Module:
    """ModelConfig.dense_arch in BASELINE_ARCHS -> that arch."""
    archs: dict[str, type[nn.Module]] = {
        "shared_bottom": SharedBottomArch,
        "mmoe": MMoEArch,
        "ple": PLEArch,
    }
    name = getattr(cfg, "dense_arch", "supermoe")
    if name not in archs:
        raise ValueError(f"unknown baseline dense_arch {name!r}; expected one of {BASELINE_ARCHS}")
    arch = archs[name](cfg)
    logger.info("dense arch %s: %d parameters", name, count_parameters(arch))
    return arch


def count_parameters(module: nn.Module) -> int:
    return int(sum(p.numel() for p in module.parameters()))
