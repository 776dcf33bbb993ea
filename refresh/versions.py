"""The embedding versions a model keeps: expiry after a refresh, rollback, and the listing.

    expire_old(store, keep=3)        # after a publish: drop all but the newest ready versions
    rollback(store)                  # userembed rollback: readers back to the previous version
    version_lines(store)             # userembed rollback --list

Versions, their status and the `current` pointer are the Redis layout of userembed/vectors.py;
this module only decides which version to point at or delete. Never deleted: the serving
version, the `building` version of the run holding the refresh lock (its `fence` is the lock's
token), and any version a live server heartbeats that it writes back into (`online-*` and the
one it follows; embed_server/version_policy.py).
"""

from __future__ import annotations

import logging

from refresh.errors import NoVersionError, StaleFlipError
from refresh.lock import lock_holder
from userembed.vectors import STATUS_BUILDING, STATUS_READY, EmbeddingVersion, VectorStore

logger = logging.getLogger(__name__)


def expire_old(store: VectorStore, keep: int) -> list[str]:
    """Delete versions older than the serving one, except the `keep` newest ready versions
    (the serving one counts) and the live ones (`_live_reason`). Versions newer than the serving
    one (a run in progress) stay."""
    current_id = store.current_version()
    versions = store.list_versions()
    current = next((v for v in versions if v.id == current_id), None)
    if current is None:
        return []
    ready = [v for v in versions if v.status == STATUS_READY and v.id != current_id]
    kept = {current_id} | {v.id for v in ready[-(keep - 1) :]} if keep > 1 else {current_id}
    holder = lock_holder(store)
    live_token = holder.token if holder else 0
    deleted = []
    for v in versions:
        if v.id in kept or v.created_at_ms > current.created_at_ms:
            continue
        live = _live_reason(store, v, live_token)
        if live:
            logger.info("kept embedding version %s (%s): %s", v.id, v.status, live)
            continue
        n = store.delete_version(v.id)
        logger.info("deleted embedding version %s (%s, %d vectors)", v.id, v.status, n)
        deleted.append(v.id)
    return deleted


def _live_reason(store: VectorStore, v: EmbeddingVersion, live_token: int) -> str:
    """Why `v` must stay although it is old ("" when it may go)."""
    if v.status == STATUS_BUILDING and live_token and v.fence == live_token:
        return f"built by the running refresh (token {live_token})"
    if store.has_live_writer(v.id):
        return "a live server writes back into it"
    return ""


def _previous_ready(store: VectorStore, current_id: str | None) -> EmbeddingVersion:
    """The newest ready version older than the serving one."""
    versions = store.list_versions()
    current = next((v for v in versions if v.id == current_id), None)
    older = [
        v
        for v in versions
        if v.status == STATUS_READY
        and v.id != current_id
        and (current is None or v.created_at_ms < current.created_at_ms)
    ]
    if not older:
        raise NoVersionError(
            f"model {store.keys.model}: no ready version older than {current_id} to roll back to"
        )
    return older[-1]


def _named_ready(store: VectorStore, version: str) -> EmbeddingVersion:
    target = store.version_info(version)
    if target is None or target.status != STATUS_READY:
        state = target.status if target else "unknown"
        raise NoVersionError(f"model {store.keys.model}: version {version} is {state}, not ready")
    return target


def rollback(store: VectorStore, to: str | None = None) -> tuple[str | None, str]:
    """Point readers back at `to`, or at the newest ready version older than the serving one.
    Returns (from, to). The version rolled away from stays (a later rollback --to can return)."""
    current_id = store.current_version()  # the flip below is a compare-and-set against it
    target = _previous_ready(store, current_id) if to is None else _named_ready(store, to)
    any_vector = next(
        store.r.scan_iter(match=store.keys.vector_pattern(target.id), count=1000), None
    )
    if any_vector is None:
        raise NoVersionError(f"model {store.keys.model}: version {target.id} has no vectors left")
    flip = store.publish_if(target.id, current_id)
    if not flip.done:  # a refresh flipped meanwhile: decide again on what serves now
        raise StaleFlipError(
            f"model {store.keys.model}: rollback refused ({flip.refused}): the pointer names "
            f"{flip.pointer or '-'}, read as {current_id or '-'}; run it again"
        )
    previous = flip.pointer
    logger.info("rollback %s: readers switched %s -> %s", store.keys.model, previous, target.id)
    return previous, target.id


def version_lines(store: VectorStore) -> list[str]:
    """Human lines: one per embedding version, the serving one starred."""
    current_id = store.current_version()
    return [
        f"{'*' if v.id == current_id else ' '} {v.id}\t{v.status}\t{v.users} users"
        for v in store.list_versions()
    ]
