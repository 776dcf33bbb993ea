"""The embedding versions a model keeps: expiry after a refresh, rollback, and the listing.

    expire_old(store, keep=3)        # after a publish: drop all but the newest ready versions
    rollback(store)                  # userembed rollback: readers back to the previous version
    version_lines(store)             # userembed rollback --list

Versions, their status and the `current` pointer are the Redis layout of userembed/vectors.py;
this module only decides which version to point at or delete.
"""

from __future__ import annotations

import logging

from refresh.errors import NoVersionError
from userembed.vectors import STATUS_READY, EmbeddingVersion, VectorStore

logger = logging.getLogger(__name__)


def expire_old(store: VectorStore, keep: int) -> list[str]:
    """Delete versions older than the serving one, except the `keep` newest ready versions
    (the serving one counts). Versions newer than the serving one (a run in progress) stay."""
    current_id = store.current_version()
    versions = store.list_versions()
    current = next((v for v in versions if v.id == current_id), None)
    if current is None:
        return []
    ready = [v for v in versions if v.status == STATUS_READY and v.id != current_id]
    kept = {current_id} | {v.id for v in ready[-(keep - 1) :]} if keep > 1 else {current_id}
    deleted = []
    for v in versions:
        if v.id in kept or v.created_at_ms > current.created_at_ms:
            continue
        n = store.delete_version(v.id)
        logger.info("deleted embedding version %s (%s, %d vectors)", v.id, v.status, n)
        deleted.append(v.id)
    return deleted


def _previous_ready(store: VectorStore) -> EmbeddingVersion:
    """The newest ready version older than the serving one."""
    current_id = store.current_version()
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
    target = _previous_ready(store) if to is None else _named_ready(store, to)
    any_vector = next(
        store.r.scan_iter(match=store.keys.vector_pattern(target.id), count=1000), None
    )
    if any_vector is None:
        raise NoVersionError(f"model {store.keys.model}: version {target.id} has no vectors left")
    previous = store.publish(target.id)
    logger.info("rollback %s: readers switched %s -> %s", store.keys.model, previous, target.id)
    return previous, target.id


def version_lines(store: VectorStore) -> list[str]:
    """Human lines: one per embedding version, the serving one starred."""
    current_id = store.current_version()
    return [
        f"{'*' if v.id == current_id else ' '} {v.id}\t{v.status}\t{v.users} users"
        for v in store.list_versions()
    ]
