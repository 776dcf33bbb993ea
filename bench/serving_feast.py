"""The `feast serve` reference of the serving benchmark: the stored vectors as a Feast feature
(`user_vectors:vector`) in a second Feast repo on the same Redis, served over HTTP by
`feast serve` (1 worker, --max-requests 0), driven by the HTTP/1.1 load generator.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from bench.common import free_port
from userembed.processes import stop

FEAST = str(Path(sys.executable).parent / "feast")


def vectors_repo(root: Path, redis_url: str, vectors: np.ndarray, env: dict[str, str]) -> Path:
    """Write, apply and materialize the Feast repo root/feast_vectors serving `vectors`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from userembed.feast_ops import redis_connection_string

    repo = root / "feast_vectors"
    repo.mkdir()
    n = len(vectors)
    ts = pa.array([datetime(2026, 11, 1, tzinfo=UTC)] * n, type=pa.timestamp("us", tz="UTC"))
    pq.write_table(
        pa.table(
            {
                "user_id": pa.array(np.arange(n, dtype=np.int64)),
                "event_timestamp": ts,
                "vector": pa.array(vectors.tolist(), type=pa.list_(pa.float32())),
            }
        ),
        repo / "vectors.parquet",
    )
    (repo / "feature_store.yaml").write_text(
        f"project: benchvectors\nprovider: local\nregistry: {repo / 'registry.db'}\n"
        f"online_store:\n  type: redis\n  connection_string: {redis_connection_string(redis_url)}\n"
        "offline_store:\n  type: file\nentity_key_serialization_version: 3\n"
    )
    (repo / "vectors.py").write_text(
        "from datetime import timedelta\n"
        "from feast import Entity, FeatureView, Field, FileSource\n"
        "from feast.types import Array, Float32\nfrom feast.value_type import ValueType\n"
        "user = Entity(name='user', join_keys=['user_id'], value_type=ValueType.INT64)\n"
        f"src = FileSource(name='vectors_src', path='{repo / 'vectors.parquet'}', timestamp_field='event_timestamp')\n"
        "user_vectors = FeatureView(name='user_vectors', entities=[user], ttl=timedelta(0),\n"
        "    schema=[Field(name='vector', dtype=Array(Float32))], source=src, online=True)\n"
    )
    subprocess.run(
        [FEAST, "apply"], cwd=repo, env=env, check=True, capture_output=True, timeout=300
    )
    subprocess.run(
        [FEAST, "materialize", "1970-01-02T00:00:00", "2026-11-02T00:00:00"],
        cwd=repo,
        env=env,
        check=True,
        capture_output=True,
        timeout=600,
    )
    return repo


@contextmanager
def feast_serve(repo: Path, env: dict[str, str], timeout_s: float = 120) -> Iterator[int]:
    """`feast serve` of `repo` on a free port; yields the port once it accepts connections."""
    port = free_port()
    argv = [FEAST, "serve", "-p", str(port), "-w", "1", "--max-requests", "0", "--no-access-log"]
    proc = subprocess.Popen(
        argv, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("feast serve did not start") from None
                time.sleep(0.5)
        yield port
    finally:
        stop(proc)
