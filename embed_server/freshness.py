"""Serve-stale-while-refreshing: stored vectors older than behaviour pushed since
(docs/freshness.md).

A push (userembed/freshness.py) leaves a per-user marker, the newest pushed event; the stored
read fetches it with the vector (stored_reader.stale_since). A stale vector is served at once and
recomputed in the background through the miss path (compute.py), whose write-back stores the
fresh vector and its newer feature_ts; the next read finds it. Past `max_stale_s` since the
newest pushed event, the read recomputes inline instead. One background recompute per user at a
time; at most `stale_refresh_queue` at once per worker, past it a stale user waits for its next
read (counted as dropped).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from embed_server.compute import ComputePath
from embed_server.metrics import ServerMetrics
from embed_server.model_manager import ServingModel
from embed_server.settings import ServerSettings
from userembed.errors import UserEmbedError

logger = logging.getLogger(__name__)

OK, FAILED, DROPPED = "ok", "failed", "dropped"  # background recompute outcomes (metric label)
BULK = 16  # served vectors from which a batch's ages update the histogram's buckets at once


class Freshness:
    def __init__(
        self, settings: ServerSettings, compute: ComputePath, metrics: ServerMetrics
    ) -> None:
        self.compute = compute
        self.metrics = metrics
        self.max_stale_ms = int(settings.max_stale_s * 1000)
        self.queue = settings.stale_refresh_queue
        self._pending: set[tuple[str, str, str]] = set()  # (model, embedding version, user)
        self._tasks: set[asyncio.Task[None]] = set()
        self._ages: dict[str, Any] = {}  # prometheus children, looked up once

    def observe_age(self, model: str, feature_ts_ms: Sequence[int]) -> None:
        """Vector age at serve time (now - feature_ts) of stored vectors served (0: unknown)."""
        child = self._ages.get(model)
        if child is None:
            child = self._ages[model] = self.metrics.vector_age.labels(model)
        now = time.time()
        if len(feature_ts_ms) < BULK:
            for ts in feature_ts_ms:
                if ts:
                    child.observe(max(now - ts / 1000.0, 0.0))
            return
        # a batch call: one bucket update per bucket, not one locked observe per user
        # (prometheus_client's Histogram has no bulk observe; these are its own fields)
        stamps = np.asarray(feature_ts_ms, dtype=np.int64)
        ages = np.maximum(now - stamps[stamps > 0] / 1000.0, 0.0)
        counts = np.bincount(
            np.searchsorted(child._upper_bounds, ages, side="left"),
            minlength=len(child._upper_bounds),
        )
        for bucket, n in zip(child._buckets, counts.tolist(), strict=True):
            if n:
                bucket.inc(n)
        child._sum.inc(float(ages.sum()))

    def serve_stale(
        self, model: ServingModel, embedding_version: str, user_id: str, pushed_ms: int
    ) -> bool:
        """A stale stored vector (newest pushed event `pushed_ms`): True to serve it (a
        background recompute is queued), False to recompute inline (past `max_stale_s`)."""
        if self.max_stale_ms and time.time() * 1000 - pushed_ms > self.max_stale_ms:
            return False
        self.metrics.stale_served.labels(model.name).inc()
        self._schedule(model, embedding_version, user_id)
        return True

    def _schedule(self, model: ServingModel, embedding_version: str, user_id: str) -> None:
        key = (model.name, embedding_version, user_id)
        if key in self._pending:
            return  # one recompute per user at a time: it stores what the next read wants
        if len(self._pending) >= self.queue:
            self.metrics.background_recomputes.labels(model.name, DROPPED).inc()
            return
        self._pending.add(key)
        task = asyncio.create_task(self._recompute(model, embedding_version, user_id, key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _recompute(
        self,
        model: ServingModel,
        embedding_version: str,
        user_id: str,
        key: tuple[str, str, str],
    ) -> None:
        outcome = FAILED
        try:
            # the miss path: micro-batched with other misses, written back (feature_ts updated)
            await self.compute.submit(model, embedding_version, user_id, None)
            outcome = OK
        except UserEmbedError as e:  # unknown user, overload, outage: the next read retries
            logger.warning("background recompute of user %s failed: %s", user_id, e)
        finally:
            self._pending.discard(key)
            self.metrics.background_recomputes.labels(model.name, outcome).inc()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
