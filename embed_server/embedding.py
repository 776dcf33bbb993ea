"""One user's vector with where it came from: the value the server returns and the client gets.

Light on purpose (numpy only): the client imports it without the server's Redis and onnxruntime.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

STORED = "stored"  # read from the Redis vector store
COMPUTED = "computed"  # features -> encoder on this call


class Embedding(NamedTuple):
    """A NamedTuple, not a dataclass: the server builds one per user on hot paths."""

    user_id: str
    vector: np.ndarray  # (D,) float32
    model_name: str
    model_version: str
    embedding_version: str
    computed_at_ms: int
    feature_ts_ms: int
    source: str  # STORED | COMPUTED
