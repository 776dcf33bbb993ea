"""The exportable encoder, rebuilt from a run's final model.

TorchRec modules taking a KeyedJaggedTensor do not export to ONNX, so the exported encoder is
`ExportableEncoder`: one plain `nn.Embedding` per table carrying the trained weights, followed
by the model's own dense arch, unchanged. Its inputs are exactly `userembed.features.
encode_inputs` (one (B, L) int64 array per sequence feature, `profile` (B, P) int64; a model
without profile features has no `profile` input, since the exporter drops an unused one and
onnxruntime refuses an input the graph lacks; with long-term features `long_term` (B, H)
float32, last), its outputs `user_vector` (B, V) and, with tasks, `task_scores` (B, T) =
sigmoid(task logits). A model with item attributes takes one (B, L, K) int64 input per
attribute after the sequence features (userembed.items.encode_item_attributes: the lookup of
each event's item in the model's attribute map happens before the graph, where the server and
the refresh hold the map), and pools each event's K rows as training did (trainer.tables).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from trainer.config import ModelConfig
from trainer.dense import DenseOutput
from trainer.encoder import sequence_stats
from trainer.model import load_final
from trainer.moe import SparseMoeBlock
from trainer.run_dir import RunDir
from trainer.tables import pool_values, table_name
from userembed.errors import DataNotFoundError, InvalidInputError
from userembed.features import LONG_TERM_INPUT, PROFILE_INPUT
from userembed.manifest import TASK_SCORES_OUTPUT, USER_VECTOR_OUTPUT


class ExportableEncoder(nn.Module):
    """Plain-torch encoder: `nn.Embedding` tables with the trained weights + the dense arch.

    forward(*`input_names` in order) -> (user_vector, task_scores).
    Indices are already hashed (userembed.features.encode_inputs); 0 = padding.
    """

    def __init__(self, cfg: ModelConfig, tables: Mapping[str, Tensor], dense: nn.Module) -> None:
        super().__init__()
        spec = cfg.input_spec
        self.cfg = cfg
        self.sequence_names = tuple(f.name for f in spec.sequence_features)
        self.sequence_length = spec.sequence_length
        self.profile_names = tuple(f.name for f in spec.profile_features)
        self.has_long_term = spec.long_term is not None
        self.attribute_names = spec.item_attribute_inputs
        self.tables = nn.ModuleDict()
        sizes = [(f.name, f.num_embeddings) for f in spec.sequence_features + spec.profile_features]
        sizes += [(a.input_name, a.num_embeddings) for a in spec.item_attributes]
        for name, num_embeddings in sizes:
            w = tables[table_name(name)]
            if tuple(w.shape) != (num_embeddings, cfg.embedding_dim):
                raise InvalidInputError(
                    f"table {table_name(name)} has shape {tuple(w.shape)}, "
                    f"config says ({num_embeddings}, {cfg.embedding_dim})"
                )
            self.tables[table_name(name)] = nn.Embedding.from_pretrained(
                w.detach().float(),
                freeze=True,  # shares the loaded table: no copy
            )
        self.dense_arch = dense
        self.has_tasks = len(cfg.task_names) > 0

    @property
    def input_names(self) -> tuple[str, ...]:
        profile = (PROFILE_INPUT,) if self.profile_names else ()
        long_term = (LONG_TERM_INPUT,) if self.has_long_term else ()
        return (*self.sequence_names, *self.attribute_names, *profile, *long_term)

    @property
    def output_names(self) -> tuple[str, ...]:
        return (USER_VECTOR_OUTPUT, TASK_SCORES_OUTPUT) if self.has_tasks else (USER_VECTOR_OUTPUT,)

    def dense_forward(self, *inputs: Tensor) -> DenseOutput:
        """The lookups, then the dense arch: its full output (router stats included)."""
        named = dict(zip(self.input_names, inputs, strict=True))
        seqs = [named[n] for n in self.sequence_names]
        seq_emb = {
            n: self.tables[table_name(n)](x) for n, x in zip(self.sequence_names, seqs, strict=True)
        }
        for n in self.attribute_names:  # (B, L, K) -> (B, L, D), the mean of each event's rows
            seq_emb[n] = pool_values(self.tables[table_name(n)](named[n]), named[n])
        mask = seqs[0] != 0  # (B, L): padding of the first (item) sequence, as in training
        if self.profile_names:
            profile = named[PROFILE_INPUT]  # (B, P)
            profile_emb = torch.stack(
                [
                    self.tables[table_name(n)](profile[:, j])
                    for j, n in enumerate(self.profile_names)
                ],
                dim=1,
            )  # (B, P, D): one id per bag, so the sum-pooled bag is the row itself
        else:
            profile_emb = seq_emb[self.sequence_names[0]][:, :0, :]  # (B, 0, D)
        long_term = named[LONG_TERM_INPUT] if self.has_long_term else None  # (B, H) float32
        return self.dense_arch(
            seq_emb,
            mask,
            profile_emb,
            sequence_stats(seqs, mask, self.sequence_length),
            long_term,
        )

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        out = self.dense_forward(*inputs)
        if self.has_tasks:
            return out.user_vector, torch.sigmoid(out.task_logits)
        return (out.user_vector,)


def final_model(run: str | Path) -> Path:
    """A run folder, or its model.pt itself -> the model.pt path (which must exist)."""
    path = Path(run)
    model_pt = RunDir(path).model if path.is_dir() else path
    if not model_pt.is_file():
        raise DataNotFoundError(f"no trained model at {model_pt}")
    return model_pt


def rebuild(model_pt: Path) -> ExportableEncoder:
    """The exportable encoder (eval mode) of a run's model.pt."""
    cfg, tables, dense = load_final(model_pt)
    return ExportableEncoder(cfg, tables, dense).eval()


def moe_layers(enc: ExportableEncoder) -> list[SparseMoeBlock]:
    return [m for m in enc.dense_arch.modules() if isinstance(m, SparseMoeBlock)]


def torch_inputs(enc: ExportableEncoder, arrays: Mapping[str, np.ndarray]) -> tuple[Tensor, ...]:
    """Encoder input arrays -> tensors in the encoder's input order."""
    return tuple(torch.from_numpy(np.ascontiguousarray(arrays[n])) for n in enc.input_names)
