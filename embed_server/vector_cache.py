"""Stored vectors kept in the worker's memory, keyed by (model, model version, embedding version,
user): a hot user is answered without a Redis round trip.

No invalidation on a pointer flip or a model swap: both change the key, and a vector stored under
an embedding version never changes, except by a forced recompute, which drops the entry
(`drop`) after its write-back. A read that was in flight across such a drop may carry the old
value; `fill` refuses every value read before the latest drop (`epoch`), so the cache holds only
what Redis held after the last forced recompute this worker made. Other workers and replicas
hear of it on a Redis pub/sub channel (`DropBroadcast`) and drop their entry too; a worker that
lost its subscription clears its whole cache when it subscribes again.

Bounded by bytes (vector bytes plus an estimated per-entry overhead). Eviction is LRU; admission
is TinyLFU: a new vector enters a full cache only when a small count-min sketch of recent
lookups says its user is asked for more often than the entry it would evict, so a Zipf tail of
one-off users does not flush the hot ones (BENCHMARKS.md, serving: hit ratio with and without).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from embed_server.metrics import ServerMetrics
from embed_server.stored_reader import StoredRow
from userembed.vectors import CACHE_DROP_CHANNEL

logger = logging.getLogger(__name__)

# pub/sub channel of forced recomputes: model version, then the vector keys, NUL separated; an
# empty first field: user ids whose behaviour was pushed (userembed/freshness.py)
DROP_CHANNEL = CACHE_DROP_CHANNEL
_SEP = b"\0"
RESUBSCRIBE_S = 1.0

ENTRY_OVERHEAD = 400  # bytes per entry beyond the vector: key tuple, row list, dict slot
SKETCH_ROWS = 4
_MASK64 = (1 << 64) - 1
# odd 64-bit multipliers: one independent-enough index per sketch row from one hash()
_SEEDS = (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93)


class FrequencySketch:
    """Count-min sketch of 8-bit counters; every counter is halved after `10 * width` lookups,
    so frequencies describe recent traffic (TinyLFU's reset)."""

    def __init__(self, width: int) -> None:
        self.bits = max(4, (width - 1).bit_length())
        self.width = 1 << self.bits
        self.table = bytearray(SKETCH_ROWS * self.width)
        self._shift = 64 - self.bits
        self._sample = 10 * self.width
        self._added = 0

    def _slots(self, key: Hashable) -> list[int]:
        h = hash(key) & _MASK64
        w, s = self.width, self._shift
        return [r * w + (((h * seed) & _MASK64) >> s) for r, seed in enumerate(_SEEDS)]

    def add(self, key: Hashable) -> None:
        t = self.table
        for i in self._slots(key):
            if t[i] < 255:
                t[i] += 1
        self._added += 1
        if self._added >= self._sample:
            view = np.frombuffer(self.table, dtype=np.uint8)
            view >>= 1  # in place, on the bytearray
            self._added //= 2

    def estimate(self, key: Hashable) -> int:
        t = self.table
        return min(t[i] for i in self._slots(key))


@dataclass(slots=True)
class CacheEntry:
    """A cached row, and the single-id reply built from it once (the servicer's, serialized)."""

    row: StoredRow
    reply: bytes | None = None


def _size(entry: CacheEntry) -> int:
    return len(entry.row[0] or b"") + len(entry.reply or b"") + ENTRY_OVERHEAD


class VectorCache:
    """key -> stored row (StoredRow: a plain f32 row the loaded model version made).

    `lookup` (the row) and `entry` (its CacheEntry) count every request (hit or miss) in the
    sketch; `fill(key, row, epoch)` offers a row read from Redis, with the `epoch` taken before
    the read began."""

    def __init__(self, max_bytes: int, metrics: ServerMetrics | None = None) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.epoch = 0  # bumped by every drop: fills of reads that began earlier are refused
        self._rows: OrderedDict[Hashable, CacheEntry] = OrderedDict()
        # about one counter per vector the cache could hold at 256 floats, at least 1024
        self.sketch = FrequencySketch(max(1024, max_bytes // (1024 + ENTRY_OVERHEAD)))
        m = metrics
        self._hits: Any = m.cache_lookups.labels("hit") if m else None
        self._misses: Any = m.cache_lookups.labels("miss") if m else None
        self._evictions: Any = m.cache_evictions if m else None
        self._rejections: Any = m.cache_rejections if m else None
        self._bytes_gauge: Any = m.cache_bytes if m else None

    def __len__(self) -> int:
        return len(self._rows)

    def lookup(self, key: Hashable) -> StoredRow | None:
        entry = self.entry(key)
        return None if entry is None else entry.row

    def entry(self, key: Hashable) -> CacheEntry | None:
        self.sketch.add(key)
        entry = self._rows.get(key)
        if entry is None:
            if self._misses is not None:
                self._misses.inc()
            return None
        self._rows.move_to_end(key)
        if self._hits is not None:
            self._hits.inc()
        return entry

    def fill(self, key: Hashable, row: StoredRow, epoch: int) -> bool:
        """Offer a row read from Redis; returns whether it is now cached."""
        if epoch != self.epoch or key in self._rows:
            return False  # a drop since the read began: the row may be the dropped value
        size = len(row[0] or b"") + ENTRY_OVERHEAD
        if size > self.max_bytes:
            return False
        rows = self._rows
        if self.bytes + size > self.max_bytes:
            # TinyLFU admission: only a user asked for more often than the LRU victim enters
            victim = next(iter(rows))
            if self.sketch.estimate(key) <= self.sketch.estimate(victim):
                if self._rejections is not None:
                    self._rejections.inc()
                return False
            self._evict(size)
        rows[key] = CacheEntry(row)
        self.bytes += size
        if self._bytes_gauge is not None:
            self._bytes_gauge.set(self.bytes)
        return True

    def set_reply(self, entry: CacheEntry, reply: bytes) -> None:
        """Keep the reply built from `entry`'s row with it, its bytes counted (the least
        recently used entries make room; a hit entry is the most recent, so it stays)."""
        size = len(reply)
        if entry.reply is not None or _size(entry) + size > self.max_bytes:
            return
        self._evict(size)
        entry.reply = reply
        self.bytes += size
        if self._bytes_gauge is not None:
            self._bytes_gauge.set(self.bytes)

    def _evict(self, size: int) -> None:
        """Evict least recently used entries until `size` more bytes fit."""
        rows = self._rows
        while rows and self.bytes + size > self.max_bytes:
            _, old = rows.popitem(last=False)
            self.bytes -= _size(old)
            if self._evictions is not None:
                self._evictions.inc()

    def clear(self) -> None:
        """Forget everything (drops may have been missed), refusing in-flight fills."""
        self.epoch += 1
        self._rows.clear()
        self.bytes = 0
        if self._bytes_gauge is not None:
            self._bytes_gauge.set(0)

    def drop(self, key: Hashable) -> None:
        """The stored value of `key` changed (a forced recompute wrote it back): forget it, and
        refuse the fills of every read that began before now."""
        self.epoch += 1
        old = self._rows.pop(key, None)
        if old is not None:
            self.bytes -= _size(old)
            if self._bytes_gauge is not None:
                self._bytes_gauge.set(self.bytes)


class DropBroadcast:
    """Forced recomputes told to every worker and replica: `publish` after a write-back; `run`
    (a task) drops the published keys from this worker's cache. Subscribing clears the cache
    first, so drops published while this worker was not listening cannot leave a stale entry."""

    def __init__(
        self,
        client: Any,
        cache: VectorCache,
        user_keys: Callable[[Sequence[str]], Sequence[Hashable]] | None = None,
    ) -> None:
        self._redis = client  # redis.asyncio.Redis (pub/sub)
        self.cache = cache
        self._user_keys = user_keys  # user ids -> this worker's cache keys of them (a push)
        # keys of the publishes asked for in this event-loop turn, by model version
        self._queued: dict[bytes, list[bytes]] = {}
        self._sent: asyncio.Future[None] | None = None  # done when they are published
        self._sending: set[asyncio.Task[None]] = set()  # sends in flight (tasks need a ref)

    async def publish(self, model_version: bytes, keys: Sequence[bytes]) -> None:
        """Publish after the write-back; returns once published (or failed: logged, never
        raised: the call already has its vector). The publishes of one event-loop turn go out
        as one message per model version: a micro-batch of forced single-id calls ends in one
        turn, so it costs one PUBLISH, not one per call."""
        self._queued.setdefault(model_version, []).extend(keys)
        sent = self._sent
        if sent is None:
            loop = asyncio.get_running_loop()
            sent = self._sent = loop.create_future()
            loop.call_soon(self._send_queued)
        await asyncio.shield(sent)  # one caller cancelled: the others' keys still go out

    def _send_queued(self) -> None:
        queued, sent = self._queued, self._sent
        self._queued, self._sent = {}, None
        if sent is not None:
            task = asyncio.get_running_loop().create_task(self._send(queued, sent))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send(self, queued: dict[bytes, list[bytes]], sent: asyncio.Future[None]) -> None:
        try:
            for model_version, keys in queued.items():
                try:
                    await self._redis.publish(DROP_CHANNEL, _SEP.join([model_version, *keys]))
                except Exception as e:  # the call already has its vector: log, never fail it
                    logger.warning(
                        "vector cache: could not publish %d dropped keys: %s", len(keys), e
                    )
        finally:
            if not sent.done():
                sent.set_result(None)

    def _apply(self, data: bytes) -> None:
        version, *keys = data.split(_SEP)
        if not version:  # pushed behaviour: every cached row of these users
            if self._user_keys is not None:
                for cache_key in self._user_keys([k.decode() for k in keys]):
                    self.cache.drop(cache_key)
            return
        for key in keys:
            self.cache.drop((version, key))

    async def run(self) -> None:
        lost = False  # warn once per outage, not once per retry
        while True:
            pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(DROP_CHANNEL)
                self.cache.clear()
                if lost:
                    logger.info("vector cache: drop subscription back (cache cleared)")
                    lost = False
                while True:
                    # a bounded wait: an idle subscription never hits the reply timeout
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if msg is not None and msg["type"] == "message":
                        self._apply(msg["data"])
            except asyncio.CancelledError:
                raise
            except Exception as e:  # Redis away: resubscribe (and clear) when it is back
                if not lost:
                    logger.warning("vector cache: drop subscription lost (%s); resubscribing", e)
                lost = True
                await asyncio.sleep(RESUBSCRIBE_S)
            finally:
                try:
                    await pubsub.aclose()
                except Exception:  # closing a broken connection: nothing left to do
                    logger.debug("vector cache: closing the subscription failed", exc_info=True)
