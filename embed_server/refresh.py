"""The nightly batch refresh: plan, compute, validate, then switch readers to the new vectors.

    summary = refresh(RefreshConfig(model="supermoe"))          # userembed refresh
    rollback(store)                                             # userembed rollback

One run writes every user's vector into a NEW embedding version of the Redis layout
(userembed/vectors.py), id `<model version>.<UTC time>`, while readers keep following the
`current` pointer to the previous version. Parts (slices of the offline parquet file) are
checkpointed in the version's metadata: a killed run is resumed by the next one with the same
plan. Only when every part is done and the checks pass (count, NaN/inf, norms, read-back) is the
pointer flipped, atomically (`VectorStore.publish`); a failing run is marked `failed` and the
old version keeps serving. The last `keep` ready versions stay for `rollback`; older ones are
deleted. See docs/refresh.md.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import grpc
import redis

from embed_server.refresh_checkpoint import Checkpoint, PartResult, RunPlan, find_resumable
from embed_server.refresh_source import OfflineSource, Part
from embed_server.refresh_validate import (
    drift_report,
    norm_bounds,
    part_problems,
    sample_problems,
    total_problems,
)
from embed_server.refresh_worker import PartJob, PartWorker
from userembed import paths
from userembed.errors import DataNotFoundError, InvalidInputError, UserEmbedError
from userembed.registry import LATEST, Registry
from userembed.vectors import (
    STATUS_FAILED,
    STATUS_READY,
    EmbeddingVersion,
    VectorStore,
)

logger = logging.getLogger(__name__)

MODES = ("full", "incremental")
ENGINES = ("local", "ray")
DEFAULT_VECTOR_TTL_S = 14 * 24 * 3600  # outlives a week of failed nightly runs


class RefreshValidationError(UserEmbedError):
    """The new version failed a check; it is marked failed and readers were not switched."""

    grpc_status = grpc.StatusCode.FAILED_PRECONDITION


class NoVersionError(UserEmbedError):
    """No embedding version to roll back to (or the one named is not ready)."""

    grpc_status = grpc.StatusCode.FAILED_PRECONDITION


@dataclass(frozen=True)
class RefreshConfig:
    model: str = "supermoe"
    model_ref: str = LATEST  # registry alias or version id
    mode: str = "full"  # "incremental": only users with features newer than the last run
    engine: str = "local"  # "ray": Ray Data actor pool (embed_server/refresh_ray.py)
    ray_address: str | None = None  # None: start a local Ray instance
    ray_actors: int = 2
    batch_size: int = 1024  # users per encoder run
    part_rows: int = 50_000  # file rows per checkpointed part
    resume: bool = True  # continue a killed run with the same plan
    keep: int = 3  # ready versions kept for rollback
    min_norm: float | None = None  # default from the manifest (l2: 1 +- 1e-3)
    max_norm: float | None = None
    drift_sample: int = 1000  # users compared with the previous version (and read back)
    drift_k: int = 10
    intra_op_threads: int = 2  # onnxruntime threads (per Ray actor: 1)
    vector_ttl_s: int | None = DEFAULT_VECTOR_TTL_S
    progress_every_s: float = 10.0
    pause_between_parts_s: float = 0.0  # throttle: spare a shared Redis (and lets tests kill)
    registry_root: str = field(default_factory=paths.registry_root)
    redis_url: str = field(default_factory=paths.redis_url)
    offline_dir: str = field(default_factory=lambda: str(paths.offline_dir()))

    def __post_init__(self) -> None:
        problems = []
        if self.mode not in MODES:
            problems.append(f"mode must be one of {MODES}")
        if self.engine not in ENGINES:
            problems.append(f"engine must be one of {ENGINES}")
        if self.batch_size < 1 or self.part_rows < 1 or self.ray_actors < 1:
            problems.append("batch_size, part_rows and ray_actors must be >= 1")
        if self.keep < 1:
            problems.append("keep must be >= 1 (the serving version)")
        if problems:
            raise InvalidInputError("invalid refresh config: " + "; ".join(problems))


@dataclass(frozen=True)
class RefreshSummary:
    model: str
    model_version: str
    embedding_version: str
    previous_version: str | None
    mode: str
    engine: str
    users: int
    computed: int  # users whose vector was computed by this run (not resumed, not copied)
    copied: int  # unchanged users carried over (incremental)
    parts: int
    parts_resumed: int  # parts finished by an earlier, killed run and not recomputed
    seconds: float
    drift: dict[str, Any] | None
    deleted_versions: tuple[str, ...] = ()

    @property
    def users_per_s(self) -> float:
        return self.computed / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        d = self.drift or {}
        drift = ", ".join(f"{k}={d[k]}" for k in ("mean_cosine", "knn_overlap") if k in d)
        return (
            f"refreshed {self.model} -> {self.embedding_version}: {self.users} users "
            f"({self.computed} computed, {self.copied} copied, {self.parts_resumed}/{self.parts} "
            f"parts resumed) in {self.seconds:.1f}s, {self.users_per_s:.0f} users/s; "
            f"drift vs {self.previous_version or '-'}: {drift or '-'}"
        )


class Progress:
    """Logs users done / total, rate and ETA at most every `every_s` seconds."""

    def __init__(self, name: str, total: int, done: int, every_s: float) -> None:
        self.name, self.total, self.done, self.every_s = name, total, done, every_s
        self.start = self.last = time.monotonic()
        self.new = 0

    def add(self, n: int) -> None:
        self.done += n
        self.new += n
        now = time.monotonic()
        if now - self.last >= self.every_s or self.done >= self.total:
            self.last = now
            rate = self.new / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            logger.info(
                "%s: %d/%d users (%.1f%%), %.0f users/s, ETA %.0fs",
                self.name,
                self.done,
                self.total,
                100.0 * self.done / max(self.total, 1),
                rate,
                eta,
            )


def new_embedding_version(model_version: str, now: datetime | None = None) -> str:
    """`<model version>.<UTC time to the millisecond>`: sorts by model, then by time."""
    now = (now or datetime.now(UTC)).astimezone(UTC)
    return f"{model_version}.{now:%Y%m%dT%H%M%S}{now.microsecond // 1000:03d}Z"


Engine = Callable[[PartJob, Sequence[Part], RefreshConfig], Iterator[PartResult]]


def run_local(job: PartJob, parts: Sequence[Part], cfg: RefreshConfig) -> Iterator[PartResult]:
    """The default engine: one process, one onnxruntime session, parts in file order
    (memory bounded by one part)."""
    worker = PartWorker(job)
    try:
        for part in parts:
            yield worker.process(part)
    finally:
        worker.close()


def _engine(name: str) -> Engine:
    if name == "ray":
        from embed_server.refresh_ray import run_ray  # ray is imported only when asked for

        return run_ray
    return run_local


def _fail(store: VectorStore, ev: str, problems: list[str]) -> RefreshValidationError:
    note = "; ".join(problems)[:2000]
    store.mark(ev, STATUS_FAILED, note=note)
    logger.error("refresh %s failed validation, readers stay where they were: %s", ev, note)
    return RefreshValidationError(f"embedding version {ev} failed validation: {note}")


def refresh(cfg: RefreshConfig) -> RefreshSummary:
    """Build, validate and publish a new embedding version of `cfg.model` (see module doc)."""
    t0 = time.monotonic()
    registry = Registry(cfg.registry_root)
    version = registry.resolve(cfg.model, cfg.model_ref)
    manifest = registry.read_manifest(cfg.model, version)
    store = VectorStore(redis.Redis.from_url(cfg.redis_url), cfg.model, cfg.vector_ttl_s)
    prev_ev = store.current_version()
    prev = store.version_info(prev_ev) if prev_ev else None

    since_ms: int | None = None
    base_ev: str | None = None
    mode = cfg.mode
    if mode == "incremental":
        watermark = Checkpoint(store, prev_ev).get_field("watermark_ms") if prev_ev else None
        if prev is None or watermark is None:
            logger.warning("incremental refresh: no previous version with a watermark; full run")
            mode = "full"
        elif prev.model_version != version:
            logger.warning(
                "incremental refresh: model changed %s -> %s; every user is recomputed",
                prev.model_version,
                version,
            )
            mode = "full"
        else:
            since_ms, base_ev = int(watermark), prev_ev

    source = OfflineSource(cfg.offline_dir, manifest.input_spec)
    splan = source.plan(cfg.part_rows, since_ms)
    if splan.users == 0:
        raise DataNotFoundError(f"{source.behavior_path} holds no users")
    plan = RunPlan(
        model_version=version,
        mode=mode,
        fingerprint=splan.fingerprint,
        part_rows=cfg.part_rows,
        since_ms=since_ms,
        base_version=base_ev,
        users=splan.users,
        parts=len(splan.parts),
    )
    ev = find_resumable(store, plan) if cfg.resume else None
    if ev is None:
        ev = new_embedding_version(version)
        store.create_version(ev, version)
        Checkpoint(store, ev).save_plan(plan)
        logger.info(
            "refresh %s: new version %s (%s, %d users, %d to compute, %d parts)",
            cfg.model,
            ev,
            mode,
            splan.users,
            splan.changed,
            len(splan.parts),
        )
    ckpt = Checkpoint(store, ev)
    done = ckpt.done()
    if done:
        logger.info(
            "refresh %s: resuming %s, %d/%d parts done", cfg.model, ev, len(done), len(splan.parts)
        )
    ckpt.set_fields({"mode": mode, "engine": cfg.engine})

    bounds = norm_bounds(manifest, cfg.min_norm, cfg.max_norm)
    problems = [p for r in done.values() for p in part_problems(r, bounds)]
    if problems:
        raise _fail(store, ev, problems)
    todo = [p for p in splan.parts if p.id not in done]
    job = PartJob(
        registry_root=cfg.registry_root,
        model=cfg.model,
        model_version=version,
        ev=ev,
        base_ev=base_ev,
        redis_url=cfg.redis_url,
        offline_dir=cfg.offline_dir,
        part_rows=cfg.part_rows,
        batch_size=cfg.batch_size,
        intra_op_threads=cfg.intra_op_threads,
        ttl_s=cfg.vector_ttl_s,
    )
    progress = Progress(
        f"refresh {ev}", splan.users, sum(r.users for r in done.values()), cfg.progress_every_s
    )
    computed = copied = 0
    t_compute = time.monotonic()
    results = _engine(cfg.engine)(job, todo, cfg)
    try:
        for r in results:
            ckpt.mark_done(r)
            problems = part_problems(r, bounds)
            if problems:  # fail fast: a broken model shows in the first part
                raise _fail(store, ev, problems)
            computed += r.computed
            copied += r.copied
            progress.add(r.users)
            if cfg.pause_between_parts_s:
                time.sleep(cfg.pause_between_parts_s)
    finally:
        close = getattr(results, "close", None)
        if close is not None:
            close()  # stop the engine's workers even when a check failed midway
    compute_s = time.monotonic() - t_compute

    # Validate, then switch.
    finished = list(ckpt.done().values())
    counted = store.count(ev)
    sample = source.sample_user_ids(splan, cfg.drift_sample)
    problems = total_problems(finished, splan.users, counted)
    problems += sample_problems(store, ev, sample, bounds, manifest.vector.dim)
    if problems:
        raise _fail(store, ev, problems)
    drift = None
    if prev_ev is not None and prev_ev != ev:
        same = prev is not None and prev.model_version == version
        drift = drift_report(store, prev_ev, ev, sample, same, cfg.drift_k)
        logger.info("refresh %s: drift vs %s: %s", ev, prev_ev, drift)
    seconds = time.monotonic() - t0
    ckpt.set_fields(
        {
            "watermark_ms": max([splan.watermark_ms] + [since_ms or 0]),
            "drift": drift or {},
            "seconds": round(seconds, 3),
            "compute_seconds": round(compute_s, 3),
            "finished_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
    )
    replaced = store.publish(ev, users=splan.users)
    logger.info("refresh %s: readers switched %s -> %s", cfg.model, replaced, ev)
    deleted = expire_old(store, cfg.keep)
    summary = RefreshSummary(
        model=cfg.model,
        model_version=version,
        embedding_version=ev,
        previous_version=replaced,
        mode=mode,
        engine=cfg.engine,
        users=splan.users,
        computed=computed,
        copied=copied,
        parts=len(splan.parts),
        parts_resumed=len(done),
        seconds=round(seconds, 3),
        drift=drift,
        deleted_versions=tuple(deleted),
    )
    logger.info("%s", summary.line())
    return summary


def expire_old(store: VectorStore, keep: int) -> list[str]:
    """Delete versions older than the serving one, except the `keep` newest ready versions
    (the serving one counts). Versions newer than the serving one (a run in progress) stay."""
    current = store.current_version()
    versions = store.list_versions()
    cur = next((v for v in versions if v.id == current), None)
    if cur is None:
        return []
    ready = [v for v in versions if v.status == STATUS_READY and v.id != current]
    kept = {current} | {v.id for v in ready[-(keep - 1) :]} if keep > 1 else {current}
    deleted = []
    for v in versions:
        if v.id in kept or v.created_at_ms > cur.created_at_ms:
            continue
        n = store.delete_version(v.id)
        logger.info("deleted embedding version %s (%s, %d vectors)", v.id, v.status, n)
        deleted.append(v.id)
    return deleted


def rollback(store: VectorStore, to: str | None = None) -> tuple[str | None, str]:
    """Point readers back at `to`, or at the newest ready version older than the serving one.
    Returns (from, to). The version rolled away from stays (a later rollback --to can return)."""
    current = store.current_version()
    versions = store.list_versions()
    if to is None:
        cur = next((v for v in versions if v.id == current), None)
        older = [
            v
            for v in versions
            if v.status == STATUS_READY
            and v.id != current
            and (cur is None or v.created_at_ms < cur.created_at_ms)
        ]
        if not older:
            raise NoVersionError(
                f"model {store.keys.model}: no ready version older than {current} to roll back to"
            )
        target: EmbeddingVersion | None = older[-1]
    else:
        target = store.version_info(to)
        if target is None or target.status != STATUS_READY:
            state = target.status if target else "unknown"
            raise NoVersionError(f"model {store.keys.model}: version {to} is {state}, not ready")
    assert target is not None
    if (
        next(store.r.scan_iter(match=store.keys.vector_pattern(target.id), count=1000), None)
        is None
    ):
        raise NoVersionError(f"model {store.keys.model}: version {target.id} has no vectors left")
    prev = store.publish(target.id)
    logger.info("rollback %s: readers switched %s -> %s", store.keys.model, prev, target.id)
    return prev, target.id


def version_lines(store: VectorStore) -> list[str]:
    """Human lines: one per embedding version, the serving one starred."""
    current = store.current_version()
    return [
        f"{'*' if v.id == current else ' '} {v.id}\t{v.status}\t{v.users} users"
        for v in store.list_versions()
    ]
