"""The compute step of a refresh: one part's users read, encoded and written to Redis, and the
local engine that runs the parts one after the other.

The same `PartWorker` runs in the local engine (`run_local`, one per process) and in each Ray
actor (refresh/ray_engine.py), so both engines write identical vectors. It holds one onnxruntime
session (userembed.onnx_encoder) and one Redis client (a cluster client for a `redis+cluster://`
URL). Writes are pipelined and overlap the next encoder batch (one writer thread: onnxruntime
releases the GIL while it computes); on Redis Cluster each write goes to its key's master.
"""

from __future__ import annotations

import logging
from collections.abc import Generator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import cast

import numpy as np
import pyarrow as pa
import redis

from refresh.checkpoint import PartResult
from refresh.source import FEATURE_TS, OfflineSource, Part
from userembed.features import encode_arrow
from userembed.ids import format_user_ids
from userembed.onnx_encoder import OnnxEncoder
from userembed.redis_urls import open_redis
from userembed.registry import Registry
from userembed.schema import USER_ID
from userembed.vectors import VectorStore, copy_vectors

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PartJob:
    """Everything a worker needs to compute parts of one run (picklable, for Ray actors)."""

    registry_root: str
    model: str
    model_version: str  # registry version id (exact, not an alias: every worker loads the same)
    embedding_version: str  # the version being built
    base_version: str | None  # incremental: copy unchanged users from here
    redis_url: str
    offline_dir: str
    part_rows: int
    batch_size: int
    intra_op_threads: int
    ttl_s: int | None


class PartWorker:
    """Computes parts of one run: one encoder session, one Redis connection, one writer thread."""

    def __init__(self, job: PartJob) -> None:
        self.job = job
        loaded = Registry(job.registry_root).load_verified(job.model, job.model_version)
        manifest = loaded.manifest
        self.spec = manifest.input_spec
        try:
            self.items = loaded.items()  # the model's item attribute map (None without one)
            self.encoder = OnnxEncoder(
                loaded.session_source(),
                manifest.vector.dim,
                job.intra_op_threads,
                name=manifest.ref,
                # spinning threads would take the cores from encode_arrow, the writer and Redis
                allow_spinning=False,
            )
        finally:
            loaded.release()  # the session holds the model now
        self.source = OfflineSource(job.offline_dir, self.spec)
        self.store = VectorStore(open_redis(job.redis_url), job.model, job.ttl_s)
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="refresh-write")

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        self.store.r.close()

    def process(self, part: Part) -> PartResult:
        """Compute (or, for unchanged users, copy) the part's vectors into the new version."""
        table = self.source.read_part(part, self.job.part_rows)
        user_ids = format_user_ids(table.column(USER_ID).to_numpy())  # the keys' spelling
        feature_ts = np.asarray(table.column(FEATURE_TS).to_numpy(), dtype=np.int64)
        compute = np.asarray(part.changed, dtype=bool).copy()
        copied = 0
        if self.job.base_version is not None and not compute.all():
            unchanged = np.nonzero(~compute)[0]
            had = copy_vectors(
                self.store,
                self.job.base_version,
                self.job.embedding_version,
                [user_ids[i] for i in unchanged],
            )
            missing = unchanged[~np.asarray(had, dtype=bool)]
            compute[missing] = True  # not in the base version: compute it after all
            copied = len(unchanged) - len(missing)
        else:
            compute[:] = True
        rows = np.nonzero(compute)[0]
        nonfinite = 0
        norms_min, norms_max = np.inf, 0.0
        pending: Future[list[redis.ResponseError | None]] | None = None
        for a in range(0, len(rows), self.job.batch_size):
            idx = rows[a : a + self.job.batch_size]
            if idx[-1] - idx[0] == len(idx) - 1:  # contiguous rows (a full refresh): no copy
                batch = table.slice(int(idx[0]), len(idx))
            else:
                batch = table.take(pa.array(idx))
            vectors = self.encoder.run(encode_arrow(batch, self.spec, self.items))  # (B, D)
            finite = np.isfinite(vectors).all(axis=1)
            nonfinite += int((~finite).sum())
            if finite.any():
                norms = np.linalg.norm(vectors[finite], axis=1)
                norms_min = min(norms_min, float(norms.min()))
                norms_max = max(norms_max, float(norms.max()))
            if pending is not None:
                pending.result()
            pending = self._writer.submit(
                self.store.write,
                self.job.embedding_version,
                [user_ids[i] for i in idx],
                vectors,
                self.job.model_version,
                cast(Sequence[int], feature_ts[idx]),
            )
        if pending is not None:
            pending.result()
        return PartResult(
            part_id=part.id,
            users=len(rows) + copied,
            computed=len(rows),
            copied=copied,
            nonfinite=nonfinite,
            min_norm=float(norms_min) if np.isfinite(norms_min) else 0.0,
            max_norm=float(norms_max),
            max_feature_ts_ms=int(feature_ts.max()) if len(feature_ts) else 0,
        )


def run_local(job: PartJob, parts: Sequence[Part]) -> Generator[PartResult, None, None]:
    """The default engine: one process, one PartWorker, parts in file order (memory bounded by
    one part; the source reads each row group once)."""
    worker = PartWorker(job)
    try:
        for part in parts:
            yield worker.process(part)
    finally:
        worker.close()
