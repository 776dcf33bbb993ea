"""Test data for the refresh: offline parquet files in the Feast offline layout, encoders
(the tiny ONNX encoder of tests/tiny_model.py, optionally poisoned so some users get NaN
vectors), and the RefreshConfig the tests start from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pyarrow as pa
import pyarrow.parquet as pq
from onnx import numpy_helper

from refresh.config import RefreshConfig
from tests.tiny_model import DIM, MODEL, SPEC, tiny_encoder
from userembed.features import hash_ids
from userembed.manifest import single_onnx_manifest
from userembed.registry import Registry
from userembed.snapshots import BEHAVIOR_FILE, PROFILE_FILE

T0_MS = 1_760_000_000_000
DAY_MS = 86_400_000


def offline_tables(
    n_users: int, seed: int = 0, snapshots: int = 2, t0_ms: int = T0_MS
) -> tuple[pa.Table, pa.Table]:
    """Behaviour rows (`snapshots` per user, shuffled: the latest is not the last in the file)
    and one profile row per user. The latest snapshot's sequences start with the user's id."""
    rng = np.random.default_rng(seed)
    uid, ts, items, cats = [], [], [], []
    for s in range(snapshots):
        for u in range(n_users):
            n = int(rng.integers(0, 12))  # 0..11 events; sequence_length is 6
            seq = [u + 1000 * s] + rng.integers(0, 200, size=n).tolist() if n else []
            uid.append(u)
            ts.append(t0_ms + s * DAY_MS + int(rng.integers(0, 1000)))
            items.append(seq)
            cats.append([i % 7 for i in seq])
    order = rng.permutation(len(uid))
    behavior = pa.table(
        {
            "user_id": pa.array(np.asarray(uid)[order], pa.int64()),
            "event_timestamp": pa.array(np.asarray(ts)[order], pa.int64()).cast(
                pa.timestamp("ms", tz="UTC")
            ),
            "item_seq": pa.array([items[i] for i in order], pa.list_(pa.int64())),
            "category_seq": pa.array([cats[i] for i in order], pa.list_(pa.int64())),
            "seq_len": pa.array([len(items[i]) for i in order], pa.int64()),
        }
    )
    ages = rng.integers(0, 8, size=n_users).astype(object)
    ages[::17] = None  # unknown profile values are padding
    profile = pa.table(
        {
            "user_id": pa.array(np.arange(n_users), pa.int64()),
            "event_timestamp": pa.array(np.full(n_users, t0_ms), pa.int64()).cast(
                pa.timestamp("ms", tz="UTC")
            ),
            "age_bucket": pa.array(list(ages), pa.int64()),
        }
    )
    return behavior, profile


def write_offline(
    directory: Path, behavior: pa.Table, profile: pa.Table, row_group_size: int = 1000
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    pq.write_table(behavior, directory / BEHAVIOR_FILE, row_group_size=row_group_size)
    pq.write_table(profile, directory / PROFILE_FILE)
    return directory


def refresh_config(
    registry: Registry, redis_url: str, offline_dir: Path, **overrides: Any
) -> RefreshConfig:
    """A refresh of the tiny model over `offline_dir`, no progress log; `overrides`: the fields
    a test is about (parts, batch size, drift sample, similar index, another model, ...)."""
    fields: dict[str, Any] = {"model": MODEL, "progress_every_s": 0.0, **overrides}
    return RefreshConfig(
        registry_root=registry.root, redis_url=redis_url, offline_dir=str(offline_dir), **fields
    )


def latest_rows_python(behavior: pa.Table) -> dict[int, dict]:
    """Reference: each user's latest behaviour row, the slow obvious way."""
    out: dict[int, dict] = {}
    for r in behavior.to_pylist():
        cur = out.get(r["user_id"])
        if cur is None or r["event_timestamp"] >= cur["event_timestamp"]:
            out[r["user_id"]] = r
    return out


def publish_model(registry: Registry, staging: Path, model: onnx.ModelProto, name: str) -> str:
    """Publish an encoder with the tiny model's SPEC; returns the version id."""
    d = staging / name
    d.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(d / "encoder.onnx"))
    manifest = single_onnx_manifest(MODEL, d, SPEC, DIM)
    return registry.publish(manifest, d).version


def poisoned_encoder(seed: int, nan_item: int) -> onnx.ModelProto:
    """The tiny encoder whose item table row for `nan_item` is NaN: any user with that item in
    the last SPEC.sequence_length events gets a NaN vector (a broken export, say)."""
    model = tiny_encoder(SPEC, DIM, seed)
    item = SPEC.sequence_features[0]
    row = int(hash_ids(np.array([nan_item]), item.num_embeddings)[0])
    for i, init in enumerate(model.graph.initializer):
        if init.name == f"t_{item.name}":
            table = numpy_helper.to_array(init).copy()
            table[row] = np.nan
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(table, init.name))
    return model
