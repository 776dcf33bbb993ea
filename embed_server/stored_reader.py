"""The stored read: vector hashes from Redis through one reader, chosen once when the server starts.

`open_stored_reader` picks it from the settings:
- `CoalescingReader`: on a single Redis whose URL the lean connection supports (the default),
  the pipelined connection and read coalescer of redis_reads.py; concurrent single reads share
  round trips.
- `ScriptReader` / `PipelineReader`: redis.asyncio, one Lua call per batch of keys
  (`redis_script_reads: 1`) or one pipelined HMGET per key (`redis_script_reads: 0`); single
  reads are micro-batched, taking what is queued and never waiting for more.
- On Redis Cluster (a `redis+cluster://` URL, userembed/redis_urls.py) always the
  `PipelineReader` over redis.asyncio's cluster client, whatever `redis_script_reads` says: a
  batch's keys span slots, so one script cannot read them; the cluster pipeline sends each HMGET
  to the master of its key's slot.

Every reader returns raw rows in VECTOR_FIELDS order, then the user's pushed-behaviour marker
(`pushed_ms`; docs/freshness.md), read in the same round trip (vector None: no stored vector),
and raises redis / OS errors on an outage or an error reply to the whole command; the caller
turns those into UNAVAILABLE. A key Redis answered with its own error reply (WRONGTYPE) is, in `read_many`,
that error in the key's place instead of a row, and, in `read`, raised to that caller alone.
`stored_embedding` and `plain_hits` say which rows the loaded model version made.
"""

from __future__ import annotations

import abc
import functools
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import numpy as np
import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

from embed_server.batching import MicroBatcher
from embed_server.embedding import STORED, Embedding
from embed_server.model_manager import ServingModel
from embed_server.redis_reads import READ_MARKED_SCRIPT, PipelinedRedis, ReadCoalescer
from embed_server.settings import ServerSettings
from userembed.errors import OverloadedError
from userembed.redis_urls import AsyncRedisClient, is_cluster
from userembed.vectors import VECTOR_FIELDS, decode_vector, pushed_key_of

# vector, dtype, model_version, computed_at, feature_ts, pushed marker: raw bytes as Redis
# returns them (a list)
StoredRow = Sequence[bytes | None]


def stale_since(row: StoredRow) -> int:
    """The newest pushed event (epoch ms) when it is newer than the row's feature_ts (a stale
    vector), else 0. Rows without a marker field (older callers, fakes) are never stale."""
    if len(row) < 6 or row[5] is None:
        return 0
    pushed = int(row[5])
    return pushed if pushed > int(row[4] or 0) else 0


class StoredReader(Protocol):
    def read(self, key: bytes, deadline: float | None) -> Awaitable[StoredRow]:
        """One vector hash: the single-id hot path."""
        ...

    async def read_many(self, keys: Sequence[bytes]) -> list[StoredRow]:
        """Many vector hashes in one round trip: the batch path. An error reply for one key
        (an Exception) stands in its row."""
        ...

    def start(self) -> None: ...

    async def close(self) -> None: ...


class CoalescingReader:
    """The lean pipelined connection; single reads go through the read coalescer. At most
    `queue_size` single reads wait for Redis (queued or in flight); past it OverloadedError
    (RESOURCE_EXHAUSTED), like the micro-batched readers' bounded queue."""

    def __init__(
        self,
        url: str,
        max_keys: int,
        hold_s: float,
        on_batch: Callable[[int], None],
        queue_size: int = 4096,
    ) -> None:
        self.connection = PipelinedRedis(url)
        self.coalescer = ReadCoalescer(
            self.connection,
            VECTOR_FIELDS,
            max_keys=max_keys,
            on_batch=on_batch,
            hold_s=hold_s,
            marker=pushed_key_of,
        )
        self.queue_size = queue_size
        self.pending = 0

    def read(self, key: bytes, deadline: float | None) -> Awaitable[StoredRow]:
        if self.pending >= self.queue_size:
            raise OverloadedError(
                f"stored-read: queue full ({self.pending}/{self.queue_size} pending)"
            )
        fut = self.coalescer.read(key)  # a future: no task, no extra coroutine
        self.pending += 1
        fut.add_done_callback(self._done)
        return fut

    def _done(self, _: object) -> None:
        self.pending -= 1

    async def read_many(self, keys: Sequence[bytes]) -> list[StoredRow]:
        return await self.coalescer.read_many(keys)

    def start(self) -> None:
        pass

    async def close(self) -> None:
        self.connection.close()


class _MicroBatchedReader(abc.ABC):
    """redis.asyncio reads; single reads are micro-batched into `read_many` calls."""

    def __init__(
        self,
        client: AsyncRedisClient,
        max_batch_size: int,
        queue_size: int,
        on_batch: Callable[[int], None],
    ) -> None:
        self._redis = client
        self._batcher = MicroBatcher[bytes, StoredRow](
            "stored-read",
            self.read_many,
            max_batch_size=max_batch_size,
            max_wait_s=0.0,  # adaptive: take what is queued, never wait for more
            queue_size=queue_size,
            workers=2,
            on_batch=on_batch,
        )

    def read(self, key: bytes, deadline: float | None) -> Awaitable[StoredRow]:
        return self._batcher.submit(key, deadline)

    @abc.abstractmethod
    async def read_many(self, keys: Sequence[bytes]) -> list[StoredRow]: ...

    def start(self) -> None:
        self._batcher.start()

    async def close(self) -> None:
        await self._batcher.close()


class ScriptReader(_MicroBatchedReader):
    """One `EVAL` of the read script per batch of keys (single Redis: keys span slots)."""

    @functools.cached_property
    def _script(self) -> AsyncScript:
        # a single server: open_stored_reader never gives a cluster client a script reader
        assert isinstance(self._redis, aioredis.Redis)
        return self._redis.register_script(READ_MARKED_SCRIPT)

    async def read_many(self, keys: Sequence[bytes]) -> list[StoredRow]:
        markers = [pushed_key_of(k) for k in keys]
        return list(await self._script(keys=[*keys, *markers], args=list(VECTOR_FIELDS)))


class PipelineReader(_MicroBatchedReader):
    """One pipelined HMGET per key, and a GET of its marker (on Redis Cluster, each sent to its
    slot's master; a key and its marker share one)."""

    async def read_many(self, keys: Sequence[bytes]) -> list[StoredRow]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hmget(key.decode(), list(VECTOR_FIELDS))
                pipe.get(pushed_key_of(key).decode())
            replies = await pipe.execute(raise_on_error=False)
        rows: list[StoredRow] = []
        for row, marker in zip(replies[::2], replies[1::2], strict=True):
            if isinstance(row, Exception):
                rows.append(row)  # type: ignore[arg-type]  # this key's error reply in its place
            else:  # a marker of the wrong type reads as none
                rows.append([*row, None if isinstance(marker, Exception) else marker])
        return rows


def open_stored_reader(
    settings: ServerSettings, client: AsyncRedisClient, on_batch: Callable[[int], None]
) -> StoredReader:
    """The reader for these settings. `client` serves the redis.asyncio readers; `on_batch`
    observes the size of each batch of single reads."""
    max_keys = max(settings.batch_size, 256)
    if is_cluster(settings.redis_url):  # no multi-key script across slots
        return PipelineReader(client, max_keys, settings.queue_size, on_batch)
    if settings.redis_script_reads and PipelinedRedis.supports(settings.redis_url):
        return CoalescingReader(
            settings.redis_url,
            max_keys,
            settings.read_hold_ms / 1000.0,
            on_batch,
            settings.queue_size,
        )
    if settings.redis_script_reads:
        return ScriptReader(client, max_keys, settings.queue_size, on_batch)
    return PipelineReader(client, max_keys, settings.queue_size, on_batch)


def plain_hits(model: ServingModel, rows: Sequence[StoredRow]) -> list[bool]:
    """Per row: made by the loaded model version in f32 (the default layout), so its vector
    bytes can be returned as they are. An error reply in a row's place is not."""
    version, size = model.version_bytes, 4 * model.dim
    # indexed, not unpacked: a batch has up to max_batch_ids rows (0 vector, 1 dtype, 2 made by)
    return [
        r.__class__ is list
        and r[0] is not None
        and r[2] == version
        and len(r[0]) == size
        and r[1] in (None, b"f32")
        for r in rows
    ]


def stored_embedding(
    model: ServingModel, embedding_version: str, user_id: str, row: StoredRow
) -> Embedding | None:
    """A stored row -> Embedding when the loaded model version made it (else None).
    Hot path: compares raw bytes, decodes f32 without a copy."""
    vector_bytes, dtype, made_by, computed_at, feature_ts = row[:5]
    if vector_bytes is None or made_by != model.version_bytes:
        return None
    if dtype is None or dtype == b"f32":
        if len(vector_bytes) != 4 * model.dim:
            return None
        vector = np.frombuffer(vector_bytes, dtype="<f4")
    else:
        vector = decode_vector(vector_bytes, dtype.decode())
        if vector.shape != (model.dim,):
            return None
    return Embedding(
        user_id=user_id,
        vector=vector,
        model_name=model.name,
        model_version=model.version,
        embedding_version=embedding_version,
        computed_at_ms=int(computed_at or 0),
        feature_ts_ms=int(feature_ts or 0),
        source=STORED,
    )
