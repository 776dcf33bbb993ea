"""The Ray Data engine writes the same vectors as the local engine (local 2-CPU Ray instance)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import redis

from refresh.config import RAY
from refresh.job import refresh
from tests.refresh.support import offline_tables, refresh_config, write_offline
from tests.tiny_model import MODEL, publish_tiny
from userembed.registry import Registry
from userembed.vectors import VectorStore

ray = pytest.importorskip("ray")

N_USERS = 500


@pytest.fixture
def local_ray() -> Iterator[None]:
    for attempt in (1, 2):
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            break
        except Exception:  # seen once: GCS "Deadline Exceeded" on a loaded 2-core machine
            ray.shutdown()
            if attempt == 2:
                raise
    try:
        yield
    finally:
        ray.shutdown()  # stray ray:: workers would outlive the test otherwise


@pytest.mark.timeout(240)
def test_ray_engine_gives_the_local_engines_vectors(
    local_ray: None, redis_url: str, registry: Registry, tmp_path: Path
) -> None:
    behavior, profile = offline_tables(N_USERS, seed=3)
    offline = write_offline(tmp_path / "offline", behavior, profile, row_group_size=400)
    publish_tiny(registry, tmp_path / "staging", seed=0)
    cfg = refresh_config(registry, redis_url, offline, part_rows=150, batch_size=64)
    local = refresh(cfg)
    remote = refresh(replace(cfg, engine=RAY, ray_actors=2))
    store = VectorStore(redis.Redis.from_url(redis_url), MODEL)
    assert store.current_version() == remote.embedding_version
    assert remote.computed == remote.users == local.users == N_USERS
    assert store.count(remote.embedding_version) == N_USERS
    users = [str(u) for u in range(N_USERS)]
    a = store.read(local.embedding_version, users)
    b = store.read(remote.embedding_version, users)
    np.testing.assert_allclose(
        np.stack([x.vector for x in b]), np.stack([x.vector for x in a]), atol=1e-5
    )
    assert [x.feature_ts_ms for x in b] == [x.feature_ts_ms for x in a]
