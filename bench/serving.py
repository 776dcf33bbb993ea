"""Serving benchmark: the embedding server beside its references, measured in one run.

    .venv/bin/python bench/serving.py [--users 20000] [--scale 1.0] [--rounds 3]
                                     [--client h2|grpcio] [--load-procs N]
                                     [--no-feast-serve] [--encoder supermoe|synthetic]
                                     [--baseline-env USEREMBED_READ_HOLD_MS=0,...]

Starts a private redis-server on a free port, publishes an encoder to a temporary registry
(default: the trainer's default SUPERMOE model with random weights, exported by the trainer's
exporter, so the miss path pays what the real model costs; `--encoder synthetic`: a torch-free
ONNX of embeddings, 2 position-wise FFN layers, mean pool and projection, hidden 64), with
sequence length 50, loads features into the real Feast
online store (apply + materialize), writes stored vectors, then runs `userembed serve --port 0`
and, each in its own process, closed-loop load generators. References:
- a no-op grpc.aio server of the same service returning a constant vector (stored path), on
  the same event loop as the server (`USEREMBED_EVENT_LOOP`: uvloop by default),
- `feast serve` (HTTP, 1 worker, --max-requests 0) serving the same vectors as a feature,
- raw redis-py MGET of the same vectors (batch path), raw onnxruntime at the server's batch
  size (miss path).
The load generators share the 2 cores with the servers, so they are kept cheap and of one
kind: raw-protocol asyncio clients, HTTP/1.1 for `feast serve` and HTTP/2 frames for gRPC
(`--client h2`, bench/h2grpc.py, about 50 us of CPU per call). `--client grpcio` drives the
gRPC servers with grpc.aio instead (about 400 us per call, more than the servers it measures).
Each comparison alternates the server and its reference in `--rounds` short runs and reports the
median run of each side (other jobs on a shared machine swing throughput 2x within a minute);
every run's figure is kept in the JSON (`runs_*`), with each stored-path side's CPU time per call.
`--baseline-env` adds a second server with other settings to the stored-path rounds, so a change
is measured side by side with what it replaces. Above concurrency 1 the gRPC load runs in
`--load-procs` processes started together (default 1 for h2, 2 for grpcio).
Prints progress lines, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MODEL = "bench"
DIM = 64
SEQ_LEN = 50
EV = "bench-ev"
SERVER_BATCH = 64


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(lat: list[float], q: float) -> float:
    return round(float(np.percentile(np.asarray(lat) * 1000, q)), 3) if lat else float("nan")


# --- synthetic encoder (onnx.helper, no torch) ------------------------------------------------


def input_spec() -> Any:
    from userembed.features import BEHAVIOR_VIEW, PROFILE_VIEW, FeatureSpec, InputSpec

    return InputSpec(
        sequence_length=SEQ_LEN,
        sequence_features=(
            FeatureSpec("item_seq", 20_000, BEHAVIOR_VIEW),
            FeatureSpec("category_seq", 200, BEHAVIOR_VIEW),
            FeatureSpec("event_type_seq", 8, BEHAVIOR_VIEW),
            FeatureSpec("gap_bucket_seq", 16, BEHAVIOR_VIEW),
        ),
        profile_features=(
            FeatureSpec("age_bucket", 16, PROFILE_VIEW),
            FeatureSpec("gender", 4, PROFILE_VIEW),
            FeatureSpec("occupation", 32, PROFILE_VIEW),
            FeatureSpec("region", 64, PROFILE_VIEW),
        ),
    )


def synthetic_encoder(spec: Any, hidden: int = DIM, ffn: int = 4 * DIM, layers: int = 2) -> Any:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits, nodes, inputs = [], [], []

    def w(name: str, *shape: int, scale: float = 0.1) -> str:
        inits.append(
            numpy_helper.from_array((rng.normal(size=shape) * scale).astype(np.float32), name)
        )
        return name

    seq = []
    for f in spec.sequence_features:
        inputs.append(helper.make_tensor_value_info(f.name, TensorProto.INT64, ["B", SEQ_LEN]))
        nodes.append(
            helper.make_node(
                "Gather", [w(f"t_{f.name}", f.num_embeddings, hidden), f.name], [f"e_{f.name}"]
            )
        )
        seq.append(f"e_{f.name}")
    nodes.append(helper.make_node("Sum", seq, ["h0"]))  # (B, L, H)
    h = "h0"
    for i in range(layers):  # position-wise FFN with a residual: (B, L, H)
        nodes += [
            helper.make_node("MatMul", [h, w(f"w1_{i}", hidden, ffn)], [f"a{i}"]),
            helper.make_node("Relu", [f"a{i}"], [f"r{i}"]),
            helper.make_node("MatMul", [f"r{i}", w(f"w2_{i}", ffn, hidden)], [f"b{i}"]),
            helper.make_node("Add", [h, f"b{i}"], [f"h{i + 1}"]),
        ]
        h = f"h{i + 1}"
    nodes.append(helper.make_node("ReduceMean", [h], ["pooled"], axes=[1], keepdims=0))  # (B, H)
    inputs.append(
        helper.make_tensor_value_info(
            "profile", TensorProto.INT64, ["B", len(spec.profile_features)]
        )
    )
    nodes.append(helper.make_node("Gather", [w("t_profile", 64, hidden), "profile"], ["e_profile"]))
    nodes.append(helper.make_node("ReduceMean", ["e_profile"], ["p_profile"], axes=[1], keepdims=0))
    nodes.append(helper.make_node("Add", ["pooled", "p_profile"], ["z"]))
    nodes.append(helper.make_node("MatMul", ["z", w("w_out", hidden, DIM)], ["user_vector"]))
    out = helper.make_tensor_value_info("user_vector", TensorProto.FLOAT, ["B", DIM])
    model = helper.make_model(
        helper.make_graph(nodes, "bench", inputs, [out], inits),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


ENCODERS = ("supermoe", "synthetic")


def supermoe_encoder(spec: Any, path: Path) -> None:
    """The trainer's default SUPERMOE encoder with random weights (bench/encoder.py), exported
    to `path` by the trainer's exporter: the model the service runs, at its compute cost."""
    from bench.encoder import random_encoder
    from trainer.export import export_onnx, random_inputs

    export_onnx(random_encoder(spec, DIM), path, random_inputs(spec, 64, np.random.default_rng(0)))


def publish_encoder(root: Path, spec: Any, kind: str = "synthetic") -> tuple[str, Path]:
    """Build the `kind` encoder (ENCODERS), publish it to the registry under root/models."""
    import onnx

    from userembed.manifest import single_onnx_manifest
    from userembed.registry import Registry

    staging = root / "staging"
    staging.mkdir(parents=True)
    if kind == "supermoe":
        supermoe_encoder(spec, staging / "encoder.onnx")
    elif kind == "synthetic":
        onnx.save(synthetic_encoder(spec), str(staging / "encoder.onnx"))
    else:
        raise ValueError(f"unknown encoder {kind!r}; expected one of {ENCODERS}")
    manifest = single_onnx_manifest(MODEL, staging, spec, DIM)
    version = Registry(root / "models").publish(manifest, staging).version
    return version, staging / "encoder.onnx"


# --- data ---------------------------------------------------------------------------------------


def feature_rows(users: int) -> dict[str, Any]:
    rng = np.random.default_rng(1)
    lens = rng.integers(5, SEQ_LEN + 1, size=users)
    rows: dict[str, Any] = {"user_id": np.arange(users, dtype=np.int64)}
    for name, hi in (
        ("item_seq", 50_000),
        ("category_seq", 300),
        ("event_type_seq", 4),
        ("gap_bucket_seq", 16),
    ):
        rows[name] = [rng.integers(0, hi, size=n).tolist() for n in lens]
    rows["seq_len"] = lens.astype(np.int64)
    for name, hi in (("age_bucket", 7), ("gender", 3), ("occupation", 21), ("region", 50)):
        rows[name] = rng.integers(0, hi, size=users).astype(np.int64)
    return rows


def write_offline(offline: Path, rows: dict[str, Any]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from userembed.features import PROFILE_FEATURES, SEQUENCE_FEATURES

    offline.mkdir(parents=True)
    n = len(rows["user_id"])
    ts = pa.array([datetime(2026, 11, 1, tzinfo=UTC)] * n, type=pa.timestamp("us", tz="UTC"))
    b = {"user_id": pa.array(rows["user_id"]), "event_timestamp": ts}
    for f in SEQUENCE_FEATURES:
        b[f] = pa.array(rows[f], type=pa.list_(pa.int64()))
    b["seq_len"] = pa.array(rows["seq_len"])
    pq.write_table(pa.table(b), offline / "behavior.parquet")
    p = {"user_id": pa.array(rows["user_id"]), "event_timestamp": ts}
    for f in PROFILE_FEATURES:
        p[f] = pa.array(rows[f])
    pq.write_table(pa.table(p), offline / "profile.parquet")


def encode_all(encoder_path: Path, spec: Any, rows: dict[str, Any], batch: int = 512) -> np.ndarray:
    from embed_server.encoder import OnnxEncoder
    from userembed.features import encode_inputs

    enc = OnnxEncoder(encoder_path, DIM, intra_op_threads=2)
    names = [f.name for f in spec.sequence_features + spec.profile_features]
    out = []
    n = len(rows["user_id"])
    for s in range(0, n, batch):
        cols = {k: list(rows[k][s : s + batch]) for k in names}
        out.append(enc.run(encode_inputs(cols, spec)))
    return np.concatenate(out)  # (N, D)


def raw_onnxruntime(
    encoder_path: Path, spec: Any, rows: dict[str, Any], batch: int, seconds: float
) -> float:
    """users/s of onnxruntime alone (inputs pre-encoded) at `batch`, 2 intra-op threads."""
    from embed_server.encoder import OnnxEncoder
    from userembed.features import encode_inputs

    enc = OnnxEncoder(encoder_path, DIM, intra_op_threads=2)
    names = [f.name for f in spec.sequence_features + spec.profile_features]
    inputs = encode_inputs({k: list(rows[k][:batch]) for k in names}, spec)
    enc.run(inputs)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        enc.run(inputs)
        n += batch
    return n / (time.perf_counter() - t0)


def raw_redis(url: str, users: int, seconds: float) -> dict[str, float]:
    """users/s of one redis-py client: MGET of 100 string keys holding the same vector bytes,
    and the pipelined HMGET of 100 vector hashes that the store layout needs."""
    import redis

    from userembed.vectors import VECTOR_FIELDS, VectorKeys

    r = redis.Redis.from_url(url)
    keys = VectorKeys(MODEL)
    rng = random.Random(3)
    out = {}
    for mode in ("mget", "pipeline_hmget"):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            ids = [str(rng.randrange(users)) for _ in range(100)]
            if mode == "mget":
                vals = cast(list[bytes], r.mget([f"bench:mget:{{{u}}}" for u in ids]))
                [np.frombuffer(v, dtype="<f4") for v in vals]
            else:
                pipe = r.pipeline(transaction=False)
                for u in ids:
                    pipe.hmget(keys.vector(EV, u), list(VECTOR_FIELDS))
                [np.frombuffer(v[0], dtype="<f4") for v in pipe.execute()]
            n += 100
        out[mode] = n / (time.perf_counter() - t0)
    return out


# --- processes ------------------------------------------------------------------------------------


class Proc:
    def __init__(
        self, args: list[str], env: dict[str, str], ready: str, timeout: float = 120
    ) -> None:
        self.p = subprocess.Popen(
            args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        deadline = time.monotonic() + timeout
        self.line = ""
        assert self.p.stdout is not None
        seen: list[str] = []
        while time.monotonic() < deadline:
            line = self.p.stdout.readline()
            seen.append(line)
            if not line:
                tail = "".join(seen[-20:])
                raise RuntimeError(f"{args[:3]} exited before ready (rc={self.p.wait()}):\n{tail}")
            if ready in line:
                self.line = line.strip()
                break
        else:
            raise RuntimeError(f"{args[:3]} not ready within {timeout}s")
        # Keep draining its output so a chatty process never blocks on a full pipe.
        import threading

        threading.Thread(target=lambda: [None for _ in self.p.stdout], daemon=True).start()  # type: ignore[union-attr]

    @property
    def pid(self) -> int:
        return self.p.pid

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


def loadgen(env: dict[str, str], processes: int = 1, **kw: Any) -> dict[str, Any]:
    """Run the grpc load in `processes` load generator processes (concurrency and requests
    split between them), so that one client process' Python is not the limit. They warm up,
    report ready, then all start together on "go"; figures are merged (rates summed)."""
    processes = max(1, min(processes, kw["concurrency"]))
    spec = {**kw, "concurrency": kw["concurrency"] // processes}
    spec["requests"] = kw["requests"] // processes
    procs = []
    for i in range(processes):
        args = [
            sys.executable,
            __file__,
            "--role",
            "loadgen",
            "--spec",
            json.dumps({**spec, "seed": kw.get("seed", 0) + 100 * i, "sync": True}),
        ]
        procs.append(
            subprocess.Popen(
                args,
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
    if len(parts) == 1:
        return parts[0]
    merged: dict[str, Any] = {
        k: round(sum(x[k] for x in parts), 1) for k in ("req_s", "users_s")
    }  # each process ran the whole measured interval
    for k in ("p50_ms", "p99_ms"):
        merged[k] = max(x[k] for x in parts)  # conservative: the worse process
    for k in ("errors", "sources"):
        merged[k] = {}
        for x in parts:
            for name, v in x[k].items():
                merged[k][name] = merged[k].get(name, 0) + v
    return merged


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median req_s (figures of one run, not mixed), errors summed."""
    mid = sorted(runs, key=lambda x: x["req_s"])[len(runs) // 2]
    errors: dict[str, int] = {}
    for x in runs:
        for name, v in x["errors"].items():
            errors[name] = errors.get(name, 0) + v
    return {**mid, "errors": errors, "runs_req_s": [x["req_s"] for x in runs]}


# --- load generator (separate process) ------------------------------------------------------------


SERVICE = "/userembed.v1.UserEmbeddingService/"


async def _grpc_load(spec: dict[str, Any]) -> dict[str, Any]:
    """Closed-loop calls from `concurrency` tasks over one connection; figures of the measured
    part. `client`: "h2" (bench/h2grpc.py, raw HTTP/2 frames, ~50 us of CPU per call) or
    "grpcio" (grpc.aio, ~400 us per call: on 2 shared cores it takes CPU from the server)."""
    from embed_server._proto import embedding_service_pb2 as pb

    mode, conc, total, users = spec["mode"], spec["concurrency"], spec["requests"], spec["users"]
    rng = random.Random(spec.get("seed", 0))
    prefer = pb.FORCE_RECOMPUTE if mode == "force" else pb.ACCEPT_STORED
    batched = mode in ("batch", "batch_force")
    lat: list[float] = []
    errors: dict[str, int] = {}
    sources: dict[int, int] = {}
    count = 0
    warm = min(200, total // 10)

    if spec.get("client", "h2") == "h2":
        from bench.h2grpc import CallFailed, H2Channel, request_headers

        host, _, port = spec["target"].rpartition(":")
        channel = await H2Channel.connect(host, int(port))
        get_h = request_headers(spec["target"], SERVICE + "GetUserEmbedding")
        batch_h = request_headers(spec["target"], SERVICE + "BatchGetUserEmbeddings")

        async def get(req: Any) -> Any:
            return pb.GetUserEmbeddingResponse.FromString(
                await channel.call(get_h, req.SerializeToString())
            )

        async def batch(req: Any) -> Any:
            return pb.BatchGetUserEmbeddingsResponse.FromString(
                await channel.call(batch_h, req.SerializeToString())
            )

        failure: tuple[type[Exception], ...] = (CallFailed,)

        async def close() -> None:
            channel.close()
    else:
        import grpc

        from embed_server._proto import embedding_service_pb2_grpc as pb_grpc

        aio_channel = grpc.aio.insecure_channel(spec["target"])
        stub = pb_grpc.UserEmbeddingServiceStub(aio_channel)

        async def get(req: Any) -> Any:
            return await stub.GetUserEmbedding(req, timeout=30)

        async def batch(req: Any) -> Any:
            return await stub.BatchGetUserEmbeddings(req, timeout=30)

        failure = (grpc.aio.AioRpcError,)

        async def close() -> None:
            await aio_channel.close()

    def error_name(e: Exception) -> str:
        code = getattr(e, "code", None)
        return code().name if callable(code) else "grpc_error"  # h2: the status is not decoded

    async def one() -> None:
        if batched:
            ids = [str(rng.randrange(users)) for _ in range(spec.get("ids", 100))]
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
            uid = str(rng.randrange(users))
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

    await asyncio.gather(*(worker(False, warm) for _ in range(conc)))
    if spec.get("sync"):  # several load processes: start measuring together
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    count = 0
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(True, total) for _ in range(conc)))
    wall = time.perf_counter() - t0
    await close()
    per_call = spec.get("ids", 100) if mode in ("batch", "batch_force") else 1
    return {
        "req_s": round(len(lat) / wall, 1),
        "users_s": round(len(lat) * per_call / wall, 1),
        "p50_ms": pct(lat, 50),
        "p99_ms": pct(lat, 99),
        "errors": errors,
        "sources": {pb.Source.Name(k): v for k, v in sources.items()},
    }


async def _http_load(spec: dict[str, Any]) -> dict[str, Any]:
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

    await asyncio.gather(*(worker(False, min(100, total // 10)) for _ in range(conc)))
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


# --- reference servers (separate processes) -------------------------------------------------------


async def _echo_server(read_redis: str = "") -> None:
    """The same service, doing nothing: returns one constant vector. With `read_redis` (a Redis
    URL) it first reads the caller's stored vector hash through the server's own read path and
    `read_hold_ms` (embed_server/redis_reads.py: a lone read is one HMGET, concurrent reads
    share a round trip) and returns that vector: the least any stored-path server must do, so
    the server's gap to it is its own code."""
    import grpc

    from embed_server._proto import embedding_service_pb2 as pb
    from embed_server._proto import embedding_service_pb2_grpc as pb_grpc
    from embed_server.redis_reads import PipelinedRedis, ReadCoalescer
    from embed_server.settings import load_settings
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
    print(f"listening on 127.0.0.1:{port}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(0)


def setup_feast_serve(
    root: Path, redis_url: str, vectors: np.ndarray, env: dict[str, str]
) -> tuple[Path, float]:
    """A second Feast repo: the stored vectors as a feature `user_vectors:vector`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from userembed.feast_ops import redis_connection_string

    repo = root / "feast_vectors"
    repo.mkdir()
    n = len(vectors)
    ts = pa.array([datetime(2026, 11, 1, tzinfo=UTC)] * n, type=pa.timestamp("us", tz="UTC"))
    pq.write_table(
        pa.table(
            {
                "user_id": pa.array(np.arange(n, dtype=np.int64)),
                "event_timestamp": ts,
                "vector": pa.array(vectors.tolist(), type=pa.list_(pa.float32())),
            }
        ),
        repo / "vectors.parquet",
    )
    (repo / "feature_store.yaml").write_text(
        f"project: benchvectors\nprovider: local\nregistry: {repo / 'registry.db'}\n"
        f"online_store:\n  type: redis\n  connection_string: {redis_connection_string(redis_url)}\n"
        "offline_store:\n  type: file\nentity_key_serialization_version: 3\n"
    )
    (repo / "vectors.py").write_text(
        "from datetime import timedelta\n"
        "from feast import Entity, FeatureView, Field, FileSource\n"
        "from feast.types import Array, Float32\nfrom feast.value_type import ValueType\n"
        "user = Entity(name='user', join_keys=['user_id'], value_type=ValueType.INT64)\n"
        f"src = FileSource(name='vectors_src', path='{repo / 'vectors.parquet'}', timestamp_field='event_timestamp')\n"
        "user_vectors = FeatureView(name='user_vectors', entities=[user], ttl=timedelta(0),\n"
        "    schema=[Field(name='vector', dtype=Array(Float32))], source=src, online=True)\n"
    )
    feast = str(Path(sys.executable).parent / "feast")
    t0 = time.perf_counter()
    subprocess.run(
        [feast, "apply"], cwd=repo, env=env, check=True, capture_output=True, timeout=300
    )
    subprocess.run(
        [feast, "materialize", "1970-01-02T00:00:00", "2026-11-02T00:00:00"],
        cwd=repo,
        env=env,
        check=True,
        capture_output=True,
        timeout=600,
    )
    return repo, time.perf_counter() - t0


# --- main -----------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> dict[str, Any]:
    import psutil
    import redis

    from embed_server.event_loop import loop_factory
    from embed_server.settings import load_settings
    from userembed import feast_ops
    from userembed.local_redis import redis_server_argv
    from userembed.vectors import VectorStore

    baseline = _env_pairs(args.baseline_env)  # a typo fails here, before any set-up
    served = load_settings()  # the server's settings from this environment
    root = Path(tempfile.mkdtemp(prefix="userembed-bench-"))
    procs: list[Proc] = []
    redis_proc = None
    s = args.scale
    result: dict[str, Any] = {
        "users": args.users,
        "dim": DIM,
        "seq_len": SEQ_LEN,
        "encoder": args.encoder,
        "cores": os.cpu_count(),
        # the loop of the server and of the echo reference (USEREMBED_EVENT_LOOP)
        "event_loop": loop_factory(served.event_loop)[0],
        "read_hold_ms": served.read_hold_ms,  # USEREMBED_READ_HOLD_MS
        "load_client": args.client,  # the gRPC load generator (--client)
    }
    try:
        port = free_port()
        redis_proc = subprocess.Popen(redis_server_argv(port, root), stdout=subprocess.DEVNULL)
        url = f"redis://127.0.0.1:{port}/0"
        r = redis.Redis.from_url(url)
        for _ in range(100):
            try:
                r.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        env = {
            **os.environ,
            "REDIS_URL": url,
            "USEREMBED_HOME": str(root / "home"),
            "USEREMBED_OFFLINE_DIR": str(root / "offline"),
            "USEREMBED_FEAST_REGISTRY": str(root / "feast" / "registry.db"),
            "USEREMBED_REGISTRY_ROOT": str(root / "models"),
            "USEREMBED_METRICS_PORT": "-1",
            "USEREMBED_BATCH_SIZE": str(SERVER_BATCH),
            "USEREMBED_LOG_LEVEL": "WARNING",
        }
        os.environ.update(
            {
                k: env[k]
                for k in ("USEREMBED_HOME", "USEREMBED_OFFLINE_DIR", "USEREMBED_FEAST_REGISTRY")
            }
        )
        spec = input_spec()
        version, onnx_path = publish_encoder(root, spec, args.encoder)
        rows = feature_rows(args.users)
        write_offline(root / "offline", rows)
        t0 = time.perf_counter()
        store = feast_ops.open_store(url)
        feast_ops.apply(store)
        feast_ops.materialize(store)
        log(f"feast apply + materialize of {args.users} users: {time.perf_counter() - t0:.1f}s")
        vectors = encode_all(onnx_path, spec, rows)
        vs = VectorStore(r, MODEL)
        vs.create_version(EV, version)
        ids = [str(u) for u in range(args.users)]
        for i in range(0, args.users, 5000):
            vs.write(EV, ids[i : i + 5000], vectors[i : i + 5000], version)
        vs.publish(EV, users=args.users)
        pipe = r.pipeline(transaction=False)
        for i, u in enumerate(ids):
            pipe.set(f"bench:mget:{{{u}}}", vectors[i].astype("<f4").tobytes())
        pipe.execute()
        log(f"stored {args.users} vectors in {EV}")

        exe = str(Path(sys.executable).parent / "userembed")
        server = Proc([exe, "serve", "--port", "0"], env, "listening on")
        procs.append(server)
        target = server.line.split("listening on ")[1].split(",")[0]
        echo = Proc([sys.executable, __file__, "--role", "echo"], env, "listening on")
        procs.append(echo)
        echo_target = echo.line.split("listening on ")[1]
        read_spec = json.dumps({"read_redis": url})
        echo_redis = Proc(
            [sys.executable, __file__, "--role", "echo", "--spec", read_spec], env, "listening on"
        )
        procs.append(echo_redis)
        # stored-path sides: name, target, process (for its CPU time per call)
        sides = [
            ("echo", echo_target, echo),
            ("echo_redis", echo_redis.line.split("listening on ")[1], echo_redis),
            ("server", target, server),
        ]
        base_target = None
        if baseline:  # the same server with other settings, side by side
            base = Proc([exe, "serve", "--port", "0"], {**env, **baseline}, "listening on")
            procs.append(base)
            base_target = base.line.split("listening on ")[1].split(",")[0]
            sides.append(("baseline", base_target, base))

        def cpu_s(p: Proc) -> float:
            c = psutil.Process(p.pid).cpu_times()
            return c.user + c.system

        ps = psutil.Process(server.pid)

        g = dict(users=args.users, seed=1, client=args.client)
        # The RSS baseline comes after 1,000 calls of every kind, so that one-time growth
        # (onnxruntime's arena sized by the first concurrent batches, connection pools) is in
        # it and the 100k check sees what keeps growing.
        warm_calls = {"get": 800, "force": 150, "batch_force": 50}
        for mode, n_calls in warm_calls.items():
            conc = {"get": 4, "force": 64, "batch_force": 4}[mode]
            loadgen(env, target=target, mode=mode, concurrency=conc, requests=n_calls,
                    ids=SERVER_BATCH, **g)  # fmt: skip
        rss_1k = ps.memory_info().rss
        rss_trace = {"after_warm_up": rss_1k}
        total = sum(warm_calls.values()) + sum(min(200, n // 10) for n in warm_calls.values())
        med: dict[str, dict[str, dict[str, Any]]] = {}  # concurrency -> side -> median run
        cpu_us: dict[str, dict[str, float]] = {}
        rounds = args.rounds
        for conc, n in ((1, int(2000 * s)), (16, int(6000 * s)), (64, int(6000 * s))):
            # Alternate echo and server (and baseline) for `rounds` short runs each and keep the
            # median of each side: other jobs on this machine swing throughput by 2x within a
            # minute. CPU per call (the process' CPU time over the calls it answered, warm-up
            # included) moves much less with the machine's load than calls/s.
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in sides}
            cpu = {name: 0.0 for name, _, _ in sides}
            for _ in range(rounds):
                for name, tgt, proc in sides:
                    c0 = cpu_s(proc)
                    runs[name].append(
                        loadgen(
                            env,
                            processes=args.load_procs if conc > 1 else 1,
                            target=tgt,
                            mode="get",
                            concurrency=conc,
                            requests=n // rounds,
                            **g,
                        )
                    )
                    cpu[name] += cpu_s(proc) - c0
            calls = rounds * (n // rounds + min(200, n // rounds // 10))
            cpu_us[str(conc)] = {k: round(v / calls * 1e6, 1) for k, v in cpu.items()}
            m = med[str(conc)] = {name: median_of(r) for name, r in runs.items()}
            total += n + rounds * min(200, n // rounds // 10)
            log(
                f"stored c={conc}: server {m['server']['req_s']} req/s "
                f"(p50 {m['server']['p50_ms']} p99 {m['server']['p99_ms']} ms) "
                f"vs echo {m['echo']['req_s']} req/s, echo + HMGET {m['echo_redis']['req_s']} req/s"
                + (f", baseline {m['baseline']['req_s']} req/s" if base_target else "")
                + f"; CPU us per call {cpu_us[str(conc)]}"
            )

        def ratio(m: dict[str, dict[str, Any]], a: str, b: str) -> float:
            return round(m[a]["req_s"] / m[b]["req_s"], 3)

        result["stored_path"] = {
            c: {
                **{
                    k: m["server"][k]
                    for k in ("req_s", "p50_ms", "p99_ms", "errors", "sources", "runs_req_s")
                },
                "echo_req_s": m["echo"]["req_s"],
                "echo_runs_req_s": m["echo"]["runs_req_s"],
                "echo_p99_ms": m["echo"]["p99_ms"],
                "ratio_vs_echo": ratio(m, "server", "echo"),
                # the echo that also reads the stored vector on the server's read path: what the
                # Redis round trip alone costs, and the server's own overhead beyond it
                "echo_redis_req_s": m["echo_redis"]["req_s"],
                "echo_redis_runs_req_s": m["echo_redis"]["runs_req_s"],
                "echo_redis_vs_echo": ratio(m, "echo_redis", "echo"),
                "ratio_vs_echo_redis": ratio(m, "server", "echo_redis"),
                "cpu_us_per_call": cpu_us[c],
                **(
                    {
                        "baseline_req_s": m["baseline"]["req_s"],
                        "baseline_runs_req_s": m["baseline"]["runs_req_s"],
                        "baseline_p50_ms": m["baseline"]["p50_ms"],
                        "baseline_p99_ms": m["baseline"]["p99_ms"],
                        "speedup_vs_baseline": ratio(m, "server", "baseline"),
                    }
                    if base_target
                    else {}
                ),
            }
            for c, m in med.items()
        }
        if base_target:
            result["baseline_env"] = baseline
        echo.stop()
        echo_redis.stop()
        rss_trace["after_stored"] = ps.memory_info().rss

        def server_load(mode: str, concurrency: int, calls: int, ids: int = 1) -> dict[str, Any]:
            """One run against the server; users/s is its figure (as req_s, for median_of)."""
            nonlocal total
            res = loadgen(env, processes=args.load_procs, target=target, mode=mode,
                          concurrency=concurrency, requests=calls, ids=ids, **g)  # fmt: skip
            total += calls + min(200, calls // 10)  # the warm-up calls count for the RSS check
            return {**res, "req_s": res["users_s"]}

        # batch path and miss path: alternate with their raw reference, medians of each side
        b_runs, mget_runs, hmget_runs = [], [], []
        for _ in range(rounds):
            b_runs.append(server_load("batch", 16, int(1500 * s) // rounds, ids=100))
            raw_r = raw_redis(url, args.users, 1.0 * s)
            mget_runs.append(raw_r["mget"])
            hmget_runs.append(raw_r["pipeline_hmget"])
        batch = median_of(b_runs)
        raw = {"mget": float(np.median(mget_runs)), "pipeline_hmget": float(np.median(hmget_runs))}
        result["batch_100"] = {
            "runs_users_s": batch["runs_req_s"],
            "raw_mget_runs_users_s": [round(x) for x in mget_runs],
            "users_s": batch["users_s"],
            "p50_ms": batch["p50_ms"],
            "p99_ms": batch["p99_ms"],
            "errors": batch["errors"],
            "raw_mget_users_s": round(raw["mget"], 1),
            "raw_pipeline_hmget_users_s": round(raw["pipeline_hmget"], 1),
            "ratio_vs_mget": round(batch["users_s"] / raw["mget"], 3),
        }
        log(f"batch 100 ids, c=16: {batch['users_s']} users/s vs MGET {raw['mget']:.0f}")
        rss_trace["after_batch"] = ps.memory_info().rss

        m_runs, mb_runs, ort_runs = [], [], []
        for _ in range(rounds):
            mb_runs.append(server_load("batch_force", 4, int(300 * s) // rounds, SERVER_BATCH))
            m_runs.append(server_load("force", 64, int(3000 * s) // rounds))
            ort_runs.append(raw_onnxruntime(onnx_path, spec, rows, SERVER_BATCH, 1.5 * s))
        miss = median_of(m_runs)
        miss_batch = median_of(mb_runs)
        ort_64 = float(np.median(ort_runs))
        echo_64 = result["stored_path"]["64"]["echo_req_s"]
        result["miss_path"] = {
            "runs_users_s": miss["runs_req_s"],
            "raw_onnxruntime_runs_users_s": [round(x) for x in ort_runs],
            "concurrency": 64,
            "users_s": miss["users_s"],
            "p50_ms": miss["p50_ms"],
            "p99_ms": miss["p99_ms"],
            "errors": miss["errors"],
            "sources": miss["sources"],
            "raw_onnxruntime_users_s": round(ort_64, 1),
            "batch_size": SERVER_BATCH,
            "ratio_vs_onnxruntime": round(miss["users_s"] / ort_64, 3),
            # One id per call: no server can beat the no-op echo's calls/s, so this is the
            # highest ratio any single-id server could reach here, features and encoder free.
            "ceiling_echo_vs_onnxruntime": round(echo_64 / ort_64, 3),
            # Both costs on the same cores (load generator, gRPC and onnxruntime share them):
            # a user costs at least 1/echo + 1/ort machine-seconds, so users/s <= 1 / (1/echo
            # + 1/ort) and the ratio to onnxruntime <= echo / (echo + ort), features free.
            "ceiling_shared_cores_vs_onnxruntime": round(echo_64 / (echo_64 + ort_64), 3),
            # The same work with 64 ids per call (4 calls in flight): the per-call gRPC cost
            # is paid once per micro-batch, so this shows the features + encoder + write-back.
            "batch_of_64": {
                "runs_users_s": miss_batch["runs_req_s"],
                "users_s": miss_batch["users_s"],
                "p50_ms": miss_batch["p50_ms"],
                "p99_ms": miss_batch["p99_ms"],
                "errors": miss_batch["errors"],
                "ratio_vs_onnxruntime": round(miss_batch["users_s"] / ort_64, 3),
            },
        }
        log(
            f"miss path c=64: {miss['users_s']} users/s (p99 {miss['p99_ms']} ms) vs raw ORT "
            f"{ort_64:.0f} (echo ceiling {echo_64 / ort_64:.2f}); 64 ids per call: "
            f"{miss_batch['users_s']} users/s"
        )

        rss_trace["after_miss"] = ps.memory_info().rss
        left = args.rss_requests - total
        if args.rss_requests and left > 0:
            log(f"{left} more stored-path requests for the RSS check")
            loadgen(env, target=target, mode="get", concurrency=16, requests=left, **g)
        rss_100k = ps.memory_info().rss
        rss_trace["after_all"] = rss_100k
        result["rss"] = {
            "after_1k_mb": round(rss_1k / 2**20, 1),
            "after_100k_mb": round(rss_100k / 2**20, 1),
            "growth": round(rss_100k / rss_1k - 1, 3),
            "requests": max(total, args.rss_requests),
            "trace_mb": {k: round(v / 2**20, 1) for k, v in rss_trace.items()},
        }
        log(f"server RSS {result['rss']}")

        if args.feast_serve:
            repo, secs = setup_feast_serve(root, url, vectors[: args.feast_users], env)
            log(f"feast serve repo: apply + materialize {args.feast_users} vectors in {secs:.1f}s")
            fport = free_port()
            feast = str(Path(sys.executable).parent / "feast")
            fs = subprocess.Popen(
                [
                    feast,
                    "serve",
                    "-p",
                    str(fport),
                    "-w",
                    "1",
                    "--max-requests",
                    "0",
                    "--no-access-log",
                ],
                cwd=repo,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                deadline = time.monotonic() + 120
                while True:
                    try:
                        socket.create_connection(("127.0.0.1", fport), timeout=1).close()
                        break
                    except OSError:
                        if time.monotonic() > deadline or fs.poll() is not None:
                            raise RuntimeError("feast serve did not start") from None
                        time.sleep(0.5)
                fr, sv = {}, {}
                # as many calls as the stored-path runs: short runs were the noisiest figures
                for conc, n in ((1, int(2000 * s)), (16, int(6000 * s))):
                    # alternate feast serve and the server (same users) in short runs
                    f_runs, s_runs = [], []
                    for _ in range(args.rounds):
                        f_runs.append(
                            _run_http(
                                env,
                                host="127.0.0.1",
                                port=fport,
                                concurrency=conc,
                                requests=n // args.rounds,
                                users=args.feast_users,
                            )
                        )
                        s_runs.append(
                            loadgen(
                                env,
                                processes=args.load_procs if conc > 1 else 1,
                                target=target,
                                mode="get",
                                concurrency=conc,
                                requests=n // args.rounds,
                                users=args.feast_users,
                                seed=2,
                                client=args.client,
                            )
                        )
                    f_runs = [{**x, "errors": {"http": x["errors"]}} for x in f_runs]
                    fr[str(conc)], sv[str(conc)] = median_of(f_runs), median_of(s_runs)
                    log(
                        f"feast serve c={conc}: {fr[str(conc)]['req_s']} req/s "
                        f"(p99 {fr[str(conc)]['p99_ms']} ms) vs server {sv[str(conc)]['req_s']}"
                    )
                result["feast_serve"] = {
                    c: {
                        **fr[c],
                        "server_req_s": sv[c]["req_s"],
                        "server_runs_req_s": sv[c]["runs_req_s"],
                        "server_speedup": round(sv[c]["req_s"] / fr[c]["req_s"], 2),
                        # the no-op echo server (stored-path section) over feast serve: the
                        # most any Python gRPC server could show here
                        "ceiling_echo_speedup": round(
                            result["stored_path"][c]["echo_req_s"] / fr[c]["req_s"], 2
                        ),
                    }
                    for c in fr
                }
            finally:
                fs.send_signal(signal.SIGTERM)
                try:
                    fs.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    fs.kill()
                    fs.wait()
        result["aims"] = {
            "stored_vs_echo>=0.75": all(
                v["ratio_vs_echo"] >= 0.75 for v in result["stored_path"].values()
            ),
            "batch_vs_mget>=0.3": result["batch_100"]["ratio_vs_mget"] >= 0.3,
            "miss_vs_onnxruntime>=0.6": result["miss_path"]["ratio_vs_onnxruntime"] >= 0.6,
            "rss_growth<=10%": result["rss"]["growth"] <= 0.10,
        }
        if "feast_serve" in result:
            result["aims"]["stored_vs_feast_serve>=2.5x"] = all(
                v["server_speedup"] >= 2.5 for v in result["feast_serve"].values()
            )
        return result
    finally:
        for p in procs:
            p.stop()
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(timeout=10)
        shutil.rmtree(root, ignore_errors=True)


def _env_pairs(text: str) -> dict[str, str]:
    """NAME=VALUE pairs, comma separated -> a dict: the baseline server's environment overrides."""
    pairs = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        k, eq, v = part.partition("=")
        if not eq or not k:
            raise ValueError(f"--baseline-env: expected NAME=VALUE, got {part!r}")
        pairs[k] = v
    return pairs


def _run_http(env: dict[str, str], **kw: Any) -> dict[str, Any]:
    args = [sys.executable, __file__, "--role", "httpload", "--spec", json.dumps(kw)]
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"http load failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--role", default="main", choices=["main", "loadgen", "httpload", "echo"])
    ap.add_argument("--spec", default="{}", help="(internal) load generator settings as JSON")
    ap.add_argument("--users", type=int, default=20_000)
    ap.add_argument("--feast-users", type=int, default=2_000, help="vectors served by feast serve")
    ap.add_argument("--rss-requests", type=int, default=100_000, help="0: skip the RSS run")
    ap.add_argument("--scale", type=float, default=1.0, help="multiplies request counts")
    ap.add_argument("--no-feast-serve", dest="feast_serve", action="store_false")
    ap.add_argument("--rounds", type=int, default=3, help="alternating echo/server runs")
    ap.add_argument(
        "--baseline-env",
        default="",
        help="also run a second server with these environment overrides (NAME=VALUE,...) in the "
        "stored-path rounds, e.g. USEREMBED_READ_HOLD_MS=0,USEREMBED_EVENT_LOOP=asyncio",
    )
    ap.add_argument(
        "--encoder",
        default="supermoe",
        choices=ENCODERS,
        help="supermoe: the trainer's default model, random weights (default); synthetic: a "
        "torch-free 2-layer FFN, much cheaper per user",
    )
    ap.add_argument(
        "--client",
        default="h2",
        choices=["h2", "grpcio"],
        help="gRPC load generator: h2 (raw HTTP/2 frames, bench/h2grpc.py, ~50 us of CPU per "
        "call, like the raw HTTP/1.1 client that drives feast serve) or grpcio (grpc.aio, ~400 us "
        "per call, more than the servers it measures)",
    )
    ap.add_argument(
        "--load-procs",
        type=int,
        default=None,
        help="load generator processes above concurrency 1 (default: 1 for h2, 2 for grpcio)",
    )
    a = ap.parse_args()
    if a.load_procs is None:
        a.load_procs = 1 if a.client == "h2" else 2
    if a.role in ("loadgen", "httpload"):
        # both load generators on the same loop (uvloop when installed)
        from embed_server.event_loop import run

        load = _grpc_load if a.role == "loadgen" else _http_load
        print(json.dumps(run(load(json.loads(a.spec)), "auto")))
    elif a.role == "echo":
        # the server's own loop choice (USEREMBED_EVENT_LOOP, uvloop by default): same kind
        from embed_server.event_loop import run
        from embed_server.settings import load_settings

        run(_echo_server(json.loads(a.spec).get("read_redis", "")), load_settings().event_loop)
    else:
        res = main(a)
        print(json.dumps(res))
