"""The Redis vector store: the layout downstream teams may read directly (README "Vector store").

Keys (Redis Cluster safe: control keys of a model share the hash tag `{<model>}`, so the
pointer flip is one MULTI in one slot; vector keys are tagged by user, so they spread):

    ue:{<model>}:current             STRING  embedding version id readers follow
    ue:{<model>}:versions            ZSET    embedding version id -> created_at (ms)
    ue:{<model>}:ev:<ev>             HASH    model_version, created_at, status, users, note, fence
    ue:{<model>}:refresh_lock        STRING  "<fencing token> <holder>" of the running refresh (PX TTL)
    ue:{<model>}:fence               STRING  counter the refresh lock's fencing tokens come from
    ue:{<model>}:writer:<ev>         STRING  a live server writes back into <ev> (PX TTL heartbeat)
    ue:{<model>}:compat:<ev>         HASH    maps from <ev>'s space into older model versions'
                                             spaces (userembed/compat_maps.py spells the fields)
    ue:<model>:<ev>:{<user_id>}      HASH    vector, dtype, model_version, computed_at, feature_ts
    ue:forgotten                     ZSET    user id -> forgotten_at (ms): every model's tombstones
    ue:pushed:{<user_id>}            STRING  newest event (epoch ms, whole seconds) pushed for the
                                             user (userembed/freshness.py; PX TTL): a stored vector
                                             whose feature_ts is older is stale (docs/freshness.md)

`<user_id>` is the id's canonical decimal spelling (userembed.ids). `vector` is the raw
little-endian float32 (dtype "f32") or float16 ("f16") bytes of the user vector; `computed_at`
and `feature_ts` are epoch milliseconds as decimal strings. Vector keys carry a TTL. Batch
reads and writes are pipelined per key (no cross-slot multi-key command; the two write paths:
userembed/vector_writes.py); on Redis Cluster `count` and `delete_version` SCAN every master
(redis-py's cluster `scan_iter`). A version's `fence` is the fencing token of the refresh run
that builds it (refresh/lock.py); `publish_if` flips the pointer only while that token holds
the lock and the pointer still names the version the run validated against (one Lua script
over the `{<model>}` slot).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis

from userembed.redis_urls import RedisClient
from userembed.vector_writes import write_packed, write_pipelined

DTYPES: dict[str, np.dtype[Any]] = {"f32": np.dtype("<f4"), "f16": np.dtype("<f2")}
VECTOR_FIELDS = ("vector", "dtype", "model_version", "computed_at", "feature_ts")

STATUS_BUILDING = "building"
STATUS_READY = "ready"
STATUS_FAILED = "failed"


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class StoredVector:
    user_id: str
    vector: np.ndarray  # float32, (D,)
    model_version: str
    computed_at_ms: int
    feature_ts_ms: int


@dataclass(frozen=True)
class EmbeddingVersion:
    id: str
    model_version: str
    created_at_ms: int
    status: str
    users: int
    note: str = ""  # why a version failed (`mark`)
    fence: int = 0  # fencing token of the refresh run building it (0: none)


@dataclass(frozen=True)
class Flip:
    """What `publish_if` did: `done`, or why not (`refused`: "pointer moved", "lock lost",
    "version gone"); `pointer` is the version the pointer named when the script ran."""

    done: bool
    pointer: str | None
    refused: str = ""


# KEYS: current, meta(ev), refresh lock. ARGV: ev, expected pointer ("" none), fencing token
# ("" no lock check), users ("" unchanged). Returns {1|0, pointer found, reason refused}.
_PUBLISH_IF = """
local cur = redis.call('GET', KEYS[1]) or ''
if cur ~= ARGV[2] then return {0, cur, 'pointer moved'} end
if redis.call('EXISTS', KEYS[2]) == 0 then return {0, cur, 'version gone'} end
if ARGV[3] ~= '' then
  local held = redis.call('GET', KEYS[3]) or ''
  if string.match(held, '^%d+') ~= ARGV[3] or redis.call('HGET', KEYS[2], 'fence') ~= ARGV[3] then
    return {0, cur, 'lock lost'}
  end
end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[2], 'status', 'ready')
if ARGV[4] ~= '' then redis.call('HSET', KEYS[2], 'users', ARGV[4]) end
return {1, cur, ''}
"""


def encode_vector(vector: np.ndarray, dtype: str = "f32") -> bytes:
    return np.ascontiguousarray(vector, dtype=DTYPES[dtype]).tobytes()


def decode_vector(data: bytes, dtype: str = "f32") -> np.ndarray:
    return np.frombuffer(data, dtype=DTYPES[dtype]).astype(np.float32)


# Users forgotten (userembed/forget.py): one set for every model, as forgetting is of a person;
# no hash tag, a single key.
FORGOTTEN_KEY = "ue:forgotten"

# Pushed behaviour (userembed/freshness.py): one marker per user, tagged by user like the vector
# keys so one script or one cluster slot reads a vector and its marker together.
PUSHED_PREFIX = b"ue:pushed:"
PUSHED_TTL_S = 7 * 24 * 3600  # like the vectors' default TTL
# pub/sub channel of cached rows to drop (embed_server/vector_cache.py): a model version then
# vector keys, or an empty first field then user ids (a push: every model's row of the users)
CACHE_DROP_CHANNEL = "userembed:vector-cache:drop"


def pushed_key(user_id: str) -> str:
    return f"{PUSHED_PREFIX.decode()}{{{user_id}}}"


def pushed_key_of(vector_key: bytes) -> bytes:
    """The marker key of the user a vector key belongs to (its `{<user_id>}` tag; a key with
    no tag, in tests, its own marker)."""
    i = vector_key.rfind(b"{")
    return PUSHED_PREFIX + (vector_key[i:] if i >= 0 else vector_key)


class VectorKeys:
    """Key names of one model; the only place that spells them."""

    def __init__(self, model: str) -> None:
        if any(c in model for c in "{}: "):
            raise ValueError(f"model name {model!r} may not contain braces, ':' or spaces")
        self.model = model
        self.current = f"ue:{{{model}}}:current"
        self.versions = f"ue:{{{model}}}:versions"
        self.refresh_lock = f"ue:{{{model}}}:refresh_lock"
        self.fence = f"ue:{{{model}}}:fence"

    def meta(self, ev: str) -> str:
        return f"ue:{{{self.model}}}:ev:{ev}"

    def writer(self, ev: str) -> str:
        return f"ue:{{{self.model}}}:writer:{ev}"

    def compat(self, ev: str) -> str:
        return f"ue:{{{self.model}}}:compat:{ev}"

    def vector(self, ev: str, user_id: str) -> str:
        return f"ue:{self.model}:{ev}:{{{user_id}}}"

    def vector_keys(self, ev: str, user_ids: Sequence[str]) -> list[bytes]:
        """`vector(ev, u)` of many users as bytes (the batch read path builds 100s per call)."""
        head = f"ue:{self.model}:{ev}:{{".encode()
        return [b"%b%b}" % (head, u.encode()) for u in user_ids]

    def vector_pattern(self, ev: str) -> str:
        return f"ue:{self.model}:{ev}:{{*}}"


class VectorStore:
    """Versioned user vectors of one model in Redis: one server or a cluster
    (userembed.redis_urls.open_redis opens either)."""

    def __init__(self, client: RedisClient, model: str, ttl_s: int | None = 7 * 24 * 3600) -> None:
        # Any: redis-py types every command as "result | Awaitable[result]" (sync and asyncio).
        self.r: Any = client
        self.keys = VectorKeys(model)
        self.ttl_s = ttl_s

    # -- versions ---------------------------------------------------------------------------
    def current_version(self) -> str | None:
        v = self.r.get(self.keys.current)
        return v.decode() if isinstance(v, bytes) else v

    def version_info(self, ev: str) -> EmbeddingVersion | None:
        h = self.r.hgetall(self.keys.meta(ev))
        if not h:
            return None
        d = {k.decode(): v.decode() for k, v in h.items()}
        return EmbeddingVersion(
            id=ev,
            model_version=d.get("model_version", ""),
            created_at_ms=int(d.get("created_at", 0)),
            status=d.get("status", ""),
            users=int(d.get("users", 0)),
            note=d.get("note", ""),
            fence=int(d.get("fence", 0)),
        )

    def list_versions(self) -> list[EmbeddingVersion]:
        """Known embedding versions, oldest first."""
        out = []
        for ev in self.r.zrange(self.keys.versions, 0, -1):
            info = self.version_info(ev.decode())
            if info is not None:
                out.append(info)
        return out

    def create_version(self, ev: str, model_version: str, fence: int = 0) -> None:
        """Register a version being built (by the run holding fencing token `fence`); readers
        do not see it until `publish`."""
        created = now_ms()
        mapping: dict[str, str | int] = {
            "model_version": model_version,
            "created_at": created,
            "status": STATUS_BUILDING,
            "users": 0,
        }
        if fence:
            mapping["fence"] = fence
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(self.keys.meta(ev), mapping=mapping)
        pipe.zadd(self.keys.versions, {ev: created}, nx=True)
        pipe.execute()

    def mark(self, ev: str, status: str, users: int | None = None, note: str = "") -> None:
        mapping: dict[str, str | int] = {"status": status}
        if users is not None:
            mapping["users"] = users
        if note:
            mapping["note"] = note
        self.r.hset(self.keys.meta(ev), mapping=mapping)

    def publish(self, ev: str, users: int | None = None) -> str | None:
        """Atomically point readers at `ev`; returns the version it replaced."""
        while True:
            with self.r.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(self.keys.current)
                    prev = pipe.get(self.keys.current)
                    pipe.multi()
                    pipe.set(self.keys.current, ev)
                    mapping: dict[str, str | int] = {"status": STATUS_READY}
                    if users is not None:
                        mapping["users"] = users
                    pipe.hset(self.keys.meta(ev), mapping=mapping)
                    pipe.execute()
                    return prev.decode() if isinstance(prev, bytes) else prev
                except redis.WatchError:
                    continue

    def publish_if(
        self, ev: str, expected: str | None, fence: int | None = None, users: int | None = None
    ) -> Flip:
        """Compare-and-set flip: point readers at `ev` only if the pointer still names
        `expected` (None: no pointer) and, with `fence`, the refresh lock still holds that
        fencing token and `ev` was built under it. A refused flip changes nothing."""
        args = [ev, expected or "", str(fence) if fence else "", "" if users is None else users]
        keys = [self.keys.current, self.keys.meta(ev), self.keys.refresh_lock]
        done, pointer, refused = self.r.eval(_PUBLISH_IF, len(keys), *keys, *args)
        found = pointer.decode() if isinstance(pointer, bytes) else pointer
        why = refused.decode() if isinstance(refused, bytes) else refused
        return Flip(bool(done), found or None, why)

    def has_live_writer(self, ev: str) -> bool:
        """Whether a live server heartbeats that it writes back into `ev` (garbage collection
        keeps it)."""
        return bool(self.r.exists(self.keys.writer(ev)))

    # -- vectors ----------------------------------------------------------------------------
    def write(
        self,
        ev: str,
        user_ids: Sequence[str],
        vectors: np.ndarray,
        model_version: str,
        feature_ts_ms: Sequence[int] | None = None,
        dtype: str = "f32",
        computed_at_ms: int | None = None,
        raise_on_error: bool = True,
    ) -> list[redis.ResponseError | None]:
        """Pipelined write of (N, D) vectors; one HSET (+ EXPIRE) per user. Every reply is read;
        then the first error reply (OOM, READONLY, WRONGTYPE, ...) is raised, or, with
        `raise_on_error` False, each user's error reply is returned (None: written)."""
        assert vectors.ndim == 2 and len(user_ids) == vectors.shape[0]
        at = computed_at_ms if computed_at_ms is not None else now_ms()
        data = np.ascontiguousarray(vectors, dtype=DTYPES[dtype])
        keys = self.keys.vector_keys(ev, [str(u) for u in user_ids])
        fields: dict[str, str | int] = {
            "dtype": dtype,
            "model_version": model_version,
            "computed_at": at,
        }
        # the packed path speaks to one server; a cluster client routes each key to its slot
        write = write_packed if isinstance(self.r, redis.Redis) else write_pipelined
        errors = write(self.r, keys, data, fields, feature_ts_ms, self.ttl_s)
        first = next((e for e in errors if e is not None), None)
        if raise_on_error and first is not None:
            raise first
        return errors

    def read(self, ev: str, user_ids: Sequence[str]) -> list[StoredVector | None]:
        """Pipelined read; None where a user has no vector in `ev`."""
        pipe = self.r.pipeline(transaction=False)
        for uid in user_ids:
            pipe.hmget(self.keys.vector(ev, str(uid)), list(VECTOR_FIELDS))
        out: list[StoredVector | None] = []
        for uid, vals in zip(user_ids, pipe.execute(), strict=True):
            vec, dt, mv, at, fts = vals
            if vec is None:
                out.append(None)
                continue
            out.append(
                StoredVector(
                    user_id=str(uid),
                    vector=decode_vector(vec, dt.decode() if dt else "f32"),
                    model_version=mv.decode() if mv else "",
                    computed_at_ms=int(at or 0),
                    feature_ts_ms=int(fts or 0),
                )
            )
        return out

    def count(self, ev: str, batch: int = 1000) -> int:
        """Number of vector keys of `ev` (SCAN; for checks and tests, not the request path)."""
        return sum(1 for _ in self.r.scan_iter(match=self.keys.vector_pattern(ev), count=batch))

    def delete_version(self, ev: str, batch: int = 1000) -> int:
        """Remove a version's vectors and metadata; returns the number of vectors removed."""
        n = 0
        keys: list[bytes] = []
        for k in self.r.scan_iter(match=self.keys.vector_pattern(ev), count=batch):
            keys.append(k)
            if len(keys) >= batch:
                n += self._unlink(keys)
                keys = []
        n += self._unlink(keys)
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(self.keys.meta(ev), self.keys.compat(ev))  # one slot: {<model>}
        pipe.zrem(self.keys.versions, ev)
        pipe.execute()
        return n

    def _unlink(self, keys: Iterable[bytes]) -> int:
        pipe = self.r.pipeline(transaction=False)
        ks = list(keys)
        for k in ks:  # one key per command: cluster safe
            pipe.unlink(k)
        pipe.execute()
        return len(ks)


def copy_vectors(
    store: VectorStore, src_ev: str, dst_ev: str, user_ids: Sequence[str]
) -> list[bool]:
    """Copy users' vector hashes from `src_ev` into `dst_ev` unchanged (model version, feature
    and compute timestamps kept), with DUMP/RESTORE per key so it is cluster safe (COPY is
    multi-key). Returns, per user, whether `src_ev` had a vector to copy.

    Used by the incremental refresh: users whose features did not change keep their vector.
    """
    pipe = store.r.pipeline(transaction=False)
    for uid in user_ids:
        pipe.dump(store.keys.vector(src_ev, str(uid)))
    dumps = pipe.execute()
    ttl_ms = int(store.ttl_s * 1000) if store.ttl_s else 0
    pipe = store.r.pipeline(transaction=False)
    for uid, data in zip(user_ids, dumps, strict=True):
        if data is not None:
            pipe.restore(store.keys.vector(dst_ev, str(uid)), ttl_ms, data, replace=True)
    pipe.execute()
    return [d is not None for d in dumps]
