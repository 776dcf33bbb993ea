"""SuperMoEModel = SparseArch (TorchRec tables) + a dense arch (plain torch, exportable), and
its saved form, a run's model.pt (trainer/run_dir.py).

The split is the export contract: trainer/export/rebuild.py rebuilds the encoder as
`nn.Embedding` tables carrying `table_weights()` + the dense arch unchanged.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchrec import KeyedJaggedTensor

from trainer.baselines import build_baseline
from trainer.config import ModelConfig
from trainer.dense import DenseArch, DenseOutput
from trainer.encoder import sequence_stats
from trainer.future_loss import FutureLoss
from trainer.loss import LossOutput, TaskLoss
from trainer.summary_loss import SummaryLoss
from trainer.tables import SparseArch, table_name
from trainer.tensor_file import load_tensor_file

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
        future_loss: FutureLoss | None = None,
        summary_loss: SummaryLoss | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.sparse_arch = SparseArch(cfg.input_spec, cfg.embedding_dim, device=device)
        self.dense_arch = build_dense_arch(cfg)
        # Inside the model so DDP/DMP keeps uncertainty weights in sync across ranks.
        self.task_loss = task_loss or TaskLoss(len(cfg.task_names))
        # The self-supervised objective (None = off); inside for the same reason.
        self.future_loss = future_loss
        # The whole-history objective (None = off); trains only (no part of model.pt).
        self.summary_loss = summary_loss

    def forward(
        self,
        seq_kjt: KeyedJaggedTensor,
        profile_kjt: KeyedJaggedTensor,
        labels: Tensor | None,
        future_kjt: KeyedJaggedTensor | None = None,
        long_term: Tensor | None = None,
    ) -> tuple[DenseOutput, LossOutput | None]:
        """-> (dense output, loss). The loss is None when neither `labels` (B, T) nor the
        batch's `future_kjt` (trainer.future_loss.future_kjt) is given, or the model has no
        future objective and no labels. `long_term` (B, H): the batch's long-term input, required
        iff the InputSpec has it."""
        seq_emb, profile_emb = self.sparse_arch(seq_kjt, profile_kjt)
        length = self.cfg.input_spec.sequence_length
        jt = seq_kjt.to_dict()
        ids = [
            jt[f.name].values().reshape(-1, length) for f in self.cfg.input_spec.sequence_features
        ]
        mask = ids[0] != 0  # (B, L): padding of the first (item) sequence
        out = self.dense_arch(
            seq_emb, mask, profile_emb, sequence_stats(ids, mask, length), long_term
        )
        loss = None if labels is None else self.task_loss(out.task_logits, labels)
        if future_kjt is not None and self.future_loss is not None:
            # The targets go through the same (possibly sharded) tables as the inputs.
            future = self.future_loss(out.user_vector, self.sparse_arch.ec(future_kjt), future_kjt)
            loss = self._task_part(loss, out)
            loss = replace(
                loss, total=loss.total + self.future_loss.weight * future.total, future=future
            )
        if self.training and long_term is not None and self.summary_loss is not None:
            summary = self.summary_loss(out.user_vector, long_term)
            loss = self._task_part(loss, out)
            loss = replace(
                loss, total=loss.total + self.summary_loss.weight * summary, summary=summary
            )
        return out, loss

    def _task_part(self, loss: LossOutput | None, out: DenseOutput) -> LossOutput:
        """The task loss, or a zero one when the batch brought no labels."""
        if loss is not None:
            return loss
        tasks = len(self.cfg.task_names)
        return LossOutput(
            total=out.user_vector.new_zeros(()),
            per_task=out.task_logits.new_zeros(tasks),
            labelled=out.task_logits.new_zeros(tasks),
        )

    def aux_loss(self, out: DenseOutput) -> Tensor:
        moe = self.cfg.moe
        return moe.router_aux_loss_coef * out.balance_loss + moe.router_z_loss_coef * out.z_loss

    def table_weights(self) -> dict[str, Tensor]:
        """Full tables {t_<feature>: (num_embeddings, D)}; unsharded model only (see distributed)."""
        out: dict[str, Tensor] = {}
        for f in self.cfg.input_spec.sequence_features:
            out[table_name(f.name)] = self.sparse_arch.ec.embeddings[table_name(f.name)].weight
        for f in self.cfg.input_spec.profile_features:
            out[table_name(f.name)] = self.sparse_arch.bags()[table_name(f.name)].weight
        out.update(self.sparse_arch.item_tables())
        return {k: v.detach().cpu().clone() for k, v in out.items()}

    def load_table_weights(self, tables: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for f in self.cfg.input_spec.sequence_features:
                self.sparse_arch.ec.embeddings[table_name(f.name)].weight.copy_(
                    tables[table_name(f.name)]
                )
            for f in self.cfg.input_spec.profile_features:
                self.sparse_arch.bags()[table_name(f.name)].weight.copy_(tables[table_name(f.name)])
            for name, weight in self.sparse_arch.item_tables().items():
                weight.copy_(tables[name])


def save_final(
    path: Path,
    cfg: ModelConfig,
    tables: dict[str, Tensor],
    dense_state: dict[str, Any],
    future_state: dict[str, Tensor] | None = None,
) -> None:
    """The artefact the export reads: config + full tables + DenseArch state dict; with the
    self-supervised objective also its projections (`future_head`: the report scores the final
    model's future predictions with them; the export ignores them)."""
    blob = {"model_config": cfg.to_dict(), "tables": tables, "dense_arch": dense_state}
    if future_state is not None:
        blob["future_head"] = future_state
    torch.save(blob, path)


def load_final(path: Path) -> tuple[ModelConfig, dict[str, Tensor], nn.Module]:
    """-> (config, {t_<feature>: (N, D)}, DenseArch in eval mode) from a run's model.pt."""
    cfg, tables, dense, _ = _read_final(path)
    return cfg, tables, dense


def _read_final(
    path: Path,
) -> tuple[ModelConfig, dict[str, Tensor], nn.Module, dict[str, Tensor] | None]:
    """load_final's answer + the saved future projections (None without them). The file is
    read as tensors and plain data only: UnsafeFileError otherwise (trainer/tensor_file.py)."""
    blob = load_tensor_file(path)
    cfg = ModelConfig.from_dict(blob["model_config"])
    dense = build_dense_arch(cfg)
    dense.load_state_dict(blob["dense_arch"])
    dense.eval()
    return cfg, blob["tables"], dense, blob.get("future_head")


def load_unsharded(path: Path, future_loss: FutureLoss | None = None) -> SuperMoEModel:
    """Rebuild a full SuperMoEModel (unsharded, eval) from a run's model.pt. `future_loss`: an
    objective of the run's settings, given the saved projections when model.pt has them."""
    cfg, tables, dense, head = _read_final(path)
    if future_loss is not None:
        if head is None:
            future_loss = None
        else:
            future_loss.load_state_dict(head)
    model = SuperMoEModel(cfg, future_loss=future_loss)
    model.dense_arch.load_state_dict(dense.state_dict())
    model.load_table_weights(tables)
    return model.eval()
