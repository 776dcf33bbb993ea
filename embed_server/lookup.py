"""The request path: the stored vector when valid, otherwise features -> encoder -> write-back.

`EmbeddingLookup` validates the request, asks the version policy (version_policy.py) which model
and embedding version answer, reads through the worker's vector cache (vector_cache.py, when on)
and the one stored reader (stored_reader.py) and sends the misses to the compute path
(compute.py). A stored vector older than behaviour pushed since is served and recomputed in the
background, or recomputed inline past `max_stale_s` (freshness.py); stale rows are never cached.
Single calls return an `Embedding`; batch calls a column-wise `BatchResult`. A forgotten user
(userembed/forget.py, read at each poll) is NOT_FOUND before any of that: no cached, stored or
computed vector.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from embed_server.compute import ComputePath
from embed_server.embedding import COMPUTED, STORED, Embedding
from embed_server.errors import REDIS_ERRORS, RedisReplyError, as_unavailable
from embed_server.freshness import Freshness
from embed_server.metrics import ServerMetrics
from embed_server.model_manager import ModelManager, ServingModel
from embed_server.online_features import OnlineFeatureSource
from embed_server.redis_reads import CONNECT_TIMEOUT_S, REPLY_TIMEOUT_S
from embed_server.settings import ServerSettings
from embed_server.stored_reader import (
    StoredRow,
    open_stored_reader,
    plain_hits,
    stale_since,
    stored_embedding,
)
from embed_server.vector_cache import CacheEntry, DropBroadcast, VectorCache
from embed_server.version_policy import VersionPolicy
from userembed.errors import (
    BackendUnavailableError,
    InvalidInputError,
    OverloadedError,
    UserEmbedError,
    UserNotFoundError,
)
from userembed.forget import read_forgotten
from userembed.ids import parse_user_id
from userembed.redis_urls import is_cluster, open_async_pubsub, open_async_redis, open_redis

logger = logging.getLogger(__name__)

# the stored reader's timeouts for the redis-py clients too (pointers, write-backs)
REDIS_TIMEOUTS = {"socket_connect_timeout": CONNECT_TIMEOUT_S, "socket_timeout": REPLY_TIMEOUT_S}


@dataclass
class BatchResult:
    """Per-id results of a batch call, column-wise in request order: the batch path fills and
    serialises lists, not one object per user (most of a call's cost otherwise).
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

    def set_error(self, i: int, error: UserEmbedError) -> None:
        self.errors[i] = error
        self.vectors[i] = bytes(4 * self.model.dim)

    def set_stored(self, i: int, embedding_version: str, row: StoredRow) -> None:
        """A plain f32 hit at i (stored_reader.plain_hits): the row's bytes as they are."""
        self.vectors[i] = row[0]  # type: ignore[assignment]  # a plain hit: not None
        self.sources[i] = STORED
        self.embedding_versions[i] = embedding_version
        self.computed_at_ms[i] = int(row[3] or 0)
        self.feature_ts_ms[i] = int(row[4] or 0)

    def set_all_stored(self, embedding_version: str, rows: Sequence[StoredRow]) -> None:
        """Every row a plain f32 hit: the columns in one pass each."""
        self.vectors[:] = [row[0] for row in rows]  # type: ignore[misc]  # plain hits: not None
        self.sources[:] = [STORED] * len(rows)
        self.embedding_versions[:] = [embedding_version] * len(rows)
        self.computed_at_ms[:] = [int(row[3] or 0) for row in rows]
        self.feature_ts_ms[:] = [int(row[4] or 0) for row in rows]

    def set_embedding(self, i: int, embedding: Embedding) -> None:
        self.vectors[i] = embedding.vector.astype("<f4", copy=False).tobytes()
        self.sources[i] = embedding.source
        self.embedding_versions[i] = embedding.embedding_version
        self.computed_at_ms[i] = embedding.computed_at_ms
        self.feature_ts_ms[i] = embedding.feature_ts_ms

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


@dataclass(slots=True)
class SingleRead:
    """A single-id read after `EmbeddingLookup.start_get`: what it reads, and the cache entry
    that answers it (None: `finish_get` reads Redis or computes)."""

    model: ServingModel
    embedding_version: str
    user_id: str
    key: bytes  # the vector's Redis key
    hit: CacheEntry | None


class EmbeddingLookup:
    def __init__(
        self,
        settings: ServerSettings,
        manager: ModelManager,
        features: OnlineFeatureSource,
        metrics: ServerMetrics,
    ) -> None:
        self.settings = settings
        self.features = features
        self.metrics = metrics
        # one server or a cluster, as the URL says (userembed/redis_urls.py)
        self.redis = open_async_redis(settings.redis_url, **REDIS_TIMEOUTS)
        self.redis_sync = open_redis(settings.redis_url, **REDIS_TIMEOUTS)
        self.versions = VersionPolicy(manager, self.redis)
        self.reader = open_stored_reader(
            settings, self.redis, on_batch=metrics.batch_size.labels("stored_read").observe
        )
        self.compute = ComputePath(settings, features, self.versions, self.redis_sync, metrics)
        self.freshness = Freshness(settings, self.compute, metrics)
        mb = settings.vector_cache_mb
        self.cache = VectorCache(int(mb * 2**20), metrics) if mb > 0 else None
        # forced recomputes reach the other workers' caches over pub/sub; on a cluster through
        # a plain client of the seed node (docs/serving.md, "Vector cache")
        self._pubsub_redis = (
            open_async_pubsub(settings.redis_url, **REDIS_TIMEOUTS)
            if self.cache is not None and is_cluster(settings.redis_url)
            else None
        )
        self.drops = (
            DropBroadcast(
                self._pubsub_redis or self.redis, self.cache, user_keys=self._cache_keys_of
            )
            if self.cache is not None
            else None
        )
        self._drops_task: asyncio.Task[None] | None = None
        self._counters: dict[tuple[str, str], Any] = {}  # prometheus children, looked up once
        # forgotten users (userembed/forget.py), read each poll: NOT_FOUND on every path
        self.forgotten: frozenset[str] = frozenset()

    async def start(self) -> None:
        self.reader.start()
        if self.drops is not None:
            self._drops_task = asyncio.create_task(self.drops.run(), name="vector-cache-drops")

    async def close(self) -> None:
        if self._drops_task is not None:
            self._drops_task.cancel()
            await asyncio.gather(self._drops_task, return_exceptions=True)
        await self.freshness.close()
        await self.reader.close()
        await self.compute.close()
        await self.redis.aclose()
        if self._pubsub_redis is not None:
            await self._pubsub_redis.aclose()
        self.redis_sync.close()

    def check_user_id(self, user_id: str) -> None:
        """Before any key is built: only the canonical spelling of an id (userembed.ids)."""
        if not user_id:
            raise InvalidInputError("empty user id")
        if len(user_id) > self.settings.max_user_id_length:
            raise InvalidInputError(
                f"user id longer than {self.settings.max_user_id_length} characters"
            )
        parse_user_id(user_id)

    async def refresh_forgotten(self) -> None:
        """Read the forgotten users (each poll) and drop the newly forgotten from the cache."""
        try:
            forgotten = await read_forgotten(self.redis)
        except REDIS_ERRORS as e:  # keep the last set read: a poll later reads it again
            logger.warning("cannot read the forgotten users: %s", e)
            return
        if forgotten == self.forgotten:
            return  # the same object stays: similar.py keys its per-index work on it
        new = sorted(forgotten - self.forgotten)
        self.forgotten = forgotten
        if new and self.cache is not None:
            for cache_key in self._cache_keys_of(new):
                self.cache.drop(cache_key)

    def _cache_keys_of(self, user_ids: Sequence[str]) -> list[tuple[bytes, bytes]]:
        """This worker's cache keys of these users: each served model's serving version."""
        out: list[tuple[bytes, bytes]] = []
        for name, model in self.versions.manager.models.items():
            ev = self.versions.serving_version(model)
            keys = self.versions.keys(name).vector_keys(ev, list(user_ids))
            out += [(model.version_bytes, key) for key in keys]
        return out

    def _refuse_forgotten(self, user_id: str) -> UserNotFoundError | None:
        if user_id in self.forgotten:
            return UserNotFoundError(f"unknown user '{user_id}': forgotten")
        return None

    def start_get(self, model_name: str, user_id: str, force: bool) -> SingleRead:
        """Validate a single-id read and look it up in the cache (not when forced), without
        awaiting anything: a hit is served (and counted) here, the rest by `finish_get`."""
        model, embedding_version = self.versions.resolve(model_name)
        self.check_user_id(user_id)
        if self.forgotten:
            forgotten = self._refuse_forgotten(user_id)
            if forgotten is not None:
                raise forgotten
        key = self.versions.keys(model.name).vector(embedding_version, user_id).encode()
        read = SingleRead(model, embedding_version, user_id, key, None)
        # the Redis key names model, embedding version and user; the loaded version completes it
        if not force and self.cache is not None:
            hit = read.hit = self.cache.entry((model.version_bytes, key))
            if hit is not None:  # a cached row is never stale, and the loaded version's
                self._counter(model.name, STORED).inc()
                self.freshness.observe_age(model.name, (int(hit.row[4] or 0),))
        return read

    def hit_embedding(self, read: SingleRead) -> Embedding:
        """The Embedding of a cache hit (`read.hit` set)."""
        row = read.hit.row  # type: ignore[union-attr]  # a hit
        embedding = stored_embedding(read.model, read.embedding_version, read.user_id, row)
        return embedding  # type: ignore[return-value]  # cached rows are plain: never None

    def keep_reply(self, hit: CacheEntry, reply: bytes) -> None:
        """Keep the serialized single-id reply of a cache hit with its entry."""
        if self.cache is not None:
            self.cache.set_reply(hit, reply)

    async def finish_get(self, read: SingleRead, force: bool, deadline: float | None) -> Embedding:
        """A single-id read the cache did not answer: Redis, then the compute path."""
        model, embedding_version, user_id, key = (
            read.model,
            read.embedding_version,
            read.user_id,
            read.key,
        )
        cache = self.cache
        cache_key = (model.version_bytes, key)
        if not force:
            epoch = cache.epoch if cache is not None else 0
            try:
                row = await self.reader.read(key, deadline)
            except REDIS_ERRORS as e:  # an error reply for this key too: UNAVAILABLE
                raise as_unavailable("redis", e) from e
            stale = stale_since(row)
            if cache is not None and not stale and plain_hits(model, (row,))[0]:
                cache.fill(cache_key, row, epoch)
            embedding = stored_embedding(model, embedding_version, user_id, row)
            if embedding is not None and (
                not stale or self.freshness.serve_stale(model, embedding_version, user_id, stale)
            ):
                self._counter(model.name, STORED).inc()
                self.freshness.observe_age(model.name, (embedding.feature_ts_ms,))
                return embedding
        try:
            embedding = await self.compute.submit(model, embedding_version, user_id, deadline)
        finally:
            if force and cache is not None:  # written back (or maybe): forget the old value
                cache.drop(cache_key)
                if self.drops is not None:
                    await self.drops.publish(model.version_bytes, [key])
        self._counter(model.name, COMPUTED).inc()
        return embedding

    async def get_many(
        self, model_name: str, user_ids: Sequence[str], force: bool, deadline: float | None
    ) -> BatchResult:
        """Per-id results; a Redis / feature store outage fails the whole call (UNAVAILABLE),
        an error reply for one user's key fails that id alone."""
        model, embedding_version = self.versions.resolve(model_name)
        n = len(user_ids)
        if n > self.settings.max_batch_ids:
            raise InvalidInputError(f"{n} user ids; at most {self.settings.max_batch_ids} per call")
        result = BatchResult.empty(model, n)
        todo: list[int] = []
        for i, user_id in enumerate(user_ids):
            try:
                self.check_user_id(user_id)
            except InvalidInputError as e:
                result.set_error(i, e)
                continue
            forgotten = self._refuse_forgotten(user_id) if self.forgotten else None
            if forgotten is not None:
                result.set_error(i, forgotten)
            else:
                todo.append(i)
        if not force and todo:
            todo = await self._fill_stored(result, embedding_version, user_ids, todo)
        if todo:
            try:
                await self._fill_computed(result, embedding_version, user_ids, todo, deadline)
            finally:
                if force:  # written back (or maybe): forget the old values
                    await self._drop_cached(model, embedding_version, [user_ids[i] for i in todo])
        return result

    def _counter(self, model: str, source: str) -> Any:
        counter = self._counters.get((model, source))
        if counter is None:
            counter = self._counters[model, source] = self.metrics.vectors.labels(model, source)
        return counter

    async def _fill_stored(
        self,
        result: BatchResult,
        embedding_version: str,
        user_ids: Sequence[str],
        todo: list[int],
    ) -> list[int]:
        """Stored vectors into `result` at the positions `todo`; returns the positions missed.
        A key Redis answered with an error reply fails its own id (RedisReplyError)."""
        model = result.model
        wanted = [user_ids[i] for i in todo]
        keys = self.versions.keys(model.name).vector_keys(embedding_version, wanted)
        try:
            rows = await self._read_many(model, keys)
        except REDIS_ERRORS as e:
            raise as_unavailable("redis", e) from e
        plain = plain_hits(model, rows)
        misses: list[int] = []
        failed = 0
        inline = self._stale_inline(model, embedding_version, wanted, rows)
        for j in inline:
            plain[j] = False
        if all(plain) and len(todo) == len(result.vectors):  # the common case: all stored
            result.set_all_stored(embedding_version, rows)
            self.freshness.observe_age(model.name, result.feature_ts_ms)
        else:
            for j, (i, user_id, row, is_plain) in enumerate(
                zip(todo, wanted, rows, plain, strict=True)
            ):
                if j in inline:  # stale past max_stale_s: recompute on this call
                    misses.append(i)
                    continue
                if is_plain:
                    result.set_stored(i, embedding_version, row)
                    continue
                if isinstance(row, Exception):  # an error reply for this key (WRONGTYPE, ...)
                    result.set_error(
                        i, RedisReplyError(f"user {user_id}: redis error reply: {row}")
                    )
                    failed += 1
                    continue
                # other encodings (f16), or a row the loaded model version did not make
                embedding = stored_embedding(model, embedding_version, user_id, row)
                if embedding is None:
                    misses.append(i)
                else:
                    result.set_embedding(i, embedding)
            missed = set(misses)
            served = [i for i in todo if i not in missed and not result.errors[i]]
            self.freshness.observe_age(model.name, [result.feature_ts_ms[i] for i in served])
        self._counter(model.name, STORED).inc(len(todo) - len(misses) - failed)
        return misses

    def _stale_inline(
        self,
        model: ServingModel,
        embedding_version: str,
        user_ids: Sequence[str],
        rows: Sequence[StoredRow],
    ) -> set[int]:
        """Rows stale since a push: served (a background recompute queued) or, past
        `max_stale_s`, returned here to recompute inline."""
        inline: set[int] = set()
        # rows with a marker are few: find them in one pass (the marker is the last field)
        marked = [j for j, row in enumerate(rows) if row.__class__ is list and row[-1] is not None]
        for j in marked:
            row = rows[j]
            if row[0] is None or row[2] != model.version_bytes:
                continue  # an error reply, no vector, another model version's: a miss anyway
            stale = stale_since(row)
            if stale and not self.freshness.serve_stale(
                model, embedding_version, user_ids[j], stale
            ):
                inline.add(j)
        return inline

    async def _read_many(self, model: ServingModel, keys: Sequence[bytes]) -> list[StoredRow]:
        """Stored rows of `keys`: cached ones from the cache, the others in one Redis read
        (which fills the cache with the plain rows among them)."""
        cache = self.cache
        if cache is None:
            return await self.reader.read_many(keys)
        cache_keys = [(model.version_bytes, k) for k in keys]
        rows: list[StoredRow | None] = [cache.lookup(k) for k in cache_keys]
        todo = [j for j, row in enumerate(rows) if row is None]
        if todo:
            epoch = cache.epoch
            read = await self.reader.read_many([keys[j] for j in todo])
            for j, row, plain in zip(todo, read, plain_hits(model, read), strict=True):
                rows[j] = row
                if plain and not stale_since(row):  # a stale row: read again until fresh
                    cache.fill(cache_keys[j], row, epoch)
        return rows  # type: ignore[return-value]  # every None replaced above

    async def _drop_cached(
        self, model: ServingModel, embedding_version: str, user_ids: list[str]
    ) -> None:
        """Forced recomputes wrote these users back: their cached rows are gone, here and in
        the other workers."""
        if self.cache is not None:
            keys = self.versions.keys(model.name).vector_keys(embedding_version, user_ids)
            for key in keys:
                self.cache.drop((model.version_bytes, key))
            if self.drops is not None:
                await self.drops.publish(model.version_bytes, keys)

    async def _fill_computed(
        self,
        result: BatchResult,
        embedding_version: str,
        user_ids: Sequence[str],
        todo: list[int],
        deadline: float | None,
    ) -> None:
        model = result.model
        wanted = [user_ids[i] for i in todo]
        try:
            futures = self.compute.submit_many(model, embedding_version, wanted, deadline)
        except OverloadedError as e:
            for i in todo:
                result.set_error(i, e)
            return
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
        computed = 0
        for i, outcome in zip(todo, outcomes, strict=True):
            if isinstance(outcome, Embedding):
                result.set_embedding(i, outcome)
                computed += 1
            elif isinstance(outcome, BackendUnavailableError):
                raise outcome
            elif isinstance(outcome, UserEmbedError):
                result.set_error(i, outcome)
            else:
                raise outcome
        self._counter(model.name, COMPUTED).inc(computed)
