"""Forget a user (docs/forget.md): their stored vectors, online features and index entries go,
and a tombstone keeps them gone until the offline data no longer holds them.

    forget_users(["42"])                       # every model of the registry; the CLI: `forget`
    release_users(["42"])                      # drop the tombstone (`forget --release`)

The tombstone is one ZSET of every model (userembed/vectors.py `FORGOTTEN_KEY`, user id ->
forgotten_at ms): forgetting is of a person, so a model published later honours it too. Who
honours it:

- the refresh plans without tombstoned users (refresh/source.py), leaves them out of the
  similar-users index (refresh/index_build.py), and after its flip deletes them again from every
  version of its model and drops the tombstones of users the offline files no longer hold
  (`honour_in_refresh`);
- the server reads the set at each poll and answers NOT_FOUND for a forgotten user on every
  path (stored, vector cache, miss) and never lists one among neighbours (embed_server/).

Versions still `building` are not touched here: deleting from them would fail the running
refresh's count check; that refresh deletes them after its flip. Feast's Redis online store
keeps all views of an entity in one hash (key: serialised entity key + project), so one UNLINK
per user removes both feature views' rows. Feast is imported only where those keys are built.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from userembed import paths
from userembed.errors import InvalidInputError
from userembed.ids import parse_user_id
from userembed.redis_urls import AsyncRedisClient, RedisClient, open_redis
from userembed.schema import USER_ID
from userembed.vectors import FORGOTTEN_KEY, STATUS_BUILDING, VectorStore, now_ms, pushed_key

logger = logging.getLogger(__name__)

UNLINK_BATCH = 1000  # keys per pipeline


def canonical_ids(user_ids: Sequence[str]) -> list[str]:
    """The ids as given, each checked to be canonical (userembed.ids), without repeats."""
    if not user_ids:
        raise InvalidInputError("name at least one user id")
    for u in user_ids:
        parse_user_id(u)
    return list(dict.fromkeys(user_ids))


class Tombstones:
    """The forgotten users (`FORGOTTEN_KEY`): user id -> forgotten_at (ms)."""

    def __init__(self, client: RedisClient) -> None:
        self.r: Any = client

    def add(self, user_ids: Sequence[str], at_ms: int | None = None) -> None:
        """Record the users; a user forgotten before keeps the first time."""
        at = at_ms if at_ms is not None else now_ms()
        self.r.zadd(FORGOTTEN_KEY, dict.fromkeys(user_ids, at), nx=True)

    def remove(self, user_ids: Collection[str]) -> int:
        return int(self.r.zrem(FORGOTTEN_KEY, *user_ids)) if user_ids else 0

    def all(self) -> dict[str, int]:
        return {
            u.decode(): int(at) for u, at in self.r.zrange(FORGOTTEN_KEY, 0, -1, withscores=True)
        }

    def ids(self) -> set[str]:
        return {u.decode() for u in self.r.zrange(FORGOTTEN_KEY, 0, -1)}


async def read_forgotten(client: AsyncRedisClient) -> frozenset[str]:
    """The forgotten user ids (the server's poll)."""
    return frozenset(u.decode() for u in await client.zrange(FORGOTTEN_KEY, 0, -1))  # type: ignore[misc]


def _unlink(client: Any, keys: Sequence[str | bytes]) -> int:
    """UNLINK one key per command (cluster safe); returns how many existed."""
    n = 0
    for a in range(0, len(keys), UNLINK_BATCH):
        pipe = client.pipeline(transaction=False)
        for k in keys[a : a + UNLINK_BATCH]:
            pipe.unlink(k)
        n += sum(int(r) for r in pipe.execute())
    return n


def delete_vectors(store: VectorStore, user_ids: Sequence[str], building: bool = False) -> int:
    """Delete the users' vectors in every embedding version of the store's model (`building`
    versions only with `building`); returns the number of vectors deleted."""
    keys: list[str] = []
    for v in store.list_versions():
        if v.status != STATUS_BUILDING or building:
            keys += [store.keys.vector(v.id, u) for u in user_ids]
    return _unlink(store.r, keys)


def feast_online_keys(user_ids: Sequence[str], repo: Path | None = None) -> list[bytes]:
    """The Redis keys of the users' Feast online rows (both feature views share one hash per
    entity), spelled by Feast itself from the repository's project and key serialisation."""
    from feast.infra.online_stores.helpers import _redis_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    from userembed.feast_ops import feature_store_yaml

    config = yaml.safe_load(feature_store_yaml(repo or paths.FEATURE_REPO).read_text())
    project = str(config["project"])
    version = int(config.get("entity_key_serialization_version", 3))
    return [
        _redis_key(
            project,
            EntityKey(join_keys=[USER_ID], entity_values=[Value(int64_val=int(u))]),
            version,
        )
        for u in user_ids
    ]


@dataclass(frozen=True)
class ForgetReport:
    users: tuple[str, ...]
    models: tuple[str, ...]
    vectors_deleted: int
    feature_rows_deleted: int  # -1: online features left alone (`features=False`)

    def line(self) -> str:
        rows = (
            "online features not touched"
            if self.feature_rows_deleted < 0
            else f"{self.feature_rows_deleted} online feature rows deleted"
        )
        return (
            f"forgot {len(self.users)} users: {self.vectors_deleted} vectors deleted in "
            f"{len(self.models)} models ({', '.join(self.models) or '-'}), {rows}; "
            "tombstones recorded"
        )


def forget_users(
    user_ids: Sequence[str],
    redis_url: str | None = None,
    models: Sequence[str] | None = None,
    registry_root: str | None = None,
    feature_repo: Path | None = None,
    features: bool = True,
) -> ForgetReport:
    """Tombstone the users, then delete their online feature rows and their vectors in every
    version of `models` (default: every model of the registry). The tombstone comes first: a
    server that computes a user between the deletes refuses it from its next poll on."""
    users = canonical_ids(user_ids)
    if models is None:
        from userembed.registry import Registry

        models = Registry(registry_root).list_models()
    client = open_redis(redis_url or paths.redis_url())
    try:
        Tombstones(client).add(users)
        rows = _unlink(client, feast_online_keys(users, feature_repo)) if features else -1
        _unlink(client, [pushed_key(u).encode() for u in users])  # their freshness markers
        deleted = sum(delete_vectors(VectorStore(client, m), users) for m in models)
    finally:
        client.close()
    report = ForgetReport(tuple(users), tuple(models), deleted, rows)
    logger.info("%s", report.line())
    return report


def release_users(user_ids: Sequence[str], redis_url: str | None = None) -> int:
    """Drop the users' tombstones (refreshes and servers serve them again once their data is
    back); returns how many were tombstoned."""
    users = canonical_ids(user_ids)
    client = open_redis(redis_url or paths.redis_url())
    try:
        return Tombstones(client).remove(users)
    finally:
        client.close()


def honour_in_refresh(
    store: VectorStore, planned_without: Collection[str], still_held: Collection[str]
) -> tuple[int, int]:
    """After a refresh's flip: delete every tombstoned user again from every version of the
    store's model (a forget that raced the run or a server's write-back), and drop the
    tombstones of users the run planned without (`planned_without`) that the offline files no
    longer hold (not in `still_held`). Returns (vectors deleted, tombstones dropped)."""
    tombstones = Tombstones(store.r)
    forgotten = sorted(tombstones.ids())
    deleted = delete_vectors(store, forgotten, building=True) if forgotten else 0
    gone = set(planned_without) - set(still_held)
    dropped = tombstones.remove(gone)
    if deleted or dropped:
        logger.info(
            "refresh %s: %d vectors of forgotten users deleted, %d tombstones dropped "
            "(no longer in the offline files)",
            store.keys.model,
            deleted,
            dropped,
        )
    return deleted, dropped
