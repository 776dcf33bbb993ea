"""The world the serving benchmark serves: an encoder in a scratch registry, feature rows in
the offline files and Feast, and every user's vector stored in Redis.

`--encoder supermoe` (default): the trainer's default SUPERMOE model with random weights
(bench/encoder.py), exported by the trainer's exporter, so the miss path pays what the real
model costs. `--encoder synthetic`: a torch-free ONNX of embeddings, 2 position-wise FFN
layers, mean pool and projection (hidden 64). Both read 4 sequence features of length 50.
bench/refresh.py publishes the same encoders.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import input_spec as spec_with_sizes
from bench.common import log

MODEL = "bench"
DIM = 64
SEQ_LEN = 50
EV = "bench-ev"  # the embedding version that holds the stored vectors
SERVER_BATCH = 64  # the server's micro-batch (USEREMBED_BATCH_SIZE) and raw ORT's batch
ENCODERS = ("supermoe", "synthetic")
TABLE_SIZES = {
    "item_seq": 20_000,
    "category_seq": 200,
    "event_type_seq": 8,
    "gap_bucket_seq": 16,
    "age_bucket": 16,
    "gender": 4,
    "occupation": 32,
    "region": 64,
}


def input_spec() -> Any:
    return spec_with_sizes(SEQ_LEN, TABLE_SIZES)


def mget_key(user_id: str) -> str:
    """The plain string key holding a copy of a user's vector, for the raw MGET reference."""
    return f"bench:mget:{{{user_id}}}"


# --- encoders -----------------------------------------------------------------------------------


def synthetic_encoder(spec: Any, hidden: int = DIM, ffn: int = 4 * DIM, layers: int = 2) -> Any:
    """The cheap encoder as an onnx.ModelProto built with onnx.helper (no torch)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits, nodes, inputs = [], [], []

    def w(name: str, *shape: int, scale: float = 0.1) -> str:
        inits.append(
            numpy_helper.from_array((rng.normal(size=shape) * scale).astype(np.float32), name)
        )
        return name

    seq = []
    for f in spec.sequence_features:
        inputs.append(helper.make_tensor_value_info(f.name, TensorProto.INT64, ["B", SEQ_LEN]))
        nodes.append(
            helper.make_node(
                "Gather", [w(f"t_{f.name}", f.num_embeddings, hidden), f.name], [f"e_{f.name}"]
            )
        )
        seq.append(f"e_{f.name}")
    nodes.append(helper.make_node("Sum", seq, ["h0"]))  # (B, L, H)
    h = "h0"
    for i in range(layers):  # position-wise FFN with a residual: (B, L, H)
        nodes += [
            helper.make_node("MatMul", [h, w(f"w1_{i}", hidden, ffn)], [f"a{i}"]),
            helper.make_node("Relu", [f"a{i}"], [f"r{i}"]),
            helper.make_node("MatMul", [f"r{i}", w(f"w2_{i}", ffn, hidden)], [f"b{i}"]),
            helper.make_node("Add", [h, f"b{i}"], [f"h{i + 1}"]),
        ]
        h = f"h{i + 1}"
    nodes.append(helper.make_node("ReduceMean", [h], ["pooled"], axes=[1], keepdims=0))  # (B, H)
    inputs.append(
        helper.make_tensor_value_info(
            "profile", TensorProto.INT64, ["B", len(spec.profile_features)]
        )
    )
    nodes.append(helper.make_node("Gather", [w("t_profile", 64, hidden), "profile"], ["e_profile"]))
    nodes.append(helper.make_node("ReduceMean", ["e_profile"], ["p_profile"], axes=[1], keepdims=0))
    nodes.append(helper.make_node("Add", ["pooled", "p_profile"], ["z"]))
    nodes.append(helper.make_node("MatMul", ["z", w("w_out", hidden, DIM)], ["user_vector"]))
    out = helper.make_tensor_value_info("user_vector", TensorProto.FLOAT, ["B", DIM])
    model = helper.make_model(
        helper.make_graph(nodes, "bench", inputs, [out], inits),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def supermoe_encoder(spec: Any, path: Path) -> None:
    """The trainer's default SUPERMOE encoder with random weights (bench/encoder.py), exported
    to `path` by the trainer's exporter: the model the service runs, at its compute cost."""
    from bench.encoder import random_encoder
    from trainer.export import export_onnx, random_inputs

    export_onnx(random_encoder(spec, DIM), path, random_inputs(spec, 64, np.random.default_rng(0)))


def publish_encoder(root: Path, spec: Any, kind: str = "synthetic") -> tuple[str, Path]:
    """Build the `kind` encoder (ENCODERS), publish it to the registry under root/models;
    -> (model version, path of the ONNX file)."""
    import onnx

    from userembed.manifest import single_onnx_manifest
    from userembed.registry import Registry

    staging = root / "staging"
    staging.mkdir(parents=True)
    if kind == "supermoe":
        supermoe_encoder(spec, staging / "encoder.onnx")
    elif kind == "synthetic":
        onnx.save(synthetic_encoder(spec), str(staging / "encoder.onnx"))
    else:
        raise ValueError(f"unknown encoder {kind!r}; expected one of {ENCODERS}")
    manifest = single_onnx_manifest(MODEL, staging, spec, DIM)
    version = Registry(root / "models").publish(manifest, staging).version
    return version, staging / "encoder.onnx"


# --- features and vectors -----------------------------------------------------------------------


def feature_rows(users: int) -> dict[str, Any]:
    """Random feature columns of `users` users (ids 0..users-1), 5 to SEQ_LEN events each."""
    rng = np.random.default_rng(1)
    lens = rng.integers(5, SEQ_LEN + 1, size=users)
    rows: dict[str, Any] = {"user_id": np.arange(users, dtype=np.int64)}
    for name, hi in (
        ("item_seq", 50_000),
        ("category_seq", 300),
        ("event_type_seq", 4),
        ("gap_bucket_seq", 16),
    ):
        rows[name] = [rng.integers(0, hi, size=n).tolist() for n in lens]
    rows["seq_len"] = lens.astype(np.int64)
    for name, hi in (("age_bucket", 7), ("gender", 3), ("occupation", 21), ("region", 50)):
        rows[name] = rng.integers(0, hi, size=users).astype(np.int64)
    return rows


def write_offline(offline: Path, rows: dict[str, Any]) -> None:
    """The rows as the offline parquet files the Feast views read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from userembed.features import PROFILE_FEATURES, SEQUENCE_FEATURES
    from userembed.paths import BEHAVIOR_FILE, PROFILE_FILE

    offline.mkdir(parents=True)
    n = len(rows["user_id"])
    ts = pa.array([datetime(2026, 11, 1, tzinfo=UTC)] * n, type=pa.timestamp("us", tz="UTC"))
    b = {"user_id": pa.array(rows["user_id"]), "event_timestamp": ts}
    for f in SEQUENCE_FEATURES:
        b[f] = pa.array(rows[f], type=pa.list_(pa.int64()))
    b["seq_len"] = pa.array(rows["seq_len"])
    for name, values in long_term_columns(rows).items():
        b[name] = pa.array(values)
    pq.write_table(pa.table(b), offline / BEHAVIOR_FILE)
    p = {"user_id": pa.array(rows["user_id"]), "event_timestamp": ts}
    for f in PROFILE_FEATURES:
        p[f] = pa.array(rows[f])
    pq.write_table(pa.table(p), offline / PROFILE_FILE)


def long_term_columns(rows: dict[str, Any]) -> dict[str, list[Any]]:
    """The behaviour view's long-term counts, taken from each user's events in `rows` (the
    Feast view declares them, so the offline file must hold them)."""
    from userembed.features import (
        LT_ATTRIBUTE_COUNTS,
        LT_CATEGORY_COUNTS,
        LT_DISTINCT_CATEGORIES,
        LT_DISTINCT_ITEMS,
        LT_EVENT_TYPE_COUNTS,
        LT_SECONDS_SINCE_FIRST,
        LT_SECONDS_SINCE_LAST,
        LT_WINDOW_COUNTS,
        LongTermSpec,
    )

    spec = LongTermSpec()
    out: dict[str, list[Any]] = {
        name: []
        for name in (
            LT_CATEGORY_COUNTS,
            LT_EVENT_TYPE_COUNTS,
            LT_WINDOW_COUNTS,
            LT_DISTINCT_ITEMS,
            LT_DISTINCT_CATEGORIES,
            LT_SECONDS_SINCE_FIRST,
            LT_SECONDS_SINCE_LAST,
            LT_ATTRIBUTE_COUNTS,
        )
    }
    for items, cats, types in zip(
        rows["item_seq"], rows["category_seq"], rows["event_type_seq"], strict=True
    ):
        cats_arr, types_arr = np.asarray(cats), np.asarray(types)
        out[LT_CATEGORY_COUNTS].append(
            np.bincount(cats_arr % spec.category_buckets, minlength=spec.category_buckets).tolist()
        )
        out[LT_EVENT_TYPE_COUNTS].append(
            np.bincount(
                types_arr % spec.event_type_buckets, minlength=spec.event_type_buckets
            ).tolist()
        )
        out[LT_WINDOW_COUNTS].append([len(items)] * len(spec.window_days))
        out[LT_DISTINCT_ITEMS].append(len(set(items)))
        out[LT_DISTINCT_CATEGORIES].append(len(set(cats)))
        out[LT_SECONDS_SINCE_FIRST].append(30 * 86_400)
        out[LT_SECONDS_SINCE_LAST].append(3_600)
        out[LT_ATTRIBUTE_COUNTS].append([0] * spec.attribute_buckets)  # no items table here
    return out


def encoder_inputs(spec: Any, rows: dict[str, Any], start: int, stop: int) -> dict[str, Any]:
    """Encoder inputs of rows[start:stop]."""
    from userembed.features import encode_inputs

    names = [f.name for f in spec.sequence_features + spec.profile_features]
    return encode_inputs({k: list(rows[k][start:stop]) for k in names}, spec)


def encode_all(encoder_path: Path, spec: Any, rows: dict[str, Any], batch: int = 512) -> np.ndarray:
    """Every user's vector, (N, D)."""
    from userembed.onnx_encoder import OnnxEncoder

    enc = OnnxEncoder(encoder_path, DIM, intra_op_threads=2)
    n = len(rows["user_id"])
    return np.concatenate(
        [enc.run(encoder_inputs(spec, rows, s, s + batch)) for s in range(0, n, batch)]
    )


def store_vectors(r: Any, vectors: np.ndarray, model_version: str) -> None:
    """Publish the vectors as embedding version EV, and a plain copy under `mget_key` for the
    raw MGET reference."""
    from userembed.vectors import VectorStore

    n = len(vectors)
    vs = VectorStore(r, MODEL)
    vs.create_version(EV, model_version)
    ids = [str(u) for u in range(n)]
    for i in range(0, n, 5000):
        vs.write(EV, ids[i : i + 5000], vectors[i : i + 5000], model_version)
    vs.publish(EV, users=n)
    pipe = r.pipeline(transaction=False)
    for i, u in enumerate(ids):
        pipe.set(mget_key(u), vectors[i].astype("<f4").tobytes())
    pipe.execute()


# --- the whole set-up ---------------------------------------------------------------------------


@dataclass
class World:
    """What the server serves, set up in a scratch folder."""

    root: Path
    url: str
    env: dict[str, str]
    spec: Any
    onnx_path: Path
    rows: dict[str, Any]
    vectors: np.ndarray


def server_env(root: Path, url: str) -> dict[str, str]:
    """The environment of the server and the helper processes."""
    return {
        **os.environ,
        "REDIS_URL": url,
        "USEREMBED_HOME": str(root / "home"),
        "USEREMBED_OFFLINE_DIR": str(root / "offline"),
        "USEREMBED_FEAST_REGISTRY": str(root / "feast" / "registry.db"),
        "USEREMBED_REGISTRY_ROOT": str(root / "models"),
        "USEREMBED_METRICS_PORT": "-1",
        "USEREMBED_BATCH_SIZE": str(SERVER_BATCH),
        "USEREMBED_LOG_LEVEL": "WARNING",
    }


def prepare(root: Path, url: str, users: int, encoder: str) -> World:
    """Publish the encoder, write and materialize the features, store every user's vector."""
    import redis

    from userembed import feast_ops

    env = server_env(root, url)
    # this process applies and materializes Feast too: the same folders as the server
    for k in ("USEREMBED_HOME", "USEREMBED_OFFLINE_DIR", "USEREMBED_FEAST_REGISTRY"):
        os.environ[k] = env[k]
    spec = input_spec()
    version, onnx_path = publish_encoder(root, spec, encoder)
    rows = feature_rows(users)
    write_offline(root / "offline", rows)
    t0 = time.perf_counter()
    store = feast_ops.open_store(url)
    feast_ops.apply(store)
    feast_ops.materialize(store)
    log(f"feast apply + materialize of {users} users: {time.perf_counter() - t0:.1f}s")
    vectors = encode_all(onnx_path, spec, rows)
    store_vectors(redis.Redis.from_url(url), vectors, version)
    log(f"stored {users} vectors in {EV}")
    return World(root, url, env, spec, onnx_path, rows, vectors)
