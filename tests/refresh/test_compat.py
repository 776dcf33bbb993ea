"""Compatibility maps fitted by the refresh (refresh/compat.py) against a real Redis: two
refreshes with two different models store a map from the new space into the old one, record its
fit, and the mapped new vectors sit closer to the old ones than the raw new vectors."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import redis

from refresh.compat import COMPAT_FIELD, fit_matrix, mean_cosine, stored_maps
from refresh.config import LSTSQ, PROCRUSTES, RefreshConfig
from refresh.job import refresh
from tests.refresh.support import offline_tables, refresh_config, write_offline
from tests.tiny_model import publish_tiny
from userembed.registry import Registry
from userembed.vectors import VectorStore

N_USERS = 400


@pytest.fixture
def cfg(redis_url: str, registry: Registry, tmp_path: Path) -> RefreshConfig:
    behavior, profile = offline_tables(N_USERS, seed=1)
    return refresh_config(
        registry,
        redis_url,
        write_offline(tmp_path / "offline", behavior, profile),
        batch_size=128,
        drift_sample=50,
        check_sample=0,
        similar_index=False,  # not what these tests are about
    )


def _store(cfg: RefreshConfig) -> VectorStore:
    return VectorStore(redis.Redis.from_url(cfg.redis_url), cfg.model)


def test_fit_matrix_recovers_a_rotation_and_a_linear_map() -> None:
    rng = np.random.default_rng(0)
    new = rng.normal(size=(300, 8)).astype(np.float32)
    rotation = np.linalg.qr(rng.normal(size=(8, 8)))[0]
    assert np.allclose(fit_matrix(new, new @ rotation, PROCRUSTES), rotation, atol=1e-4)
    linear = rng.normal(size=(8, 5))
    assert np.allclose(fit_matrix(new, new @ linear, LSTSQ), linear, atol=1e-4)


def test_a_new_model_version_stores_a_map_into_the_previous_ones_space(
    cfg, registry, tmp_path
) -> None:
    store = _store(cfg)
    old_mv = publish_tiny(registry, tmp_path / "staging", seed=0)
    old_ev = refresh(cfg).embedding_version
    assert stored_maps(store, old_ev) == {}  # nothing before it: no map
    new_mv = publish_tiny(registry, tmp_path / "staging", seed=1)
    summary = refresh(cfg)
    new_ev = summary.embedding_version

    maps = stored_maps(store, new_ev)
    assert list(maps) == [old_mv]
    m = maps[old_mv]
    info = m.info
    assert (info.method, info.against) == (cfg.compat_method, old_ev)
    assert info.fitted_on + info.held_out == N_USERS
    assert info.fit_cosine is not None and info.raw_cosine is not None
    assert info.fit_cosine > info.raw_cosine + 0.1
    # the fit is recorded in the version's metadata and on the summary line
    recorded = json.loads(store.r.hget(store.keys.meta(new_ev), COMPAT_FIELD))
    assert recorded[old_mv]["fit_cosine"] == info.fit_cosine
    assert f"compatible with: {old_mv} cos {info.fit_cosine:.3f}" in summary.line()

    # mapped new vectors are closer to the old ones than the raw new vectors (every user)
    users = [str(u) for u in range(N_USERS)]
    old = np.stack([v.vector for v in store.read(old_ev, users) if v is not None])
    new = np.stack([v.vector for v in store.read(new_ev, users) if v is not None])
    assert mean_cosine(m.apply(new), old) > mean_cosine(new, old) + 0.1

    # a refresh of the same model version carries the map over; a third model composes it
    again = refresh(cfg).embedding_version
    assert list(stored_maps(store, again)) == [old_mv]
    third_mv = publish_tiny(registry, tmp_path / "staging", seed=2)
    third = refresh(cfg)
    chained = stored_maps(store, third.embedding_version)
    assert sorted(chained) == sorted([old_mv, new_mv])
    assert chained[old_mv].info.via == (new_mv,) and chained[old_mv].info.fit_cosine is None
    assert third_mv not in chained


def test_deleting_a_version_deletes_its_maps(cfg, registry, tmp_path) -> None:
    store = _store(cfg)
    publish_tiny(registry, tmp_path / "staging", seed=0)
    refresh(replace(cfg, keep=1))
    publish_tiny(registry, tmp_path / "staging", seed=1)
    ev = refresh(replace(cfg, keep=1)).embedding_version
    assert store.r.exists(store.keys.compat(ev))
    store.delete_version(ev)
    assert not store.r.exists(store.keys.compat(ev))


def test_compat_sample_zero_fits_nothing(cfg, registry, tmp_path) -> None:
    store = _store(cfg)
    publish_tiny(registry, tmp_path / "staging", seed=0)
    refresh(cfg)
    publish_tiny(registry, tmp_path / "staging", seed=1)
    summary = refresh(replace(cfg, compat_sample=0))
    assert summary.compat is None and stored_maps(store, summary.embedding_version) == {}


def test_procrustes_maps_keep_unit_vectors_unit(cfg, registry, tmp_path) -> None:
    store = _store(cfg)
    publish_tiny(registry, tmp_path / "staging", seed=0)
    refresh(cfg)
    publish_tiny(registry, tmp_path / "staging", seed=1)
    ev = refresh(replace(cfg, compat_method=PROCRUSTES)).embedding_version
    (m,) = stored_maps(store, ev).values()
    assert m.info.method == PROCRUSTES
    gram = m.matrix.T @ m.matrix  # orthonormal columns: a rotation into the old space
    assert np.allclose(gram, np.eye(len(gram)), atol=1e-4)
