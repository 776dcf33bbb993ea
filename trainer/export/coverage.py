"""Routing seen from outside the model: crafted inputs that route real tokens to every expert
of every MoE layer, and how near each row's routing is to a tie.

A trace can silently lose an expert the example input never reached, so parity runs on rows
that reach them all: random pools first (cheap; enough unless a router has collapsed), then a
greedy search per unreached expert that mutates ids to raise its router margin.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from trainer.export.inputs import Rows, concat_rows, random_inputs, slice_rows
from trainer.export.rebuild import ExportableEncoder, moe_layers, torch_inputs


def expert_covering_inputs(
    enc: ExportableEncoder,
    seed: int = 0,
    pool_rounds: int = 8,
    pool_size: int = 256,
    climb_steps: int = 60,
) -> tuple[Rows, list[list[bool]]]:
    """-> (the rows, a few per expert; the coverage [layer][expert] they reach)."""
    spec = enc.cfg.input_spec
    rng = np.random.default_rng(seed)
    layers = moe_layers(enc)
    chosen: list[Rows] = []
    covered = [np.zeros(m.num_experts, bool) for m in layers]
    for _ in range(pool_rounds):
        if all(c.all() for c in covered):
            break
        pool = random_inputs(spec, pool_size, rng)
        for li, hit in enumerate(_routing(enc, pool)):
            for e in np.flatnonzero(~covered[li] & hit.any(axis=0)):
                chosen.append(slice_rows(pool, np.flatnonzero(hit[:, e])[:1]))
                covered[li][e] = True
    for li, layer_cov in enumerate(covered):
        for e in np.flatnonzero(~layer_cov):
            row = _climb(enc, li, int(e), rng, climb_steps)
            if row is not None:
                chosen.append(row)
                for lj, hit in enumerate(_routing(enc, row)):
                    covered[lj] |= hit[0]
    rows = concat_rows(chosen) if chosen else random_inputs(spec, 1, rng)
    final = _routing(enc, rows)  # recomputed on the chosen rows alone: what parity will see
    coverage = [[bool(x) for x in np.asarray(hit.any(axis=0))] for hit in final]
    return rows, coverage


def _valid_tokens(enc: ExportableEncoder, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """(B, 1 + L) bool: the CLS token and the real events, the tokens the routers see."""
    seq = arrays[enc.sequence_names[0]]
    return np.concatenate([np.ones((seq.shape[0], 1), bool), seq != 0], axis=1)


@torch.no_grad()
def _routing(enc: ExportableEncoder, arrays: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Per MoE layer, per row: which experts got at least one real token -> (B, E) bool."""
    out = enc.dense_forward(*torch_inputs(enc, arrays))
    valid = _valid_tokens(enc, arrays)
    b = valid.shape[0]
    result: list[np.ndarray] = []
    for layer, stats in zip(moe_layers(enc), out.router_stats, strict=True):
        k = layer.num_experts_per_tok
        top = torch.topk(stats.router_logits, k, dim=-1).indices.numpy()  # (B*S, k)
        hit = np.zeros((valid.size, layer.num_experts), bool)  # (B*S, E)
        np.put_along_axis(hit, top, True, axis=1)
        hit &= valid.reshape(-1)[:, None]
        result.append(np.asarray(hit.reshape(b, -1, layer.num_experts).any(axis=1)))
    return result


@torch.no_grad()
def routing_tie_margin(enc: ExportableEncoder, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """Per row (B,), the smallest gap over MoE layers and real tokens between the k-th and the
    (k+1)-th router logit: how far the row's top-k choice is from a tie. +inf without a
    choice to make (no MoE layer, or k = number of experts)."""
    out = enc.dense_forward(*torch_inputs(enc, arrays))
    valid = _valid_tokens(enc, arrays)
    margin = np.full(valid.shape[0], np.inf)
    for layer, stats in zip(moe_layers(enc), out.router_stats, strict=True):
        k = layer.num_experts_per_tok
        if k >= layer.num_experts:
            continue
        top = torch.topk(stats.router_logits, k + 1, dim=-1).values.numpy()  # (B*S, k+1)
        gap = np.where(valid, (top[:, k - 1] - top[:, k]).reshape(valid.shape), np.inf)
        margin = np.minimum(margin, gap.min(axis=1))
    return margin


@torch.no_grad()
def _router_margin(
    enc: ExportableEncoder, arrays: Mapping[str, np.ndarray], layer: int, expert: int
) -> np.ndarray:
    """Per row, the best (over real tokens) margin of `expert` over the k-th router logit: > 0
    means the expert is among the token's top-k."""
    out = enc.dense_forward(*torch_inputs(enc, arrays))
    logits = out.router_stats[layer].router_logits.numpy()  # (B*S, E)
    k = moe_layers(enc)[layer].num_experts_per_tok
    others = np.delete(logits, expert, axis=1)
    kth_other = np.sort(others, axis=1)[:, -k]  # the logit the expert must beat
    margin = logits[:, expert] - kth_other
    valid = _valid_tokens(enc, arrays)
    return np.where(valid, margin.reshape(valid.shape[0], -1), -np.inf).max(axis=1)


def _climb(
    enc: ExportableEncoder, layer: int, expert: int, rng: np.random.Generator, steps: int
) -> Rows | None:
    """One row whose real tokens reach `expert` of `layer`, by greedy id mutation; None if
    `steps` rounds do not get there."""
    spec = enc.cfg.input_spec
    best = random_inputs(spec, 64, rng)
    margins = _router_margin(enc, best, layer, expert)
    best = slice_rows(best, np.argsort(-margins)[:1])
    best_margin = margins.max()
    for _ in range(steps):
        if best_margin > 0:
            return best
        cand = {k: np.repeat(v, 64, axis=0) for k, v in best.items()}
        for f in spec.sequence_features:  # mutate a few real positions per candidate
            x = cand[f.name]
            pos = rng.integers(0, spec.sequence_length, size=(64, 2))
            new = rng.integers(1, f.num_embeddings, size=(64, 2))
            np.put_along_axis(x, pos, new, axis=1)
        first = cand[spec.sequence_features[0].name]
        for f in spec.sequence_features[1:]:  # keep padding consistent with the item sequence
            cand[f.name] = np.where(first != 0, cand[f.name], 0)
        m = _router_margin(enc, cand, layer, expert)
        if m.max() > best_margin:
            best, best_margin = slice_rows(cand, np.array([int(m.argmax())])), m.max()
    return best if best_margin > 0 else None
