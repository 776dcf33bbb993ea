"""The serving bench's raw HTTP/2 load client (bench/h2grpc.py) against a real grpc.aio server:
it must return exactly the server's message, see an error status as an error, keep flow control
going past the default 64 KiB windows, and fail open calls when the server goes away."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest

from bench import h2grpc as h2  # the serving bench's load generator (bench/serving_load.py)
from embed_server._proto import embedding_service_pb2 as pb
from embed_server._proto import embedding_service_pb2_grpc as pb_grpc

GET = "/userembed.v1.UserEmbeddingService/GetUserEmbedding"


class _Service(pb_grpc.UserEmbeddingServiceServicer):
    """Echoes the user id with a 64-float vector; "bad" -> NOT_FOUND; "slow" waits 30 s."""

    async def GetUserEmbedding(self, request: Any, context: Any) -> Any:
        if request.user_id == "slow":
            await asyncio.sleep(30)
        if request.user_id == "bad":
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown user 'bad'")
        resp = pb.GetUserEmbeddingResponse()
        resp.embedding.user_id = request.user_id
        resp.embedding.vector.extend([float(len(request.user_id))] * 64)
        return resp


async def _server() -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    pb_grpc.add_UserEmbeddingServiceServicer_to_server(_Service(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


def _run(body: Callable[[grpc.aio.Server, str, Any], Awaitable[None]]) -> None:
    """Run `body(server, target, channel)` on a fresh loop with a served channel."""

    async def main() -> None:
        server, target = await _server()
        host, _, port = target.rpartition(":")
        channel = await h2.H2Channel.connect(host, int(port))
        try:
            await body(server, target, channel)
        finally:
            channel.close()
            await server.stop(0)

    asyncio.run(main())


async def _get(channel: Any, target: str, user_id: str) -> Any:
    headers = h2.request_headers(target, GET)
    raw = await channel.call(
        headers, pb.GetUserEmbeddingRequest(user_id=user_id).SerializeToString()
    )
    return pb.GetUserEmbeddingResponse.FromString(raw)


def test_a_call_returns_the_servers_message() -> None:
    async def body(_: Any, target: str, channel: Any) -> None:
        resp = await _get(channel, target, "user-42")
        assert resp.embedding.user_id == "user-42"
        assert list(resp.embedding.vector) == [7.0] * 64

    _run(body)


def test_an_error_status_or_unknown_method_is_a_failed_call() -> None:
    async def body(_: Any, target: str, channel: Any) -> None:
        with pytest.raises(h2.CallFailed, match="trailers only"):
            await _get(channel, target, "bad")
        nope = h2.request_headers(target, "/userembed.v1.UserEmbeddingService/Nope")
        with pytest.raises(h2.CallFailed):
            await channel.call(nope, b"")
        assert (await _get(channel, target, "after")).embedding.user_id == "after"  # usable

    _run(body)


def test_concurrent_calls_get_their_own_answers_past_the_default_windows() -> None:
    """6,000 answers of about 300 bytes: far past the 64 KiB initial windows of both sides, so
    both the connection window top-ups and the server's send window are exercised."""

    async def body(_: Any, target: str, channel: Any) -> None:
        ids = [f"u{i}" for i in range(6000)]
        sem = asyncio.Semaphore(64)

        async def one(uid: str) -> str:
            async with sem:
                return str((await _get(channel, target, uid)).embedding.user_id)

        # a stalled window would hang: bounded
        assert await asyncio.wait_for(asyncio.gather(*(one(u) for u in ids)), 60) == ids

    _run(body)


def test_open_and_later_calls_fail_when_the_server_goes_away() -> None:
    async def body(server: grpc.aio.Server, target: str, channel: Any) -> None:
        pending = asyncio.ensure_future(_get(channel, target, "slow"))
        await asyncio.sleep(0.2)
        await server.stop(0)
        with pytest.raises((h2.CallFailed, ConnectionError)):
            await asyncio.wait_for(pending, 10)
        with pytest.raises((h2.CallFailed, ConnectionError)):
            await asyncio.wait_for(_get(channel, target, "late"), 10)


def test_the_server_ends_a_call_past_its_grpc_timeout() -> None:
    async def body(_: Any, target: str, channel: Any) -> None:
        slow = pb.GetUserEmbeddingRequest(user_id="slow").SerializeToString()
        t0 = asyncio.get_running_loop().time()
        with pytest.raises(h2.CallFailed):
            await channel.call(h2.request_headers(target, GET, timeout_s=1), slow)
        assert asyncio.get_running_loop().time() - t0 < 5  # not the handler's 30 s

    _run(body)

    _run(body)
