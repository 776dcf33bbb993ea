"""Push fresh behaviour and mark the users' stored vectors stale (docs/freshness.md).

`push_fresh(store, client, rows)` writes the rows online through the Feast push source
(feast_ops.push_behavior), then, per user, the marker `ue:pushed:{<user_id>}` (userembed/vectors.py)
holding the newest pushed event, and tells every server worker to drop the users' cached vectors.
A server reading a stored vector whose feature_ts is older than the marker serves it and
recomputes it in the background (embed_server/freshness.py). The marker is written after the push,
so the recompute it triggers reads the pushed row; it only ever grows, and holds whole seconds, as
Feast's event times (the recomputed feature_ts) do.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import redis

from userembed.errors import InvalidInputError
from userembed.ids import parse_user_id
from userembed.redis_urls import RedisClient
from userembed.vectors import CACHE_DROP_CHANNEL, PUSHED_TTL_S, pushed_key

if TYPE_CHECKING:
    from feast import FeatureStore

logger = logging.getLogger(__name__)

# KEYS: marker. ARGV: event ms, TTL ms. Keeps the newest event; refreshes the TTL.
_MARK = """
local cur = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
local new = tonumber(ARGV[1])
if new > cur then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
else redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


@dataclass(frozen=True)
class PushReport:
    rows: int
    users: int
    newest_event_ms: int

    def line(self) -> str:
        return (
            f"pushed {self.rows} rows for {self.users} users (newest event "
            f"{pd.Timestamp(self.newest_event_ms, unit='ms', tz='UTC').isoformat()}); their "
            "stored vectors are recomputed at their next read"
        )


def newest_events_ms(rows: pd.DataFrame) -> dict[str, int]:
    """user id (canonical) -> newest event time in epoch ms, truncated to whole seconds."""
    if "user_id" not in rows or "event_timestamp" not in rows:
        raise InvalidInputError("push: rows need user_id and event_timestamp columns")
    ts = pd.to_datetime(rows["event_timestamp"], utc=True)
    seconds = ts.dt.as_unit("ns").astype("int64") // 10**9
    ids = [str(u) for u in rows["user_id"]]
    if not ids:
        raise InvalidInputError("push: no rows")
    for uid in ids:
        parse_user_id(uid)  # canonical decimal only: it becomes a key
    out: dict[str, int] = {}
    for uid, s in zip(ids, seconds.tolist(), strict=True):
        out[uid] = max(out.get(uid, 0), int(s) * 1000)
    return out


def mark_pushed(client: RedisClient, newest: dict[str, int], ttl_s: int = PUSHED_TTL_S) -> None:
    """Raise each user's marker to its newest pushed event (one single-key script per user:
    cluster safe), then tell the servers' vector caches to drop the users."""
    r: Any = client
    ttl_ms = ttl_s * 1000
    if isinstance(r, redis.Redis):
        pipe = r.pipeline(transaction=False)
        for uid, ms in newest.items():
            pipe.eval(_MARK, 1, pushed_key(uid), ms, ttl_ms)
        pipe.execute()
    else:  # redis-py's cluster pipeline has no EVAL: one call per user (pushes are small)
        for uid, ms in newest.items():
            r.eval(_MARK, 1, pushed_key(uid), ms, ttl_ms)
    if newest:
        # an empty first field: user ids, not a model version and keys (vector_cache.py)
        r.publish(CACHE_DROP_CHANNEL, b"\0".join([b"", *(u.encode() for u in newest)]))


def push_fresh(store: FeatureStore, client: RedisClient, rows: pd.DataFrame) -> PushReport:
    """Push behaviour rows online (every feature of the view, feast_ops.push_behavior) and mark
    the users' stored vectors stale."""
    from userembed.feast_ops import push_behavior

    newest = newest_events_ms(rows)  # validates ids before anything is written
    push_behavior(store, rows)
    mark_pushed(client, newest)
    return PushReport(len(rows), len(newest), max(newest.values(), default=0))


def read_rows(path: Path) -> pd.DataFrame:
    """Rows to push from a parquet or JSON lines file (lists stay lists in both)."""
    if not path.exists():
        raise InvalidInputError(f"push: {path} does not exist")
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    if path.suffix in (".jsonl", ".json"):
        return pd.read_json(path, lines=path.suffix == ".jsonl")
    raise InvalidInputError(f"push: {path}: expected a .parquet or .jsonl file")
