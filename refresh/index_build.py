"""The index step of a refresh: the similar-users index of the new embedding version.

After every vector of the version is written and validated, and before the pointer flips, the
vectors are read back from Redis (so users copied by an incremental run are in it too), an HNSW
index is built and stored with its sha256 (userembed/similar_index.py). The server loads the
index of the version the pointer names, so once readers follow a version its index is there.
After the flip, the indexes of versions garbage collection deleted are removed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np

from refresh.config import RefreshConfig
from refresh.errors import RefreshValidationError
from userembed.forget import Tombstones
from userembed.similar_index import IndexMeta, IndexStore, build_hnsw
from userembed.vectors import VectorStore

logger = logging.getLogger(__name__)

READ_BATCH = 10_000  # users per pipelined read-back


def read_vectors(
    store: VectorStore, version: str, user_ids: Sequence[str], dim: int
) -> tuple[np.ndarray, np.ndarray]:
    """The version's vectors of `user_ids` as (int64 ids (N,), float32 vectors (N, D));
    RefreshValidationError when any is missing or of another dim."""
    vectors = np.empty((len(user_ids), dim), dtype=np.float32)  # (N, D)
    missing: list[str] = []
    for a in range(0, len(user_ids), READ_BATCH):
        for i, stored in enumerate(store.read(version, user_ids[a : a + READ_BATCH]), start=a):
            if stored is None or stored.vector.shape != (dim,):
                missing.append(user_ids[i])
            else:
                vectors[i] = stored.vector
    if missing:
        raise RefreshValidationError(
            f"similar index of {version}: {len(missing)} users have no {dim}-d vector "
            f"(first: {', '.join(missing[:5])})"
        )
    return np.asarray(user_ids, dtype=np.int64), vectors


def build_index(
    cfg: RefreshConfig,
    store: VectorStore,
    version: str,
    model_version: str,
    user_ids: Sequence[str],
    dim: int,
) -> IndexMeta:
    """Read the version's vectors back and store its index under `cfg.similar_root`."""
    t0 = time.monotonic()
    forgotten = Tombstones(store.r).ids()  # forgotten while the run computed: not indexed
    user_ids = [u for u in user_ids if u not in forgotten]
    ids, vectors = read_vectors(store, version, user_ids, dim)
    t_read = time.monotonic() - t0
    index = build_hnsw(ids, vectors, cfg.similar_params)
    meta = IndexStore(cfg.similar_root).write(
        cfg.model, version, model_version, index, cfg.similar_params
    )
    logger.info(
        "refresh %s: similar index of %d users in %.1fs (read back %.1fs)",
        version,
        meta.users,
        time.monotonic() - t0,
        t_read,
    )
    return meta


def prune_indexes(cfg: RefreshConfig, store: VectorStore) -> list[str]:
    """Remove the indexes of embedding versions that no longer exist in Redis."""
    return IndexStore(cfg.similar_root).prune(cfg.model, {v.id for v in store.list_versions()})
