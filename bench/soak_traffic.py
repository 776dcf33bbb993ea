"""The soak benchmark's traffic and its vector check.

Closed-loop gRPC callers send stored reads (`ACCEPT_STORED`), forced recomputes (the miss path)
and batch calls (packed or per-item) for Zipf-distributed users. Every vector that comes back is
compared with the vector this process computed itself with onnxruntime for the model version the
answer claims (`Truth`); the embedding version the answer names must hold that model version.
A mismatch is a wrong vector: counted, kept with its details, and a failed run.
"""

from __future__ import annotations

import asyncio
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from embed_server._proto import embedding_service_pb2 as pb
from embed_server._proto import embedding_service_pb2_grpc as pb_grpc
from embed_server.version_policy import online_version

STORED, MISS, BATCH = "stored", "miss", "batch"
KINDS = (STORED, MISS, BATCH)
OK = grpc.StatusCode.OK.value[0]
CODE_NAMES = {c.value[0]: c.name for c in grpc.StatusCode}
# A vector matches when max|got - want| <= TOLERANCE * max(1, max|want|): onnxruntime's sums
# differ by ~1e-7 between batch sizes; a vector of another model version is off by ~1.
TOLERANCE = 1e-4
KEPT_WRONG = 20  # wrong answers kept in full in the report


@dataclass(frozen=True)
class TrafficConfig:
    users: int
    concurrency: int = 8
    batch_ids: int = 16
    zipf_a: float = 1.2
    mix: tuple[float, float, float] = (0.6, 0.15, 0.25)  # stored, miss, batch shares of calls
    deadline_s: float = 5.0
    backoff_s: float = 0.05  # a caller waits this long after a failed call, as clients retry
    seed: int = 0


class Truth:
    """What the benchmark knows without asking the server: each good model version's vectors
    of every user, and the model version behind each embedding version."""

    def __init__(self) -> None:
        self.vectors: dict[str, np.ndarray] = {}  # model version -> (users, D)
        self.ev_model: dict[str, str] = {}  # embedding version -> model version

    def add_model(self, version: str, vectors: np.ndarray) -> None:
        self.vectors[version] = vectors
        self.ev_model[online_version(version)] = version  # the server's own write-back version

    def add_embedding_version(self, ev: str, model_version: str) -> None:
        self.ev_model[ev] = model_version


@dataclass
class Checker:
    """Checks each answer's vector at once; the embedding version -> model version claims are
    checked in `finish`, once every refresh has reported the version it wrote."""

    truth: Truth
    checked: int = 0
    wrong: int = 0
    wrong_kept: list[dict[str, Any]] = field(default_factory=list)
    claims: Counter[tuple[str, str]] = field(default_factory=Counter)
    first_seen: dict[str, float] = field(default_factory=dict)  # model / embedding version -> t

    def check(self, t: float, user: str, vector: np.ndarray, mv: str, ev: str, kind: str) -> None:
        self.checked += 1
        self.claims[ev, mv] += 1
        self.first_seen.setdefault(mv, t)
        self.first_seen.setdefault(ev, t)
        want = self.truth.vectors.get(mv)
        if want is None:
            self._wrong(t, user, mv, ev, kind, "model version not published as a good one")
            return
        expected = want[int(user)]
        diff = float(np.max(np.abs(vector - expected))) if vector.shape == expected.shape else None
        if diff is None or diff > TOLERANCE * max(1.0, float(np.max(np.abs(expected)))):
            self._wrong(t, user, mv, ev, kind, f"max abs diff {diff} (shape {vector.shape})")

    def _wrong(self, t: float, user: str, mv: str, ev: str, kind: str, why: str) -> None:
        self.wrong += 1
        if len(self.wrong_kept) < KEPT_WRONG:
            self.wrong_kept.append(
                {"t": round(t, 3), "user": user, "model_version": mv, "ev": ev, "kind": kind,
                 "why": why}
            )  # fmt: skip

    def finish(self) -> None:
        """Answers whose embedding version holds another (or an unknown) model version (those
        naming an unknown model version are counted already)."""
        for (ev, mv), n in self.claims.items():
            holds = self.truth.ev_model.get(ev)
            if holds != mv and mv in self.truth.vectors:
                self.wrong += n
                if len(self.wrong_kept) < KEPT_WRONG:
                    self.wrong_kept.append(
                        {"ev": ev, "model_version": mv, "answers": n,
                         "why": f"embedding version holds {holds or 'an unknown model version'}"}
                    )  # fmt: skip


@dataclass
class Calls:
    """One row per call in typed arrays (8 bytes a float: a 10-minute run makes millions of
    rows), plus the failed batch items."""

    t: array[float] = field(default_factory=lambda: array("d"))  # end, s since the start
    latency: array[float] = field(default_factory=lambda: array("d"))
    kind: array[int] = field(default_factory=lambda: array("b"))  # index into KINDS
    code: array[int] = field(default_factory=lambda: array("b"))  # grpc status code number
    item_t: array[float] = field(default_factory=lambda: array("d"))
    item_code: array[int] = field(default_factory=lambda: array("b"))

    def add(self, t: float, latency: float, kind: str, code: int) -> None:
        self.t.append(t)
        self.latency.append(latency)
        self.kind.append(KINDS.index(kind))
        self.code.append(code)


class Users:
    """Zipf-distributed user ids: a few users take most calls (like real traffic), which ones
    is a fixed random permutation."""

    def __init__(self, users: int, a: float, seed: int) -> None:
        self.n, self.a = users, a
        self.perm = np.random.default_rng(seed).permutation(users)

    def sample(self, rng: np.random.Generator, k: int) -> list[str]:
        z = rng.zipf(self.a, size=k)
        return [str(u) for u in self.perm[(z - 1) % self.n]]


class Traffic:
    """`concurrency` callers, each sending one call at a time until `stop` is set."""

    def __init__(self, cfg: TrafficConfig, target: str, checker: Checker, t0: float) -> None:
        self.cfg, self.checker, self.t0 = cfg, checker, t0
        # a connection per caller (no shared subchannel): with several server processes on
        # the port, the kernel spreads connections, so every process gets traffic
        self.channels = [
            grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(cfg.concurrency)
        ]
        self.stubs = [pb_grpc.UserEmbeddingServiceStub(c) for c in self.channels]
        self.users = Users(cfg.users, cfg.zipf_a, cfg.seed)
        self.calls = Calls()
        self.stop = asyncio.Event()

    def now(self) -> float:
        return time.monotonic() - self.t0

    async def run(self) -> None:
        await asyncio.gather(*(self._caller(i) for i in range(self.cfg.concurrency)))

    async def close(self) -> None:
        for c in self.channels:
            await c.close()

    async def _caller(self, i: int) -> None:
        rng = np.random.default_rng([self.cfg.seed, i])
        while not self.stop.is_set():
            kind = KINDS[int(rng.choice(3, p=self.cfg.mix))]
            t = self.now()
            try:
                if kind == BATCH:
                    await self._batch(self.stubs[i], rng, t)
                else:
                    await self._single(self.stubs[i], rng, t, kind)
                code = OK
            except grpc.aio.AioRpcError as e:
                code = e.code().value[0]
            end = self.now()
            self.calls.add(end, end - t, kind, code)
            if code != OK:
                await asyncio.sleep(self.cfg.backoff_s)

    async def _single(self, stub: Any, rng: np.random.Generator, t: float, kind: str) -> None:
        (user,) = self.users.sample(rng, 1)
        prefer = pb.FORCE_RECOMPUTE if kind == MISS else pb.ACCEPT_STORED
        req = pb.GetUserEmbeddingRequest(user_id=user, prefer=prefer)
        e = (await stub.GetUserEmbedding(req, timeout=self.cfg.deadline_s)).embedding
        vector = np.asarray(e.vector, dtype=np.float32)
        self.checker.check(t, user, vector, e.model_version, e.embedding_version, kind)

    async def _batch(self, stub: Any, rng: np.random.Generator, t: float) -> None:
        ids = self.users.sample(rng, self.cfg.batch_ids)
        packed = bool(rng.random() < 0.5)
        req = pb.BatchGetUserEmbeddingsRequest(user_ids=ids, packed=packed)
        resp = await stub.BatchGetUserEmbeddings(req, timeout=self.cfg.deadline_s)
        if packed:
            p = resp.packed
            vectors = np.asarray(p.vectors, dtype=np.float32).reshape(len(ids), resp.dim)
            for i, user in enumerate(ids):
                if p.codes[i] == OK:
                    ev = p.embedding_versions[i]
                    self.checker.check(t, user, vectors[i], resp.model_version, ev, BATCH)
                else:
                    self._item_error(p.codes[i])
            return
        for user, item in zip(ids, resp.items, strict=True):
            if item.status.code == OK:
                e = item.embedding
                vector = np.asarray(e.vector, dtype=np.float32)
                self.checker.check(t, user, vector, e.model_version, e.embedding_version, BATCH)
            else:
                self._item_error(item.status.code)

    def _item_error(self, code: int) -> None:
        self.calls.item_t.append(self.now())
        self.calls.item_code.append(code)
