"""Caps on work in flight: calls per server process (max_concurrent_rpcs) and stored reads
waiting for Redis (queue_size); past either, RESOURCE_EXHAUSTED instead of an unbounded queue."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from embed_server.client import ClientSecurity, EmbeddingClient
from embed_server.stored_reader import CoalescingReader
from tests.embed_server.conftest import FakeFeatures, publish_tiny
from userembed.errors import OverloadedError
from userembed.registry import Registry


@pytest.fixture
def v1(registry: Registry, tmp_path: Path) -> str:
    return publish_tiny(registry, tmp_path / "staging", seed=1)


def test_calls_past_max_concurrent_rpcs_are_resource_exhausted_and_health_answers(
    start_server, v1, features: FakeFeatures
):
    srv = start_server(max_concurrent_rpcs=1)
    entered, release = threading.Event(), threading.Event()
    fetch = features.fetch

    def held_fetch(user_ids, spec):  # the first miss holds its call open
        entered.set()
        assert release.wait(30)
        return fetch(user_ids, spec)

    features.fetch = held_fetch  # type: ignore[method-assign]
    with (
        EmbeddingClient(f"127.0.0.1:{srv.port}", security=ClientSecurity()) as c,
        ThreadPoolExecutor(1) as pool,
    ):
        held = pool.submit(c.get, "3")
        assert entered.wait(30)
        for call in (lambda: c.get("4"), c.list_models, lambda: c.batch_get(["1"])):
            with pytest.raises(grpc.RpcError) as ei:
                call()
            assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_concurrent_rpcs" in ei.value.details()
        assert c.health() == "SERVING"  # probes are not counted: a busy server is alive
        release.set()
        assert held.result(30).source == "computed"
        assert c.get("4").source == "computed"  # the slot is free again
    refused = srv.metrics.registry.get_sample_value(
        "userembed_requests_total", {"method": "GetUserEmbedding", "code": "RESOURCE_EXHAUSTED"}
    )
    assert refused == 1


def test_a_failed_call_gives_its_slot_back(start_server, v1):
    srv = start_server(max_concurrent_rpcs=1)
    with EmbeddingClient(f"127.0.0.1:{srv.port}", security=ClientSecurity()) as c:
        for _ in range(3):  # INVALID_ARGUMENT each time, never RESOURCE_EXHAUSTED
            with pytest.raises(grpc.RpcError) as ei:
                c.get("042")
            assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert c.get("4").source == "computed"


def test_stored_reads_past_queue_size_are_refused_while_redis_does_not_answer():
    """A Redis that accepts and never answers: reads wait, up to queue_size of them."""

    async def run() -> None:
        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read(1 << 20)
            await asyncio.sleep(60)

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader = CoalescingReader(
            f"redis://127.0.0.1:{port}/0", 256, 0.0, lambda n: None, queue_size=2
        )
        try:
            first = reader.read(b"k1", None)
            second = reader.read(b"k2", None)
            with pytest.raises(OverloadedError, match="queue full \\(2/2 pending\\)"):
                reader.read(b"k3", None)
            assert reader.pending == 2
            first.cancel()  # a caller that gives up frees its place
            await asyncio.sleep(0)
            assert reader.pending == 1
            third = reader.read(b"k3", None)
            assert reader.pending == 2
        finally:
            await reader.close()
            server.close()
        for fut in (second, third):
            fut.cancel()

    asyncio.run(asyncio.wait_for(run(), 30))  # a guard against hanging
