"""The optional items table: what a team knows about its items, one row per item.

`items.parquet` holds `item_id` (int >= 0, unique) and any number of attribute columns, each
either a small integer (a brand, a price band: int >= 0, null = unknown) or a list of integers
(several categories, tags: list<int >= 0>, null or empty = none). Which columns are present is
read from the table itself (`item_attributes`); README.md ("Input schema") documents it.
Events whose item is not in the table simply have no attributes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from userembed.errors import DataNotFoundError, FeatureMismatchError, SchemaError
from userembed.hashing import hash_ids

ITEM_ID = "item_id"
# Attribute names become table names (`t_item_<name>`) and manifest keys: keep them plain.
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


@dataclass(frozen=True)
class ItemAttribute:
    """One attribute column: `multi` = a list of ints per item, else one int."""

    name: str
    multi: bool


def _is_int_list(column: pa.ChunkedArray) -> bool:
    t = column.type
    return (pa.types.is_list(t) or pa.types.is_large_list(t)) and (
        pa.types.is_integer(t.value_type) or pa.types.is_null(t.value_type)
    )


def validate_items(table: pa.Table, source: str) -> tuple[ItemAttribute, ...]:
    """Raise SchemaError naming `source` and the first bad column; return the attributes."""
    names = table.column_names
    if ITEM_ID not in names:
        raise SchemaError(source, ITEM_ID, "is missing (expected int: item id, >= 0)")
    ids = table.column(ITEM_ID)
    if not pa.types.is_integer(ids.type):
        raise SchemaError(source, ITEM_ID, f"has type {ids.type}, expected int")
    id_values = ids.to_numpy(zero_copy_only=False) if ids.null_count == 0 else None
    if id_values is None:
        raise SchemaError(source, ITEM_ID, "has null values")
    if len(id_values) and int(id_values.min()) < 0:
        raise SchemaError(source, ITEM_ID, "has negative values")
    if len(np.unique(id_values)) != len(id_values):
        raise SchemaError(source, ITEM_ID, "has duplicate ids: one row per item")
    attributes = []
    for name in names:
        if name == ITEM_ID:
            continue
        if not _NAME.match(name):
            raise SchemaError(source, name, "is not a plain lower-case name ([a-z][a-z0-9_]*)")
        column = table.column(name)
        if pa.types.is_integer(column.type):
            values = column.drop_null().to_numpy()
            multi = False
        elif _is_int_list(column):
            values = column.combine_chunks().flatten().drop_null().to_numpy(zero_copy_only=False)
            multi = True
        else:
            raise SchemaError(source, name, f"has type {column.type}, expected int or list of int")
        if len(values) and int(values.min()) < 0:
            raise SchemaError(source, name, "has negative values")
        attributes.append(ItemAttribute(name, multi))
    if not attributes:
        raise SchemaError(source, "*", "has no attribute column beside item_id")
    return tuple(attributes)


def read_items(path: Path) -> tuple[pd.DataFrame, tuple[ItemAttribute, ...]]:
    """Read and validate an items parquet file; (table as pandas, its attributes)."""
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"{path}: no such file")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise SchemaError(str(path), "*", f"cannot be read as parquet: {e}") from e
    return table.to_pandas(), validate_items(table, str(path))


def items_frame(items: pd.DataFrame, source: str) -> tuple[ItemAttribute, ...]:
    """Validate an in-memory items table (a source's own) the same way as a file."""
    return validate_items(pa.Table.from_pandas(items, preserve_index=False), source)


# A multi-valued attribute keeps at most this many values per item (its first ones): the
# encoder input is a fixed (B, L, K) block, K = the most any item has, up to this cap.
MAX_VALUES_PER_ITEM = 8
# The encoder input of attribute `name`: (B, L, K) int64 table rows of each event's item.
ATTRIBUTE_INPUT_PREFIX = "item_"
ATTRIBUTE_INPUT_SUFFIX = "_seq"


@dataclass(frozen=True)
class ItemAttributeSpec:
    """One item attribute a model reads: its table size and values per event (K); a model's
    InputSpec carries them, so its manifest says how the attribute inputs were made."""

    name: str
    num_embeddings: int
    max_values: int  # K: 1 for a single-valued attribute

    @property
    def input_name(self) -> str:
        return f"{ATTRIBUTE_INPUT_PREFIX}{self.name}{ATTRIBUTE_INPUT_SUFFIX}"


@dataclass(frozen=True)
class ItemAttributeMap:
    """Raw item id -> each attribute's raw values, (N, K) int64 per attribute, -1 = none.
    Versioned with a model: the trainer writes it next to model.pt, the export ships it in
    the registry entry (`save` / `load`: one .npz of plain arrays, no pickle)."""

    item_ids: np.ndarray  # (N,) sorted, unique
    values: dict[str, np.ndarray]

    @classmethod
    def from_frame(
        cls, items: pd.DataFrame, attributes: tuple[ItemAttribute, ...]
    ) -> ItemAttributeMap:
        """A validated items table (`items_frame` / `read_items`) -> the map."""
        order = np.argsort(items[ITEM_ID].to_numpy(dtype=np.int64), kind="stable")
        ids = items[ITEM_ID].to_numpy(dtype=np.int64)[order]
        values = {}
        for a in attributes:
            column = items[a.name].iloc[order]
            if a.multi:
                lists = [
                    np.asarray(v, dtype=np.int64)[:MAX_VALUES_PER_ITEM]
                    if v is not None and not (isinstance(v, float) and v != v)
                    else np.zeros(0, np.int64)
                    for v in column
                ]
                k = max([1, *(len(v) for v in lists)])
                block = np.full((len(ids), k), -1, dtype=np.int64)
                for i, v in enumerate(lists):
                    block[i, : len(v)] = v
            else:
                block = column.astype("Int64").fillna(-1).to_numpy(dtype=np.int64)[:, None]
            values[a.name] = block
        return cls(ids, values)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.values)

    def specs(self, table_cap: int) -> tuple[ItemAttributeSpec, ...]:
        """Attribute table sizes from the values: min(max value + 2, cap), as the other tables."""
        return tuple(
            ItemAttributeSpec(
                name,
                max(2, min(int(v.max(initial=-1)) + 2, table_cap)),
                int(v.shape[1]),
            )
            for name, v in self.values.items()
        )

    def lookup(self, raw_item_ids: np.ndarray) -> dict[str, np.ndarray]:
        """(B, L) raw item ids (-1 = padding) -> {name: (B, L, K) raw values, -1 = none}; an
        item absent from the map has no values."""
        raw = np.asarray(raw_item_ids, dtype=np.int64)
        pos = np.searchsorted(self.item_ids, raw)
        pos = np.minimum(pos, max(len(self.item_ids) - 1, 0))
        found = (raw >= 0) & (len(self.item_ids) > 0)
        if len(self.item_ids):
            found &= self.item_ids[pos] == raw
        out = {}
        for name, block in self.values.items():
            got = block[pos] if len(block) else np.full((*raw.shape, block.shape[1]), -1)
            out[name] = np.where(found[..., None], got, -1)
        return out

    def save(self, path: Path) -> None:
        arrays = {"item_ids": self.item_ids} | {f"attr_{n}": v for n, v in self.values.items()}
        with open(path, "wb") as f:  # np.savez on a path would append ".npz"
            np.savez(f, **arrays)  # type: ignore[arg-type]

    @classmethod
    def load(cls, path: Path) -> ItemAttributeMap:
        with np.load(path, allow_pickle=False) as z:
            values = {k[len("attr_") :]: z[k] for k in z.files if k.startswith("attr_")}
            return cls(z["item_ids"], values)


def history_attributes(items: pd.DataFrame) -> ItemAttributeMap | None:
    """The map of the validated items table's multi-valued attributes (genres, tags): the
    values the long-term attribute histogram counts (userembed.features.LT_ATTRIBUTE_COUNTS);
    None when the table has none."""
    multi = tuple(a for a in items_frame(items, "items table") if a.multi)
    return ItemAttributeMap.from_frame(items, multi) if multi else None


def encode_item_attributes(
    raw_item_ids: np.ndarray,
    specs: tuple[ItemAttributeSpec, ...],
    items: ItemAttributeMap | None,
) -> dict[str, np.ndarray]:
    """(B, L) raw item ids (-1 = padding) -> {input name: (B, L, K) int64 table rows}: each
    event's attribute values, hashed as every id (userembed.features.hash_ids), 0 = none.
    The trainer, the export, the server and the refresh all call this with the model's map."""
    if not specs:
        return {}
    if items is None:
        raise FeatureMismatchError(
            "the model reads item attributes but no item attribute map was given (the "
            "registry entry's item_attributes file)"
        )
    raw = items.lookup(raw_item_ids)
    out = {}
    for s in specs:
        if s.name not in raw:
            raise FeatureMismatchError(f"the item attribute map lacks attribute {s.name!r}")
        block = raw[s.name][..., : s.max_values]
        if block.shape[-1] < s.max_values:  # a map with fewer values per item: pad
            pad = np.full((*block.shape[:-1], s.max_values - block.shape[-1]), -1)
            block = np.concatenate([block, pad], axis=-1)
        out[s.input_name] = hash_ids(block, s.num_embeddings)
    return out
