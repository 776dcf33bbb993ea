"""The id hashing policy: raw ids -> embedding table rows (userembed.features documents the
contract; every table, item attributes included, follows it)."""

from __future__ import annotations

import numpy as np


def hash_ids(raw: np.ndarray, num_embeddings: int) -> np.ndarray:
    """Map raw ids (>= 0) to table rows 1..num_embeddings-1; negative ids (padding) map to 0.

    Tables are sized from the data (max id + 2) up to a cap; below the cap this is id + 1 and
    collision free, above it unseen or overflowing ids wrap (documented hashing policy).
    """
    raw = np.asarray(raw, dtype=np.int64)
    return np.where(raw < 0, 0, 1 + np.mod(raw, num_embeddings - 1))
