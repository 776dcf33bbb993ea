"""The server on a real three-master Redis Cluster (tests/redis_cluster.py): stored reads, miss-path
write-backs and the pointer, and the Feast online store (`redis_cluster` type) it computes from."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from redis.exceptions import SlotNotCoveredError

from embed_server.client import EmbeddingClient
from embed_server.errors import status_of
from embed_server.online_features import FeastFeatureSource
from embed_server.server import EmbeddingServer
from embed_server.stored_reader import PipelineReader
from embed_server.version_policy import online_version
from tests.embed_server.conftest import DIM, MODEL, SPEC, FakeFeatures, LoopThread, publish_tiny
from tests.embed_server.test_feast_integration import FEATURE_TIME, USERS, write_offline
from tests.redis_cluster import RedisClusterServers
from tests.waiting import wait_for
from userembed import feast_ops
from userembed.features import encode_inputs
from userembed.freshness import mark_pushed
from userembed.redis_urls import open_redis
from userembed.registry import Registry
from userembed.vectors import VectorStore


def _want(srv, row: dict) -> np.ndarray:
    cols = {f.name: [row[f.name]] for f in SPEC.sequence_features + SPEC.profile_features}
    return srv.manager.get(MODEL).encoder.run(encode_inputs(cols, SPEC))[0]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("script_reads", [1, 0], ids=["script-setting", "pipeline-setting"])
def test_server_reads_stored_vectors_and_writes_back_misses_on_a_cluster(
    start_server,
    registry: Registry,
    tmp_path: Path,
    features: FakeFeatures,
    redis_cluster: RedisClusterServers,
    redis_cluster_url: str,
    script_reads: int,
):
    """Stored reads of users whose keys live on every master (single and batch), the miss
    path's write-back into the cluster, and `redis_script_reads: 1` turned into a pipeline (a
    script over keys of many slots is refused by a cluster)."""
    v1 = publish_tiny(registry, tmp_path / "staging", seed=1)
    store = VectorStore(open_redis(redis_cluster_url), MODEL)
    stored = [str(u) for u in range(100, 160)]
    vectors = np.arange(len(stored) * DIM, dtype=np.float32).reshape(len(stored), DIM)
    store.create_version("ev1", v1)
    store.write("ev1", stored, vectors, v1, feature_ts_ms=[7] * len(stored))
    assert store.publish_if("ev1", None).done
    spread = redis_cluster.keys_per_master(store.keys.vector_pattern("ev1"))
    assert sum(spread.values()) == len(stored) and min(spread.values()) > 0, spread

    srv = start_server(redis_url=redis_cluster_url, redis_script_reads=script_reads)
    assert srv.lookup is not None and isinstance(srv.lookup.reader, PipelineReader)
    with EmbeddingClient(f"127.0.0.1:{srv.port}") as c:
        e = c.get("101")
        assert (e.source, e.embedding_version, e.feature_ts_ms) == ("stored", "ev1", 7)
        np.testing.assert_array_equal(e.vector, vectors[1])
        many = c.batch_get(stored)
        assert [b.source for b in many] == ["stored"] * len(stored)
        np.testing.assert_array_equal(np.stack([b.vector for b in many]), vectors)

        # misses: computed from features, written back into the version the pointer names
        missed = [str(u) for u in range(1, 21)]
        first = c.batch_get(missed)
        assert [b.source for b in first] == ["computed"] * len(missed)
        np.testing.assert_allclose(first[4].vector, _want(srv, features.users["5"]), rtol=1e-6)
        again = c.batch_get(missed)
        assert [b.source for b in again] == ["stored"] * len(missed)
        np.testing.assert_array_equal(again[4].vector, first[4].vector)
    spread = redis_cluster.keys_per_master(store.keys.vector_pattern("ev1"))
    assert sum(spread.values()) == len(stored) + len(missed) and min(spread.values()) > 0
    assert store.count("ev1") == len(stored) + len(missed)
    assert 0 < open_redis(redis_cluster_url).ttl(store.keys.vector("ev1", "5")) <= 7 * 24 * 3600


@pytest.mark.timeout(180)
def test_feast_materializes_into_the_cluster_and_the_server_computes_from_it(
    settings_for,
    registry: Registry,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    redis_cluster: RedisClusterServers,
    redis_cluster_url: str,
):
    """Feast's `redis_cluster` online store from a `redis+cluster://` URL: materialize spreads
    the entity rows over the masters, online reads find them, and the server's miss path
    computes from them and writes back into the cluster (no pointer: the online version)."""
    monkeypatch.setenv("USEREMBED_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("USEREMBED_OFFLINE_DIR", str(tmp_path / "offline"))
    monkeypatch.setenv("USEREMBED_FEAST_REGISTRY", str(tmp_path / "feast" / "registry.db"))
    write_offline(tmp_path / "offline")
    feast = feast_ops.open_store(redis_cluster_url)
    assert feast.config.online_store.redis_type == "redis_cluster"
    feast_ops.apply(feast)
    feast_ops.materialize(feast)
    rows = FeastFeatureSource(feast).fetch(["12", "99", "11"], SPEC)
    assert rows.found == [True, False, True]
    assert rows.columns["item_seq"][0] == USERS[12]["item_seq"]
    on_nodes = redis_cluster.keys_per_master("*" + feast.project)
    assert sum(on_nodes.values()) == len(USERS), on_nodes

    v1 = publish_tiny(registry, tmp_path / "staging", seed=1)
    loop = LoopThread()
    srv = EmbeddingServer(
        settings_for(redis_url=redis_cluster_url), features=FeastFeatureSource(feast)
    )
    try:
        loop.run(srv.start())
        with EmbeddingClient(f"127.0.0.1:{srv.port}", timeout_s=30) as c:
            e = c.get("11")
            assert e.source == "computed"
            assert e.feature_ts_ms == int(FEATURE_TIME.timestamp() * 1000)
            np.testing.assert_allclose(e.vector, _want(srv, USERS[11]), rtol=1e-6)
            assert c.get("11").source == "stored"
    finally:
        loop.run(srv.stop(grace=0.5))
        loop.close()
    store = VectorStore(open_redis(redis_cluster_url), MODEL)
    assert store.count(online_version(v1)) == 1


@pytest.mark.timeout(120)
def test_a_stopped_master_fails_only_its_users_as_unavailable_until_it_is_back(
    start_server,
    registry: Registry,
    tmp_path: Path,
    redis_cluster: RedisClusterServers,
    redis_cluster_url: str,
):
    """A master down: reads of the users whose slots it serves are UNAVAILABLE (an outage, not
    INTERNAL), users on the other masters are still served; once it is back (empty: nothing
    is kept on disk) the server recomputes and writes back there without a restart."""
    v1 = publish_tiny(registry, tmp_path / "staging", seed=1)
    cluster = open_redis(redis_cluster_url)
    store = VectorStore(cluster, MODEL)
    users = [str(u) for u in range(1, 21)]
    store.create_version("ev1", v1)
    store.write("ev1", users, np.ones((len(users), DIM), dtype=np.float32), v1)
    assert store.publish_if("ev1", None).done
    pointer_port = cluster.get_node_from_key(store.keys.current).port
    victim = next(p for p in redis_cluster.ports if p != pointer_port)
    lost = [
        u for u in users if cluster.get_node_from_key(store.keys.vector("ev1", u)).port == victim
    ]
    kept = [u for u in users if u not in lost]
    assert len(lost) > 1 and kept

    srv = start_server(redis_url=redis_cluster_url)
    with EmbeddingClient(f"127.0.0.1:{srv.port}", timeout_s=30) as c:
        assert c.get(lost[0]).source == "stored"
        redis_cluster.stop_master(victim)
        try:  # users read for the first time here: no worker's vector cache holds them
            with pytest.raises(grpc.RpcError) as ei:
                c.get(lost[1])
            assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
            assert c.get(kept[0]).source == "stored"
        finally:
            redis_cluster.restart_master(victim)
        assert c.get(lost[1]).source == "computed"
        assert c.get(lost[1]).source == "stored"


def test_a_slot_no_master_serves_is_an_outage_not_an_internal_error():
    """redis-py's cluster errors that are not RedisErrors (a slot without a reachable master)."""
    code, message = status_of(SlotNotCoveredError("slot 42 is not covered by the cluster"))
    assert code == grpc.StatusCode.UNAVAILABLE and "slot 42" in message


@pytest.mark.timeout(120)
def test_cache_drops_reach_a_replica_seeded_on_another_node(
    start_server,
    registry: Registry,
    tmp_path: Path,
    redis_cluster: RedisClusterServers,
    redis_cluster_url: str,
):
    """A forced recompute on replica A and a behaviour push each drop the vector replica B
    cached, though A and B (and the push) talk to different nodes: pub/sub crosses the
    cluster bus."""
    v1 = publish_tiny(registry, tmp_path / "staging", seed=1)
    store = VectorStore(open_redis(redis_cluster_url), MODEL)
    store.create_version("ev1", v1)
    store.write("ev1", ["7"], np.full((1, DIM), 1.0, np.float32), v1)
    assert store.publish_if("ev1", None).done
    other_seed = redis_cluster_url.replace(str(redis_cluster.ports[0]), str(redis_cluster.ports[1]))
    a = start_server(redis_url=redis_cluster_url, vector_cache_mb=1)
    b = start_server(redis_url=other_seed, vector_cache_mb=1)
    assert b.lookup is not None and b.lookup.cache is not None and b.lookup.drops is not None
    with EmbeddingClient(f"127.0.0.1:{a.port}") as ca, EmbeddingClient(f"127.0.0.1:{b.port}") as cb:
        for _ in range(2):
            old = cb.get("7").vector
        assert len(b.lookup.cache) == 1
        forced = ca.get("7", force=True).vector
        assert not np.array_equal(forced, old)
        # the drop message is on its way (pub/sub)
        wait_for(lambda: np.array_equal(cb.get("7").vector, forced), "A's drop to reach B")
        assert len(b.lookup.cache) == 1  # cached again, the new value

        # a push through the blocking cluster client publishes from whichever node it picks
        mark_pushed(open_redis(redis_cluster.url), {"7": int(time.time() * 1000)})
        wait_for(lambda: len(b.lookup.cache) == 0, "the push's drop to reach B")
