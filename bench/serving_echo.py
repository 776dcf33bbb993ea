"""The echo reference server of the serving benchmark (`serving.py --role echo [--spec JSON]`).

The embedding service doing nothing: GetUserEmbedding returns one constant vector. With
`read_redis` (a Redis URL) in the spec it first reads the caller's stored vector hash through
the server's own read path and `read_hold_ms` (embed_server/redis_reads.py: a lone read is one
HMGET, concurrent reads share a round trip) and returns that vector: the least any stored-path
server must do, so the server's gap to it is its own code. It runs on the server's event loop
(USEREMBED_EVENT_LOOP) and prints `listening on HOST:PORT` once bound; SIGTERM stops it.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import numpy as np

from bench.serving_data import DIM, EV, MODEL


async def echo_server(read_redis: str = "") -> None:
    import grpc

    from embed_server._proto import embedding_service_pb2 as pb
    from embed_server._proto import embedding_service_pb2_grpc as pb_grpc
    from embed_server.redis_reads import PipelinedRedis, ReadCoalescer
    from embed_server.settings import load_settings
    from userembed.processes import LISTENING
    from userembed.vectors import VECTOR_FIELDS, VectorKeys

    vec = np.arange(DIM, dtype=np.float32).tolist()
    keys = VectorKeys(MODEL)
    reads = None
    if read_redis:  # the server's read path and settings: a lone read goes at once, and so on
        hold_s = load_settings().read_hold_ms / 1000.0
        reads = ReadCoalescer(PipelinedRedis(read_redis), VECTOR_FIELDS, hold_s=hold_s)

    class Echo(pb_grpc.UserEmbeddingServiceServicer):
        async def GetUserEmbedding(self, request: Any, context: Any) -> Any:
            resp = pb.GetUserEmbeddingResponse()
            e = resp.embedding
            e.user_id = request.user_id
            if reads is None:
                e.vector.extend(vec)
            else:
                row = await reads.read(keys.vector(EV, request.user_id).encode())
                e.vector.extend(np.frombuffer(row[0], dtype="<f4").tolist())
            e.model_name, e.model_version, e.embedding_version = MODEL, "v", EV
            e.source = pb.STORED
            return resp

    server = grpc.aio.server()
    pb_grpc.add_UserEmbeddingServiceServicer_to_server(Echo(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"{LISTENING} 127.0.0.1:{port}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(0)


def run_echo(spec: dict[str, Any]) -> None:
    """The role's entry: serve until SIGTERM on the loop the server would use."""
    from embed_server.event_loop import run
    from embed_server.settings import load_settings

    run(echo_server(spec.get("read_redis", "")), load_settings().event_loop)
