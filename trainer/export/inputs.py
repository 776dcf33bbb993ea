"""Encoder inputs for the export's checks: random rows of an InputSpec, a run's held-out rows."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from trainer.run_dir import HELDOUT_INPUTS, HELDOUT_ROWS, RunDir
from userembed.errors import DataNotFoundError, InvalidInputError
from userembed.features import (
    LONG_TERM_INPUT,
    LT_DISTINCT_CATEGORIES,
    LT_DISTINCT_ITEMS,
    LT_SECONDS_SINCE_FIRST,
    LT_SECONDS_SINCE_LAST,
    PROFILE_INPUT,
    InputSpec,
    LongTermSpec,
    encode_inputs,
    encode_long_term,
)
from userembed.items import ItemAttributeMap

logger = logging.getLogger(__name__)

Rows = dict[str, np.ndarray]  # encoder input name -> (B, L) or (B, P) int64, (B, H) float32


def random_inputs(spec: InputSpec, n: int, rng: np.random.Generator) -> Rows:
    """Rows shaped like encode_inputs output: random lengths 0..L (0-padded), random ids, and
    long-term features of a random whole history at least that long."""
    length = spec.sequence_length
    lens = rng.integers(0, length + 1, size=n)
    lens[: min(n, 2)] = (0, length)[: min(n, 2)]  # an empty and a full history always included
    valid = np.arange(length)[None, :] < lens[:, None]  # (n, L)
    out = {
        f.name: np.where(valid, rng.integers(1, f.num_embeddings, size=(n, length)), 0)
        for f in spec.sequence_features
    }
    for a in spec.item_attributes:  # (n, L, K): 0..K values per real event, none on padding
        ids = rng.integers(1, a.num_embeddings, size=(n, length, a.max_values))
        ids[rng.random(ids.shape) < 0.3] = 0
        out[a.input_name] = np.where(valid[..., None], ids, 0)
    out[PROFILE_INPUT] = np.zeros((n, len(spec.profile_features)), np.int64)  # (n, P), P may be 0
    for j, f in enumerate(spec.profile_features):
        out[PROFILE_INPUT][:, j] = rng.integers(0, f.num_embeddings, size=n)
    rows = {k: v.astype(np.int64) for k, v in out.items()}
    if spec.long_term is not None:
        rows[LONG_TERM_INPUT] = random_long_term(spec.long_term, lens, rng)
    return rows


def random_long_term(lt: LongTermSpec, lens: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(n, H) float32: the encoded long-term features of random histories of at least `lens`
    events (none where lens is 0), through the contract's own encoding."""
    n = len(lens)
    events = np.where(lens > 0, lens * rng.integers(1, 6, size=n), 0)  # (n,)

    def split(width: int) -> np.ndarray:  # (n, width) counts summing to `events`
        return np.stack([rng.multinomial(e, rng.dirichlet(np.ones(width))) for e in events])

    counts = {name: split(width) for name, width in lt.list_lengths.items()}
    counts[LT_DISTINCT_ITEMS] = np.ceil(events * rng.random(n)).astype(np.int64)
    counts[LT_DISTINCT_CATEGORIES] = np.minimum(counts[LT_DISTINCT_ITEMS], lt.category_buckets)
    tenure = rng.integers(0, 400 * 86_400, size=n)
    counts[LT_SECONDS_SINCE_FIRST] = np.where(events > 0, tenure, -1)
    counts[LT_SECONDS_SINCE_LAST] = np.where(events > 0, (tenure * rng.random(n)).astype(int), -1)
    return encode_long_term(counts, lt)


def load_heldout(
    path: str | Path,
    spec: InputSpec,
    max_rows: int = HELDOUT_ROWS,
    items: ItemAttributeMap | None = None,
) -> Rows:
    """Held-out encoder inputs from a `.npz` of encoded arrays or a training-frame `.parquet`
    (rows of split == 'test' when that column exists, encoded with encode_inputs and `items`,
    the model's item attribute map)."""
    p = Path(path)
    if not p.exists():
        raise DataNotFoundError(f"held-out inputs {p} do not exist")
    names = [f.name for f in spec.sequence_features] + [*spec.item_attribute_inputs, PROFILE_INPUT]
    names += [LONG_TERM_INPUT] if spec.long_term is not None else []
    if p.suffix == ".npz":
        with np.load(p) as z:
            missing = [n for n in names if n not in z]
            if missing:
                raise InvalidInputError(f"{p}: arrays {missing} are missing")
            return as_inputs({n: z[n][:max_rows] for n in names})
    import pandas as pd

    frame = pd.read_parquet(p)
    if "split" in frame.columns and (frame["split"] == "test").any():
        frame = frame[frame["split"] == "test"]
    frame = frame.head(max_rows)
    cols = [f.name for f in spec.sequence_features + spec.profile_features]
    cols += spec.long_term_names
    missing = [c for c in cols if c not in frame.columns]
    if missing:
        raise InvalidInputError(f"{p}: columns {missing} are missing")
    return encode_inputs({c: frame[c].tolist() for c in cols}, spec, items)


def heldout_rows(
    heldout: Mapping[str, np.ndarray] | str | Path | None,
    run: RunDir,
    spec: InputSpec,
    rng: np.random.Generator,
) -> tuple[Rows, str]:
    """(rows, where they came from) for parity: `heldout` (arrays, or a .npz/.parquet path),
    else the run's held-out inputs, else random rows from the InputSpec."""
    if isinstance(heldout, str | Path):
        return load_heldout(heldout, spec, items=run.items()), str(heldout)
    if heldout is not None:
        return as_inputs(heldout), "provided"
    if run.heldout_inputs.exists():
        return load_heldout(run.heldout_inputs, spec), HELDOUT_INPUTS
    logger.warning("no held-out rows for parity: using random inputs from the InputSpec")
    return random_inputs(spec, 256, rng), "random (no held-out rows found)"


def as_inputs(arrays: Mapping[str, np.ndarray]) -> Rows:
    """Encoder input arrays in their dtypes: int64 ids, float32 long-term features."""
    return {
        k: np.asarray(v, np.float32 if k == LONG_TERM_INPUT else np.int64)
        for k, v in arrays.items()
    }


def slice_rows(rows: Mapping[str, np.ndarray], idx: np.ndarray) -> Rows:
    return {k: v[idx] for k, v in rows.items()}


def concat_rows(parts: Sequence[Mapping[str, np.ndarray]]) -> Rows:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
