"""The real Feast repository over the real Redis fixture: point-in-time training rows through
each offline store (DuckDB, the default; Ray, the cluster configuration, on a local 2-CPU Ray),
materialised serving rows, pushed rows."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

from bench.pit_join import merge_asof_frame
from userembed import feast_ops
from userembed.datasets import generate_synthetic
from userembed.errors import InvalidInputError
from userembed.features import (
    LONG_TERM_FEATURES,
    LONG_TERM_LIST_FEATURES,
    LONG_TERM_SCALAR_FEATURES,
    PROFILE_FEATURES,
    SEQUENCE_FEATURES,
    LongTermSpec,
)
from userembed.paths import FEATURE_REPO
from userembed.schema import task_columns
from userembed.snapshots import offline_latest, write_feature_tables

NUM_USERS = 250


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, redis_server: Any) -> Iterator[dict[str, Any]]:
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("USEREMBED_HOME", str(home))
        mp.delenv("USEREMBED_OFFLINE_DIR", raising=False)
        mp.delenv("USEREMBED_FEAST_REGISTRY", raising=False)
        events, users, labels, spec = generate_synthetic(NUM_USERS, seed=11)
        write_feature_tables(events, users, spec, home / "offline")
        store = feast_ops.open_store(redis_server.url)
        feast_ops.apply(store)
        yield {
            "store": store,
            "redis_url": redis_server.url,
            "events": events,
            "users": users,
            "labels": labels,
            "spec": spec,
            "home": home,
        }


def _ray_store(repo: dict[str, Any], mp: pytest.MonkeyPatch) -> Any:
    """The repository opened with feature_store.ray.yaml over a local 2-CPU Ray of the test's
    own (Feast would start one on every core); Feast then uses the running instance."""
    ray = pytest.importorskip("ray")
    from feast.infra import ray_initializer

    mp.delenv("RAY_ADDRESS", raising=False)
    for attempt in (1, 2):
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            break
        except Exception:  # seen once: GCS "Deadline Exceeded" on a loaded 2-core machine
            ray.shutdown()
            if attempt == 2:
                raise
    # Feast remembers that it connected; a later Ray store in this process must connect again.
    mp.setattr(ray_initializer, "_ray_initialized", False)
    mp.setenv(feast_ops.FEAST_CONFIG_ENV, feast_ops.RAY_FEAST_CONFIG)
    store = feast_ops.open_store(repo["redis_url"])
    mp.delenv(feast_ops.FEAST_CONFIG_ENV)
    assert store.config.offline_store.type == "ray"
    return store


@pytest.fixture(scope="module", params=["duckdb", pytest.param("ray", marks=[pytest.mark.slow])])
def frame(repo: dict[str, Any], request: pytest.FixtureRequest) -> Iterator[pd.DataFrame]:
    """The training frame of every label row through one offline store."""
    if request.param == "duckdb":
        assert repo["store"].config.offline_store.type == "duckdb"  # the default configuration
        yield feast_ops.training_frame(repo["store"], repo["labels"], repo["spec"])
        return
    import ray

    with pytest.MonkeyPatch.context() as mp:
        try:
            store = _ray_store(repo, mp)
            yield feast_ops.training_frame(store, repo["labels"], repo["spec"])
        finally:
            ray.shutdown()  # stray ray:: workers would outlive the test otherwise


def _events_before(events: pd.DataFrame, user: int, at: pd.Timestamp, n: int = 50) -> list[int]:
    mine = events[(events["user_id"] == user) & (events["event_timestamp"] < at)]
    return mine.sort_values("event_timestamp", kind="stable")["item_id"].tolist()[-n:]


def test_training_rows_never_use_an_event_at_or_after_their_label_time(repo, frame) -> None:
    events = repo["events"]
    assert len(frame) == len(repo["labels"])  # every (user, cut) row, empty histories included
    assert set(frame["split"]) == {"train", "validation", "test"}
    ts_of = events.groupby(["user_id", "item_id"])["event_timestamp"].min()
    for row in frame.itertuples(index=False):
        expected = _events_before(events, row.user_id, row.label_timestamp)
        assert list(row.item_seq) == expected, (row.user_id, row.label_timestamp)
        assert row.seq_len == len(expected)
        # Belt and braces: the earliest time each item was seen is before the label time.
        if expected:
            assert max(ts_of.loc[(row.user_id, i)] for i in expected) < row.label_timestamp
    users = repo["users"].set_index("user_id")
    assert (frame["gender"].to_numpy() == users.loc[frame["user_id"], "gender"].to_numpy()).all()


def test_training_rows_long_term_features_count_the_whole_history_before_the_label(
    repo, frame
) -> None:
    """Every row of the real point-in-time join against the raw events: the long-term
    features cover all events strictly before the label time, none at or after it."""
    lt = LongTermSpec()
    by_user = dict(tuple(repo["events"].groupby("user_id")))
    longer = 0
    for row in frame.itertuples(index=False):
        past = by_user[row.user_id]
        past = past[past["event_timestamp"] < row.label_timestamp]
        n = len(past)
        longer += n > 50
        assert (
            list(row.lt_category_counts)
            == np.bincount(
                past["category_id"] % lt.category_buckets, minlength=lt.category_buckets
            ).tolist()
        )
        assert sum(row.lt_event_type_counts) == n
        assert row.lt_distinct_items == past["item_id"].nunique()
        assert row.lt_distinct_categories == past["category_id"].nunique()
        last = (row.label_timestamp - past["event_timestamp"].max()).total_seconds() if n else -1
        assert row.lt_seconds_since_last == int(last), (row.user_id, row.label_timestamp)
    assert longer > 0


def _assert_same_frame(a: pd.DataFrame, b: pd.DataFrame) -> None:
    assert list(a.columns) == list(b.columns) and len(a) == len(b)
    for col in a.columns:
        if col in (*SEQUENCE_FEATURES, *LONG_TERM_LIST_FEATURES):
            assert [list(x) for x in a[col]] == [list(x) for x in b[col]], col
        else:
            pd.testing.assert_series_equal(a[col], b[col], check_dtype=False, check_names=False)


def test_offline_store_frame_equals_the_merge_asof_reference(repo, frame) -> None:
    """The store's frame is the one bench/pit_join.py builds by pandas merge_asof over the same
    files (the benchmark's and the quality benchmark's reference)."""
    reference = merge_asof_frame(repo["home"] / "offline", repo["labels"], repo["spec"])
    _assert_same_frame(frame, reference)


def test_task_labels_and_future_targets_come_back_with_their_own_row(repo) -> None:
    """The task labels and the self-supervised objective's targets (future information: never
    features) skip the join and are taken back by label row: each frame row holds the values
    of the label row with its user and time, as the labels held them (rows shuffled first)."""
    from userembed.future_targets import FUTURE_COLUMNS, add_future_targets

    labels, spec = add_future_targets(repo["events"], repo["labels"].iloc[::5], repo["spec"])
    labels = labels.sample(frac=1.0, random_state=0)
    key = ["user_id", "label_timestamp"]
    store_frame = feast_ops.training_frame(repo["store"], labels, spec)
    _assert_same_frame(store_frame, merge_asof_frame(repo["home"] / "offline", labels, spec))
    both = store_frame.merge(labels, on=key, suffixes=("", "_label"), validate="1:1")
    assert len(both) == len(labels)
    for col in task_columns(labels):
        pd.testing.assert_series_equal(both[col], both[f"{col}_label"], check_names=False)
    for col in FUTURE_COLUMNS:
        assert [list(x) for x in both[col]] == [list(x) for x in both[f"{col}_label"]], col
    assert both[FUTURE_COLUMNS[0]].map(len).sum() > 0


def test_the_ray_configuration_differs_from_the_default_only_in_its_offline_store() -> None:
    repo = FEATURE_REPO
    default = yaml.safe_load((repo / feast_ops.DEFAULT_FEAST_CONFIG).read_text())
    ray = yaml.safe_load((repo / feast_ops.RAY_FEAST_CONFIG).read_text())
    assert default.pop("offline_store") == {"type": "duckdb"}
    assert ray.pop("offline_store")["type"] == "ray"
    assert default == ray


def test_materialize_serves_the_latest_snapshot_online(
    repo, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = repo["store"]
    with caplog.at_level(logging.INFO, logger=feast_ops.__name__):
        feast_ops.materialize(store)
    # Progress counts the rows written: one per user in each of the two views.
    assert f"materialize: {2 * NUM_USERS}/{2 * NUM_USERS} rows (100%)" in caplog.text
    ids = [0, 7, 42]
    online = feast_ops.online_features(store, ids)
    latest = offline_latest(repo["home"] / "offline", ids)
    for f in SEQUENCE_FEATURES:
        assert online[f] == [list(v) for v in latest[f]], f
    for f in LONG_TERM_LIST_FEATURES:
        assert online[f] == [list(v) for v in latest[f]], f
    for f in (*PROFILE_FEATURES, "seq_len", *LONG_TERM_SCALAR_FEATURES):
        assert online[f] == latest[f].tolist(), f
    assert online["seq_len"][1] > 0


def test_unknown_user_reads_back_as_missing(repo, redis_url: str) -> None:
    feast_ops.materialize(repo["store"])
    online = feast_ops.online_features(repo["store"], [10_000_000])
    assert online["item_seq"] == [None] and online["age_bucket"] == [None]


def test_pushed_behaviour_is_read_back_online(repo, redis_url: str) -> None:
    store = repo["store"]
    feast_ops.materialize(store)
    row = pd.DataFrame(
        {
            "user_id": [3],
            "event_timestamp": [pd.Timestamp.now(tz="UTC")],
            "item_seq": [[5, 6, 7]],
            "category_seq": [[1, 1, 2]],
            "event_type_seq": [[0, 1, 3]],
            "gap_bucket_seq": [[0, 4, 2]],
            "seq_len": [3],
            "lt_category_counts": [[0, 2, 1] + [0] * (LongTermSpec().category_buckets - 3)],
            "lt_event_type_counts": [[1, 1, 0, 1] + [0] * (LongTermSpec().event_type_buckets - 4)],
            "lt_window_counts": [[3] * len(LongTermSpec().window_days)],
            "lt_attribute_counts": [[0, 1] + [0] * (LongTermSpec().attribute_buckets - 2)],
            "lt_distinct_items": [3],
            "lt_distinct_categories": [2],
            "lt_seconds_since_first": [600],
            "lt_seconds_since_last": [5],
        }
    )
    with pytest.raises(InvalidInputError, match="lt_distinct_items"):
        feast_ops.push_behavior(store, row.drop(columns=["lt_distinct_items"]))
    feast_ops.push_behavior(store, row)
    online = feast_ops.online_features(store, [3])
    assert online["item_seq"] == [[5, 6, 7]] and online["seq_len"] == [3]
    assert online["event_type_seq"] == [[0, 1, 3]]
    for f in LONG_TERM_FEATURES:
        assert online[f] == row[f].tolist(), f
    assert online["gender"] == [int(repo["users"].set_index("user_id").loc[3, "gender"])]


def test_redis_url_becomes_a_feast_connection_string() -> None:
    timeouts = "socket_connect_timeout=2.0,socket_timeout=5.0"
    assert (
        feast_ops.redis_connection_string("redis://127.0.0.1:6390/2")
        == f"127.0.0.1:6390,db=2,{timeouts}"
    )
    assert (
        feast_ops.redis_connection_string("rediss://:pw@cache:6380/0")
        == f'cache:6380,db=0,{timeouts},password="pw",ssl=true'
    )


def test_feature_store_yaml_reads_redis_and_registry_from_the_environment(repo) -> None:
    config = repo["store"].config
    assert config.online_store.type == "redis"
    assert ",db=0,socket_connect_timeout=" in config.online_store.connection_string
    assert Path(config.registry.path) == repo["home"] / "feast" / "registry.db"
