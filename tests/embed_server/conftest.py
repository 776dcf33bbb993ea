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

import pytest

from embed_server.online_features import FeatureRows
from embed_server.server import EmbeddingServer
from embed_server.settings import ServerSettings, load_settings
from tests.tiny_model import DIM, MODEL, SPEC, publish_tiny  # noqa: F401 (server tests)
from userembed.features import InputSpec
from userembed.registry import Registry


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

    def fetch(self, user_ids: Sequence[str], spec: InputSpec) -> FeatureRows:
        self.fetched.append(list(user_ids))
        names = spec.feature_names()
        rows = [self.users.get(u) for u in user_ids]
        return FeatureRows(
            columns={n: [r.get(n) if r else None for r in rows] for n in names},
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
