"""SuperMoEModel = SparseArch (TorchRec tables) + a dense arch (plain torch, exportable), and
its saved form, a run's model.pt (trainer/run_dir.py).

The split is the export contract: trainer/export/rebuild.py rebuilds the encoder as
`nn.Embedding` tables carrying `table_weights()` + the dense arch unchanged.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchrec import KeyedJaggedTensor

from trainer.baselines import build_baseline
from trainer.config import ModelConfig
from trainer.dense import DenseArch, DenseOutput
from trainer.encoder import sequence_stats
from trainer.loss import LossOutput, TaskLoss
from trainer.tables import SparseArch, table_name

logger = logging.getLogger(__name__)


def build_dense_arch(cfg: ModelConfig) -> nn.Module:
    """cfg.dense_arch -> DenseArch ('supermoe') or a baseline of trainer/baselines.py."""
    if cfg.dense_arch == "supermoe":
        return DenseArch(cfg)
    return build_baseline(cfg)


class SuperMoEModel(nn.Module):
    """The training model: tables, dense arch (cfg.dense_arch) and the task loss."""

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
