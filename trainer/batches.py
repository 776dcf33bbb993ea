"""Training frame (pandas) -> encoded tensors -> KeyedJaggedTensor batches.

The frame is what `userembed.feast_ops.training_frame` returns: user_id, label_timestamp,
split, label_<task>, the sequence features (lists of raw ids, oldest first), seq_len, the
long-term features and the profile ints. Encoding follows userembed.features (hash_ids,
padding, encode_long_term) exactly.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from torchrec import KeyedJaggedTensor

from trainer.future_loss import future_kjt
from userembed.errors import SchemaError
from userembed.features import (
    BEHAVIOR_VIEW,
    DEFAULT_SEQUENCE_LENGTH,
    LONG_TERM_INPUT,
    LT_ATTRIBUTE_COUNTS,
    PROFILE_INPUT,
    PROFILE_VIEW,
    SEQUENCE_FEATURES,
    TRAINING_FEATURE_SERVICE,
    FeatureSpec,
    InputSpec,
    LongTermSpec,
    encode_inputs,
)
from userembed.items import ItemAttributeMap

DEFAULT_TABLE_CAP = 100_000


def _max_id(values: pd.Series) -> int:
    m = -1
    for v in values:
        if isinstance(v, list | tuple | np.ndarray):
            if len(v):
                m = max(m, int(np.max(v)))
        elif v is not None and v == v:
            m = max(m, int(v))
    return m


def build_input_spec(
    frame: pd.DataFrame,
    profile_features: Sequence[str],
    sequence_length: int = DEFAULT_SEQUENCE_LENGTH,
    table_cap: int = DEFAULT_TABLE_CAP,
    long_term: bool | None = None,
    items: ItemAttributeMap | None = None,
) -> InputSpec:
    """Table sizes from the data: num_embeddings = min(max raw id + 2, cap).

    long_term: the long-term input (userembed.features.LongTermSpec, its default parameters,
    the ones the data build writes); None = when the frame has the long-term columns (every
    frame of `feast_ops.training_frame` has them), False = never (an ablation).
    items: the data set's item attribute map (userembed.items): one input per attribute,
    its table sized from the map's values; None = a model without item attributes.
    """
    # the item attribute histogram is optional (_long_term_spec); the other features are not
    base = LongTermSpec(attribute_buckets=0).feature_names
    if long_term is None:
        long_term = all(c in frame.columns for c in base)
    required = (*SEQUENCE_FEATURES, *profile_features, *(base if long_term else ()))
    for col in required:
        if col not in frame.columns:
            raise SchemaError("training frame", col, "is missing")

    def size(col: str) -> int:
        return max(2, min(_max_id(frame[col]) + 2, table_cap))

    return InputSpec(
        sequence_length=sequence_length,
        sequence_features=tuple(
            FeatureSpec(name=f, num_embeddings=size(f), view=BEHAVIOR_VIEW)
            for f in SEQUENCE_FEATURES
        ),
        profile_features=tuple(
            FeatureSpec(name=f, num_embeddings=size(f), view=PROFILE_VIEW) for f in profile_features
        ),
        feature_service=TRAINING_FEATURE_SERVICE,
        long_term=_long_term_spec(frame, items) if long_term else None,
        item_attributes=items.specs(table_cap) if items is not None else (),
    )


def _long_term_spec(frame: pd.DataFrame, items: ItemAttributeMap | None) -> LongTermSpec:
    """The data build's parameters; the item attribute histogram only for a model with items
    whose data has attribute values (a multi-valued attribute in the items table)."""
    spec = LongTermSpec()
    counts = frame[LT_ATTRIBUTE_COUNTS] if LT_ATTRIBUTE_COUNTS in frame.columns else None
    if items is None or counts is None or not any(np.any(c) for c in counts if c is not None):
        return replace(spec, attribute_buckets=0)
    return spec


def task_names_of(frame: pd.DataFrame) -> tuple[str, ...]:
    """Task names from the label_<task> columns (label_timestamp is the cut time, not a task)."""
    return tuple(
        c[len("label_") :]
        for c in frame.columns
        if c.startswith("label_") and c != "label_timestamp"
    )


@dataclass
class EncodedSplit:
    """One split, encoded once: (N, L) table indices per sequence feature and (N, L, K) per
    item attribute input (both in `sequences`), (N, P), (N, T)."""

    sequences: dict[str, np.ndarray]
    profile: np.ndarray
    labels: np.ndarray  # float32, NaN = unlabelled
    teacher: np.ndarray | None = None  # (N, T) teacher probabilities, NaN = none (distill.py)
    # {kind: (N, K) table rows} of the future targets, 0 = none (trainer/future_loss.py)
    future: dict[str, np.ndarray] | None = None
    long_term: np.ndarray | None = None  # (N, H) float32, the `long_term` input (or None)

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def encode_split(
    frame: pd.DataFrame,
    spec: InputSpec,
    task_names: Sequence[str],
    items: ItemAttributeMap | None = None,
) -> EncodedSplit:
    """`items`: the model's item attribute map, required iff the spec has item attributes."""
    names = [f.name for f in spec.sequence_features + spec.profile_features]
    rows = {n: frame[n].tolist() for n in (*names, *spec.long_term_names)}
    enc = encode_inputs(rows, spec, items)
    labels = (
        np.stack([frame[f"label_{t}"].to_numpy(dtype=np.float32) for t in task_names], axis=1)
        if len(task_names)
        else np.zeros((len(frame), 0), dtype=np.float32)
    )
    profile = enc.pop(PROFILE_INPUT)
    long_term = enc.pop(LONG_TERM_INPUT, None)
    return EncodedSplit(sequences=enc, profile=profile, labels=labels, long_term=long_term)


@dataclass
class Batch:
    seq_kjt: KeyedJaggedTensor
    profile_kjt: KeyedJaggedTensor
    labels: Tensor  # (B, T)
    teacher: Tensor | None = None  # (B, T), NaN = no teacher
    future_kjt: KeyedJaggedTensor | None = None  # future targets (trainer/future_loss.py)
    long_term: Tensor | None = None  # (B, H) float32, the `long_term` input

    def to(self, device: torch.device) -> Batch:
        teacher = None if self.teacher is None else self.teacher.to(device)
        future = None if self.future_kjt is None else self.future_kjt.to(device)
        long_term = None if self.long_term is None else self.long_term.to(device)
        return Batch(
            self.seq_kjt.to(device),
            self.profile_kjt.to(device),
            self.labels.to(device),
            teacher,
            future,
            long_term,
        )


def make_batch(split: EncodedSplit, idx: np.ndarray, spec: InputSpec) -> Batch:
    """Rows idx -> KJTs: every sample has L ids per sequence feature, L * K per item attribute
    input (after the sequence features, in the same KJT) and 1 per profile feature."""
    b = len(idx)
    names = [f.name for f in spec.sequence_features]
    per_sample = [spec.sequence_length] * len(names)
    names += [a.input_name for a in spec.item_attributes]
    per_sample += [spec.sequence_length * a.max_values for a in spec.item_attributes]
    seq_values = np.concatenate([split.sequences[n][idx].reshape(-1) for n in names])
    seq_kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=names,
        values=torch.from_numpy(seq_values),
        lengths=torch.from_numpy(np.repeat(np.asarray(per_sample, dtype=np.int64), b)),
    )
    pnames = [f.name for f in spec.profile_features]
    prof = split.profile[idx]  # (B, P)
    profile_kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=pnames,
        values=torch.from_numpy(np.ascontiguousarray(prof.T).reshape(-1)),
        lengths=torch.ones(b * len(pnames), dtype=torch.int64),
    )
    teacher = None if split.teacher is None else torch.from_numpy(split.teacher[idx])
    future = (
        None
        if split.future is None
        else future_kjt({k: v[idx] for k, v in split.future.items()}, spec)
    )
    long_term = None if split.long_term is None else torch.from_numpy(split.long_term[idx])
    return Batch(
        seq_kjt, profile_kjt, torch.from_numpy(split.labels[idx]), teacher, future, long_term
    )


def iterate_batches(
    split: EncodedSplit,
    spec: InputSpec,
    batch_size: int,
    shuffle_seed: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
) -> Iterator[Batch]:
    """Batches of this rank's share: rank r takes every world_size-th batch."""
    order = np.arange(len(split))
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(len(split))
    starts = list(range(0, len(split), batch_size))
    if drop_last or world_size > 1:  # equal batch counts on every rank
        starts = [s for s in starts if s + batch_size <= len(split)] or starts[:1]
        starts = starts[: len(starts) - len(starts) % world_size] or starts[:world_size]
    for i, s in enumerate(starts):
        if i % world_size == rank:
            yield make_batch(split, order[s : s + batch_size], spec)
