"""SparseArch: the TorchRec embedding tables (the only TorchRec part of the model).

Sequence features go through an EmbeddingCollection (one row per event, tables
`t_item_seq`, ...), profile features through an EmbeddingBagCollection (`t_<feature>`, one id
per bag). Outputs are read by key, never by position: sharded collections reorder their keys.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchrec import (
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    EmbeddingCollection,
    EmbeddingConfig,
    KeyedJaggedTensor,
)

from userembed.features import InputSpec


def table_name(feature: str) -> str:
    return f"t_{feature}"


class SparseArch(nn.Module):
    def __init__(self, spec: InputSpec, embedding_dim: int, device: torch.device | None = None):
        super().__init__()
        device = device or torch.device("cpu")
        self.sequence_length = spec.sequence_length
        self.sequence_names = tuple(f.name for f in spec.sequence_features)
        self.profile_names = tuple(f.name for f in spec.profile_features)
        self.ec = EmbeddingCollection(
            tables=[
                EmbeddingConfig(
                    name=table_name(f.name),
                    embedding_dim=embedding_dim,
                    num_embeddings=f.num_embeddings,
                    feature_names=[f.name],
                )
                for f in spec.sequence_features
            ],
            device=device,
        )
        self.ebc = EmbeddingBagCollection(
            tables=[
                EmbeddingBagConfig(
                    name=table_name(f.name),
                    embedding_dim=embedding_dim,
                    num_embeddings=f.num_embeddings,
                    feature_names=[f.name],
                )
                for f in spec.profile_features
            ],
            device=device,
        )

    def forward(
        self, seq_kjt: KeyedJaggedTensor, profile_kjt: KeyedJaggedTensor
    ) -> tuple[dict[str, Tensor], Tensor]:
        """-> seq_emb {name: (B, L, D)}, profile_emb (B, P, D) in InputSpec order.

        Every sample carries exactly L ids per sequence feature (0 = padding row), so the
        jagged values reshape to a dense (B, L, D) block.
        """
        jts = self.ec(seq_kjt)
        seq_emb = {
            name: jts[name].values().reshape(-1, self.sequence_length, jts[name].values().shape[-1])
            for name in self.sequence_names
        }
        pooled = self.ebc(profile_kjt).to_dict()
        profile_emb = torch.stack([pooled[name] for name in self.profile_names], dim=1)
        return seq_emb, profile_emb
