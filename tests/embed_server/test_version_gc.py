"""The refresh's garbage collection against a live server (real Redis, real gRPC server): the
version the server writes back into is kept while it heartbeats; a dead server's is not."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import redis

from embed_server.client import EmbeddingClient
from embed_server.version_policy import online_version
from refresh.versions import expire_old
from tests.embed_server.conftest import DIM, MODEL, publish_tiny
from userembed.registry import Registry
from userembed.vectors import VectorStore


@pytest.fixture
def v1(registry: Registry, tmp_path: Path) -> str:
    return publish_tiny(registry, tmp_path / "staging", seed=1)


def _ready_version(store: VectorStore, ev: str, model_version: str) -> None:
    store.create_version(ev, model_version)
    store.write(ev, ["1"], np.ones((1, DIM), np.float32), model_version)
    store.publish(ev, users=1)


def test_gc_keeps_the_online_version_a_live_server_writes_to(start_server, v1, redis_url):
    store = VectorStore(redis.Redis.from_url(redis_url), MODEL)
    # A version of another model version serves: the server writes back into online-<v1>.
    srv = start_server()
    online = online_version(v1)
    with EmbeddingClient(f"127.0.0.1:{srv.port}") as c:
        assert c.get("5").source == "computed"
    assert store.version_info(online) is not None
    # A dead server's online version, and then a refresh of another model version flips.
    _ready_version(store, "online-dead", "dead-model-version")
    store.r.delete(store.keys.writer("online-dead"))  # its heartbeat expired
    _ready_version(store, "refreshed", "other-model-version")

    deleted = expire_old(store, keep=1)

    assert deleted == ["online-dead"]
    info = store.version_info(online)
    assert info is not None and info.status == "online"
    assert 0 < store.r.pttl(store.keys.writer(online)) <= 60_000  # dies with the server
    with EmbeddingClient(f"127.0.0.1:{srv.port}") as c:
        again = c.get("5")
    assert (again.source, again.embedding_version) == ("stored", online)
