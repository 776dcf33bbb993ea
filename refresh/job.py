"""The refresh job: plan, compute, validate, then switch readers to the new vectors.

    summary = refresh(RefreshConfig())          # userembed refresh (the default model)

One run writes every user's vector into a NEW embedding version of the Redis layout
(userembed/vectors.py), id `<model version>.<UTC time>`, while readers keep following the
`current` pointer to the previous version. Parts (slices of the offline parquet file) are
checkpointed in the version's metadata: a killed run is resumed by the next one with the same
plan. Only when every part is done and the checks pass (count, NaN/inf, norms, read-back) is the
pointer flipped, atomically and only if it still names the version the run validated against
(`VectorStore.publish_if`); a failing run is marked `failed` and the old version keeps serving.
The last `keep` ready versions stay for rollback (refresh/versions.py); older ones are deleted.
The whole run holds the model's refresh lock (refresh/lock.py): one run per model at a time.
Forgotten users (userembed/forget.py) get no vector; after the flip their tombstones are
honoured again across the model's versions.
See docs/refresh.md.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from refresh.checkpoint import (
    DRIFT_FIELD,
    ENGINE_FIELD,
    FINISHED_AT_FIELD,
    MODE_FIELD,
    SECONDS_FIELD,
    WATERMARK_FIELD,
    Checkpoint,
    PartResult,
    RunPlan,
    find_resumable,
)
from refresh.compat import CompatFit, fit_compat
from refresh.config import FULL, INCREMENTAL, RAY, RefreshConfig
from refresh.errors import RefreshValidationError, StaleFlipError
from refresh.index_build import build_index, prune_indexes
from refresh.lock import RefreshLock
from refresh.ray_engine import run_ray
from refresh.source import OfflineSource, Part, SourcePlan
from refresh.validate import (
    NormBounds,
    drift_report,
    norm_bounds,
    part_problems,
    sample_problems,
    total_problems,
)
from refresh.versions import expire_old
from refresh.worker import PartJob, run_local
from userembed.consistency import CheckConfig, not_checkable
from userembed.consistency import check as check_consistency
from userembed.errors import DataNotFoundError, UserEmbedError
from userembed.forget import Tombstones, honour_in_refresh
from userembed.manifest import Manifest
from userembed.redis_urls import open_redis
from userembed.registry import Registry
from userembed.vectors import STATUS_FAILED, EmbeddingVersion, VectorStore

logger = logging.getLogger(__name__)


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
    # The consistency check of the new version before the flip (`_check`): the report's
    # `to_dict()` ("ok" says whether all agreed), {"skipped": why} or {"error": ...}; None: off.
    check: dict[str, Any] | None = None
    # maps into older model versions' spaces stored with the version (refresh/compat.py)
    compat: CompatFit | None = None

    @property
    def users_per_s(self) -> float:
        return self.computed / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        """The one-line summary a run ends with."""
        report = self.drift or {}
        drift = ", ".join(f"{k}={report[k]}" for k in ("mean_cosine", "knn_overlap") if k in report)
        return (
            f"refreshed {self.model} -> {self.embedding_version}: {self.users} users "
            f"({self.computed} computed, {self.copied} copied, {self.parts_resumed}/{self.parts} "
            f"parts resumed) in {self.seconds:.1f}s, {self.users_per_s:.0f} users/s; "
            f"drift vs {self.previous_version or '-'}: {drift or '-'}; "
            f"check: {_check_word(self.check)}; "
            f"compatible with: {self.compat.word() if self.compat else '-'}"
        )


def _check_word(check: dict[str, Any] | None) -> str:
    if check is None:
        return "off"
    if "ok" not in check:
        return "skipped" if "skipped" in check else "error"
    if check["ok"]:
        return f"consistent ({check['users']} users)"
    return (
        f"MISMATCH ({check['feature_mismatches'] + check['not_online']} online rows, "
        f"{check['vector_mismatches']} vectors of {check['users']} users"
        f"{', stale views' if check['stale_views'] else ''})"
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


@dataclass(frozen=True)
class _Start:
    """What a run builds on: the model to run and the version serving now."""

    model_version: str
    manifest: Manifest
    store: VectorStore
    serving: EmbeddingVersion | None  # the version readers follow now
    serving_id: str | None


@dataclass(frozen=True)
class _Mode:
    """The mode that applies (an incremental run may have to be a full one)."""

    mode: str
    since_ms: int | None  # incremental: users with features newer than this are computed
    base_version: str | None  # incremental: every other user is copied from here


def _start(cfg: RefreshConfig, store: VectorStore) -> _Start:
    """Read under the lock: the serving version is what the flip compares against."""
    registry = Registry(cfg.registry_root)
    model_version = registry.resolve(cfg.model, cfg.model_ref)
    manifest = registry.read_manifest(cfg.model, model_version)
    serving_id = store.current_version()
    serving = store.version_info(serving_id) if serving_id else None
    return _Start(model_version, manifest, store, serving, serving_id)


def _mode(cfg: RefreshConfig, start: _Start) -> _Mode:
    """Incremental only on top of a serving version of the same model that saw a watermark."""
    if cfg.mode != INCREMENTAL:
        return _Mode(cfg.mode, None, None)
    serving_id = start.serving_id
    watermark = (
        Checkpoint(start.store, serving_id).get_field(WATERMARK_FIELD) if serving_id else None
    )
    if start.serving is None or watermark is None:
        logger.warning("incremental refresh: no previous version with a watermark; full run")
        return _Mode(FULL, None, None)
    if start.serving.model_version != start.model_version:
        logger.warning(
            "incremental refresh: model changed %s -> %s; every user is recomputed",
            start.serving.model_version,
            start.model_version,
        )
        return _Mode(FULL, None, None)
    return _Mode(INCREMENTAL, int(watermark), serving_id)


def _open_version(
    cfg: RefreshConfig, start: _Start, plan: RunPlan, source_plan: SourcePlan, fence: int
) -> str:
    """The killed run's version to resume, or a new `building` version with its plan saved;
    either is stamped with this run's fencing token."""
    version = find_resumable(start.store, plan) if cfg.resume else None
    if version is not None:
        Checkpoint(start.store, version, fence).set_fields({"fence": fence})
        return version
    version = new_embedding_version(start.model_version)
    start.store.create_version(version, start.model_version, fence=fence)
    Checkpoint(start.store, version, fence).save_plan(plan)
    logger.info(
        "refresh %s: new version %s (%s, %d users, %d to compute, %d parts)",
        cfg.model,
        version,
        plan.mode,
        source_plan.users,
        source_plan.changed,
        len(source_plan.parts),
    )
    return version


def _fail(store: VectorStore, version: str, problems: list[str]) -> RefreshValidationError:
    """Mark the version failed (readers stay where they are) and return the error to raise."""
    note = "; ".join(problems)[:2000]
    store.mark(version, STATUS_FAILED, note=note)
    logger.error("refresh %s failed validation, readers stay where they were: %s", version, note)
    return RefreshValidationError(f"embedding version {version} failed validation: {note}")


def _run_parts(
    cfg: RefreshConfig, job: PartJob, parts: Sequence[Part]
) -> Generator[PartResult, None, None]:
    if cfg.engine == RAY:
        return run_ray(job, parts, cfg.ray_address, cfg.ray_actors)
    return run_local(job, parts)


def _compute(
    cfg: RefreshConfig,
    job: PartJob,
    parts: Sequence[Part],
    checkpoint: Checkpoint,
    bounds: NormBounds,
    progress: Progress,
) -> tuple[int, int]:
    """Run the parts on the engine, checkpointing and checking each as it arrives (a run that
    lost its lock stops at its next checkpoint write: Checkpoint is fenced).
    Returns (computed, copied) users."""
    computed = copied = 0
    results = _run_parts(cfg, job, parts)
    try:
        for result in results:
            checkpoint.mark_done(result)
            problems = part_problems(result, bounds)
            if problems:  # fail fast: a broken model shows in the first part
                raise _fail(checkpoint.store, checkpoint.version, problems)
            computed += result.computed
            copied += result.copied
            progress.add(result.users)
            if cfg.pause_between_parts_s:
                time.sleep(cfg.pause_between_parts_s)
    finally:
        results.close()  # stop the engine's workers even when a check failed midway
    return computed, copied


def _validate(
    cfg: RefreshConfig,
    start: _Start,
    version: str,
    source: OfflineSource,
    source_plan: SourcePlan,
    bounds: NormBounds,
) -> dict[str, Any] | None:
    """Completeness and a read-back sample; raises when a check fails. Returns the drift report
    against the serving version (None when nothing serves)."""
    store = start.store
    finished = list(Checkpoint(store, version).done().values())
    counted = store.count(version)
    sample = source.sample_user_ids(source_plan, cfg.drift_sample)
    problems = total_problems(finished, source_plan.users, counted)
    problems += sample_problems(store, version, sample, bounds, start.manifest.vector.dim)
    if problems:
        raise _fail(store, version, problems)
    if start.serving_id is None or start.serving_id == version:
        return None
    same_model = start.serving is not None and start.serving.model_version == start.model_version
    drift = drift_report(store, start.serving_id, version, sample, same_model, cfg.drift_k)
    logger.info("refresh %s: drift vs %s: %s", version, start.serving_id, drift)
    return drift


def _check(cfg: RefreshConfig, store: VectorStore, version: str) -> dict[str, Any] | None:
    """Train/serve consistency of the new version (userembed.consistency: online rows against
    the offline files, its vectors against a recompute from the online rows), logged; with
    `check_blocks_flip` a mismatch or a failed check fails the run (the version marked failed)."""
    from redis.exceptions import RedisError

    if not cfg.check_sample:
        return None
    why = not_checkable(cfg.redis_url)
    if why:
        logger.info("refresh %s: consistency check skipped: %s", version, why)
        return {"skipped": why}
    check_cfg = CheckConfig(
        model=cfg.model,
        embedding_version=version,
        sample=cfg.check_sample,
        registry_root=cfg.registry_root,
        redis_url=cfg.redis_url,
        offline_dir=cfg.offline_dir,
    )
    try:
        report = check_consistency(check_cfg)
    except (UserEmbedError, RedisError) as e:
        if cfg.check_blocks_flip:
            raise _fail(store, version, [f"consistency check failed: {e}"]) from e
        logger.warning("refresh %s: consistency check failed: %s", version, e)
        return {"error": str(e)}
    if report.ok:
        logger.info("refresh %s: %s", version, report.headline())
        return report.to_dict()
    for line in report.lines():
        logger.error("refresh %s: %s", version, line)
    if cfg.check_blocks_flip:
        raise _fail(store, version, [report.headline()])
    logger.error(
        "refresh %s: switching readers anyway (check_blocks_flip is off): the server computes "
        "misses from online rows that disagree with the offline files",
        version,
    )
    return report.to_dict()


def refresh(cfg: RefreshConfig) -> RefreshSummary:
    """Build, validate and publish a new embedding version of `cfg.model` (see module doc).
    RefreshLockedError when another run of the model holds the lock (after `lock_wait_s`)."""
    store = VectorStore(open_redis(cfg.redis_url), cfg.model, cfg.vector_ttl_s)
    with RefreshLock(store, cfg.lock_ttl_s, cfg.lock_wait_s).held() as lock:
        return _refresh_locked(cfg, store, lock)


def _flip(start: _Start, version: str, users: int, lock: RefreshLock) -> str | None:
    """Point readers at `version` if the pointer still names the version this run validated
    against and the run still holds the lock; StaleFlipError otherwise."""
    lock.check()
    flip = start.store.publish_if(version, start.serving_id, fence=lock.token, users=users)
    if flip.done:
        return flip.pointer
    problem = (
        f"refresh {version}: flip refused ({flip.refused}): the pointer names "
        f"{flip.pointer or '-'}, the run validated against {start.serving_id or '-'}"
    )
    if flip.refused == "pointer moved":  # complete but stale: never served, GC removes it
        start.store.mark(version, STATUS_FAILED, note=problem)
    logger.error("%s; readers stay where they are", problem)
    raise StaleFlipError(problem)


def _refresh_locked(cfg: RefreshConfig, store: VectorStore, lock: RefreshLock) -> RefreshSummary:
    t0 = time.monotonic()
    # Plan: the model, the mode, the parts of the offline file, the version to (re)build.
    start = _start(cfg, store)
    mode = _mode(cfg, start)
    source = OfflineSource(cfg.offline_dir, start.manifest.input_spec)
    forgotten = Tombstones(store.r).ids()  # left out of the run (userembed/forget.py)
    source_plan = source.plan(cfg.part_rows, mode.since_ms, forgotten)
    if source_plan.users == 0:
        raise DataNotFoundError(f"{source.behavior_path} holds no users")
    plan = RunPlan(
        model_version=start.model_version,
        mode=mode.mode,
        fingerprint=source_plan.fingerprint,
        part_rows=cfg.part_rows,
        since_ms=mode.since_ms,
        base_version=mode.base_version,
        users=source_plan.users,
        parts=len(source_plan.parts),
    )
    version = _open_version(cfg, start, plan, source_plan, lock.token)
    checkpoint = Checkpoint(start.store, version, lock.token)
    done = checkpoint.done()
    if done:
        logger.info(
            "refresh %s: resuming %s, %d/%d parts done",
            cfg.model,
            version,
            len(done),
            len(source_plan.parts),
        )
    checkpoint.set_fields({MODE_FIELD: mode.mode, ENGINE_FIELD: cfg.engine})

    # Compute the parts not done yet.
    bounds = norm_bounds(start.manifest, cfg.min_norm, cfg.max_norm)
    problems = [p for result in done.values() for p in part_problems(result, bounds)]
    if problems:
        raise _fail(start.store, version, problems)
    job = PartJob(
        registry_root=cfg.registry_root,
        model=cfg.model,
        model_version=start.model_version,
        embedding_version=version,
        base_version=mode.base_version,
        redis_url=cfg.redis_url,
        offline_dir=cfg.offline_dir,
        part_rows=cfg.part_rows,
        batch_size=cfg.batch_size,
        intra_op_threads=cfg.intra_op_threads,
        ttl_s=cfg.vector_ttl_s,
    )
    progress = Progress(
        f"refresh {version}",
        source_plan.users,
        sum(result.users for result in done.values()),
        cfg.progress_every_s,
    )
    t_compute = time.monotonic()
    todo = [p for p in source_plan.parts if p.id not in done]
    computed, copied = _compute(cfg, job, todo, checkpoint, bounds, progress)
    compute_s = time.monotonic() - t_compute

    # Validate, then switch readers and drop the versions no longer kept.
    drift = _validate(cfg, start, version, source, source_plan, bounds)
    check = _check(cfg, start.store, version)
    seconds = time.monotonic() - t0
    checkpoint.set_fields(
        {
            WATERMARK_FIELD: max(source_plan.watermark_ms, mode.since_ms or 0),
            DRIFT_FIELD: drift or {},
            SECONDS_FIELD: round(seconds, 3),
            "compute_seconds": round(compute_s, 3),
            FINISHED_AT_FIELD: datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
    )
    lock.check()  # a run that lost its lock writes no index or map (the version may be gone)
    if cfg.similar_index:  # before the flip: readers never follow a version without its index
        every_user = source.sample_user_ids(source_plan, source_plan.users)
        dim = start.manifest.vector.dim
        build_index(cfg, start.store, version, start.model_version, every_user, dim)
    compat = None
    if cfg.compat_sample:  # before the flip, like the index
        shared = source.sample_user_ids(source_plan, cfg.compat_sample)
        compat = fit_compat(start.store, cfg, version, start.model_version, start.serving, shared)
    replaced = _flip(start, version, source_plan.users, lock)
    logger.info("refresh %s: readers switched %s -> %s", cfg.model, replaced, version)
    honour_in_refresh(start.store, forgotten, source_plan.held_forgotten)
    deleted = expire_old(start.store, cfg.keep)
    if cfg.similar_index:
        prune_indexes(cfg, start.store)
    summary = RefreshSummary(
        model=cfg.model,
        model_version=start.model_version,
        embedding_version=version,
        previous_version=replaced,
        mode=mode.mode,
        engine=cfg.engine,
        users=source_plan.users,
        computed=computed,
        copied=copied,
        parts=len(source_plan.parts),
        parts_resumed=len(done),
        seconds=round(seconds, 3),
        drift=drift,
        deleted_versions=tuple(deleted),
        check=check,
        compat=compat,
    )
    logger.info("%s", summary.line())
    return summary
