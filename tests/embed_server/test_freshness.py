"""Freshness through a real Redis, Feast push source and gRPC server (docs/freshness.md): behaviour
pushed for a user is served stale at once, then fresh after a background recompute with no
refresh run; past `max_stale_s` the read recomputes inline."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd
import pytest
import redis

from embed_server.client import EmbeddingClient
from embed_server.freshness import BULK, Freshness
from embed_server.metrics import ServerMetrics
from embed_server.online_features import FeastFeatureSource
from embed_server.server import EmbeddingServer
from embed_server.settings import load_settings
from embed_server.stored_reader import open_stored_reader, stale_since
from tests.embed_server.conftest import MODEL, LoopThread, publish_tiny
from tests.embed_server.test_feast_integration import (  # noqa: F401 (the fixture)
    FEATURE_TIME,
    feast_store,
)
from userembed.features import LONG_TERM_SCALAR_FEATURES, LongTermSpec, encode_inputs
from userembed.freshness import mark_pushed, push_fresh
from userembed.redis_urls import open_async_redis, open_redis
from userembed.vectors import VectorStore, pushed_key

OLD_TS = int(FEATURE_TIME.timestamp() * 1000)


def _row(user_id: int, at: datetime, items: list[int]) -> pd.DataFrame:
    """One behaviour row with every feature of the view (a push replaces the whole row)."""
    row: dict[str, Any] = {
        "user_id": [user_id],
        "event_timestamp": [at],
        "item_seq": [items],
        "category_seq": [[1] * len(items)],
        "event_type_seq": [[3] * len(items)],
        "gap_bucket_seq": [[2] * len(items)],
        "seq_len": [len(items)],
    }
    for f, width in LongTermSpec().list_lengths.items():
        row[f] = [[1] * width]
    for f in LONG_TERM_SCALAR_FEATURES:
        row[f] = [7]
    return pd.DataFrame(row)


def _sample(srv: EmbeddingServer, name: str, **labels: str) -> float:
    return srv.metrics.registry.get_sample_value(name, {"model": MODEL, **labels}) or 0.0


def _recomputed(srv: EmbeddingServer, store: Any, user_id: str) -> np.ndarray:
    """What the miss path computes from the user's online row now."""
    model = srv.manager.get(MODEL)
    rows = FeastFeatureSource(store).fetch([user_id], model.spec)
    return model.encoder.run(encode_inputs(rows.columns, model.spec, model.items))[0]


def _cached(srv: EmbeddingServer) -> int:
    cache = srv.lookup.cache
    return len(cache) if cache is not None else 0


@pytest.mark.timeout(120)
def test_pushed_behaviour_is_served_stale_then_fresh_then_inline_past_the_limit(
    feast_store,  # noqa: F811 (the imported fixture)
    settings_for,
    registry,
    tmp_path,
    redis_url,
):
    publish_tiny(registry, tmp_path / "staging", seed=1)
    r = redis.Redis.from_url(redis_url)
    loop = LoopThread()
    lenient = EmbeddingServer(settings_for(), features=FeastFeatureSource(feast_store))
    strict = EmbeddingServer(
        settings_for(max_stale_s=60, vector_cache_mb=0), features=FeastFeatureSource(feast_store)
    )
    try:
        loop.run(lenient.start())
        loop.run(strict.start())
        with (
            EmbeddingClient(f"127.0.0.1:{lenient.port}", timeout_s=30) as c,
            EmbeddingClient(f"127.0.0.1:{strict.port}", timeout_s=30) as s,
        ):
            assert [e.source for e in c.batch_get(["11", "12"])] == ["computed"] * 2
            now = datetime.now(UTC).replace(microsecond=0)

            # past max_stale_s since the newest pushed event: recomputed on the call itself
            hour_ago = now - timedelta(hours=1)  # newer than FEATURE_TIME, older than 60 s
            push_fresh(feast_store, r, _row(12, hour_ago, [96, 97]))
            inline = s.get("12")
            assert inline.source == "computed"
            assert inline.feature_ts_ms == int(hour_ago.timestamp() * 1000)
            np.testing.assert_allclose(inline.vector, _recomputed(strict, feast_store, "12"))
            assert _sample(strict, "userembed_stale_served_total") == 0
            assert s.get("12").source == "stored"  # written back: fresh

            before = c.get("11")  # stored, and now in the vector cache
            assert before.source == "stored" and before.feature_ts_ms == OLD_TS
            assert _cached(lenient) == 1

            # a push: Feast's online row, the marker, and every worker's cached row dropped
            report = push_fresh(feast_store, r, _row(11, now, [90, 91, 92]))
            assert report.users == 1 and int(r.get(pushed_key("11"))) == report.newest_event_ms
            until = time.monotonic() + 5
            while _cached(lenient) and time.monotonic() < until:
                time.sleep(0.01)
            assert _cached(lenient) == 0, "the push did not drop the cached vector"

            stale = c.get("11")  # at once: the stored vector, while it is recomputed
            assert stale.source == "stored" and stale.feature_ts_ms == OLD_TS
            np.testing.assert_array_equal(stale.vector, before.vector)
            assert _sample(lenient, "userembed_stale_served_total") == 1

            until = time.monotonic() + 5  # the background recompute writes back
            fresh = c.get("11")
            while fresh.feature_ts_ms == OLD_TS and time.monotonic() < until:
                time.sleep(0.02)
                fresh = c.get("11")
            assert fresh.source == "stored" and fresh.feature_ts_ms == report.newest_event_ms
            np.testing.assert_allclose(fresh.vector, _recomputed(lenient, feast_store, "11"))
            assert not np.allclose(fresh.vector, before.vector)
            outcome = {"outcome": "ok"}
            assert _sample(lenient, "userembed_background_recomputes_total", **outcome) == 1
            served = _sample(lenient, "userembed_stale_served_total")  # each stale read
            assert c.get("11").feature_ts_ms == report.newest_event_ms
            assert _sample(lenient, "userembed_stale_served_total") == served  # fresh: not stale
            assert _sample(lenient, "userembed_vector_age_seconds_count") >= 3

            # the batch path serves stale the same way
            push_fresh(feast_store, r, _row(12, now, [93, 94]))
            (stale12,) = c.batch_get(["12"])
            assert stale12.source == "stored" and stale12.feature_ts_ms == inline.feature_ts_ms
            assert _sample(lenient, "userembed_stale_served_total") == served + 1

            # within max_stale_s the strict server serves stale too
            push_fresh(feast_store, r, _row(11, now + timedelta(seconds=1), [95]))
            assert s.get("11").source == "stored"
            assert _sample(strict, "userembed_stale_served_total") == 1
    finally:
        loop.run(lenient.stop(grace=0.5))
        loop.run(strict.stop(grace=0.5))
        loop.close()


@pytest.mark.parametrize(
    ("cluster", "script_reads", "url_options"),
    [(False, 1, ""), (False, 1, "?health_check_interval=30"), (False, 0, ""), (True, 1, "")],
    ids=["coalescing", "script", "pipeline", "cluster"],
)
def test_every_stored_reader_reads_the_pushed_marker_with_the_vector(
    request, cluster, script_reads, url_options
):
    """Single and batch reads of each reader kind end each row with the user's marker; a
    marker newer than the row's feature_ts makes it stale, an older one does not."""
    url = request.getfixturevalue("redis_cluster_url" if cluster else "redis_url") + url_options
    client = open_redis(url)
    store = VectorStore(client, MODEL)
    store.write("ev", ["1", "2", "3"], np.ones((3, 4), np.float32), "v1", [5000, 5000, 5000])
    mark_pushed(client, {"1": 9000, "2": 4000})  # 1 stale, 2 not (older), 3 no marker
    keys = store.keys.vector_keys("ev", ["1", "2", "3"])
    settings = load_settings(env={}, redis_url=url, redis_script_reads=script_reads)

    async def main():
        aclient = open_async_redis(url)
        reader = open_stored_reader(settings, aclient, on_batch=lambda n: None)
        reader.start()
        try:
            single = await asyncio.gather(*(reader.read(k, None) for k in keys[:1]))
            many = await reader.read_many(keys)
        finally:
            await reader.close()
            await aclient.aclose()
        return single, many

    single, many = asyncio.run(asyncio.wait_for(main(), 30))
    assert single[0][5] == b"9000" and stale_since(single[0]) == 9000
    assert [r[5] for r in many] == [b"9000", b"4000", None]
    assert [stale_since(r) for r in many] == [9000, 0, 0]


def test_a_batch_of_ages_fills_the_histogram_as_one_observe_per_vector():
    """The batch path's bulk update of the vector-age histogram equals observing each vector."""
    now_ms = int(time.time() * 1000)
    stamps = [now_ms - h * 3_600_000 for h in range(3 * BULK)] + [0]  # 0: unknown, not counted
    bulk, each = ServerMetrics(), ServerMetrics()
    Freshness(load_settings(env={}), None, bulk).observe_age(MODEL, stamps)
    one = Freshness(load_settings(env={}), None, each)
    for ts in stamps:
        one.observe_age(MODEL, [ts])

    def buckets(m: ServerMetrics) -> dict[str, float]:
        (metric,) = [x for x in m.registry.collect() if x.name == "userembed_vector_age_seconds"]
        return {s.name + s.labels.get("le", ""): s.value for s in metric.samples}

    got, want = buckets(bulk), buckets(each)
    assert got.keys() == want.keys() and got["userembed_vector_age_seconds_count"] == 3 * BULK
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-3, abs=1.0), k


def test_cli_push_writes_the_online_row_and_the_marker(
    feast_store,  # noqa: F811 (the imported fixture)
    redis_url,
    tmp_path,
    capsys,
):
    from userembed import feast_ops
    from userembed.commands import main as cli

    at = datetime.now(UTC).replace(microsecond=0)
    _row(11, at, [80, 81]).to_parquet(tmp_path / "rows.parquet")
    assert cli.main(["push", str(tmp_path / "rows.parquet"), "--redis-url", redis_url]) == 0
    assert capsys.readouterr().out.startswith("pushed 1 rows for 1 users")
    marker = redis.Redis.from_url(redis_url).get(pushed_key("11"))
    assert int(marker) == int(at.timestamp()) * 1000
    assert feast_ops.online_features(feast_store, [11])["item_seq"] == [[80, 81]]
