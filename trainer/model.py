"""SuperMoEModel = SparseArch (TorchRec tables) + DenseArch (plain torch, exportable).

The split is the export contract: trainer/export.py rebuilds the encoder as `nn.Embedding`
tables carrying `table_weights()` + this `DenseArch` unchanged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torchrec import KeyedJaggedTensor

from trainer.config import ModelConfig
from trainer.encoder import EncoderArch, sequence_stats
from trainer.heads import TaskHeadsArch
from trainer.loss import LossOutput, TaskLoss
from trainer.moe import RouterStats
from trainer.tables import SparseArch, table_name

logger = logging.getLogger(__name__)

FINAL_CHECKPOINT = "model.pt"
HELDOUT_INPUTS = "heldout_inputs.npz"  # encoded test rows: the export's parity inputs


@dataclass
class DenseOutput:
    user_vector: Tensor  # (B, V), L2-normalised
    task_logits: Tensor  # (B, T)
    balance_loss: Tensor  # () summed over MoE layers
    z_loss: Tensor  # () summed over MoE layers
    router_stats: list[RouterStats] = field(default_factory=list)  # one per MoE layer


class DenseArch(nn.Module):
    """Everything after the table lookups. No TorchRec, no data-dependent control flow in eval."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.encoder = EncoderArch(cfg)
        self.heads = TaskHeadsArch(cfg.user_dim, cfg.task_names, cfg.tower_hidden)

    def forward(
        self, seq_emb: dict[str, Tensor], mask: Tensor, profile_emb: Tensor, seq_stats: Tensor
    ) -> DenseOutput:
        user_vector, stats = self.encoder(seq_emb, mask, profile_emb, seq_stats)
        zero = user_vector.new_zeros(())
        return DenseOutput(
            user_vector=user_vector,
            task_logits=self.heads(user_vector),
            balance_loss=sum((s.balance_loss for s in stats), zero),
            z_loss=sum((s.z_loss for s in stats), zero),
            router_stats=stats,
        )


def build_dense_arch(cfg: ModelConfig) -> nn.Module:
    """cfg.dense_arch -> DenseArch ('supermoe') or a baseline of trainer/baselines.py."""
    if cfg.dense_arch == "supermoe":
        return DenseArch(cfg)
    from trainer.baselines import build_baseline  # lazy: baselines imports DenseOutput from here

    return build_baseline(cfg)


class SuperMoEModel(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        task_loss: TaskLoss | None = None,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.sparse_arch = SparseArch(cfg.input_spec, cfg.embedding_dim, device=device)
        self.dense_arch = build_dense_arch(cfg)
        # Inside the model so DDP/DMP keeps uncertainty weights in sync across ranks.
        self.task_loss = task_loss or TaskLoss(len(cfg.task_names))

    def forward(
        self, seq_kjt: KeyedJaggedTensor, profile_kjt: KeyedJaggedTensor, labels: Tensor | None
    ) -> tuple[DenseOutput, LossOutput | None]:
        seq_emb, profile_emb = self.sparse_arch(seq_kjt, profile_kjt)
        length = self.cfg.input_spec.sequence_length
        jt = seq_kjt.to_dict()
        ids = [
            jt[f.name].values().reshape(-1, length) for f in self.cfg.input_spec.sequence_features
        ]
        mask = ids[0] != 0  # (B, L): padding of the first (item) sequence
        out = self.dense_arch(seq_emb, mask, profile_emb, sequence_stats(ids, mask, length))
        loss = None if labels is None else self.task_loss(out.task_logits, labels)
        return out, loss

    def aux_loss(self, out: DenseOutput) -> Tensor:
        moe = self.cfg.moe
        return moe.router_aux_loss_coef * out.balance_loss + moe.router_z_loss_coef * out.z_loss

    def table_weights(self) -> dict[str, Tensor]:
        """Full tables {t_<feature>: (num_embeddings, D)}; unsharded model only (see distributed)."""
        out: dict[str, Tensor] = {}
        for f in self.cfg.input_spec.sequence_features:
            out[table_name(f.name)] = self.sparse_arch.ec.embeddings[table_name(f.name)].weight
        for f in self.cfg.input_spec.profile_features:
            out[table_name(f.name)] = self.sparse_arch.ebc.embedding_bags[table_name(f.name)].weight
        return {k: v.detach().cpu().clone() for k, v in out.items()}

    def load_table_weights(self, tables: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for f in self.cfg.input_spec.sequence_features:
                self.sparse_arch.ec.embeddings[table_name(f.name)].weight.copy_(
                    tables[table_name(f.name)]
                )
            for f in self.cfg.input_spec.profile_features:
                self.sparse_arch.ebc.embedding_bags[table_name(f.name)].weight.copy_(
                    tables[table_name(f.name)]
                )


def save_final(
    path: Path, cfg: ModelConfig, tables: dict[str, Tensor], dense_state: dict[str, Any]
) -> None:
    """The artefact the export reads: config + full tables + DenseArch state dict."""
    torch.save({"model_config": cfg.to_dict(), "tables": tables, "dense_arch": dense_state}, path)


def load_final(path: Path) -> tuple[ModelConfig, dict[str, Tensor], nn.Module]:
    """-> (config, {t_<feature>: (N, D)}, DenseArch in eval mode) from a run's model.pt."""
    blob = torch.load(path, map_location="cpu", weights_only=False)
    cfg = ModelConfig.from_dict(blob["model_config"])
    dense = build_dense_arch(cfg)
    dense.load_state_dict(blob["dense_arch"])
    dense.eval()
    return cfg, blob["tables"], dense


def load_unsharded(path: Path) -> SuperMoEModel:
    """Rebuild a full SuperMoEModel (unsharded, eval) from a run's model.pt."""
    cfg, tables, dense = load_final(path)
    model = SuperMoEModel(cfg)
    model.dense_arch.load_state_dict(dense.state_dict())
    model.load_table_weights(tables)
    return model.eval()


@torch.no_grad()
def score_rows(
    model: SuperMoEModel, part: Any, batch_size: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """Eval-mode (user vectors (N, V), task probabilities (N, T)) of an unsharded model on
    training-frame rows `part` (a DataFrame), encoded with the model's own input spec."""
    from trainer.batches import encode_split, iterate_batches

    model.eval()
    spec = model.cfg.input_spec
    vectors, probs = [], []
    for b in iterate_batches(encode_split(part, spec, ()), spec, batch_size):
        o, _ = model(b.seq_kjt, b.profile_kjt, None)
        vectors.append(o.user_vector.numpy())
        probs.append(torch.sigmoid(o.task_logits).numpy())
    if not vectors:
        return np.zeros((0, model.cfg.user_dim), np.float32), np.zeros(
            (0, len(model.cfg.task_names)), np.float32
        )
    return np.concatenate(vectors), np.concatenate(probs)
