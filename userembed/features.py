"""Feature names and the rules that turn feature rows into encoder inputs.

This module is the single definition of:
- the Feast feature names (behaviour sequences and profile attributes),
- the time-gap bucketing used when sequences are built,
- the id hashing policy (`hash_ids`): table index = 1 + id mod (num_embeddings - 1), 0 = padding,
- the padded layout of encoder inputs: oldest event first, truncated to the last L events,
  padded with 0 at the end,
- the long-term features of a user (`LONG_TERM_FEATURES`: counts over the whole history before
  the snapshot time) and their encoding into one float input (`encode_long_term`, layout in
  `LongTermSpec.column_names`).
The trainer, the exported ONNX encoder, the server and the refresh job all follow it, and the
model manifest records the parameters (`InputSpec`), so a model carries its own input rules.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from userembed.errors import FeatureMismatchError
from userembed.hashing import hash_ids  # part of this contract; kept in a leaf module
from userembed.items import ItemAttributeMap, ItemAttributeSpec, encode_item_attributes

BEHAVIOR_VIEW = "user_behavior"
PROFILE_VIEW = "user_profile"

ITEM_SEQ = "item_seq"  # the raw item ids, which the item attributes are looked up from
# Behaviour sequence features (Feast Array(Int64)), oldest event first.
SEQUENCE_FEATURES: tuple[str, ...] = (
    ITEM_SEQ,
    "category_seq",
    "event_type_seq",
    "gap_bucket_seq",
)
# Profile attributes (Feast Int64). A model declares which of them it uses.
PROFILE_FEATURES: tuple[str, ...] = ("age_bucket", "gender", "occupation", "region")
SEQ_LEN_FEATURE = "seq_len"
# The encoder input holding every profile feature, (B, P) int64 (manifest input name).
PROFILE_INPUT = "profile"

# Long-term features: counts over the user's WHOLE history strictly before the snapshot time,
# in the behaviour view's snapshot rows (the same point-in-time rule as the sequences, which
# keep only the last L events). Raw counts in Feast (Int64 / Array(Int64)); the encoder reads
# them as one float input (`encode_long_term`).
LT_CATEGORY_COUNTS = "lt_category_counts"  # [category_buckets]: events per category_id mod C
LT_EVENT_TYPE_COUNTS = "lt_event_type_counts"  # [event_type_buckets]: per event_type mod E
LT_WINDOW_COUNTS = "lt_window_counts"  # [len(window_days)]: events in the last d days
# [attribute_buckets]: per value mod A of the items table's multi-valued attributes (genres,
# tags: userembed.items.history_attributes), every value of each event's item; zeros without
# an items table
LT_ATTRIBUTE_COUNTS = "lt_attribute_counts"
LT_DISTINCT_ITEMS = "lt_distinct_items"
LT_DISTINCT_CATEGORIES = "lt_distinct_categories"  # raw category ids, before bucketing
LT_SECONDS_SINCE_FIRST = "lt_seconds_since_first"  # tenure; -1 = no event yet
LT_SECONDS_SINCE_LAST = "lt_seconds_since_last"  # recency; -1 = no event yet
LONG_TERM_LIST_FEATURES: tuple[str, ...] = (
    LT_CATEGORY_COUNTS,
    LT_EVENT_TYPE_COUNTS,
    LT_WINDOW_COUNTS,
    LT_ATTRIBUTE_COUNTS,
)
LONG_TERM_SCALAR_FEATURES: tuple[str, ...] = (
    LT_DISTINCT_ITEMS,
    LT_DISTINCT_CATEGORIES,
    LT_SECONDS_SINCE_FIRST,
    LT_SECONDS_SINCE_LAST,
)
LONG_TERM_FEATURES: tuple[str, ...] = LONG_TERM_LIST_FEATURES + LONG_TERM_SCALAR_FEATURES
# The encoder input holding the encoded long-term features, (B, H) float32 (manifest name).
LONG_TERM_INPUT = "long_term"
DEFAULT_CATEGORY_BUCKETS = 32  # MovieLens has 19 genres, the synthetic data 20 categories
DEFAULT_EVENT_TYPE_BUCKETS = 8  # MovieLens ratings 1..5, synthetic event types 0..3
DEFAULT_WINDOW_DAYS: tuple[int, ...] = (1, 7, 28)
DEFAULT_ATTRIBUTE_BUCKETS = 32  # MovieLens has 19 genres
# Scales that put the encoded logs near [0, 1]: 10,000 events, 10 years.
LOG_COUNT_SCALE = math.log1p(10_000)
LOG_DAYS_SCALE = math.log1p(3650)
# The first columns of the encoded long-term input, in order (then the category shares, the
# event-type shares, the window counts and, for a model with items, the attribute shares).
LONG_TERM_SCALARS: tuple[str, ...] = (
    "has_history",  # 1 if the user has an event before the snapshot time
    "log_events",  # log1p(events) / LOG_COUNT_SCALE
    "log_distinct_items",  # log1p(distinct items) / LOG_COUNT_SCALE
    "log_distinct_categories",  # log1p(distinct categories) / LOG_COUNT_SCALE
    "category_entropy",  # entropy of the category bucket shares / log(C)
    "event_type_mean",  # mean event-type bucket / (E - 1)
    "event_type_std",  # its standard deviation / (E - 1)
    "log_days_since_last",  # log1p(days since the last event) / LOG_DAYS_SCALE
    "log_days_since_first",  # log1p(days since the first event) / LOG_DAYS_SCALE
)
_SECONDS_PER_DAY = 86_400.0

TRAINING_FEATURE_SERVICE = "user_training_v1"
SERVING_FEATURE_SERVICE = "user_serving_v1"

DEFAULT_SEQUENCE_LENGTH = 50
NUM_GAP_BUCKETS = 16  # bucket 0 = no previous event; 1..15 log2 of minutes


def gap_buckets(gap_seconds: np.ndarray) -> np.ndarray:
    """Bucket time gaps between consecutive events: 1 + floor(log2(1 + minutes)), capped at 15.

    A negative gap marks "no previous event" and maps to bucket 0.
    """
    g = np.asarray(gap_seconds, dtype=np.float64)
    b = 1 + np.floor(np.log2(1.0 + np.maximum(g, 0.0) / 60.0))
    b = np.minimum(b, NUM_GAP_BUCKETS - 1).astype(np.int64)
    return np.where(g < 0, 0, b)


@dataclass(frozen=True)
class FeatureSpec:
    """One categorical input: its Feast feature and its embedding table size."""

    name: str  # encoder input name == Feast feature name
    num_embeddings: int
    view: str

    @property
    def feast_ref(self) -> str:
        return f"{self.view}:{self.name}"


@dataclass(frozen=True)
class LongTermSpec:
    """The parameters of the long-term features (the data build writes them with the defaults)
    and of their encoding; a model carries them in its InputSpec, so its manifest says how
    its `long_term` input was made."""

    category_buckets: int = DEFAULT_CATEGORY_BUCKETS
    event_type_buckets: int = DEFAULT_EVENT_TYPE_BUCKETS
    window_days: tuple[int, ...] = DEFAULT_WINDOW_DAYS
    view: str = BEHAVIOR_VIEW
    buckets: str = "bucket = id mod buckets (category_id, event_type, item attribute values)"
    # 0: the model does not read the item attribute histogram (trained without an items
    # table, or saved before the histogram existed); the data build always writes it
    attribute_buckets: int = DEFAULT_ATTRIBUTE_BUCKETS

    def __post_init__(self) -> None:
        if self.category_buckets < 2 or self.event_type_buckets < 2:
            raise ValueError("long-term features need at least 2 buckets per histogram")
        if self.attribute_buckets == 1 or self.attribute_buckets < 0:
            raise ValueError("attribute_buckets must be 0 (none) or at least 2")
        object.__setattr__(self, "window_days", tuple(int(d) for d in self.window_days))

    @property
    def list_lengths(self) -> dict[str, int]:
        """Feast list feature the model reads -> the number of values each row holds."""
        lengths = {
            LT_CATEGORY_COUNTS: self.category_buckets,
            LT_EVENT_TYPE_COUNTS: self.event_type_buckets,
            LT_WINDOW_COUNTS: len(self.window_days),
        }
        if self.attribute_buckets:
            lengths[LT_ATTRIBUTE_COUNTS] = self.attribute_buckets
        return lengths

    @property
    def feature_names(self) -> tuple[str, ...]:
        """The Feast features the model reads, lists first."""
        return (*self.list_lengths, *LONG_TERM_SCALAR_FEATURES)

    @property
    def width(self) -> int:
        """H, the width of the encoded `long_term` input."""
        return len(LONG_TERM_SCALARS) + sum(self.list_lengths.values())

    def column_names(self) -> tuple[str, ...]:
        """The H columns of the encoded input, in order."""
        return (
            *LONG_TERM_SCALARS,
            *(f"category_share_{b}" for b in range(self.category_buckets)),
            *(f"event_type_share_{b}" for b in range(self.event_type_buckets)),
            *(f"log_events_{d}d" for d in self.window_days),
            *(f"attribute_share_{b}" for b in range(self.attribute_buckets)),
        )

    def feast_refs(self) -> list[str]:
        return [f"{self.view}:{n}" for n in self.feature_names]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LongTermSpec:
        return cls(
            category_buckets=int(d["category_buckets"]),
            event_type_buckets=int(d["event_type_buckets"]),
            window_days=tuple(int(x) for x in d["window_days"]),
            view=d.get("view", BEHAVIOR_VIEW),
            buckets=d.get("buckets", cls.buckets),
            attribute_buckets=int(d.get("attribute_buckets", 0)),
        )


@dataclass(frozen=True)
class InputSpec:
    """Everything needed to build encoder inputs from Feast rows; stored in the manifest.
    `long_term` None: a model without the long-term input (one exported before it existed, or
    trained on a frame without the features); it reads and is fed none of them."""

    sequence_length: int = DEFAULT_SEQUENCE_LENGTH
    sequence_features: tuple[FeatureSpec, ...] = field(default_factory=tuple)
    profile_features: tuple[FeatureSpec, ...] = field(default_factory=tuple)
    feature_service: str = SERVING_FEATURE_SERVICE
    hashing: str = "index = 1 + id mod (num_embeddings - 1); 0 = padding"
    padding: str = "oldest first, last sequence_length events, 0-padded at the end"
    long_term: LongTermSpec | None = None
    # Item side information (userembed.items): one (B, L, K) input per attribute, looked up
    # from the raw item ids with the model's own attribute map; () = a model without items.
    item_attributes: tuple[ItemAttributeSpec, ...] = ()

    def feast_refs(self) -> list[str]:
        refs = [f.feast_ref for f in self.sequence_features + self.profile_features]
        return refs + (self.long_term.feast_refs() if self.long_term else [])

    def feature_names(self) -> list[str]:
        """The bare Feast feature names the model reads, in `feast_refs` order."""
        return [r.split(":", 1)[1] for r in self.feast_refs()]

    @property
    def long_term_names(self) -> tuple[str, ...]:
        """The long-term features the model reads (none without a long-term input)."""
        return self.long_term.feature_names if self.long_term else ()

    @property
    def long_term_width(self) -> int:
        return self.long_term.width if self.long_term else 0

    @property
    def item_attribute_inputs(self) -> tuple[str, ...]:
        """The encoder inputs of the item attributes, in InputSpec order."""
        return tuple(a.input_name for a in self.item_attributes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if not self.item_attributes:  # a model without items keeps its manifest as it was
            del d["item_attributes"]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> InputSpec:
        long_term = d.get("long_term")
        return cls(
            sequence_length=int(d["sequence_length"]),
            sequence_features=tuple(FeatureSpec(**f) for f in d["sequence_features"]),
            profile_features=tuple(FeatureSpec(**f) for f in d["profile_features"]),
            feature_service=d.get("feature_service", SERVING_FEATURE_SERVICE),
            hashing=d.get("hashing", cls.hashing),
            padding=d.get("padding", cls.padding),
            long_term=LongTermSpec.from_dict(long_term) if long_term else None,
            item_attributes=tuple(ItemAttributeSpec(**a) for a in d.get("item_attributes", ())),
        )


def pad_sequences(seqs: Sequence[Sequence[int] | None], length: int) -> np.ndarray:
    """Lists of raw ids -> (B, length) int64, the last `length` items, -1 where padded."""
    out = np.full((len(seqs), length), -1, dtype=np.int64)
    for i, s in enumerate(seqs):
        if s is None or len(s) == 0:
            continue
        tail = np.asarray(s[-length:], dtype=np.int64)
        out[i, : len(tail)] = tail
    return out


def encode_inputs(
    rows: Mapping[str, Sequence[Any]], spec: InputSpec, items: ItemAttributeMap | None = None
) -> dict[str, np.ndarray]:
    """Feature columns (as returned by Feast, one list entry per user) -> encoder inputs.

    Returns one (B, L) int64 array per sequence feature, named as the feature,
    `profile`: (B, P) int64 in `spec.profile_features` order, and with `spec.long_term`
    `long_term`: (B, H) float32 (`encode_long_term`), and with `spec.item_attributes` one
    (B, L, K) int64 per attribute (userembed.items.encode_item_attributes, from `items`, the
    model's attribute map). Missing values become padding (a user without long-term rows
    encodes as one without history).
    """
    out: dict[str, np.ndarray] = {}
    for f in spec.sequence_features:
        raw = pad_sequences(rows[f.name], spec.sequence_length)
        out[f.name] = hash_ids(raw, f.num_embeddings)
        if f.name == ITEM_SEQ:
            out.update(encode_item_attributes(raw, spec.item_attributes, items))
    n = len(next(iter(rows.values()))) if rows else 0
    profile = np.zeros((n, len(spec.profile_features)), dtype=np.int64)
    for j, f in enumerate(spec.profile_features):
        col = np.array(
            [-1 if v is None or v != v else int(v) for v in rows[f.name]], dtype=np.int64
        )
        profile[:, j] = hash_ids(col, f.num_embeddings)
    out[PROFILE_INPUT] = profile
    if spec.long_term is not None:
        lt = spec.long_term
        absent = [n for n in lt.feature_names if n not in rows]
        if absent:
            raise FeatureMismatchError(
                f"feature rows lack {absent}, which the model reads: the rows were built "
                "without long-term features (rebuild the data set for this model)"
            )
        counts = {
            name: _fixed_width_rows(rows[name], width, name)
            for name, width in lt.list_lengths.items()
        }
        counts.update({name: _scalar_rows(rows[name]) for name in LONG_TERM_SCALAR_FEATURES})
        out[LONG_TERM_INPUT] = encode_long_term(counts, lt)
    return out


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and v != v)


def _fixed_width_rows(values: Sequence[Any], width: int, name: str) -> np.ndarray:
    """Lists of `width` counts per user (None / NaN: missing) -> (B, width) int64, 0 = missing."""
    out = np.zeros((len(values), width), dtype=np.int64)
    for i, v in enumerate(values):
        if _missing(v):
            continue
        a = np.asarray(v, dtype=np.int64)
        if a.shape != (width,):
            raise _width_error(name, a.size, width)
        out[i] = a
    return out


def _scalar_rows(values: Sequence[Any]) -> np.ndarray:
    """Ints per user (None / NaN: missing) -> (B,) int64, -1 = missing."""
    return np.array([-1 if _missing(v) else int(v) for v in values], dtype=np.int64)


def _width_error(name: str, got: int, want: int) -> FeatureMismatchError:
    return FeatureMismatchError(
        f"feature {name} holds {got} values, the model reads {want}: the feature rows were "
        "built with other long-term parameters (rebuild the data set for this model)"
    )


def encode_long_term(counts: Mapping[str, np.ndarray], spec: LongTermSpec) -> np.ndarray:
    """The long-term features of B users -> the encoder's `long_term` input, (B, H) float32.

    counts: each list feature (B, its length) int64 and each scalar feature (B,) int64, missing
    values 0 (lists) or -1 (scalars); a user without history encodes as all zeros. Columns:
    `spec.column_names()`. Shares and the event-type statistics come from the histograms; logs
    are scaled to about [0, 1] (LOG_COUNT_SCALE, LOG_DAYS_SCALE), so the model needs no
    data-dependent normalisation and every side computes the same floats from the same ints.
    """
    cat = np.asarray(counts[LT_CATEGORY_COUNTS], dtype=np.float64)  # (B, C)
    types = np.asarray(counts[LT_EVENT_TYPE_COUNTS], dtype=np.float64)  # (B, E)
    windows = np.asarray(counts[LT_WINDOW_COUNTS], dtype=np.float64)  # (B, W)
    n = types.sum(axis=1)  # (B,) events before the snapshot time
    has = n > 0
    denom = np.maximum(n, 1.0)[:, None]
    cat_share = cat / np.maximum(cat.sum(axis=1), 1.0)[:, None]  # (B, C)
    type_share = types / denom  # (B, E)
    plogp = np.where(cat_share > 0, cat_share * np.log(np.where(cat_share > 0, cat_share, 1.0)), 0)
    entropy = np.maximum(-plogp.sum(axis=1), 0.0) / math.log(spec.category_buckets)  # (B,)
    index = np.arange(spec.event_type_buckets, dtype=np.float64)
    mean = (type_share * index).sum(axis=1)  # (B,)
    std = np.sqrt(np.maximum((type_share * index**2).sum(axis=1) - mean**2, 0.0))

    def log_count(name: str) -> np.ndarray:
        return np.log1p(np.maximum(np.asarray(counts[name], dtype=np.float64), 0.0))

    def log_days(name: str) -> np.ndarray:
        seconds = np.asarray(counts[name], dtype=np.float64)
        return np.where(seconds >= 0, np.log1p(np.maximum(seconds, 0.0) / _SECONDS_PER_DAY), 0.0)

    scalars = np.stack(
        [
            has.astype(np.float64),
            np.log1p(n) / LOG_COUNT_SCALE,
            log_count(LT_DISTINCT_ITEMS) / LOG_COUNT_SCALE,
            log_count(LT_DISTINCT_CATEGORIES) / LOG_COUNT_SCALE,
            entropy,
            mean / (spec.event_type_buckets - 1),
            std / (spec.event_type_buckets - 1),
            log_days(LT_SECONDS_SINCE_LAST) / LOG_DAYS_SCALE,
            log_days(LT_SECONDS_SINCE_FIRST) / LOG_DAYS_SCALE,
        ],
        axis=1,
    )  # (B, len(LONG_TERM_SCALARS))
    parts = [scalars, cat_share, type_share, np.log1p(windows) / LOG_COUNT_SCALE]
    if spec.attribute_buckets:
        attr = np.asarray(counts[LT_ATTRIBUTE_COUNTS], dtype=np.float64)  # (B, A)
        parts.append(attr / np.maximum(attr.sum(axis=1), 1.0)[:, None])
    out = np.concatenate(parts, axis=1)  # (B, H)
    return out.astype(np.float32)


def _hash_flat(values: np.ndarray, num_embeddings: int) -> np.ndarray:
    """`hash_ids` of a flat id array; ids already inside the table (the usual case: tables are
    sized from the data) take the cheap `id + 1` path instead of an int64 modulo."""
    if len(values) and values.min() >= 0 and values.max() < num_embeddings - 1:
        return values + 1
    return hash_ids(values, num_embeddings)


def _tail_padded(
    values: np.ndarray, offsets: np.ndarray, valid: np.ndarray, length: int
) -> np.ndarray:
    """Flat list storage -> (B, length) int64: the last `length` items of each row, 0 padded.

    `values[offsets[i]:offsets[i+1]]` is row i (Arrow ListArray layout); rows not `valid`
    (null lists) are all padding. `values` are already hashed (padding index 0), so only the
    kept tails are gathered: about half the (B, L) cells for typical lengths.
    """
    starts, ends = offsets[:-1], offsets[1:]
    n = np.where(valid, np.minimum(ends - starts, length), 0)  # (B,)
    out = np.zeros((len(n), length), dtype=np.int64)
    total = int(n.sum())
    if total == 0:
        return out
    keep = np.arange(length, dtype=np.int64)[None, :] < n[:, None]  # (B, L), row-major = tails
    # flat index of each kept item: row i's tail is values[ends[i]-n[i] : ends[i]]
    row_first = np.cumsum(n) - n  # (B,) position of row i's tail in the kept order
    idx = np.arange(total, dtype=np.int64) + np.repeat(ends - n - row_first, n)  # (total,)
    out[keep] = values[idx]
    return out


def encode_arrow(
    columns: Mapping[str, Any], spec: InputSpec, items: ItemAttributeMap | None = None
) -> dict[str, np.ndarray]:
    """Vectorised `encode_inputs` for Arrow data (a pyarrow Table / RecordBatch or a mapping of
    column name -> pyarrow array): list columns go from their offsets and values straight to
    the padded, hashed (B, L) arrays without a Python loop per user, and the long-term lists
    to their (B, width) counts. Same output as `encode_inputs` on the same rows
    (tests/refresh/test_encode.py checks it)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    def column(name: str) -> Any:
        col = columns[name]
        return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col

    out: dict[str, np.ndarray] = {}
    n_rows = 0
    for f in spec.sequence_features:
        arr = column(f.name)
        n_rows = len(arr)
        offsets = arr.offsets.to_numpy().astype(np.int64)  # absolute indices into arr.values
        values = pc.fill_null(arr.values, -1).to_numpy(zero_copy_only=False).astype(np.int64)
        valid = arr.is_valid().to_numpy(zero_copy_only=False)
        # hash the flat values first (fewer cells than (B, L)); padding is index 0
        hashed = _hash_flat(values, f.num_embeddings)
        out[f.name] = _tail_padded(hashed, offsets, valid, spec.sequence_length)
        if f.name == ITEM_SEQ and spec.item_attributes:  # raw ids, -1 = padding
            raw = _tail_padded(values + 1, offsets, valid, spec.sequence_length) - 1
            out.update(encode_item_attributes(raw, spec.item_attributes, items))
    if not spec.sequence_features and spec.profile_features:
        n_rows = len(column(spec.profile_features[0].name))
    profile = np.zeros((n_rows, len(spec.profile_features)), dtype=np.int64)
    for j, f in enumerate(spec.profile_features):
        col = pc.fill_null(column(f.name), -1).to_numpy(zero_copy_only=False)
        profile[:, j] = hash_ids(col.astype(np.int64), f.num_embeddings)
    out[PROFILE_INPUT] = profile
    if spec.long_term is not None:
        lt = spec.long_term
        counts = {
            name: _fixed_width_arrow(column(name), width, name)
            for name, width in lt.list_lengths.items()
        }
        for name in LONG_TERM_SCALAR_FEATURES:
            col = pc.fill_null(column(name), -1).to_numpy(zero_copy_only=False)
            counts[name] = np.asarray(col, dtype=np.int64)
        out[LONG_TERM_INPUT] = encode_long_term(counts, lt)
    return out


def _fixed_width_arrow(arr: Any, width: int, name: str) -> np.ndarray:
    """A list<int64> Arrow column of `width` counts per row (null: missing) -> (B, width)."""
    import pyarrow.compute as pc

    offsets = arr.offsets.to_numpy().astype(np.int64)  # absolute indices into arr.values
    valid = arr.is_valid().to_numpy(zero_copy_only=False)
    lengths = offsets[1:] - offsets[:-1]
    bad = valid & (lengths != width)
    if bad.any():
        raise _width_error(name, int(lengths[bad][0]), width)
    values = pc.fill_null(arr.values, 0).to_numpy(zero_copy_only=False).astype(np.int64)
    out = np.zeros((len(valid), width), dtype=np.int64)
    rows = np.flatnonzero(valid)
    out[rows] = values[offsets[:-1][rows, None] + np.arange(width)[None, :]]
    return out
