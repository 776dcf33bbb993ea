"""SparseArch: the TorchRec embedding tables (the only TorchRec part of the model).

Sequence features go through an EmbeddingCollection (one row per event, tables
`t_item_seq`, ...), profile features through an EmbeddingBagCollection (`t_<feature>`, one id
per bag). Outputs are read by key, never by position: sharded collections reorder their keys.
A data set without profile columns has no EmbeddingBagCollection at all (`ebc` is None):
TorchRec's collection cannot pool zero tables, and the dense arch takes a (B, 0, D) profile.
Item attributes (userembed.items) go through a second EmbeddingCollection (`item_ec`, tables
`t_item_<attribute>_seq`, None without them): K rows per event, mean-pooled over the event's
values (0 = none), so an event's embedding of a multi-valued attribute is the mean of its values.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

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


def pool_values(emb: Tensor, ids: Tensor) -> Tensor:
    """(B, L, K, D) rows of (B, L, K) ids (0 = none) -> (B, L, D): the mean over each event's
    values, zeros for an event without any. The exported encoder pools the same way."""
    w = (ids != 0).to(emb.dtype).unsqueeze(-1)  # (B, L, K, 1)
    return (emb * w).sum(dim=2) / w.sum(dim=2).clamp(min=1.0)


def _configs(kind: Any, features: list[tuple[str, int]], embedding_dim: int) -> list[Any]:
    """One table per (feature, rows), named `table_name(feature)`: EmbeddingConfig or
    EmbeddingBagConfig (`kind`)."""
    return [
        kind(
            name=table_name(name),
            embedding_dim=embedding_dim,
            num_embeddings=rows,
            feature_names=[name],
        )
        for name, rows in features
    ]


class SparseArch(nn.Module):
    def __init__(self, spec: InputSpec, embedding_dim: int, device: torch.device | None = None):
        super().__init__()
        device = device or torch.device("cpu")
        self.sequence_length = spec.sequence_length
        self.sequence_names = tuple(f.name for f in spec.sequence_features)
        self.profile_names = tuple(f.name for f in spec.profile_features)
        self.item_attributes = spec.item_attributes
        # A second collection keeps `ec` exactly the tables the future objective looks up.
        item_tables = [(a.input_name, a.num_embeddings) for a in spec.item_attributes]
        self.item_ec = (
            EmbeddingCollection(
                tables=_configs(EmbeddingConfig, item_tables, embedding_dim), device=device
            )
            if item_tables
            else None
        )
        self.ec = EmbeddingCollection(
            tables=_configs(
                EmbeddingConfig,
                [(f.name, f.num_embeddings) for f in spec.sequence_features],
                embedding_dim,
            ),
            device=device,
        )
        # None without profile features: an empty collection fails at its first forward.
        self.ebc = (
            EmbeddingBagCollection(
                tables=_configs(
                    EmbeddingBagConfig,
                    [(f.name, f.num_embeddings) for f in spec.profile_features],
                    embedding_dim,
                ),
                device=device,
            )
            if spec.profile_features
            else None
        )

    def bags(self) -> Mapping[str, Any]:
        """The profile tables (`nn.EmbeddingBag`) by name (`t_<feature>`); none without
        profile features."""
        return {} if self.ebc is None else self.ebc.embedding_bags

    def item_tables(self) -> dict[str, Tensor]:
        """The item attribute tables' weights by name (`t_item_<attribute>_seq`); none
        without item attributes."""
        if self.item_ec is None:
            return {}
        return {
            table_name(a.input_name): self.item_ec.embeddings[table_name(a.input_name)].weight
            for a in self.item_attributes
        }

    def forward(
        self, seq_kjt: KeyedJaggedTensor, profile_kjt: KeyedJaggedTensor
    ) -> tuple[dict[str, Tensor], Tensor]:
        """-> seq_emb {name: (B, L, D)} (sequence features, then the item attribute inputs,
        pooled per event), profile_emb (B, P, D) in InputSpec order (P may be 0).

        Every sample carries exactly L ids per sequence feature (0 = padding row), so the
        jagged values reshape to a dense (B, L, D) block.
        """
        item_kjt = None
        if self.item_ec is not None:  # the attribute keys follow the sequence features
            seq_kjt, item_kjt = seq_kjt.split([len(self.sequence_names), len(self.item_attributes)])
        jts = self.ec(seq_kjt)
        seq_emb = {
            name: jts[name].values().reshape(-1, self.sequence_length, jts[name].values().shape[-1])
            for name in self.sequence_names
        }
        if self.item_ec is not None and item_kjt is not None:
            item_jts = self.item_ec(item_kjt)
            for a in self.item_attributes:
                emb = item_jts[a.input_name].values()
                seq_emb[a.input_name] = pool_values(
                    emb.reshape(-1, self.sequence_length, a.max_values, emb.shape[-1]),
                    item_kjt[a.input_name].values().reshape(-1, self.sequence_length, a.max_values),
                )
        if self.ebc is None:
            return seq_emb, seq_emb[self.sequence_names[0]][:, :0, :]  # (B, 0, D)
        pooled = self.ebc(profile_kjt).to_dict()
        profile_emb = torch.stack([pooled[name] for name in self.profile_names], dim=1)
        return seq_emb, profile_emb
