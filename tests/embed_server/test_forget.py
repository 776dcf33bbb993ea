"""Forgetting a user (docs/forget.md) on a real Redis, the real Feast online store, real refresh
runs and a real gRPC server: every read path says NOT_FOUND, refreshes honour the tombstone
until the offline files no longer hold the user, and another user is untouched."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import redis

from embed_server.client import EmbeddingClient, ItemError
from embed_server.embedding import Embedding
from embed_server.online_features import FeastFeatureSource
from embed_server.server import EmbeddingServer
from refresh.job import refresh
from tests.embed_server.conftest import MODEL, SPEC, LoopThread, publish_tiny
from tests.embed_server.test_feast_integration import feast_store  # noqa: F401 (fixture)
from tests.refresh.support import refresh_config
from tests.waiting import wait_for
from userembed import feast_ops
from userembed.commands.main import main
from userembed.forget import Tombstones, release_users
from userembed.registry import Registry
from userembed.snapshots import BEHAVIOR_FILE, PROFILE_FILE
from userembed.vectors import VectorStore

GONE, KEPT = "11", "12"  # the users of test_feast_integration's offline files


def code_of(call: Callable[[], object]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def stored_keys(client: redis.Redis, user: str) -> list[bytes]:
    return sorted(client.scan_iter(match=f"ue:{MODEL}:*:{{{user}}}"))


@pytest.mark.timeout(240)
def test_a_forgotten_user_is_not_found_on_every_path_and_stays_out_of_refreshes(
    feast_store: Any,  # noqa: F811 (the fixture imported above)
    settings_for: Callable[..., Any],
    registry: Registry,
    redis_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    publish_tiny(registry, tmp_path / "staging", seed=1)
    offline = tmp_path / "offline"  # the fixture's offline files: both users
    cfg = refresh_config(
        registry, redis_url, offline, part_rows=50, batch_size=16, drift_sample=2, check_sample=0
    )
    first = refresh(cfg)
    r = redis.Redis.from_url(redis_url)
    features = FeastFeatureSource(feast_store)
    loop = LoopThread()
    srv = EmbeddingServer(settings_for(vector_cache_mb=1.0), features=features)
    try:
        loop.run(srv.start())
        with EmbeddingClient(f"127.0.0.1:{srv.port}", timeout_s=30) as c:
            assert [c.get(GONE).source for _ in range(2)] == ["stored", "stored"]  # now cached
            assert c.similar(KEPT).user_ids == [GONE]
            kept = c.get(KEPT).vector

            argv = ["forget", GONE, "--registry-root", registry.root, "--redis-url", redis_url]
            assert main([*argv, "--json"]) == 0
            report = json.loads(capsys.readouterr().out)
            assert report["models"] == [MODEL] and report["vectors_deleted"] == 1
            assert report["feature_rows_deleted"] == 1  # one hash holds both feature views
            assert features.fetch([GONE, KEPT], SPEC).found == [False, True]
            assert stored_keys(r, GONE) == []

            # From the next poll on: NOT_FOUND stored, cached, computed, batched and similar,
            # even once the online rows are materialised again from the offline files.
            wait_for(lambda: GONE in srv.lookup.forgotten)  # type: ignore[union-attr]
            feast_ops.materialize(feast_store)
            assert features.fetch([GONE], SPEC).found == [True]

            def every_path_refuses() -> None:
                assert code_of(lambda: c.get(GONE)) == grpc.StatusCode.NOT_FOUND
                assert code_of(lambda: c.get(GONE, force=True)) == grpc.StatusCode.NOT_FOUND
                gone, other = c.batch_get([GONE, KEPT])
                assert isinstance(gone, ItemError) and gone.code == grpc.StatusCode.NOT_FOUND
                assert isinstance(other, Embedding) and other.source == "stored"
                assert code_of(lambda: c.similar(GONE)) == grpc.StatusCode.NOT_FOUND
                assert GONE not in c.similar(KEPT).user_ids
                assert stored_keys(r, GONE) == []  # no write-back either
                # the other user is untouched (a refresh recomputes them: equal up to rounding)
                np.testing.assert_allclose(c.get(KEPT).vector, kept, rtol=1e-5, atol=1e-6)

            every_path_refuses()

            # A refresh leaves the user out while the offline files hold them; the tombstone
            # stays. The server follows the new version and its index.
            second = refresh(cfg)
            assert (first.users, second.users) == (2, 1)
            wait_for(lambda: c.get(KEPT).embedding_version == second.embedding_version)
            assert VectorStore(r, MODEL).read(second.embedding_version, [GONE]) == [None]
            assert GONE in Tombstones(r).ids()
            every_path_refuses()

            # Once the offline files no longer hold the user, the next refresh drops the
            # tombstone (then `forget --release` has nothing left to release).
            for name in (BEHAVIOR_FILE, PROFILE_FILE):
                table = pq.read_table(offline / name)
                pq.write_table(table.filter(pc.field("user_id") != int(GONE)), offline / name)
            third = refresh(cfg)
            assert third.users == 1 and GONE not in Tombstones(r).ids()
            assert release_users([GONE, KEPT], redis_url) == 0
    finally:
        loop.run(srv.stop(grace=0.5))
        loop.close()
