"""The self-supervised objective: the user vector predicts the user's own future behaviour.

A dense all-action loss after PinnerFormer (Pancha et al., KDD 2022): after each cut the user
vector, projected to the table width per target kind, scores the items and categories the
user engages with in the future window (userembed/future_targets.py) against the other
targets of the batch (in-batch negatives, sampled softmax with a temperature). The targets are
embedded by the same TorchRec tables as the inputs, through a second lookup of the model's
(possibly sharded) EmbeddingCollection, so it runs unchanged under DistributedModelParallel.

Per kind (items, categories), row i with future targets P_i, target p in P_i, over the
batch's distinct targets c (q and e L2-normalised, tau the temperature):
    l_ic = <q(u_i), e_c> / tau
    loss_ip = -log( exp(l_ip) / (exp(l_ip) + sum_{c not in P_i} exp(l_ic)) )
A row's other future targets are never its negatives. L_kind = mean over the rows that have a
target of their mean loss_ip; 0 with exactly zero gradient when no row of the batch has one
(an indicator, as the task loss). The objective is the mean over kinds; the model adds it to
the task loss with `TrainConfig.future_loss_weight` (trainer/model.py).

Scores: `auc` = the share of a target's in-batch negatives scored below it, averaged over
targets; it picks the model when a run has no labelled task (trainer/evaluate.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchrec import JaggedTensor, KeyedJaggedTensor

from trainer.config import TrainConfig
from userembed.errors import InvalidInputError
from userembed.features import InputSpec, hash_ids
from userembed.future_targets import FUTURE_OFFSETS, TARGET_TABLES

# The target kinds, in loss order: the future-target columns of the training frame.
FUTURE_KINDS: tuple[str, ...] = tuple(TARGET_TABLES)


def _flat(column: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """A column of lists -> (flat int64 values, (N + 1,) row offsets)."""
    lists = column.tolist()
    lengths = np.fromiter((len(v) for v in lists), dtype=np.int64, count=len(lists))
    offsets = np.zeros(len(lists) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if not lists:
        return np.zeros(0, dtype=np.int64), offsets
    return np.concatenate([np.asarray(v, dtype=np.int64) for v in lists]), offsets


def encode_future(
    frame: pd.DataFrame, spec: InputSpec, max_targets: int, window_seconds: int | None
) -> dict[str, np.ndarray]:
    """The frame's future-target columns -> {kind: (N, max_targets) int64 table rows}, hashed
    exactly as the kind's input sequence (userembed.features.hash_ids); 0 = no target.

    Per row: the targets within `window_seconds` of the cut (None = the data set's whole
    window), at most `max_targets` of them, evenly spaced in time."""
    missing = [c for c in (*FUTURE_KINDS, FUTURE_OFFSETS) if c not in frame.columns]
    if missing:
        raise InvalidInputError(
            f"the training frame has no future targets ({', '.join(missing)}): rebuild the data "
            "set with `userembed data build` (it writes them with the labels), or train with "
            "future_loss_weight=0"
        )
    n = len(frame)
    offsets_s, starts = _flat(frame[FUTURE_OFFSETS])
    inside = (
        np.ones(len(offsets_s), bool) if window_seconds is None else offsets_s <= window_seconds
    )
    row = np.repeat(np.arange(n), np.diff(starts))  # (E,) row of each stored target
    m = np.bincount(row[inside], minlength=n)  # (N,) targets inside the window
    first = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(m, out=first[1:])
    kept = np.minimum(m, max_targets)
    sel_row = np.repeat(np.arange(n), kept)  # (S,)
    j = np.arange(int(kept.sum())) - np.repeat(np.cumsum(kept) - kept, kept)  # slot in the row
    # evenly spaced over the row's targets in the window when there are more than max_targets
    among = np.where(m[sel_row] > max_targets, j * m[sel_row] // max_targets, j)
    picked = np.flatnonzero(inside)[first[sel_row] + among]  # (S,) flat index of each target
    tables = {f.name: f.num_embeddings for f in spec.sequence_features}
    out: dict[str, np.ndarray] = {}
    for kind in FUTURE_KINDS:
        values, _ = _flat(frame[kind])
        raw = np.full((n, max_targets), -1, dtype=np.int64)  # -1 hashes to 0: no target
        raw[sel_row, j] = values[picked]
        out[kind] = hash_ids(raw, tables[TARGET_TABLES[kind]])
    return out


def future_kjt(future: dict[str, np.ndarray], spec: InputSpec) -> KeyedJaggedTensor:
    """Rows' future targets {kind: (B, K)} -> a KJT over EVERY sequence feature of `spec`, in
    its order (a sharded EmbeddingCollection fixes its key order at the first call): the
    target ids under their table's feature (K per row, 0 = none), nothing under the others."""
    by_feature = {TARGET_TABLES[kind]: ids for kind, ids in future.items()}
    b = len(next(iter(future.values())))
    values, lengths = [], []
    for f in spec.sequence_features:
        ids = by_feature.get(f.name)
        k = 0 if ids is None else ids.shape[1]
        if ids is not None:
            values.append(torch.from_numpy(np.ascontiguousarray(ids).reshape(-1)))
        lengths.append(torch.full((b,), k, dtype=torch.int64))
    return KeyedJaggedTensor.from_lengths_sync(
        keys=[f.name for f in spec.sequence_features],
        values=torch.cat(values) if values else torch.zeros(0, dtype=torch.int64),
        lengths=torch.cat(lengths),
    )


@dataclass
class FutureOutput:
    """One batch's future objective; sums so that evaluation can pool batches."""

    total: Tensor  # () mean of per_kind
    per_kind: Tensor  # (K,) L_kind in FUTURE_KINDS order
    rows: Tensor  # (K,) rows with at least one target
    auc_sum: Tensor  # (K,) sum over scored targets of their in-batch AUC (eval only, else 0)
    auc_n: Tensor  # (K,) targets scored (eval only, else 0)


def in_batch_loss(
    query: Tensor, target_emb: Tensor, target_ids: Tensor, temperature: float, score: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """query (B, D), target_emb (B, K, D), target_ids (B, K) table rows (0 = none)
    -> (L_kind (), rows with a target (), AUC sum (), targets scored ())."""
    valid = target_ids != 0  # (B, K)
    has = valid.any(dim=1)  # (B,)
    rows = has.sum().to(query.dtype)
    # value 0; keeps the projection and the lookup in the graph on every step, so DDP's
    # reductions and a sharded lookup's backward all-to-all run on every rank
    zero = (query * 0.0).sum() + (target_emb * 0.0).sum()
    if not bool(has.any()):
        return zero, rows, zero.detach(), zero.detach()
    b, k = target_ids.shape
    flat = target_ids[valid]  # (M,)
    uniq, inv = torch.unique(flat, return_inverse=True)  # (C,), (M,)
    first = torch.full((len(uniq),), len(flat), dtype=torch.long, device=flat.device)
    first = first.scatter_reduce(0, inv, torch.arange(len(flat), device=flat.device), "amin")
    cand = F.normalize(target_emb[valid][first], dim=-1)  # (C, D): one row per distinct target
    q = F.normalize(query, dim=-1)
    logits = q @ cand.T / temperature  # (B, C)
    col = torch.zeros((b, k), dtype=torch.long, device=flat.device)
    col[valid] = inv
    row_of = torch.arange(b, device=flat.device).unsqueeze(1).expand(b, k)[valid]  # (M,)
    positive = torch.zeros_like(logits, dtype=torch.bool)
    positive[row_of, inv] = True  # (B, C): the row's own targets, never its negatives
    low = torch.finfo(logits.dtype).min
    neg_lse = torch.logsumexp(torch.where(positive, low, logits), dim=1)  # (B,)
    pos = logits.gather(1, col)  # (B, K)
    log_p = pos - torch.logaddexp(pos, neg_lse.unsqueeze(1))  # (B, K)
    # where(), not a multiply: padding targets get exactly no loss and no gradient
    per_row = torch.where(valid, -log_p, torch.zeros_like(log_p)).sum(1) / valid.sum(1).clamp(min=1)
    loss = torch.where(has, per_row, torch.zeros_like(per_row)).sum() / rows + zero
    if not score:
        return loss, rows, zero.detach(), zero.detach()
    with torch.no_grad():
        negatives = torch.where(positive, torch.inf, logits)
        n_neg = (~positive).sum(1, keepdim=True)  # (B, 1)
        below = torch.searchsorted(torch.sort(negatives, dim=1).values, pos.contiguous())
        auc = below.to(logits.dtype) / n_neg.clamp(min=1)  # (B, K)
        scored = valid & (n_neg > 0)
        auc_sum = torch.where(scored, auc, torch.zeros_like(auc)).sum()
    return loss, rows, auc_sum, scored.sum().to(logits.dtype)


class FutureLoss(nn.Module):
    """The objective's own parameters (one projection per kind, user vector -> table width)
    and its settings. The export does not carry it: it only trains the user vector."""

    def __init__(self, user_dim: int, embedding_dim: int, temperature: float, weight: float):
        super().__init__()
        self.temperature = temperature
        self.weight = weight
        self.kinds = FUTURE_KINDS
        # A separate small map per kind: item and category tables are different spaces.
        self.proj = nn.ModuleDict({k: nn.Linear(user_dim, embedding_dim) for k in self.kinds})

    def forward(
        self, user_vector: Tensor, lookups: dict[str, JaggedTensor], kjt: KeyedJaggedTensor
    ) -> FutureOutput:
        """user_vector (B, V); `lookups` the EmbeddingCollection's output on `kjt`, the batch's
        future_kjt (read by feature name: sharded collections reorder keys)."""
        ids_of = kjt.to_dict()
        b = user_vector.shape[0]
        losses, rows, auc_sum, auc_n = [], [], [], []
        for kind in self.kinds:
            feature = TARGET_TABLES[kind]
            ids = ids_of[feature].values().reshape(b, -1)  # (B, K)
            emb = lookups[feature].values()
            emb = emb.reshape(b, ids.shape[1], emb.shape[-1])  # (B, K, D)
            out = in_batch_loss(
                self.proj[kind](user_vector), emb, ids, self.temperature, score=not self.training
            )
            losses.append(out[0])
            rows.append(out[1])
            auc_sum.append(out[2])
            auc_n.append(out[3])
        per_kind = torch.stack(losses)
        # The lookups of the other sequence features are empty; kept in the graph (value 0) so
        # that a sharded collection's backward is the same on every rank.
        used = {TARGET_TABLES[k] for k in self.kinds}
        idle = [jt.values().sum() * 0.0 for f, jt in lookups.items() if f not in used]
        return FutureOutput(
            total=per_kind.mean() + sum(idle, per_kind.new_zeros(())),
            per_kind=per_kind,
            rows=torch.stack(rows).detach(),
            auc_sum=torch.stack(auc_sum),
            auc_n=torch.stack(auc_n),
        )


def future_loss_of(cfg: TrainConfig) -> FutureLoss | None:
    """The objective of a run, or None when its weight is 0 (off)."""
    if cfg.future_loss_weight <= 0:
        return None
    m = cfg.model
    return FutureLoss(m.user_dim, m.embedding_dim, cfg.future_temperature, cfg.future_loss_weight)


class FutureTotals:
    """The future objective pooled over evaluation batches -> per-kind figures."""

    def __init__(self) -> None:
        k = len(FUTURE_KINDS)
        self.loss = torch.zeros(k, dtype=torch.float64)  # sum of L_kind x rows
        self.rows = torch.zeros(k, dtype=torch.float64)
        self.auc_sum = torch.zeros(k, dtype=torch.float64)
        self.auc_n = torch.zeros(k, dtype=torch.float64)

    def add(self, out: FutureOutput) -> None:
        rows = out.rows.detach().cpu().double()
        self.loss += out.per_kind.detach().cpu().double() * rows
        self.rows += rows
        self.auc_sum += out.auc_sum.detach().cpu().double()
        self.auc_n += out.auc_n.detach().cpu().double()

    def metrics(self) -> dict[str, dict[str, float]]:
        """{kind: auc (in-batch: share of a target's negatives scored below it), loss, rows}."""
        nan = float("nan")
        return {
            kind: {
                "auc": float(self.auc_sum[i] / self.auc_n[i]) if self.auc_n[i] > 0 else nan,
                "loss": float(self.loss[i] / self.rows[i]) if self.rows[i] > 0 else nan,
                "rows": float(self.rows[i]),
            }
            for i, kind in enumerate(FUTURE_KINDS)
        }

    def score(self) -> float:
        """Mean in-batch AUC over the kinds that have scored targets (NaN when none): the
        validation score of a run without labelled tasks."""
        aucs = [m["auc"] for m in self.metrics().values() if np.isfinite(m["auc"])]
        return float(np.mean(aucs)) if aucs else float("nan")
