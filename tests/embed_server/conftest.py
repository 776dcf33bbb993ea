"""Torch-free fixtures: a tiny ONNX encoder published to a real registry, an in-memory feature
source (the real Feast one is exercised in test_feast_integration.py), and a server running on
its own event loop thread on port 0."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from embed_server.online_features import FeatureRows, parse_user_id
from embed_server.server import EmbeddingServer
from embed_server.settings import ServerSettings, load_settings
from userembed.features import (
    BEHAVIOR_VIEW,
    PROFILE_VIEW,
    FeatureSpec,
    InputSpec,
)
from userembed.manifest import single_onnx_manifest
from userembed.registry import Registry

MODEL = "tiny"
DIM = 8
SPEC = InputSpec(
    sequence_length=6,
    sequence_features=(
        FeatureSpec("item_seq", 50, BEHAVIOR_VIEW),
        FeatureSpec("category_seq", 10, BEHAVIOR_VIEW),
    ),
    profile_features=(FeatureSpec("age_bucket", 8, PROFILE_VIEW),),
)


def tiny_encoder(
    spec: InputSpec, dim: int, seed: int, out_dim: int | None = None
) -> onnx.ModelProto:
    """Gather per feature -> mean over positions -> sum -> MatMul: (B, ...) -> user_vector (B, D)."""
    rng = np.random.default_rng(seed)
    out_dim = out_dim or dim
    inits, nodes, inputs, pooled = [], [], [], []
    feats = [(f.name, f.num_embeddings) for f in spec.sequence_features]
    feats.append(("profile", max(f.num_embeddings for f in spec.profile_features)))
    for name, n in feats:
        width = spec.sequence_length if name != "profile" else len(spec.profile_features)
        inputs.append(helper.make_tensor_value_info(name, TensorProto.INT64, ["B", width]))
        table = rng.normal(size=(n, dim)).astype(np.float32)
        inits.append(numpy_helper.from_array(table, f"t_{name}"))
        nodes.append(helper.make_node("Gather", [f"t_{name}", name], [f"e_{name}"]))  # (B, L, D)
        nodes.append(
            helper.make_node("ReduceMean", [f"e_{name}"], [f"m_{name}"], axes=[1], keepdims=0)
        )  # (B, D)
        pooled.append(f"m_{name}")
    nodes.append(helper.make_node("Sum", pooled, ["pooled"]))
    w = rng.normal(size=(dim, out_dim)).astype(np.float32)
    inits.append(numpy_helper.from_array(w, "w_out"))
    nodes.append(helper.make_node("MatMul", ["pooled", "w_out"], ["user_vector"]))  # (B, D)
    out = helper.make_tensor_value_info("user_vector", TensorProto.FLOAT, ["B", out_dim])
    graph = helper.make_graph(nodes, "tiny", inputs, [out], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def publish_tiny(
    registry: Registry,
    staging: Path,
    seed: int,
    out_dim: int | None = None,
    model: str = MODEL,
    aliases: tuple[str, ...] = ("latest",),
) -> str:
    """Publish a tiny encoder (its `latest` alias moves); returns the version id."""
    d = staging / f"{model}-{seed}-{out_dim}"
    d.mkdir(parents=True, exist_ok=True)
    onnx.save(tiny_encoder(SPEC, DIM, seed, out_dim), str(d / "encoder.onnx"))
    manifest = single_onnx_manifest(model, d, SPEC, DIM)
    return registry.publish(manifest, d, aliases=aliases).version


@dataclass
class FakeFeatures:
    """In-memory OnlineFeatureSource: user id -> feature row. Counts fetches."""

    users: dict[str, dict[str, Any]] = field(default_factory=dict)
    fetched: list[list[str]] = field(default_factory=list)

    def add(
        self, user_id: str, items: Sequence[int], age: int = 3, ts_ms: int = 1_700_000_000_000
    ) -> None:
        self.users[user_id] = {
            "item_seq": list(items),
            "category_seq": [i % 7 for i in items],
            "age_bucket": age,
            "_ts": ts_ms,
        }

    def check_user_id(self, user_id: str) -> None:
        parse_user_id(user_id)

    def fetch(self, user_ids: Sequence[str], spec: InputSpec) -> FeatureRows:
        self.fetched.append(list(user_ids))
        names = [f.name for f in spec.sequence_features + spec.profile_features]
        rows = [self.users.get(u) for u in user_ids]
        return FeatureRows(
            columns={n: [r[n] if r else None for r in rows] for n in names},
            found=[r is not None for r in rows],
            feature_ts_ms=[r["_ts"] if r else 0 for r in rows],
        )


class LoopThread:
    """An asyncio loop on a thread: the server runs there, tests call it synchronously."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 60) -> Any:
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "models")


@pytest.fixture
def features() -> FakeFeatures:
    f = FakeFeatures()
    for uid in range(1, 21):
        f.add(str(uid), items=[uid, uid + 1, uid + 2])
    return f


@pytest.fixture
def settings_for(redis_url: str, registry: Registry) -> Callable[..., ServerSettings]:
    def make(**overrides: Any) -> ServerSettings:
        base: dict[str, Any] = dict(
            grpc_port=0,
            metrics_port=0,
            registry_root=registry.root,
            redis_url=redis_url,
            reload_interval_s=0.2,
            batch_wait_ms=1.0,
            drain_grace_s=1.0,
        )
        base.update(overrides)
        return load_settings(env={}, **base)

    return make


@pytest.fixture
def start_server(
    settings_for: Callable[..., ServerSettings], features: FakeFeatures
) -> Iterator[Callable[..., EmbeddingServer]]:
    """start_server(**settings) -> a started EmbeddingServer (stopped at teardown)."""
    loop = LoopThread()
    started: list[EmbeddingServer] = []

    def start(**overrides: Any) -> EmbeddingServer:
        srv = EmbeddingServer(settings_for(**overrides), features=features)
        loop.run(srv.start())
        started.append(srv)
        return srv

    yield start
    for srv in started:
        loop.run(srv.stop(grace=0.5))
    loop.close()
