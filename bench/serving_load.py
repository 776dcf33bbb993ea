"""Load generators of the serving benchmark, each in its own process (`serving.py --role
loadgen|httpload --spec JSON`), and the calls that start them and read their figures.

Closed loop: `concurrency` tasks over one connection, each sending its next call when the
last one is answered; a warm-up (a tenth of the calls, at most 200) is not measured. They share
the 2 cores with the servers, so they are cheap raw-protocol asyncio clients: HTTP/2 frames for
gRPC (`client` "h2", bench/h2grpc.py, about 50 us of CPU per call; "grpcio": grpc.aio, about
400 us per call, more than the servers it measures) and HTTP/1.1 for `feast serve`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.serving_data import DIM

ENTRY = Path(__file__).with_name("serving.py")  # the script whose --role runs a generator
SERVICE = "/userembed.v1.UserEmbeddingService/"


def pct(lat: list[float], q: float) -> float:
    """The q-th percentile of latencies in seconds, in ms."""
    return round(float(np.percentile(np.asarray(lat) * 1000, q)), 3) if lat else float("nan")


def warm_up_calls(total: int, cap: int = 200) -> int:
    """Unmeasured calls before a run of `total` measured ones (the server answers them too)."""
    return min(cap, total // 10)


# --- in the parent: start generators, merge and pick figures ------------------------------------


def run_grpc_load(env: dict[str, str], processes: int = 1, **kw: Any) -> dict[str, Any]:
    """Run the gRPC load in `processes` generator processes (concurrency and calls split between
    them), so that one client process' Python is not the limit. They warm up, report ready,
    then all start together on "go"; figures are merged (rates summed)."""
    processes = max(1, min(processes, kw["concurrency"]))
    spec = {**kw, "concurrency": kw["concurrency"] // processes}
    spec["requests"] = kw["requests"] // processes
    procs = []
    for i in range(processes):
        own = json.dumps({**spec, "seed": kw.get("seed", 0) + 100 * i, "sync": True})
        procs.append(
            subprocess.Popen(
                [sys.executable, str(ENTRY), "--role", "loadgen", "--spec", own],
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    for p in procs:
        assert p.stdout is not None
        if p.stdout.readline().strip() != "ready":
            raise RuntimeError(f"loadgen failed: {p.communicate(timeout=60)[1][-2000:]}")
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    parts = []
    for p in procs:
        out, err = p.communicate(timeout=900)
        if p.returncode != 0:
            raise RuntimeError(f"loadgen failed: {err[-2000:]}")
        parts.append(json.loads(out.strip().splitlines()[-1]))
    return parts[0] if len(parts) == 1 else _merge(parts)


def _merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    # each process ran the whole measured interval: rates add up
    merged: dict[str, Any] = {k: round(sum(x[k] for x in parts), 1) for k in ("req_s", "users_s")}
    for k in ("p50_ms", "p99_ms"):
        merged[k] = max(x[k] for x in parts)  # conservative: the worse process
    for k in ("errors", "sources"):
        merged[k] = {}
        for x in parts:
            for name, v in x[k].items():
                merged[k][name] = merged[k].get(name, 0) + v
    return merged


def run_http_load(env: dict[str, str], **kw: Any) -> dict[str, Any]:
    """One HTTP/1.1 generator process against `feast serve` (host, port, concurrency,
    requests, users)."""
    args = [sys.executable, str(ENTRY), "--role", "httpload", "--spec", json.dumps(kw)]
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"http load failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median req_s (figures of one run, not mixed), errors summed."""
    mid = sorted(runs, key=lambda x: x["req_s"])[len(runs) // 2]
    errors: dict[str, int] = {}
    for x in runs:
        for name, v in x["errors"].items():
            errors[name] = errors.get(name, 0) + v
    return {**mid, "errors": errors, "runs_req_s": [x["req_s"] for x in runs]}


# --- in the generator process -------------------------------------------------------------------


async def grpc_load(spec: dict[str, Any]) -> dict[str, Any]:
    """Calls to `target` in `mode` ("get", "force": one id per call; "batch", "batch_force":
    `ids` per call); figures of the measured part. With `sync` it prints "ready" after the
    warm-up and waits for a line on stdin before measuring."""
    from embed_server._proto import embedding_service_pb2 as pb

    mode, conc, total, users = spec["mode"], spec["concurrency"], spec["requests"], spec["users"]
    rng = random.Random(spec.get("seed", 0))
    prefer = pb.FORCE_RECOMPUTE if mode == "force" else pb.ACCEPT_STORED
    batched = mode in ("batch", "batch_force")
    lat: list[float] = []
    errors: dict[str, int] = {}
    sources: dict[int, int] = {}
    count = 0
    get, batch, failure, close = await _client(spec)
    pick = user_picker(spec, rng, users)

    def error_name(e: Exception) -> str:
        code = getattr(e, "code", None)
        return code().name if callable(code) else "grpc_error"  # h2: the status is not decoded

    async def one() -> None:
        if batched:
            ids = [pick() for _ in range(spec.get("ids", 100))]
            req = pb.BatchGetUserEmbeddingsRequest(
                user_ids=ids,
                packed=True,
                prefer=pb.FORCE_RECOMPUTE if mode == "batch_force" else pb.ACCEPT_STORED,
            )
            resp = await batch(req)
            bad = sum(1 for c in resp.packed.codes if c)
            if bad:
                errors["item"] = errors.get("item", 0) + bad
            if len(resp.packed.vectors) != len(ids) * DIM:  # zeros where an id failed
                errors["bad_reply"] = errors.get("bad_reply", 0) + 1
        else:
            uid = pick()
            resp = await get(pb.GetUserEmbeddingRequest(user_id=uid, prefer=prefer))
            e = resp.embedding
            if e.user_id != uid or len(e.vector) != DIM:
                errors["bad_reply"] = errors.get("bad_reply", 0) + 1
            sources[e.source] = sources.get(e.source, 0) + 1

    async def worker(record: bool, n: int) -> None:
        nonlocal count
        while count < n:
            count += 1
            t0 = time.perf_counter()
            try:
                await one()
            except failure as e:
                errors[error_name(e)] = errors.get(error_name(e), 0) + 1
                continue
            if record:
                lat.append(time.perf_counter() - t0)

    await asyncio.gather(*(worker(False, warm_up_calls(total)) for _ in range(conc)))
    if spec.get("sync"):  # several load processes: start measuring together
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    count = 0
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(True, total) for _ in range(conc)))
    wall = time.perf_counter() - t0
    await close()
    per_call = spec.get("ids", 100) if batched else 1
    return {
        "req_s": round(len(lat) / wall, 1),
        "users_s": round(len(lat) * per_call / wall, 1),
        "p50_ms": pct(lat, 50),
        "p99_ms": pct(lat, 99),
        "errors": errors,
        "sources": {pb.Source.Name(k): v for k, v in sources.items()},
    }


def user_picker(spec: dict[str, Any], rng: random.Random, users: int) -> Any:
    """() -> a user id: uniform over `users`, or with `zipf` (the exponent) Zipf-distributed
    ranks over `users` (user 0 the hottest), drawn ahead of time."""
    a = spec.get("zipf")
    if not a:
        return lambda: str(rng.randrange(users))
    g = np.random.default_rng(rng.randrange(2**32))
    draws = g.zipf(a, size=1 << 20)
    ids = [str(x) for x in (draws[draws <= users] - 1).tolist()]
    return itertools.cycle(ids).__next__


async def _client(spec: dict[str, Any]) -> tuple[Any, Any, tuple[type[Exception], ...], Any]:
    """(get, batch, failure exception types, close) of the `client` the spec names."""
    from embed_server._proto import embedding_service_pb2 as pb

    if spec.get("client", "h2") == "h2":
        from bench.h2grpc import CallFailed, H2Channel, request_headers

        host, _, port = spec["target"].rpartition(":")
        # several connections: a server of several worker processes (SO_REUSEPORT) spreads
        # connections, not calls, over its workers; calls take the connections in turn
        channels = [
            await H2Channel.connect(host, int(port)) for _ in range(spec.get("connections", 1))
        ]
        turn = itertools.cycle(channels).__next__
        get_h = request_headers(spec["target"], SERVICE + "GetUserEmbedding")
        batch_h = request_headers(spec["target"], SERVICE + "BatchGetUserEmbeddings")

        async def get(req: Any) -> Any:
            return pb.GetUserEmbeddingResponse.FromString(
                await turn().call(get_h, req.SerializeToString())
            )

        async def batch(req: Any) -> Any:
            return pb.BatchGetUserEmbeddingsResponse.FromString(
                await turn().call(batch_h, req.SerializeToString())
            )

        async def close() -> None:
            for channel in channels:
                if channel.next_id > 1:
                    channel.close()  # GOAWAY names the last stream: only after one
                elif channel.transport is not None:
                    channel.transport.close()  # a connection no call took (few calls)

        return get, batch, (CallFailed,), close

    import grpc

    from embed_server._proto import embedding_service_pb2_grpc as pb_grpc

    aio_channel = grpc.aio.insecure_channel(spec["target"])
    stub = pb_grpc.UserEmbeddingServiceStub(aio_channel)

    async def aio_get(req: Any) -> Any:
        return await stub.GetUserEmbedding(req, timeout=30)

    async def aio_batch(req: Any) -> Any:
        return await stub.BatchGetUserEmbeddings(req, timeout=30)

    async def aio_close() -> None:
        await aio_channel.close()

    return aio_get, aio_batch, (grpc.aio.AioRpcError,), aio_close


async def http_load(spec: dict[str, Any]) -> dict[str, Any]:
    """Minimal keep-alive HTTP/1.1 client (no aiohttp here): POST /get-online-features."""
    conc, total, users = spec["concurrency"], spec["requests"], spec["users"]
    rng = random.Random(0)
    host, port = spec["host"], spec["port"]
    lat: list[float] = []
    errors = 0
    count = 0

    async def worker(record: bool, n: int) -> None:
        nonlocal count, errors
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while count < n:
                count += 1
                body = json.dumps(
                    {
                        "features": ["user_vectors:vector"],
                        "entities": {"user_id": [rng.randrange(users)]},
                    }
                ).encode()
                t0 = time.perf_counter()
                writer.write(
                    b"POST /get-online-features HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                await writer.drain()
                status = (await reader.readline()).split()[1]
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    k, _, v = line.decode().partition(":")
                    if k.lower() == "content-length":
                        length = int(v)
                    if k.lower() == "transfer-encoding":
                        raise RuntimeError("chunked responses not supported by this client")
                data = await reader.readexactly(length)
                if status != b"200" or b'"vector"' not in data:
                    errors += 1
                    continue
                if record:
                    lat.append(time.perf_counter() - t0)
        finally:
            writer.close()

    await asyncio.gather(*(worker(False, warm_up_calls(total, 100)) for _ in range(conc)))
    count = 0
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(True, total) for _ in range(conc)))
    wall = time.perf_counter() - t0
    return {
        "req_s": round(len(lat) / wall, 1),
        "p50_ms": pct(lat, 50),
        "p99_ms": pct(lat, 99),
        "errors": errors,
    }
