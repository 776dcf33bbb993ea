"""The real Feast repository over the real Redis fixture: point-in-time training rows,
materialised serving rows, pushed rows."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

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
            "events": events,
            "users": users,
            "labels": labels,
            "spec": spec,
            "home": home,
        }


def _events_before(events: pd.DataFrame, user: int, at: pd.Timestamp, n: int = 50) -> list[int]:
    mine = events[(events["user_id"] == user) & (events["event_timestamp"] < at)]
    return mine.sort_values("event_timestamp", kind="stable")["item_id"].tolist()[-n:]


def test_training_rows_never_use_an_event_at_or_after_their_label_time(repo) -> None:
    frame = feast_ops.training_frame(repo["store"], repo["labels"], repo["spec"], engine="feast")
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
    repo,
) -> None:
    """Every row of the real point-in-time join against the raw events: the long-term
    features cover all events strictly before the label time, none at or after it."""
    frame = feast_ops.training_frame(repo["store"], repo["labels"], repo["spec"], engine="feast")
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


def test_direct_join_gives_the_same_frame_as_feast(repo) -> None:
    labels = repo["labels"].iloc[::7]
    a = feast_ops.training_frame(repo["store"], labels, repo["spec"], engine="feast")
    b = feast_ops.training_frame(repo["store"], labels, repo["spec"], engine="direct")
    assert list(a.columns) == list(b.columns) and len(a) == len(b)
    for col in a.columns:
        if col in (*SEQUENCE_FEATURES, *LONG_TERM_LIST_FEATURES):
            assert [list(x) for x in a[col]] == [list(x) for x in b[col]], col
        else:
            pd.testing.assert_series_equal(a[col], b[col], check_dtype=False, check_names=False)


def test_future_targets_ride_through_both_joins_unchanged(repo) -> None:
    """The self-supervised objective's targets are extra entity columns, never features:
    Feast's point-in-time join and the direct one hand them back as the labels held them."""
    from userembed.future_targets import FUTURE_COLUMNS, add_future_targets

    labels, spec = add_future_targets(repo["events"], repo["labels"].iloc[::5], repo["spec"])
    key = ["user_id", "label_timestamp"]
    for engine in ("feast", "direct"):
        frame = feast_ops.training_frame(repo["store"], labels, spec, engine=engine)
        both = frame.merge(labels, on=key, suffixes=("", "_label"), validate="1:1")
        assert len(both) == len(labels)
        for col in FUTURE_COLUMNS:
            assert [list(x) for x in both[col]] == [list(x) for x in both[f"{col}_label"]], col
        assert both[FUTURE_COLUMNS[0]].map(len).sum() > 0


def test_materialize_serves_the_latest_snapshot_online(repo, redis_url: str) -> None:
    store = repo["store"]
    feast_ops.materialize(store)
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
    assert feast_ops.redis_connection_string("redis://127.0.0.1:6390/2") == "127.0.0.1:6390,db=2"
    assert (
        feast_ops.redis_connection_string("rediss://:pw@cache:6380/0")
        == "cache:6380,db=0,password=pw,ssl=true"
    )


def test_feature_store_yaml_reads_redis_and_registry_from_the_environment(repo) -> None:
    config = repo["store"].config
    assert config.online_store.type == "redis"
    assert config.online_store.connection_string.endswith(",db=0")
    assert Path(config.registry.path) == repo["home"] / "feast" / "registry.db"
