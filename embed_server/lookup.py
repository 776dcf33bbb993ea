"""The request path: stored vector when valid, otherwise features -> encoder -> write-back.

Which stored vectors are valid: only those computed by the loaded model version. The Redis
pointer `ue:{<model>}:current` names the embedding version readers follow; when that version was
made by the loaded model version (its `model_version` field), the server reads and writes back
there. Otherwise (no refresh yet for this model version, or a rollout in progress) the server
uses its own embedding version `online-<model_version>` (registered in the versions ZSET with
status "online"), so it never returns a vector of another model version. Each stored vector's
own `model_version` field is checked too.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import redis
import redis.asyncio as aioredis

from embed_server.batching import MicroBatcher
from embed_server.errors import REDIS_OUTAGE, as_unavailable
from embed_server.metrics import ServerMetrics
from embed_server.model_manager import ModelManager, ServingModel
from embed_server.online_features import OnlineFeatureSource
from embed_server.redis_reads import READ_SCRIPT, PipelinedRedis, ReadCoalescer
from embed_server.settings import ServerSettings
from userembed.errors import (
    BackendUnavailableError,
    InvalidInputError,
    OverloadedError,
    UserEmbedError,
    UserNotFoundError,
)
from userembed.features import encode_inputs
from userembed.vectors import (
    VECTOR_FIELDS,
    VectorKeys,
    VectorStore,
    decode_vector,
    now_ms,
)

logger = logging.getLogger(__name__)

STORED = "stored"
COMPUTED = "computed"
ONLINE_PREFIX = "online-"
STATUS_ONLINE = "online"


def online_version(model_version: str) -> str:
    return f"{ONLINE_PREFIX}{model_version}"


class Embedding(NamedTuple):
    """One user's vector and where it came from (a NamedTuple: built per user on hot paths)."""

    user_id: str
    vector: np.ndarray  # (D,) float32
    model_name: str
    model_version: str
    embedding_version: str
    computed_at_ms: int
    feature_ts_ms: int
    source: str  # STORED | COMPUTED


@dataclass
class BatchResult:
    """Per-id results of a batch call, column-wise in request order: the batch path fills and
    serialises lists, not one object per user (about 7 us per user before, most of a call).
    Where `errors[i]` is set the other columns hold placeholders."""

    model: ServingModel
    vectors: list[bytes]  # little-endian f32, 4 * dim bytes each (zeros where errors[i])
    errors: list[UserEmbedError | None]
    sources: list[str]
    embedding_versions: list[str]
    computed_at_ms: list[int]
    feature_ts_ms: list[int]

    @classmethod
    def empty(cls, model: ServingModel, n: int) -> BatchResult:
        return cls(model, [b""] * n, [None] * n, [""] * n, [""] * n, [0] * n, [0] * n)

    def set_error(self, i: int, e: UserEmbedError) -> None:
        self.errors[i] = e
        self.vectors[i] = bytes(4 * self.model.dim)

    def set_stored(self, i: int, ev: str, row: Sequence[Any]) -> None:
        """A plain f32 hit at i: `row` as read from Redis (VECTOR_FIELDS order)."""
        self.vectors[i] = row[0]
        self.sources[i] = STORED
        self.embedding_versions[i] = ev
        self.computed_at_ms[i] = int(row[3] or 0)
        self.feature_ts_ms[i] = int(row[4] or 0)

    def set_embedding(self, i: int, e: Embedding) -> None:
        self.vectors[i] = e.vector.astype("<f4", copy=False).tobytes()
        self.sources[i] = e.source
        self.embedding_versions[i] = e.embedding_version
        self.computed_at_ms[i] = e.computed_at_ms
        self.feature_ts_ms[i] = e.feature_ts_ms

    def embedding(self, i: int, user_id: str) -> Embedding:
        """Row i as an Embedding (the per-item response form)."""
        return Embedding(
            user_id=user_id,
            vector=np.frombuffer(self.vectors[i], dtype="<f4"),
            model_name=self.model.name,
            model_version=self.model.version,
            embedding_version=self.embedding_versions[i],
            computed_at_ms=self.computed_at_ms[i],
            feature_ts_ms=self.feature_ts_ms[i],
            source=self.sources[i],
        )


@dataclass(frozen=True)
class _Pointer:
    current: str | None  # the Redis pointer
    model_version: str  # the model version that made `current`


class EmbeddingLookup:
    def __init__(
        self,
        settings: ServerSettings,
        manager: ModelManager,
        features: OnlineFeatureSource,
        metrics: ServerMetrics,
    ) -> None:
        self.settings = settings
        self.manager = manager
        self.features = features
        self.metrics = metrics
        # Short socket timeouts: an unreachable Redis must become UNAVAILABLE within seconds.
        opts = {"socket_connect_timeout": 2.0, "socket_timeout": 5.0}
        self.redis = aioredis.from_url(settings.redis_url, **opts)
        self.redis_sync = redis.Redis.from_url(settings.redis_url, **opts)
        self._read_script = self.redis.register_script(READ_SCRIPT)
        # Stored reads (the hot path) go through a lean pipelined connection when the URL allows
        # it (redis_reads.py); otherwise, and on Redis Cluster, through redis.asyncio.
        self._fast: PipelinedRedis | None = None
        self._coalescer: ReadCoalescer | None = None
        if settings.redis_script_reads and PipelinedRedis.supports(settings.redis_url):
            self._fast = PipelinedRedis(settings.redis_url, 2.0, 5.0)
            self._coalescer = ReadCoalescer(
                self._fast,
                VECTOR_FIELDS,
                max_keys=max(settings.batch_size, 256),
                on_batch=self.metrics.batch_size.labels("stored_read").observe,
                hold_s=settings.read_hold_ms / 1000.0,
            )
        self._counters: dict[tuple[str, str], Any] = {}  # prometheus children, looked up once
        self._keys: dict[str, VectorKeys] = {}
        self._pointers: dict[str, _Pointer] = {}
        self._registered: set[tuple[str, str]] = set()
        # Compute batches run here: feature reads and onnxruntime release the event loop.
        self._pool = ThreadPoolExecutor(
            max_workers=settings.compute_workers, thread_name_prefix="compute"
        )
        self._stored = MicroBatcher[tuple[str, str, str], Any](
            "stored-read",
            self._read_stored_batch,
            max_batch_size=max(settings.batch_size, 256),
            max_wait_s=0.0,  # adaptive: take what is queued, never wait for more
            queue_size=settings.queue_size,
            workers=2,
            on_batch=self.metrics.batch_size.labels("stored_read").observe,
        )
        self._compute: dict[str, MicroBatcher[tuple[ServingModel, str, str], Embedding]] = {}

    async def start(self) -> None:
        if self._coalescer is None:
            self._stored.start()

    async def close(self) -> None:
        await self._stored.close()
        for b in self._compute.values():
            await b.close()
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._fast is not None:
            self._fast.close()
        await self.redis.aclose()
        self.redis_sync.close()

    # -- embedding versions ------------------------------------------------------------------
    def keys(self, model: str) -> VectorKeys:
        k = self._keys.get(model)
        if k is None:
            k = self._keys[model] = VectorKeys(model)
        return k

    def serving_version(self, model: ServingModel) -> str:
        p = self._pointers.get(model.name)
        if p is not None and p.current and p.model_version == model.version:
            return p.current
        return online_version(model.version)

    def pointer(self, model: str) -> str | None:
        p = self._pointers.get(model)
        return p.current if p else None

    async def refresh_pointers(self) -> None:
        """Follow each model's Redis pointer (polled; a flip is seen within one interval)."""
        for name in self.manager.models:
            k = self.keys(name)
            try:
                cur = await self.redis.get(k.current)
                mv = await self.redis.hget(k.meta(cur.decode()), "model_version") if cur else None  # type: ignore[misc]
            except REDIS_OUTAGE as e:
                logger.warning("model %s: cannot read the vector pointer: %s", name, e)
                continue
            new = _Pointer(cur.decode() if cur else None, mv.decode() if mv else "")
            if self._pointers.get(name) != new:
                logger.info(
                    "model %s: vector pointer -> %s (by %s)", name, new.current, new.model_version
                )
            self._pointers[name] = new

    # -- stored reads ------------------------------------------------------------------------
    async def _read_stored(self, model: str, ev: str, user_ids: Sequence[str]) -> list[Any]:
        """Raw [vector, dtype, model_version, computed_at, feature_ts] per user (VECTOR_FIELDS;
        vector None: no stored vector)."""
        names = self.keys(model).vector_keys(ev, user_ids)
        try:
            if self._coalescer is not None:
                return await self._coalescer.read_many(names)
            if self.settings.redis_script_reads:
                return list(await self._read_script(keys=names, args=VECTOR_FIELDS))
            async with self.redis.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.hmget(name.decode(), list(VECTOR_FIELDS))
                return list(await pipe.execute())
        except REDIS_OUTAGE as e:
            raise as_unavailable("redis", e) from e

    async def _read_stored_batch(self, items: list[tuple[str, str, str]]) -> list[Any]:
        out: list[Any] = [None] * len(items)
        groups: dict[tuple[str, str], list[int]] = {}
        for i, (model, ev, _uid) in enumerate(items):
            groups.setdefault((model, ev), []).append(i)
        for (model, ev), idx in groups.items():
            try:
                got = await self._read_stored(model, ev, [items[i][2] for i in idx])
            except BackendUnavailableError as e:
                for i in idx:
                    out[i] = e
                continue
            for i, row in zip(idx, got, strict=True):
                out[i] = row
        return out

    @staticmethod
    def _stored_embedding(
        model: ServingModel, ev: str, uid: str, row: Sequence[bytes | None]
    ) -> Embedding | None:
        """A stored row -> Embedding when it was made by the loaded model version (else None).
        Hot path: checks the raw bytes, decodes f32 without a copy."""
        vec, dt, mv, at, fts = row
        if vec is None or mv != model.version_bytes:
            return None
        if dt is None or dt == b"f32":
            if len(vec) != 4 * model.dim:
                return None
            vector = np.frombuffer(vec, dtype="<f4")
        else:
            vector = decode_vector(vec, dt.decode())
            if vector.shape != (model.dim,):
                return None
        return Embedding(
            user_id=uid,
            vector=vector,
            model_name=model.name,
            model_version=model.version,
            embedding_version=ev,
            computed_at_ms=int(at or 0),
            feature_ts_ms=int(fts or 0),
            source=STORED,
        )

    # -- compute path ------------------------------------------------------------------------
    def _compute_batcher(
        self, model: str
    ) -> MicroBatcher[tuple[ServingModel, str, str], Embedding]:
        b = self._compute.get(model)
        if b is None:
            b = self._compute[model] = MicroBatcher(
                f"compute-{model}",
                self._compute_batch,
                max_batch_size=self.settings.batch_size,
                max_wait_s=self.settings.batch_wait_ms / 1000.0,
                queue_size=self.settings.queue_size,
                workers=self.settings.compute_workers,
                on_batch=self.metrics.batch_size.labels("compute").observe,
            )
            b.start()
        return b

    async def _compute_batch(
        self, items: list[tuple[ServingModel, str, str]]
    ) -> list[Embedding | BaseException]:
        out: list[Embedding | BaseException] = [None] * len(items)  # type: ignore[list-item]
        groups: dict[tuple[str, str], list[int]] = {}  # normally one: (model version, ev)
        for i, (m, ev, _uid) in enumerate(items):
            groups.setdefault((m.version, ev), []).append(i)
        loop = asyncio.get_running_loop()
        for idx in groups.values():
            model, ev = items[idx[0]][0], items[idx[0]][1]
            uids = [items[i][2] for i in idx]
            try:
                got = await loop.run_in_executor(self._pool, self._compute_sync, model, ev, uids)
            except UserEmbedError as e:
                got = [e] * len(idx)
            for i, r in zip(idx, got, strict=True):
                out[i] = r
        return out

    def _compute_sync(
        self, model: ServingModel, ev: str, uids: list[str]
    ) -> list[Embedding | BaseException]:
        """Blocking: one Feast read, one encoder run and one pipelined write for the batch."""
        rows = self.features.fetch(uids, model.spec)
        out: list[Embedding | BaseException] = [
            UserNotFoundError(f"unknown user '{u}': not in the feature store") for u in uids
        ]
        found = [i for i, f in enumerate(rows.found) if f]
        if not found:
            return out
        cols = {k: [v[i] for i in found] for k, v in rows.columns.items()}
        vectors = model.encoder.run(encode_inputs(cols, model.spec))  # (n, D)
        at = now_ms()
        ids = [uids[i] for i in found]
        fts = [rows.feature_ts_ms[i] for i in found]
        self._write_back(model, ev, ids, vectors, fts, at)
        for j, i in enumerate(found):
            out[i] = Embedding(
                user_id=uids[i],
                vector=vectors[j],
                model_name=model.name,
                model_version=model.version,
                embedding_version=ev,
                computed_at_ms=at,
                feature_ts_ms=fts[j],
                source=COMPUTED,
            )
        return out

    def _write_back(
        self,
        model: ServingModel,
        ev: str,
        ids: list[str],
        vectors: np.ndarray,
        fts: list[int],
        at: int,
    ) -> None:
        """Degraded mode: a failed write-back is logged and counted, the vectors still return."""
        store = VectorStore(self.redis_sync, model.name, ttl_s=self.settings.vector_ttl_s)
        try:
            if ev.startswith(ONLINE_PREFIX) and (model.name, ev) not in self._registered:
                if store.version_info(ev) is None:
                    store.create_version(ev, model.version)
                    store.mark(ev, STATUS_ONLINE)
                self._registered.add((model.name, ev))
            store.write(ev, ids, vectors, model.version, fts, computed_at_ms=at)
        except REDIS_OUTAGE as e:
            self.metrics.writeback_failures.labels(model.name).inc(len(ids))
            logger.warning("model %s: write-back of %d vectors failed: %s", model.name, len(ids), e)

    # -- public ------------------------------------------------------------------------------
    def check_user_id(self, user_id: str) -> None:
        if not user_id:
            raise InvalidInputError("empty user id")
        if len(user_id) > self.settings.max_user_id_length:
            raise InvalidInputError(
                f"user id longer than {self.settings.max_user_id_length} characters"
            )
        self.features.check_user_id(user_id)

    async def get(
        self, model_name: str, user_id: str, force: bool, deadline: float | None
    ) -> Embedding:
        model = self.manager.get(model_name)
        self.check_user_id(user_id)
        ev = self.serving_version(model)
        if not force:
            if self._coalescer is not None:
                try:
                    key = self.keys(model.name).vector(ev, user_id).encode()
                    row = await self._coalescer.read(key)
                except REDIS_OUTAGE as e:
                    raise as_unavailable("redis", e) from e
            else:
                row = await self._stored.submit((model.name, ev, user_id), deadline)
            emb = self._stored_embedding(model, ev, user_id, row)
            if emb is not None:
                self._counter(model.name, STORED).inc()
                return emb
        emb = await self._compute_batcher(model.name).submit((model, ev, user_id), deadline)
        self._counter(model.name, COMPUTED).inc()
        return emb

    def _counter(self, model: str, source: str) -> Any:
        c = self._counters.get((model, source))
        if c is None:
            c = self._counters[model, source] = self.metrics.vectors.labels(model, source)
        return c

    async def get_many(
        self, model_name: str, user_ids: Sequence[str], force: bool, deadline: float | None
    ) -> BatchResult:
        """Per-id results; a Redis / feature store outage fails the whole call (UNAVAILABLE)."""
        model = self.manager.get(model_name)
        n = len(user_ids)
        if n > self.settings.max_batch_ids:
            raise InvalidInputError(f"{n} user ids; at most {self.settings.max_batch_ids} per call")
        ev = self.serving_version(model)
        result = BatchResult.empty(model, n)
        todo: list[int] = []
        for i, uid in enumerate(user_ids):
            try:
                self.check_user_id(uid)
                todo.append(i)
            except InvalidInputError as e:
                result.set_error(i, e)
        if not force and todo:
            todo = await self._fill_stored(result, ev, [user_ids[i] for i in todo], todo)
        if todo:
            await self._fill_computed(result, ev, user_ids, todo, deadline)
        return result

    async def _fill_stored(
        self, result: BatchResult, ev: str, ids: list[str], idx: list[int]
    ) -> list[int]:
        """Stored vectors into `result` at `idx` (column-wise); returns the indices missed."""
        model = result.model
        rows = await self._read_stored(model.name, ev, ids)
        vb, nbytes = model.version_bytes, 4 * model.dim
        # A row is a plain hit when written by this model version in f32 (the default layout).
        plain = [
            r[0] is not None and r[2] == vb and len(r[0]) == nbytes and r[1] in (None, b"f32")
            for r in rows
        ]
        misses: list[int] = []
        if all(plain) and len(idx) == len(result.vectors):  # the common case: all stored
            result.vectors[:] = [r[0] for r in rows]
            result.sources[:] = [STORED] * len(rows)
            result.embedding_versions[:] = [ev] * len(rows)
            result.computed_at_ms[:] = [int(r[3] or 0) for r in rows]
            result.feature_ts_ms[:] = [int(r[4] or 0) for r in rows]
        else:
            for i, uid, row, ok in zip(idx, ids, rows, plain, strict=True):
                if ok:
                    result.set_stored(i, ev, row)
                    continue
                emb = self._stored_embedding(model, ev, uid, row)  # other encodings (f16)
                if emb is None:
                    misses.append(i)
                else:
                    result.set_embedding(i, emb)
        self._counter(model.name, STORED).inc(len(idx) - len(misses))
        return misses

    async def _fill_computed(
        self,
        result: BatchResult,
        ev: str,
        user_ids: Sequence[str],
        todo: list[int],
        deadline: float | None,
    ) -> None:
        model = result.model
        try:
            futures = self._compute_batcher(model.name).submit_many(
                [(model, ev, user_ids[i]) for i in todo], deadline
            )
        except OverloadedError as e:
            for i in todo:
                result.set_error(i, e)
            return
        results = await asyncio.gather(*futures, return_exceptions=True)
        n_ok = 0
        for i, r in zip(todo, results, strict=True):
            if isinstance(r, Embedding):
                result.set_embedding(i, r)
                n_ok += 1
            elif isinstance(r, BackendUnavailableError):
                raise r
            elif isinstance(r, UserEmbedError):
                result.set_error(i, r)
            else:
                raise r
        self._counter(model.name, COMPUTED).inc(n_ok)
