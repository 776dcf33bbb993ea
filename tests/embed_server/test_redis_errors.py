"""Redis error replies are not outages and never INTERNAL (issue #21): a write-back Redis refuses
(OOM under maxmemory + noeviction, READONLY, MISCONF, WRONGTYPE on one key) still returns the
computed vector and is counted; reads that get an error reply (LOADING, WRONGTYPE) are
UNAVAILABLE, and one bad key fails only its own id. Each test runs its own redis-server, whose
config it changes; the session's shared server is never touched."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from embed_server._proto import embedding_service_pb2 as pb
from embed_server.client import EmbeddingClient, ItemError
from embed_server.version_policy import online_version
from tests.conftest import free_port
from tests.embed_server.conftest import MODEL, FakeFeatures, publish_tiny
from tests.embed_server.test_server import expected_vector
from tests.waiting import wait_for
from userembed.local_redis import redis_server_argv, wait_until_up
from userembed.registry import Registry

IDS = [str(u) for u in range(1, 9)]


class PrivateRedis:
    """A redis-server of one test: its config may be changed, it is killed at the end (a
    server that cannot save refuses SIGTERM)."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, *extra: str, wait: bool = True) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv = redis_server_argv(self.port, self.workdir, *extra)
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if wait:
            wait_until_up(self.url)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None

    def client(self) -> redis.Redis:
        """No retries: an error reply (LOADING) is seen as it comes."""
        return redis.Redis(port=self.port, retry=Retry(NoBackoff(), 0), socket_timeout=5)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path / "redis")
    server.start()
    yield server
    server.kill()


@pytest.fixture
def v1(registry: Registry, tmp_path: Path) -> str:
    return publish_tiny(registry, tmp_path / "staging", seed=1)


def _oom(r: redis.Redis, server: PrivateRedis) -> Callable[[], None]:
    r.config_set("maxmemory-policy", "noeviction")
    r.config_set("maxmemory", 1)  # any write is over the limit
    return lambda: r.config_set("maxmemory", 0)


def _readonly(r: redis.Redis, server: PrivateRedis) -> Callable[[], None]:
    r.replicaof("127.0.0.1", free_port())  # a replica (of nobody that answers): READONLY
    return lambda: r.replicaof("NO", "ONE")


def _misconf(r: redis.Redis, server: PrivateRedis) -> Callable[[], None]:
    r.config_set("save", "3600 1")
    shutil.rmtree(server.workdir)  # the next snapshot fails: writes refused with MISCONF
    r.bgsave()
    wait_for(lambda: r.info("persistence")["rdb_last_bgsave_status"] == "err", "a failed save")
    return lambda: r.config_set("stop-writes-on-bgsave-error", "no")


FAULTS = {"oom": _oom, "readonly": _readonly, "misconf": _misconf}


def _writeback_failures(srv) -> float:
    value = srv.metrics.registry.get_sample_value(
        "userembed_writeback_failures_total", {"model": MODEL}
    )
    return value or 0.0


def _reads_sharing_a_batch(srv) -> float:
    """Single stored reads that went out in a batch with others (batch size sum - count)."""
    get = srv.metrics.registry.get_sample_value
    labels = {"stage": "stored_read"}
    return get("userembed_batch_size_sum", labels) - get("userembed_batch_size_count", labels)


def _vector_keys(r: redis.Redis) -> list[bytes]:
    return sorted(r.keys(f"ue:{MODEL}:*:{{*}}"))


@pytest.mark.parametrize("fault", FAULTS)
def test_a_refused_write_back_still_returns_the_computed_vector_and_is_counted(
    start_server, v1, features: FakeFeatures, private_redis: PrivateRedis, fault: str
) -> None:
    srv = start_server(redis_url=private_redis.url)
    r = private_redis.client()
    heal = FAULTS[fault](r, private_redis)
    with EmbeddingClient(f"127.0.0.1:{srv.port}", timeout_s=20) as c:
        single = c.get("5")
        batch = c.batch_get(["6", "7", "8"], packed=True)
        assert single.source == "computed"
        np.testing.assert_allclose(single.vector, expected_vector(srv, "5", features), rtol=1e-6)
        for uid, e in zip(["6", "7", "8"], batch, strict=True):
            assert not isinstance(e, ItemError), e
            assert e.source == "computed"
            want = expected_vector(srv, uid, features)  # a batch of one: not bit-equal
            np.testing.assert_allclose(e.vector, want, rtol=1e-5, atol=1e-6)
        assert _writeback_failures(srv) == 4  # one per vector not written
        assert _vector_keys(r) == []
        heal()
        assert c.get("5").source == "computed"  # written back this time
        assert c.get("5").source == "stored"
    assert _writeback_failures(srv) == 4


@pytest.mark.parametrize("script_reads", [1, 0], ids=["lua-script", "pipeline"])
def test_a_key_of_the_wrong_type_fails_only_its_own_user(
    start_server, v1, features: FakeFeatures, private_redis: PrivateRedis, script_reads: int
) -> None:
    srv = start_server(redis_url=private_redis.url, redis_script_reads=script_reads)
    r = private_redis.client()
    bad = f"ue:{MODEL}:{online_version(v1)}:{{3}}"
    with EmbeddingClient(f"127.0.0.1:{srv.port}", timeout_s=20) as c:
        c.batch_get(IDS)  # computed and written back
        r.delete(bad)
        r.set(bad, "not a hash")

        # stored reads: one batch ...
        for packed in (False, True):
            res = c.batch_get(IDS, packed=packed)
            for uid, e in zip(IDS, res, strict=True):
                if uid == "3":
                    assert isinstance(e, ItemError) and e.code == grpc.StatusCode.UNAVAILABLE
                    assert "WRONGTYPE" in e.message
                else:
                    assert not isinstance(e, ItemError) and e.source == "stored", e
        # ... and concurrent single reads sharing round trips: Redis holds the first read back
        # (CLIENT PAUSE) while the others queue, then they leave together (one script call).
        before = _reads_sharing_a_batch(srv)
        calls = IDS * 6
        r.client_pause(300)
        futures = [
            c.stub.GetUserEmbedding.future(pb.GetUserEmbeddingRequest(user_id=u), timeout=20)
            for u in calls
        ]
        for uid, f in zip(calls, futures, strict=True):
            if uid == "3":
                assert f.exception() is not None and f.code() == grpc.StatusCode.UNAVAILABLE
            else:
                assert f.result().embedding.source == pb.STORED
        assert _reads_sharing_a_batch(srv) > before

        # write-backs: a recompute of everyone writes every key but the bad one, and returns all
        failures = _writeback_failures(srv)
        res = c.batch_get(IDS, force=True)
        for uid, e in zip(IDS, res, strict=True):
            assert not isinstance(e, ItemError) and e.source == "computed", e
            want = expected_vector(srv, uid, features)  # a batch of one: not bit-equal
            np.testing.assert_allclose(e.vector, want, rtol=1e-5, atol=1e-6)
        assert _writeback_failures(srv) == failures + 1
    assert r.type(bad) == b"string"
    computed_at = {int(r.hget(k, "computed_at")) for k in _vector_keys(r) if k != bad.encode()}
    assert computed_at == {res[0].computed_at_ms}  # the other 7 were rewritten by that call


def test_reads_while_redis_loads_its_data_are_unavailable_not_internal(
    start_server, v1, private_redis: PrivateRedis
) -> None:
    srv = start_server(redis_url=private_redis.url)
    r = private_redis.client()
    with EmbeddingClient(f"127.0.0.1:{srv.port}", timeout_s=20) as c:
        assert c.get("5").source == "computed"
        # A dump that takes seconds to load: 500 keys of 2 KB, 6 ms each (key-load-delay).
        r.mset({f"pad:{i}": b"x" * 2048 for i in range(500)})
        r.save()
        private_redis.kill()
        private_redis.start(
            "--key-load-delay", "6000", "--loading-process-events-interval-bytes", "1024",
            wait=False,
        )  # fmt: skip

        def loading() -> bool:
            try:
                return r.info("persistence")["loading"] == 1
            except redis.ConnectionError:
                return False  # not listening yet

        wait_for(loading, "redis loading its dump", timeout=10)
        for call in (lambda: c.get("5"), lambda: c.batch_get(["5", "6"])):
            with pytest.raises(grpc.RpcError) as ei:
                call()
            assert ei.value.code() == grpc.StatusCode.UNAVAILABLE, ei.value.details()
            assert "LOADING" in ei.value.details()
        assert loading(), "the load ended before the calls: raise key-load-delay"
        wait_for(lambda: not loading(), "the load to end", timeout=30)
        deadline = time.monotonic() + 20
        while True:  # the server recovers by itself: the vector is back, stored
            try:
                assert c.get("5").source == "stored"
                break
            except grpc.RpcError as e:
                if time.monotonic() > deadline:
                    raise
                assert e.code() == grpc.StatusCode.UNAVAILABLE
                time.sleep(0.1)
