"""The refresh's similar-users index against a real Redis and registry: built from every
vector of the version before the flip, stored with its sha256, verified on load, pruned with
its version."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import redis

from refresh.config import RefreshConfig
from refresh.errors import RefreshValidationError
from refresh.index_build import read_vectors
from refresh.job import refresh
from tests.refresh.support import offline_tables, refresh_config, write_offline
from tests.tiny_model import DIM, MODEL, publish_tiny
from userembed.registry import Registry
from userembed.similar_index import (
    INDEX_FILE,
    META_FILE,
    CorruptIndexError,
    IndexParams,
    IndexStore,
    IndexUnavailableError,
    build_hnsw,
    unit_rows,
)
from userembed.vectors import VectorStore

N_USERS = 300


@pytest.fixture
def cfg(redis_url: str, registry: Registry, tmp_path: Path) -> RefreshConfig:
    behavior, profile = offline_tables(N_USERS, seed=3)
    offline = write_offline(tmp_path / "offline", behavior, profile)
    publish_tiny(registry, tmp_path / "staging", seed=0)
    return refresh_config(
        registry,
        redis_url,
        offline,
        part_rows=400,
        batch_size=128,
        drift_sample=50,
        similar_root=str(tmp_path / "similar"),
    )


def store_of(cfg: RefreshConfig) -> VectorStore:
    return VectorStore(redis.Redis.from_url(cfg.redis_url), cfg.model)


def test_refresh_builds_a_verified_index_of_every_user_of_its_version(cfg) -> None:
    s = refresh(cfg)
    indexes = IndexStore(cfg.similar_root)
    index = indexes.load_verified(MODEL, s.embedding_version)
    assert (index.meta.users, index.dim) == (N_USERS, DIM)
    assert index.meta.model_version == s.model_version
    ids = [str(u) for u in range(N_USERS)]
    _, stored = read_vectors(store_of(cfg), s.embedding_version, ids, DIM)
    unit = unit_rows(stored)  # (N, D)
    for u in (0, 7, N_USERS - 1):
        np.testing.assert_allclose(index.vector(u), unit[u], atol=1e-6)
    # On a small set the HNSW answer is the exact one: same users, same cosine scores.
    scores, found = index.search(unit[:20], 10)
    exact = np.argsort(-(unit[:20] @ unit.T), axis=1)[:, :10]  # (20, 10)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact, strict=True)])
    assert overlap >= 0.98
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)


def test_a_failed_index_build_leaves_readers_on_the_previous_version(cfg, monkeypatch) -> None:
    first = refresh(cfg).embedding_version

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(IndexStore, "write", broken)
    with pytest.raises(OSError, match="disk full"):
        refresh(cfg)
    assert store_of(cfg).current_version() == first


def test_indexes_of_deleted_versions_are_removed(cfg) -> None:
    cfg = replace(cfg, keep=1)
    first = refresh(cfg).embedding_version
    second = refresh(cfg).embedding_version
    indexes = IndexStore(cfg.similar_root)
    assert indexes.versions(MODEL) == [second]
    assert not indexes.exists(MODEL, first)


def test_a_refresh_without_the_index_step_builds_none(cfg) -> None:
    s = refresh(replace(cfg, similar_index=False))
    with pytest.raises(IndexUnavailableError, match="no similar-users index"):
        IndexStore(cfg.similar_root).load_verified(MODEL, s.embedding_version)


def test_a_tampered_index_is_refused_with_every_problem(tmp_path: Path) -> None:
    indexes = IndexStore(tmp_path)
    vectors = np.random.default_rng(0).standard_normal((50, DIM)).astype(np.float32)
    meta = indexes.write(
        "m", "ev", "mv", build_hnsw(np.arange(50), vectors, IndexParams()), IndexParams()
    )
    path = indexes.version_dir("m", "ev") / INDEX_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptIndexError, match="sha256 does not match"):
        indexes.load_verified("m", "ev")
    path.write_bytes(bytes(data[:-4]))
    with pytest.raises(CorruptIndexError, match=f"{meta.size - 4} bytes"):
        indexes.load_verified("m", "ev")
    (indexes.version_dir("m", "ev") / META_FILE).write_text("{}")
    with pytest.raises(CorruptIndexError, match="not a valid index.json"):
        indexes.load_verified("m", "ev")


def test_read_back_refuses_a_version_missing_a_users_vector(cfg) -> None:
    s = refresh(cfg)
    store = store_of(cfg)
    store.r.delete(store.keys.vector(s.embedding_version, "5"))
    with pytest.raises(RefreshValidationError, match=r"1 users have no 8-d vector \(first: 5\)"):
        read_vectors(store, s.embedding_version, [str(u) for u in range(N_USERS)], DIM)


def test_the_cli_refresh_can_skip_the_index(cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    """`userembed refresh --no-similar-index` (a huge refresh that no lookalike caller needs)
    flips readers without building or storing an index."""
    from userembed.commands.main import main

    monkeypatch.setenv("USEREMBED_SIMILAR_ROOT", cfg.similar_root)
    argv = ["refresh", "--model", MODEL, "--no-similar-index", "--check-sample", "0"]
    argv += ["--offline-dir", cfg.offline_dir, "--registry-root", cfg.registry_root]
    assert main([*argv, "--redis-url", cfg.redis_url]) == 0
    version = store_of(cfg).current_version()
    assert version is not None
    with pytest.raises(IndexUnavailableError):
        IndexStore(cfg.similar_root).load_verified(MODEL, version)
