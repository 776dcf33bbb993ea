"""Invariants of the sparse MoE layer: routing, capacity, balance loss, padding, eval graph."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.config import MoEConfig
from trainer.moe import SparseMoeBlock, load_balancing_loss


def _rows_seen(block: SparseMoeBlock) -> list[int]:
    seen = [0] * block.num_experts
    for e, expert in enumerate(block.experts):
        expert.register_forward_hook(
            lambda _m, inp, _out, e=e: seen.__setitem__(e, seen[e] + inp[0].shape[0])
        )
    return seen


@pytest.mark.parametrize("k", [1, 2])
def test_each_token_reaches_at_most_k_experts_and_compute_follows_k(k: int) -> None:
    torch.manual_seed(0)
    block = SparseMoeBlock(8, MoEConfig(num_experts=8, num_experts_per_tok=k, capacity_factor=None))
    seen = _rows_seen(block)
    x = torch.randn(50, 8)
    valid = torch.ones(50, dtype=torch.bool)
    out, stats = block(x, valid)
    # Expert rows processed = tokens * k, independent of num_experts (8 here).
    assert sum(seen) == 50 * k
    assert torch.allclose(stats.expert_load.sum(), torch.tensor(1.0))
    # Each token's output is a mix of exactly its top-k experts.
    topk = torch.topk(stats.router_logits, k, dim=-1).indices
    for t in range(3):
        probs = torch.softmax(stats.router_logits[t], -1)[topk[t]]
        # top-2: renormalised over the pair (Mixtral); top-1: the gate prob itself (Switch).
        w = probs / probs.sum() if k == 2 else probs
        expected = sum(w[i] * block.experts[int(topk[t, i])](x[t]) for i in range(k))
        assert torch.allclose(out[t], expected, atol=1e-5)


def test_capacity_is_respected_and_overflow_is_dropped() -> None:
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=4, num_experts_per_tok=2, capacity_factor=0.5)
    block = SparseMoeBlock(8, cfg).train()
    with torch.no_grad():  # skew the router so that some experts overflow
        block.gate.weight[0] += 3.0
    seen = _rows_seen(block)
    x = torch.randn(64, 8).abs()
    valid = torch.ones(64, dtype=torch.bool)
    _, stats = block(x, valid)
    capacity = math.ceil(0.5 * 64 * 2 / 4)
    assert max(seen) <= capacity
    assert float(stats.dropped) > 0
    assert math.isclose(float(stats.dropped), 1 - sum(seen) / (64 * 2), abs_tol=1e-6)


def test_eval_is_dropless_even_with_a_capacity_factor() -> None:
    torch.manual_seed(0)
    block = SparseMoeBlock(8, MoEConfig(num_experts=4, capacity_factor=0.25)).eval()
    seen = _rows_seen(block)
    _, stats = block(torch.randn(40, 8), torch.ones(40, dtype=torch.bool))
    assert sum(seen) == 40 * 2 and float(stats.dropped) == 0.0


def test_balance_loss_is_lowest_at_uniform_routing() -> None:
    n, e, k = 400, 4, 2
    valid = torch.ones(n, dtype=torch.bool)
    uniform_probs = torch.full((n, e), 1 / e)
    idx = torch.stack([torch.arange(n) % e, (torch.arange(n) + 1) % e], dim=1)
    uniform = load_balancing_loss(uniform_probs, torch.nn.functional.one_hot(idx, e).bool(), valid)
    skew_probs = torch.softmax(torch.tensor([3.0, 1.0, 0.0, 0.0]).expand(n, e), -1)
    skew_idx = torch.tensor([0, 1]).expand(n, k)
    skewed = load_balancing_loss(skew_probs, torch.nn.functional.one_hot(skew_idx, e).bool(), valid)
    assert math.isclose(float(uniform), 1.0, rel_tol=1e-6)
    assert float(skewed) > float(uniform)


def test_padding_tokens_are_not_routed_and_get_zero_output() -> None:
    torch.manual_seed(0)
    block = SparseMoeBlock(8, MoEConfig(num_experts=4, capacity_factor=None))
    seen = _rows_seen(block)
    valid = torch.tensor([True] * 10 + [False] * 30)
    out, stats = block(torch.randn(40, 8), valid)
    assert sum(seen) == 10 * 2
    assert torch.all(out[10:] == 0)
    # Stats count real tokens only: skewing padding rows does not move the load.
    x2 = torch.randn(40, 8)
    x2[10:] = 100.0
    _, stats2 = block(torch.cat([x2[:0], x2]), valid)
    assert torch.allclose(stats2.expert_load.sum(), torch.tensor(1.0))


def test_every_expert_is_called_in_eval_even_with_no_tokens() -> None:
    torch.manual_seed(0)
    block = SparseMoeBlock(8, MoEConfig(num_experts=4, num_experts_per_tok=1)).eval()
    with torch.no_grad():
        block.gate.weight.zero_()
        block.gate.weight[2] = 1.0
    calls = [0] * 4
    for e, expert in enumerate(block.experts):
        expert.register_forward_hook(lambda *_a, e=e: calls.__setitem__(e, calls[e] + 1))
    x = torch.ones(5, 8)
    out, stats = block(x, torch.ones(5, dtype=torch.bool))
    assert calls == [1, 1, 1, 1]  # static loop: a traced graph holds every expert
    assert stats.expert_load.tolist() == [0.0, 0.0, 1.0, 0.0]
    gate_prob = torch.softmax(stats.router_logits[0], -1)[2]
    assert torch.allclose(out, gate_prob * block.experts[2](x), atol=1e-6)


@pytest.mark.parametrize("k", [1, 2])
def test_sorted_and_masked_dispatch_agree_with_padding_and_capacity(k: int) -> None:
    # The sorted dispatch runs in eager training; the masked one is what ONNX export traces.
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=6, num_experts_per_tok=k, capacity_factor=0.75)
    block = SparseMoeBlock(8, cfg).train()
    x = torch.randn(40, 8, requires_grad=True)
    valid = torch.rand(40) > 0.3
    grads = []
    outs = []
    for sorted_dispatch in (True, False):
        block.sorted_dispatch = sorted_dispatch
        block.zero_grad()
        x.grad = None
        out, stats = block(x, valid)
        (out.square().sum() + stats.balance_loss).backward()
        assert float(stats.dropped) > 0  # capacity bites, so dropping is compared too
        outs.append(out.detach())
        grads.append([x.grad.clone(), *(p.grad.clone() for p in block.parameters())])
    assert torch.allclose(outs[0], outs[1], atol=1e-6)
    assert torch.equal(outs[0][~valid], torch.zeros_like(outs[0][~valid]))
    for a, b in zip(grads[0], grads[1], strict=True):
        assert torch.allclose(a, b, atol=1e-6)
