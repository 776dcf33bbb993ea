"""In-process references of the serving benchmark: what the bare libraries do without a server.

- raw redis-py: MGET of 100 plain keys holding the vectors (the batch path's reference), and
  the pipelined HMGET of 100 vector hashes that the store layout needs;
- raw onnxruntime on pre-encoded inputs at the server's batch size (the miss path's reference).
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any, cast

import numpy as np

from bench.common import raw_onnxruntime
from bench.serving_data import DIM, EV, MODEL, encoder_inputs, mget_key


def raw_redis(url: str, users: int, seconds: float) -> dict[str, float]:
    """users/s of one redis-py client for "mget" and "pipeline_hmget", `seconds` each."""
    import redis

    from userembed.vectors import VECTOR_FIELDS, VectorKeys

    r = redis.Redis.from_url(url)
    keys = VectorKeys(MODEL)
    rng = random.Random(3)
    out = {}
    for mode in ("mget", "pipeline_hmget"):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            ids = [str(rng.randrange(users)) for _ in range(100)]
            if mode == "mget":
                vals = cast(list[bytes], r.mget([mget_key(u) for u in ids]))
                [np.frombuffer(v, dtype="<f4") for v in vals]
            else:
                pipe = r.pipeline(transaction=False)
                for u in ids:
                    pipe.hmget(keys.vector(EV, u), list(VECTOR_FIELDS))
                [np.frombuffer(v[0], dtype="<f4") for v in pipe.execute()]
            n += 100
        out[mode] = n / (time.perf_counter() - t0)
    return out


def raw_encoder(
    encoder_path: Path, spec: Any, rows: dict[str, Any], batch: int, seconds: float
) -> float:
    """users/s of onnxruntime alone on the first `batch` rows, pre-encoded."""
    return raw_onnxruntime(encoder_path, DIM, encoder_inputs(spec, rows, 0, batch), seconds)
