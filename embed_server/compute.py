"""The miss path: features -> encoder -> write-back, micro-batched per model.

Per model, up to `batch_size` users wait at most `batch_wait_ms`; then one feature read, one
encoder run and one pipelined write-back run in a worker thread (feature reads and onnxruntime
release the event loop; `compute_workers` batches run at once, so one batch's feature read
overlaps another's encoder run). A failed write-back (Redis unreachable, or an error reply:
OOM, READONLY, MISCONF, LOADING, WRONGTYPE on one key) is logged and counted, and the vectors
still return (degraded mode). An error reply to the batch's feature read is narrowed down to
the users it belongs to: they fail (RedisReplyError), the others of the micro-batch do not.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from embed_server.batching import MicroBatcher
from embed_server.embedding import COMPUTED, Embedding
from embed_server.errors import REDIS_ERRORS, RedisReplyError
from embed_server.metrics import ServerMetrics
from embed_server.model_manager import ServingModel
from embed_server.online_features import OnlineFeatureSource
from embed_server.settings import ServerSettings
from embed_server.version_policy import VersionPolicy
from userembed.errors import UserEmbedError, UserNotFoundError
from userembed.features import encode_inputs
from userembed.redis_urls import RedisClient
from userembed.vectors import VectorStore, now_ms

logger = logging.getLogger(__name__)

# one user to compute: (model version, embedding version written back to, user id)
ComputeItem = tuple[ServingModel, str, str]


class ComputePath:
    def __init__(
        self,
        settings: ServerSettings,
        features: OnlineFeatureSource,
        versions: VersionPolicy,
        client: RedisClient,
        metrics: ServerMetrics,
    ) -> None:
        self.settings = settings
        self.features = features
        self.versions = versions
        self._redis = client  # write-backs (blocking, in the compute threads)
        self.metrics = metrics
        self._pool = ThreadPoolExecutor(
            max_workers=settings.compute_workers, thread_name_prefix="compute"
        )
        self._batchers: dict[str, MicroBatcher[ComputeItem, Embedding]] = {}

    def submit(
        self, model: ServingModel, embedding_version: str, user_id: str, deadline: float | None
    ) -> Awaitable[Embedding]:
        return self._batcher(model.name).submit((model, embedding_version, user_id), deadline)

    def submit_many(
        self,
        model: ServingModel,
        embedding_version: str,
        user_ids: Sequence[str],
        deadline: float | None,
    ) -> list[asyncio.Future[Embedding]]:
        """Queue all or none (OverloadedError when the model's queue has no room for all)."""
        items = [(model, embedding_version, user_id) for user_id in user_ids]
        return self._batcher(model.name).submit_many(items, deadline)

    async def close(self) -> None:
        for batcher in self._batchers.values():
            await batcher.close()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _batcher(self, model: str) -> MicroBatcher[ComputeItem, Embedding]:
        batcher = self._batchers.get(model)
        if batcher is None:
            batcher = self._batchers[model] = MicroBatcher(
                f"compute-{model}",
                self._compute_batch,
                max_batch_size=self.settings.batch_size,
                max_wait_s=self.settings.batch_wait_ms / 1000.0,
                queue_size=self.settings.queue_size,
                workers=self.settings.compute_workers,
                on_batch=self.metrics.batch_size.labels("compute").observe,
            )
            batcher.start()
        return batcher

    async def _compute_batch(self, items: list[ComputeItem]) -> list[Embedding | BaseException]:
        out: list[Embedding | BaseException] = [None] * len(items)  # type: ignore[list-item]
        # normally one group: a hot reload or a pointer flip can mix versions in one batch
        groups: dict[tuple[str, str], list[int]] = {}
        for i, (model, embedding_version, _user_id) in enumerate(items):
            groups.setdefault((model.version, embedding_version), []).append(i)
        loop = asyncio.get_running_loop()
        for positions in groups.values():
            model, embedding_version, _ = items[positions[0]]
            user_ids = [items[i][2] for i in positions]
            try:
                results = await loop.run_in_executor(
                    self._pool, self._compute_sync, model, embedding_version, user_ids
                )
            except UserEmbedError as e:
                results = [e] * len(positions)
            for i, result in zip(positions, results, strict=True):
                out[i] = result
        return out

    def _compute_sync(
        self, model: ServingModel, embedding_version: str, user_ids: list[str]
    ) -> list[Embedding | BaseException]:
        """Blocking: one feature read, one encoder run and one pipelined write for the batch."""
        try:
            rows = self.features.fetch(user_ids, model.spec)
        except RedisReplyError:
            if len(user_ids) == 1:
                raise
            return self._compute_each(model, embedding_version, user_ids)
        out: list[Embedding | BaseException] = [
            UserNotFoundError(f"unknown user '{u}': not in the feature store") for u in user_ids
        ]
        found = [i for i, known in enumerate(rows.found) if known]
        if not found:
            return out
        columns = {name: [values[i] for i in found] for name, values in rows.columns.items()}
        vectors = model.encoder.run(encode_inputs(columns, model.spec, model.items))  # (n, D)
        computed_at_ms = now_ms()
        found_ids = [user_ids[i] for i in found]
        feature_ts_ms = [rows.feature_ts_ms[i] for i in found]
        self._write_back(
            model, embedding_version, found_ids, vectors, feature_ts_ms, computed_at_ms
        )
        for j, i in enumerate(found):
            out[i] = Embedding(
                user_id=user_ids[i],
                vector=vectors[j],
                model_name=model.name,
                model_version=model.version,
                embedding_version=embedding_version,
                computed_at_ms=computed_at_ms,
                feature_ts_ms=feature_ts_ms[j],
                source=COMPUTED,
            )
        return out

    def _compute_each(
        self, model: ServingModel, embedding_version: str, user_ids: list[str]
    ) -> list[Embedding | BaseException]:
        """One user at a time, after an error reply to the batch's feature read: only the users
        whose keys give it fail (rare: a key of the wrong type in the online store)."""
        out: list[Embedding | BaseException] = []
        for user_id in user_ids:
            try:
                out += self._compute_sync(model, embedding_version, [user_id])
            except UserEmbedError as e:
                out.append(e)
        return out

    def _write_back(
        self,
        model: ServingModel,
        embedding_version: str,
        user_ids: list[str],
        vectors: np.ndarray,  # (n, D)
        feature_ts_ms: list[int],
        computed_at_ms: int,
    ) -> None:
        """Degraded mode: a failed write-back is logged and counted (per user whose vector was
        not written), the vectors still return."""
        store = VectorStore(self._redis, model.name, ttl_s=self.settings.vector_ttl_s)
        try:
            self.versions.register_online(store, model.version, embedding_version)
            errors = store.write(
                embedding_version,
                user_ids,
                vectors,
                model.version,
                feature_ts_ms,
                computed_at_ms=computed_at_ms,
                raise_on_error=False,
            )
        except REDIS_ERRORS as e:  # unreachable, or an error reply before any vector was written
            failed, first = len(user_ids), e
        else:
            failures = [e for e in errors if e is not None]
            if not failures:
                return
            failed, first = len(failures), failures[0]
        self.metrics.writeback_failures.labels(model.name).inc(failed)
        logger.warning(
            "model %s: write-back of %d of %d vectors failed: %s: %s",
            model.name,
            failed,
            len(user_ids),
            type(first).__name__,
            first,
        )
