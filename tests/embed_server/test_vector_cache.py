"""The worker's vector cache: bounded by bytes, TinyLFU admission, never a vector of another
embedding version or one a forced recompute replaced (unit, then end to end over gRPC)."""

from __future__ import annotations

import asyncio
import time
import urllib.request

import numpy as np
import pytest
import redis

from embed_server.client import EmbeddingClient
from embed_server.vector_cache import DROP_CHANNEL, ENTRY_OVERHEAD, DropBroadcast, VectorCache
from tests.embed_server.conftest import DIM, MODEL, publish_tiny
from tests.waiting import wait_for
from userembed.vectors import VectorStore


def row(i: int, dim: int = 4) -> list[bytes | None]:
    return [np.full(dim, i, "<f4").tobytes(), b"f32", b"v1", b"0", b"0"]


def test_bounded_by_bytes_and_lru_among_equals():
    entry = 16 + ENTRY_OVERHEAD
    cache = VectorCache(3 * entry)
    for i in range(3):
        cache.lookup(i)
        assert cache.fill(i, row(i), cache.epoch)
    assert cache.bytes == 3 * entry and len(cache) == 3
    cache.lookup(0)  # 0 is now the most recent; 1 the least
    for _ in range(3):
        cache.lookup(9)  # asked for more often than 1: admitted, 1 evicted
    assert cache.fill(9, row(9), cache.epoch)
    assert cache.lookup(1) is None and cache.lookup(9) == row(9) and cache.lookup(0) == row(0)
    assert cache.bytes <= cache.max_bytes


def test_admission_keeps_hot_users_against_a_one_off_tail():
    entry = 16 + ENTRY_OVERHEAD
    cache = VectorCache(10 * entry)
    for _ in range(5):  # ten hot users, each asked for five times
        for u in range(10):
            if cache.lookup(u) is None:
                cache.fill(u, row(u), cache.epoch)
    for u in range(1000, 2000):  # a tail of users asked for once
        if cache.lookup(u) is None:
            cache.fill(u, row(u), cache.epoch)
    assert all(cache.lookup(u) is not None for u in range(10))


def test_hit_ratio_under_zipf_beats_plain_lru():
    rng = np.random.default_rng(0)
    users = rng.zipf(1.1, 60_000) % 20_000
    entry = 16 + ENTRY_OVERHEAD
    cache = VectorCache(500 * entry)
    hits = 0
    for u in users.tolist():
        if cache.lookup(u) is not None:
            hits += 1
        else:
            cache.fill(u, row(u), cache.epoch)
    lru: dict[int, None] = {}
    lru_hits = 0
    for u in users.tolist():
        if u in lru:
            lru_hits += 1
            lru.pop(u)
        elif len(lru) >= 500:
            lru.pop(next(iter(lru)))
        lru[u] = None
    assert hits > lru_hits


def test_a_fill_of_a_read_that_began_before_a_drop_is_refused():
    cache = VectorCache(1 << 20)
    cache.fill("k", row(1), cache.epoch)
    epoch = cache.epoch  # a read of "k" begins (it will carry the old value)
    cache.drop("k")  # a forced recompute wrote a new value back
    assert cache.lookup("k") is None
    assert not cache.fill("k", row(1), epoch)  # the old value never comes back
    assert cache.lookup("k") is None
    assert cache.fill("k", row(2), cache.epoch)  # a read after the drop: cached
    assert cache.lookup("k") == row(2)


@pytest.fixture
def v1(registry, tmp_path) -> str:
    return publish_tiny(registry, tmp_path / "staging", seed=1)


def test_server_never_serves_another_embedding_version_or_a_replaced_vector(
    start_server, v1, redis_url
):
    store = VectorStore(redis.Redis.from_url(redis_url), MODEL)
    old = np.full((1, DIM), 1.0, np.float32)
    new = np.full((1, DIM), 2.0, np.float32)
    store.create_version("ev1", v1)
    store.write("ev1", ["7"], old, v1)
    store.publish("ev1")
    srv = start_server(vector_cache_mb=1)
    with EmbeddingClient(f"127.0.0.1:{srv.port}") as c:
        for _ in range(3):
            np.testing.assert_array_equal(c.get("7").vector, old[0])
            np.testing.assert_array_equal(c.batch_get(["7"], packed=True)[0].vector, old[0])
        assert srv.lookup is not None and srv.lookup.cache is not None
        assert len(srv.lookup.cache) == 1  # now served from the cache
        # a refresh flips the pointer to ev2: the cached ev1 vector is never returned again
        store.create_version("ev2", v1)
        store.write("ev2", ["7"], new, v1)
        store.publish("ev2")
        deadline = time.monotonic() + 30  # the next pointer poll (every 0.2 s) sees it
        while (e := c.get("7")).embedding_version != "ev2" and time.monotonic() < deadline:
            np.testing.assert_array_equal(e.vector, old[0])  # ev1's own vector until then
            time.sleep(0.05)
        assert e.embedding_version == "ev2"
        np.testing.assert_array_equal(e.vector, new[0])
        np.testing.assert_array_equal(c.batch_get(["7"], packed=True)[0].vector, new[0])
        # a forced recompute replaces the stored value: the cached one is never returned again
        forced = c.get("7", force=True)
        assert not np.array_equal(forced.vector, new[0])
        for _ in range(3):
            np.testing.assert_array_equal(c.get("7").vector, forced.vector)
            (b,) = c.batch_get(["7"], packed=True)
            np.testing.assert_array_equal(b.vector, forced.vector)
        (bf,) = c.batch_get(["7"], packed=True, force=True)
        np.testing.assert_array_equal(c.get("7").vector, bf.vector)
    body = urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics").read().decode()
    assert 'userembed_vector_cache_lookups_total{result="hit"}' in body
    assert 'userembed_vector_cache_lookups_total{result="miss"}' in body


def test_cache_off_keeps_no_vector(start_server, v1, redis_url):
    store = VectorStore(redis.Redis.from_url(redis_url), MODEL)
    store.create_version("ev1", v1)
    store.write("ev1", ["7"], np.ones((1, DIM), np.float32), v1)
    store.publish("ev1")
    srv = start_server(vector_cache_mb=0)
    with EmbeddingClient(f"127.0.0.1:{srv.port}") as c:
        assert c.get("7").source == "stored"
    assert srv.lookup is not None and srv.lookup.cache is None


def test_a_forced_recompute_on_one_server_drops_the_vector_on_another(
    start_server, v1, redis_url, features
):
    # two servers (or two workers of one) on one Redis: B cached the vector, A recomputes it
    store = VectorStore(redis.Redis.from_url(redis_url), MODEL)
    store.create_version("ev1", v1)
    store.write("ev1", ["7"], np.full((1, DIM), 1.0, np.float32), v1)
    store.publish("ev1")
    a, b = start_server(vector_cache_mb=1), start_server(vector_cache_mb=1)
    with EmbeddingClient(f"127.0.0.1:{a.port}") as ca, EmbeddingClient(f"127.0.0.1:{b.port}") as cb:
        for _ in range(2):
            old = cb.get("7").vector
        assert b.lookup is not None and b.lookup.cache is not None and len(b.lookup.cache) == 1
        forced = ca.get("7", force=True).vector
        assert not np.array_equal(forced, old)
        # the drop message is on its way (pub/sub)
        wait_for(lambda: np.array_equal(cb.get("7").vector, forced), "A's drop to reach B")
        # the same through a forced batch call, after the user's features changed
        features.add("7", items=[11, 12, 13, 14])
        (bf,) = ca.batch_get(["7"], packed=True, force=True)
        assert not np.array_equal(bf.vector, forced)
        wait_for(lambda: np.array_equal(cb.get("7").vector, bf.vector), "A's batch drop to reach B")


def test_a_kept_reply_counts_in_the_byte_bound_and_goes_with_its_entry():
    entry = 16 + ENTRY_OVERHEAD
    cache = VectorCache(3 * entry + 100)
    for i in range(3):
        cache.lookup(i)
        assert cache.fill(i, row(i), cache.epoch)
    hit = cache.entry(0)
    assert hit is not None and hit.reply is None
    cache.set_reply(hit, b"r" * 200)  # 1, the least recently used, makes room
    assert hit.reply == b"r" * 200 and cache.lookup(1) is None
    assert cache.bytes == 2 * entry + 200 <= cache.max_bytes
    cache.drop(0)  # its reply goes with it
    assert cache.entry(0) is None and cache.bytes == entry
    big = cache.entry(2)
    assert big is not None
    cache.set_reply(big, b"r" * (3 * entry))  # never fits beside its own row: not kept
    assert big.reply is None and cache.bytes == entry


def test_a_cached_reply_answers_as_the_uncached_path_does(start_server, v1, redis_url):
    store = VectorStore(redis.Redis.from_url(redis_url), MODEL)
    store.create_version("ev1", v1)
    store.write("ev1", ["7"], np.arange(DIM, dtype=np.float32)[None], v1, [1234])
    store.publish("ev1")
    cached, plain = start_server(vector_cache_mb=1), start_server(vector_cache_mb=0)
    with (
        EmbeddingClient(f"127.0.0.1:{cached.port}") as cc,
        EmbeddingClient(f"127.0.0.1:{plain.port}") as cp,
    ):
        want = cp.get("7")
        for _ in range(3):  # a miss, then hits: the first builds the reply, the next reuse it
            got = cc.get("7")
            assert got._replace(vector=None) == want._replace(vector=None)
            np.testing.assert_array_equal(got.vector, want.vector)
        assert cached.lookup is not None and cached.lookup.cache is not None
        (entry,) = cached.lookup.cache._rows.values()
        assert entry.reply is not None


class _Publisher:
    """redis.asyncio's publish, recorded; the first `failures` calls fail."""

    def __init__(self, failures: int = 0) -> None:
        self.sent: list[bytes] = []
        self.failures = failures

    async def publish(self, channel: str, data: bytes) -> int:
        assert channel == DROP_CHANNEL
        await asyncio.sleep(0)
        if self.failures:
            self.failures -= 1
            raise ConnectionError("redis away")
        self.sent.append(data)
        return 1


def test_drops_published_in_one_loop_turn_share_one_message_per_model_version():
    async def main() -> list[bytes]:
        client = _Publisher()
        drops = DropBroadcast(client, VectorCache(1 << 20))
        # a micro-batch of forced single-id calls ends in one turn: one PUBLISH per version
        await asyncio.gather(
            *(drops.publish(b"v1", [b"k%d" % i]) for i in range(5)),
            drops.publish(b"v2", [b"k9"]),
        )
        assert sorted(client.sent) == [b"v1\0k0\0k1\0k2\0k3\0k4", b"v2\0k9"]
        await drops.publish(b"v1", [b"k5"])  # a later turn: a message of its own
        client.failures = 1
        await drops.publish(b"v1", [b"k6"])  # a failed publish is logged, never raised
        return client.sent

    sent = asyncio.run(main())
    assert sent[-1] == b"v1\0k5"
    # every message applies as one drop per key on the workers that hear it
    cache = VectorCache(1 << 20)
    for key in (b"k0", b"k4"):
        cache.fill((b"v1", key), row(1), cache.epoch)
    DropBroadcast(None, cache)._apply(sent[0] if sent[0].startswith(b"v1") else sent[1])
    assert len(cache) == 0
