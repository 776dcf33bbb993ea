"""The two ways `VectorStore.write` sends a batch of vector hashes: one HSET (+ EXPIRE) per user.

- `write_pipelined`: a redis-py pipeline. On Redis Cluster the cluster pipeline sends each
  command to the master of its key's slot (and follows MOVED / ASK while slots migrate).
- `write_packed`: the same commands packed as RESP into one buffer and sent on one pooled
  connection of a single server. redis-py's Python cost of packing and parsing two commands per
  user would be paid on the cores the batch refresh shares with onnxruntime and Redis.

Both read every reply and return, per user, its first error reply (None: written).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import redis

from userembed import resp


def write_pipelined(
    client: Any,  # redis.Redis or RedisCluster
    keys: Sequence[bytes],
    data: np.ndarray,  # (N, D) in the stored dtype
    fields: dict[str, str | int],  # dtype, model_version, computed_at: the same for every user
    feature_ts_ms: Sequence[int] | None,
    ttl_s: int | None,
) -> list[redis.ResponseError | None]:
    pipe = client.pipeline(transaction=False)
    for i, key in enumerate(keys):
        fts = int(feature_ts_ms[i]) if feature_ts_ms is not None else 0
        pipe.hset(key, mapping={"vector": data[i].tobytes(), **fields, "feature_ts": fts})
        if ttl_s:
            pipe.expire(key, ttl_s)
    replies = pipe.execute(raise_on_error=False)
    per_user = 2 if ttl_s else 1
    return [
        next((r for r in replies[i : i + per_user] if isinstance(r, redis.ResponseError)), None)
        for i in range(0, len(replies), per_user)
    ]


def write_packed(
    client: redis.Redis,
    keys: Sequence[bytes],
    data: np.ndarray,  # (N, D) in the stored dtype, C-contiguous
    fields: dict[str, str | int],  # dtype, model_version, computed_at, in that order
    feature_ts_ms: Sequence[int] | None,
    ttl_s: int | None,
) -> list[redis.ResponseError | None]:
    """Single server only (no per-slot routing)."""
    row = data.shape[1] * data.itemsize
    buf = memoryview(data.tobytes())  # one copy of the batch, sliced per user without copies
    head = resp.array_header(2 + 2 * (len(fields) + 2)) + resp.bulk(b"HSET")  # + vector, feature_ts
    vector_head = resp.bulk(b"vector") + resp.bulk_header(row)
    # fields after the vector, the same for every user except feature_ts' value
    middle = resp.CRLF + b"".join(
        resp.bulk(name.encode()) + resp.bulk(str(value).encode()) for name, value in fields.items()
    )
    middle += resp.bulk(b"feature_ts")
    expire_head = resp.array_header(3) + resp.bulk(b"EXPIRE")
    ttl = resp.bulk(b"%d" % ttl_s) if ttl_s else b""
    parts: list[bytes | memoryview] = []
    for i, name in enumerate(keys):
        key = resp.bulk(name)
        fts = int(feature_ts_ms[i]) if feature_ts_ms is not None else 0
        parts += (head, key, vector_head, buf[i * row : (i + 1) * row], middle)
        parts.append(resp.bulk(b"%d" % fts))
        if ttl:
            parts += (expire_head, key, ttl)
    per_user = 2 if ttl else 1
    errors: list[redis.ResponseError | None] = [None] * len(keys)
    pool = client.connection_pool
    conn = pool.get_connection()
    try:
        conn.send_packed_command([b"".join(parts)])  # a list: bytes alone is iterated
        for i in range(len(keys)):
            for _ in range(per_user):
                try:
                    conn.read_response()  # raises an error reply: read on, it is one user's
                except redis.ResponseError as e:
                    errors[i] = errors[i] or e
    except BaseException:
        conn.disconnect()  # replies may be left unread: never reuse this connection
        raise
    finally:
        pool.release(conn)
    return errors
