"""Sparse mixture-of-experts feed-forward layer (top-1/top-2, Mixtral naming).

Only the chosen experts run for a token, so compute grows with top-k, not num_experts. Two
dispatches compute the same thing:
- sorted (eager torch: training and evaluation): the (token, slot) assignments are sorted by
  expert once and split by the per-expert counts, one host read of the counts per layer. On a
  GPU the masked form below waits on the device once per expert (a nonzero each), which made
  16 experts cost far more than 4 there; bench/moe_gpu.py measures both.
- masked (while tracing for ONNX export): per expert, torch.where picks its tokens, which
  index_select gathers and index_add puts back. The counts stay tensors, so the graph keeps a
  dynamic batch, and the static loop over `self.experts` puts every expert in the graph whether
  or not the example input reached it; empty token sets are valid (0-row matmuls).
The export's parity check runs the masked graph against the sorted eager model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.config import MoEConfig


@dataclass
class RouterStats:
    """Per-layer routing figures over real (non-padding) tokens."""

    router_logits: Tensor  # (N, E)
    expert_load: Tensor  # (E,) share of (token, slot) assignments per expert, before dropping
    dropped: Tensor  # () share of assignments dropped by capacity
    balance_loss: Tensor  # () Switch load-balancing loss, 1.0 at uniform routing
    z_loss: Tensor  # () router z-loss


class ExpertFFN(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.gelu(self.w1(x)))


def load_balancing_loss(probs: Tensor, assign: Tensor, valid: Tensor) -> Tensor:
    """Switch Transformer loss E * sum_e f_e * P_e (Fedus et al. 2021, eq. 4), top-k form.

    probs (N, E) router softmax; assign (N, k, E) one-hot choices; valid (N,) bool.
    f_e = share of real-token assignments to expert e, P_e = mean router prob of e.
    """
    num_experts = probs.shape[-1]
    w = valid.to(probs.dtype)  # (N,)
    n = w.sum().clamp(min=1.0)
    k = assign.shape[1]
    f = (assign.to(probs.dtype) * w[:, None, None]).sum(dim=(0, 1)) / (n * k)  # (E,)
    p = (probs * w[:, None]).sum(dim=0) / n  # (E,)
    return num_experts * (f * p).sum()


def router_z_loss(router_logits: Tensor, valid: Tensor) -> Tensor:
    """ST-MoE z-loss: mean squared log-sum-exp of router logits (Zoph et al. 2022)."""
    w = valid.to(router_logits.dtype)
    z = torch.logsumexp(router_logits, dim=-1) ** 2  # (N,)
    return (z * w).sum() / w.sum().clamp(min=1.0)


def capacity_keep(assign: Tensor, valid: Tensor, capacity: int) -> Tensor:
    """Which (token, slot) assignments fit their expert's capacity: (N, k) bool.

    Priority: every token's first choice before any second choice, then token order (GShard).
    """
    n, k, e = assign.shape
    a = assign & valid[:, None, None]  # (N, k, E)
    slot_major = a.permute(1, 0, 2).reshape(k * n, e).to(torch.int64)  # (k*N, E)
    # Queue position at its expert. The scan runs along the last dim of a contiguous (E, k*N):
    # on a GPU, a scan over dim 0 of the narrow (k*N, E) took 92% of a training step
    # (bench/moe_gpu.py --profile).
    position = torch.cumsum(slot_major.t().contiguous(), dim=1).t() - 1
    fits = ((position < capacity) & (slot_major > 0)).any(dim=-1)  # (k*N,)
    return fits.reshape(k, n).permute(1, 0)  # (N, k)


class SparseMoeBlock(nn.Module):
    """x (N, D), valid (N,) bool -> (N, D) expert mix, RouterStats. Padding is never routed."""

    def __init__(self, dim: int, cfg: MoEConfig) -> None:
        super().__init__()
        if cfg.num_experts_per_tok not in (1, 2) or cfg.num_experts_per_tok > cfg.num_experts:
            raise ValueError("num_experts_per_tok must be 1 or 2 and <= num_experts")
        self.num_experts = cfg.num_experts
        self.num_experts_per_tok = cfg.num_experts_per_tok
        self.capacity_factor = cfg.capacity_factor
        self.gate = nn.Linear(dim, cfg.num_experts, bias=False)
        self.experts = nn.ModuleList(
            ExpertFFN(dim, cfg.expert_hidden) for _ in range(cfg.num_experts)
        )
        self.sorted_dispatch = True  # False: the masked dispatch also in eager (benchmarks)

    def forward(self, x: Tensor, valid: Tensor) -> tuple[Tensor, RouterStats]:
        router_logits = self.gate(x)  # (N, E)
        probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)
        topk_w, topk_idx = torch.topk(probs, self.num_experts_per_tok, dim=-1)  # (N, k)
        # top-2: renormalise over the chosen pair (Mixtral); top-1 keeps the gate prob as the
        # scale so the router gets a gradient (Switch Transformer).
        if self.num_experts_per_tok > 1:
            topk_w = topk_w / topk_w.sum(dim=-1, keepdim=True)
        topk_w = topk_w.to(x.dtype)
        assign = F.one_hot(topk_idx, self.num_experts).to(torch.bool)  # (N, k, E)

        keep = valid[:, None].expand_as(topk_idx)  # (N, k)
        if self.training and self.capacity_factor is not None:
            n_real = int(valid.sum().item())
            capacity = max(
                1,
                math.ceil(
                    self.capacity_factor * n_real * self.num_experts_per_tok / self.num_experts
                ),
            )
            keep = keep & capacity_keep(assign, valid, capacity)

        if self.sorted_dispatch and not (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()):
            out = self._dispatch_sorted(x, topk_idx, topk_w, keep)
        else:
            out = self._dispatch_masked(x, topk_idx, topk_w, keep)

        vf = valid.to(probs.dtype)
        n_assign = (vf.sum() * self.num_experts_per_tok).clamp(min=1.0)
        expert_load = (assign.to(probs.dtype) * vf[:, None, None]).sum(dim=(0, 1)) / n_assign
        dropped = 1.0 - keep.to(probs.dtype).sum() / n_assign
        stats = RouterStats(
            router_logits=router_logits,
            expert_load=expert_load,
            dropped=dropped.clamp(min=0.0),
            balance_loss=load_balancing_loss(probs, assign, valid),
            z_loss=router_z_loss(router_logits, valid),
        )
        return out, stats

    def _dispatch_masked(self, x: Tensor, topk_idx: Tensor, topk_w: Tensor, keep: Tensor) -> Tensor:
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token_idx, slot = torch.where((topk_idx == e) & keep)  # possibly empty
            h = expert(torch.index_select(x, 0, token_idx))  # (n_e, D)
            w = topk_w[token_idx, slot].unsqueeze(-1)  # (n_e, 1)
            out = out.index_add(0, token_idx, h * w)
        return out

    def _dispatch_sorted(self, x: Tensor, topk_idx: Tensor, topk_w: Tensor, keep: Tensor) -> Tensor:
        k = self.num_experts_per_tok
        # Dropped and padding assignments get the sentinel expert E, which sorts last.
        expert_of = torch.where(keep, topk_idx, self.num_experts).reshape(-1)  # (N*k,)
        order = torch.argsort(expert_of, stable=True)
        counts = torch.bincount(expert_of, minlength=self.num_experts + 1)
        sizes = counts[: self.num_experts].tolist()  # the one host read of this layer
        n_routed = sum(sizes)
        order = order[:n_routed]
        token_idx = torch.div(order, k, rounding_mode="floor")  # assignment -> its token
        chunks = torch.index_select(x, 0, token_idx).split(sizes)
        h = torch.cat([expert(c) for expert, c in zip(self.experts, chunks, strict=True)])
        w = topk_w.reshape(-1)[order].unsqueeze(-1)  # (n_routed, 1)
        return torch.zeros_like(x).index_add(0, token_idx, h * w)


class DenseFFN(nn.Module):
    """Plain FFN for the dense layers interleaved with MoE layers (moe_every > 1)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.ffn = ExpertFFN(dim, hidden)

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        return self.ffn(x) * valid.unsqueeze(-1).to(x.dtype)
