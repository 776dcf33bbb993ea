"""The refresh on a real three-master Redis Cluster (tests/redis_cluster.py): every user written
across the masters, checkpoint, lock and compare-and-set flip in the model's slot, incremental
copies, rollback, and expiry that deletes an old version's keys from every master."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from refresh.checkpoint import Checkpoint
from refresh.config import RefreshConfig
from refresh.errors import RefreshLockedError
from refresh.job import refresh
from refresh.lock import RefreshLock, lock_holder
from refresh.versions import expire_old, rollback
from tests.redis_cluster import RedisClusterServers
from tests.refresh.support import DAY_MS, T0_MS, offline_tables, refresh_config, write_offline
from tests.refresh.test_job import expected_vectors
from tests.tiny_model import MODEL, publish_tiny
from userembed.redis_urls import open_redis
from userembed.registry import Registry
from userembed.vectors import VectorStore

N_USERS = 300


@pytest.fixture
def offline(tmp_path: Path) -> tuple[Path, pa.Table, pa.Table]:
    behavior, profile = offline_tables(N_USERS, seed=2)
    return write_offline(tmp_path / "offline", behavior, profile), behavior, profile


@pytest.fixture
def cfg(
    redis_cluster_url: str, registry: Registry, offline: tuple[Path, pa.Table, pa.Table]
) -> RefreshConfig:
    return refresh_config(
        registry,
        redis_cluster_url,
        offline[0],
        part_rows=150,  # several parts: each one's checkpoint goes to the model's slot
        batch_size=64,
        drift_sample=100,
        keep=2,
    )


def _spread(cluster: RedisClusterServers, store: VectorStore, ev: str) -> dict[int, int]:
    return cluster.keys_per_master(store.keys.vector_pattern(ev))


@pytest.mark.timeout(120)
def test_refresh_on_a_cluster_writes_flips_copies_rolls_back_and_expires_on_every_master(
    cfg: RefreshConfig,
    registry: Registry,
    tmp_path: Path,
    offline: tuple[Path, pa.Table, pa.Table],
    redis_cluster: RedisClusterServers,
):
    publish_tiny(registry, tmp_path / "staging", seed=0)
    store = VectorStore(open_redis(cfg.redis_url), MODEL)
    first = refresh(cfg)
    ev1 = first.embedding_version
    assert (store.current_version(), first.users) == (ev1, N_USERS) and first.parts > 1
    assert store.count(ev1) == N_USERS  # SCAN over every master
    spread = _spread(redis_cluster, store, ev1)
    assert sum(spread.values()) == N_USERS and min(spread.values()) > 0, spread
    assert len(Checkpoint(store, ev1).done()) == first.parts and lock_holder(store) is None
    users = [0, 7, 150, N_USERS - 1]
    want, _ = expected_vectors(registry, offline[1], offline[2], users)
    got = store.read(ev1, [str(u) for u in users])
    np.testing.assert_allclose(np.stack([g.vector for g in got]), want, rtol=1e-5, atol=1e-6)

    # Incremental: users with newer features are computed, the others copied (DUMP/RESTORE per
    # key, each on its own master).
    directory, behavior, profile = offline
    fresh = behavior.filter(pc.is_in(behavior["user_id"], pa.array(range(20)))).slice(0, 20)
    newer = fresh.set_column(
        1,
        "event_timestamp",
        pa.array([T0_MS + 10 * DAY_MS] * len(fresh), pa.int64()).cast(pa.timestamp("ms", tz="UTC")),
    )
    changed = len(set(newer["user_id"].to_pylist()))
    write_offline(directory, pa.concat_tables([behavior, newer]), profile)
    second = refresh(replace(cfg, mode="incremental"))
    ev2 = second.embedding_version
    assert (second.mode, second.computed, second.copied) == (
        "incremental",
        changed,
        N_USERS - changed,
    )
    assert store.current_version() == ev2 and store.count(ev2) == N_USERS
    kept = store.read(ev2, ["150"])[0]
    assert kept is not None and kept.computed_at_ms == got[2].computed_at_ms

    # Rollback and back: compare-and-set flips in the model's slot.
    assert rollback(store) == (ev2, ev1)
    assert rollback(store, to=ev2) == (ev1, ev2)
    assert store.publish_if(ev1, expected=ev1).refused == "pointer moved"

    # Expiry deletes the old version's vectors from every master, and its metadata.
    assert expire_old(store, keep=1) == [ev1]
    assert set(_spread(redis_cluster, store, ev1).values()) == {0}
    assert store.version_info(ev1) is None and store.count(ev2) == N_USERS


def test_refresh_lock_on_a_cluster_admits_one_run(redis_cluster_url: str):
    store = VectorStore(open_redis(redis_cluster_url), MODEL)
    with RefreshLock(store, ttl_s=5).held() as lock:
        holder = lock_holder(store)
        assert holder is not None and holder.token == lock.token
        with pytest.raises(RefreshLockedError), RefreshLock(store, ttl_s=5).held():
            pass
    assert lock_holder(store) is None
