"""Encoder inputs for the export's checks: random rows of an InputSpec, a run's held-out rows."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from trainer.run_dir import HELDOUT_INPUTS, HELDOUT_ROWS, RunDir
from userembed.errors import DataNotFoundError, InvalidInputError
from userembed.features import PROFILE_INPUT, InputSpec, encode_inputs

logger = logging.getLogger(__name__)

Rows = dict[str, np.ndarray]  # encoder input name -> (B, L) or (B, P) int64


def random_inputs(spec: InputSpec, n: int, rng: np.random.Generator) -> Rows:
    """Rows shaped like encode_inputs output: random lengths 0..L (0-padded), random ids."""
    length = spec.sequence_length
    lens = rng.integers(0, length + 1, size=n)
    lens[: min(n, 2)] = (0, length)[: min(n, 2)]  # an empty and a full history always included
    valid = np.arange(length)[None, :] < lens[:, None]  # (n, L)
    out = {
        f.name: np.where(valid, rng.integers(1, f.num_embeddings, size=(n, length)), 0)
        for f in spec.sequence_features
    }
    out[PROFILE_INPUT] = np.stack(
        [rng.integers(0, f.num_embeddings, size=n) for f in spec.profile_features], axis=1
    ).reshape(n, len(spec.profile_features))
    return {k: v.astype(np.int64) for k, v in out.items()}


def load_heldout(path: str | Path, spec: InputSpec, max_rows: int = HELDOUT_ROWS) -> Rows:
    """Held-out encoder inputs from a `.npz` of encoded arrays or a training-frame `.parquet`
    (rows of split == 'test' when that column exists, encoded with encode_inputs)."""
    p = Path(path)
    if not p.exists():
        raise DataNotFoundError(f"held-out inputs {p} do not exist")
    names = [f.name for f in spec.sequence_features] + [PROFILE_INPUT]
    if p.suffix == ".npz":
        with np.load(p) as z:
            missing = [n for n in names if n not in z]
            if missing:
                raise InvalidInputError(f"{p}: arrays {missing} are missing")
            return {n: np.asarray(z[n][:max_rows], dtype=np.int64) for n in names}
    import pandas as pd

    frame = pd.read_parquet(p)
    if "split" in frame.columns and (frame["split"] == "test").any():
        frame = frame[frame["split"] == "test"]
    frame = frame.head(max_rows)
    cols = [f.name for f in spec.sequence_features + spec.profile_features]
    missing = [c for c in cols if c not in frame.columns]
    if missing:
        raise InvalidInputError(f"{p}: columns {missing} are missing")
    return encode_inputs({c: frame[c].tolist() for c in cols}, spec)


def heldout_rows(
    heldout: Mapping[str, np.ndarray] | str | Path | None,
    run: RunDir,
    spec: InputSpec,
    rng: np.random.Generator,
) -> tuple[Rows, str]:
    """(rows, where they came from) for parity: `heldout` (arrays, or a .npz/.parquet path),
    else the run's held-out inputs, else random rows from the InputSpec."""
    if isinstance(heldout, str | Path):
        return load_heldout(heldout, spec), str(heldout)
    if heldout is not None:
        return {k: np.asarray(v, np.int64) for k, v in heldout.items()}, "provided"
    if run.heldout_inputs.exists():
        return load_heldout(run.heldout_inputs, spec), HELDOUT_INPUTS
    logger.warning("no held-out rows for parity: using random inputs from the InputSpec")
    return random_inputs(spec, 256, rng), "random (no held-out rows found)"


def slice_rows(rows: Mapping[str, np.ndarray], idx: np.ndarray) -> Rows:
    return {k: v[idx] for k, v in rows.items()}


def concat_rows(parts: Sequence[Mapping[str, np.ndarray]]) -> Rows:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
