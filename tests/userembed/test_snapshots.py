"""Point-in-time feature tables: a snapshot at s holds the last N events strictly before s."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from userembed.datasets import generate_synthetic
from userembed.datasets.spec import DatasetSpec
from userembed.features import (
    LONG_TERM_FEATURES,
    PROFILE_FEATURES,
    SEQUENCE_FEATURES,
    LongTermSpec,
    gap_buckets,
)
from userembed.items import history_attributes
from userembed.snapshots import (
    _first_seen_prefix,
    offline_latest,
    snapshot,
    sort_events,
    write_feature_tables,
)


def _reference(events: pd.DataFrame, user: int, at: pd.Timestamp, n: int) -> dict[str, list[int]]:
    """Slow per-user reference: the last n events strictly before `at`, oldest first."""
    mine = events[events["user_id"] == user].sort_values("event_timestamp", kind="stable")
    ts = mine["event_timestamp"].astype("int64").to_numpy()
    gaps = np.concatenate([[-1.0], np.diff(ts) / 1e9]) if len(ts) else np.array([])
    keep = (mine["event_timestamp"] < at).to_numpy()
    tail = slice(max(0, int(keep.sum()) - n), int(keep.sum()))
    return {
        "item_seq": mine["item_id"].to_numpy()[keep][tail].tolist(),
        "category_seq": mine["category_id"].to_numpy()[keep][tail].tolist(),
        "event_type_seq": mine["event_type"].to_numpy()[keep][tail].tolist(),
        "gap_bucket_seq": gap_buckets(gaps)[keep][tail].tolist(),
    }


def _long_term_reference(
    mine: pd.DataFrame, at: pd.Timestamp, lt: LongTermSpec, genres: dict[int, list[int]]
) -> dict:
    """Slow reference: the long-term features of one user's events (any order) at `at`;
    `genres`: item -> its values of the items table's multi-valued attribute."""
    past = mine[mine["event_timestamp"] < at]
    values = [v % lt.attribute_buckets for i in past["item_id"] for v in genres.get(i, [])]
    cats = past["category_id"].to_numpy() % lt.category_buckets
    types = past["event_type"].to_numpy() % lt.event_type_buckets
    age = [(at - t).total_seconds() for t in past["event_timestamp"]]
    return {
        "lt_category_counts": np.bincount(cats, minlength=lt.category_buckets).tolist(),
        "lt_event_type_counts": np.bincount(types, minlength=lt.event_type_buckets).tolist(),
        "lt_window_counts": [sum(a <= d * 86400 for a in age) for d in lt.window_days],
        "lt_attribute_counts": np.bincount(values, minlength=lt.attribute_buckets).tolist(),
        "lt_distinct_items": past["item_id"].nunique(),
        "lt_distinct_categories": past["category_id"].nunique(),
        "lt_seconds_since_first": int(max(age)) if age else -1,
        "lt_seconds_since_last": int(min(age)) if age else -1,
    }


@pytest.fixture(scope="module")
def data() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, DatasetSpec]:
    return generate_synthetic(400, seed=3)


def test_snapshot_holds_the_last_n_events_strictly_before_its_time(data) -> None:
    events, users, _, spec = data
    ev = sort_events(events, users["user_id"].to_numpy())
    for at in spec.snapshot_times:
        table = snapshot(ev, at, 50).to_pydict()
        assert all(t == at for t in table["event_timestamp"])
        for i, user in enumerate(table["user_id"][:60]):
            ref = _reference(events, user, at, 50)
            for f in SEQUENCE_FEATURES:
                assert table[f][i] == ref[f], (user, at, f)
            assert table["seq_len"][i] == len(ref["item_seq"])
    # Some users have more than 50 events: truncation is exercised.
    assert events.groupby("user_id").size().max() > 50


def test_long_term_features_count_every_event_strictly_before_the_snapshot(data) -> None:
    """Every row of every snapshot against the raw events: the whole history, not the last 50,
    and nothing at or after the snapshot time; the attribute histogram counts every value of
    each event's item (values past the buckets wrap, items absent from the table count none)."""
    events, users, _, spec = data
    lt = LongTermSpec()
    rng = np.random.default_rng(0)
    item_ids = np.sort(events["item_id"].unique())[::2]  # half the items are in the table
    genres = {int(i): rng.integers(0, 40, size=rng.integers(0, 4)).tolist() for i in item_ids}
    items = pd.DataFrame({"item_id": list(genres), "genres": list(genres.values())})
    history = history_attributes(items)
    assert history is not None
    # Unsorted input: the build must not rely on the generator's order.
    shuffled = events.sample(frac=1.0, random_state=0)
    ev = sort_events(shuffled, users["user_id"].to_numpy(), history)
    by_user = dict(tuple(events.groupby("user_id")))
    empty = events.iloc[:0]
    checked = longer = 0
    for at in spec.snapshot_times:
        table = snapshot(ev, at, 50, lt).to_pydict()
        for i, user in enumerate(table["user_id"]):
            ref = _long_term_reference(by_user.get(user, empty), at, lt, genres)
            for f in LONG_TERM_FEATURES:
                assert table[f][i] == ref[f], (user, at, f)
            checked += 1
            longer += sum(ref["lt_event_type_counts"]) > 50
    assert checked == len(users) * len(spec.snapshot_times)
    assert longer > 0  # some histories are longer than the sequences: the whole one is counted


@pytest.mark.parametrize("big", [False, True])
def test_distinct_counts_hold_for_any_id_range(big: bool) -> None:
    """Distinct items come from first-seen flags; ids near 2^62 take the lexsort path."""
    rng = np.random.default_rng(0)
    user_index = np.sort(rng.integers(0, 30, size=600))
    values = rng.integers(0, 12, size=600) + (2**62 if big else 0)
    prefix = _first_seen_prefix(user_index, values)
    seen: set[tuple[int, int]] = set()
    want = [0]
    for u, v in zip(user_index.tolist(), values.tolist(), strict=True):
        want.append(want[-1] + ((u, v) not in seen))
        seen.add((u, v))
    assert prefix.tolist() == want


def test_event_at_the_snapshot_time_is_excluded() -> None:
    at = pd.Timestamp("2026-02-01", tz="UTC")
    events = pd.DataFrame(
        {
            "user_id": [1, 1, 1],
            "item_id": [10, 11, 12],
            "category_id": [0, 1, 2],
            "event_type": [0, 1, 0],
            "event_timestamp": [at - pd.Timedelta(hours=2), at - pd.Timedelta(minutes=1), at],
        }
    )
    table = snapshot(sort_events(events, np.array([1, 2])), at, 50).to_pydict()
    assert table["item_seq"] == [[10, 11], []]  # user 2 has no events: an empty row
    assert table["seq_len"] == [2, 0]
    assert table["gap_bucket_seq"][0] == [0, int(gap_buckets(np.array([7140.0]))[0])]
    # Long-term features: the event at `at` is in no count and sets no recency.
    assert table["lt_category_counts"][0][:3] == [1, 1, 0]
    assert sum(table["lt_event_type_counts"][0]) == 2
    assert table["lt_window_counts"][0] == [2, 2, 2]
    assert table["lt_distinct_items"] == [2, 0] and table["lt_distinct_categories"] == [2, 0]
    assert table["lt_seconds_since_last"] == [60, -1]
    assert table["lt_seconds_since_first"] == [7200, -1]
    assert table["lt_category_counts"][1] == [0] * LongTermSpec().category_buckets


def test_feature_tables_have_a_row_per_user_per_cut_plus_the_final_snapshot(
    data, tmp_path: Path
) -> None:
    events, users, _, spec = data
    summary = write_feature_tables(events, users, spec, tmp_path)
    behavior = pq.read_table(tmp_path / "behavior.parquet").to_pandas()
    assert summary["behavior_rows"] == len(behavior) == len(users) * (len(spec.cut_times) + 1)
    stamps = set(pd.to_datetime(behavior["event_timestamp"], utc=True))
    assert stamps == set(spec.cut_times) | {pd.Timestamp(spec.data_end)}
    profile = pq.read_table(tmp_path / "profile.parquet").to_pandas()
    assert list(profile.columns) == ["user_id", "event_timestamp", *PROFILE_FEATURES]
    assert (pd.to_datetime(profile["event_timestamp"], utc=True) < min(spec.cut_times)).all()
    assert not list(tmp_path.glob("*.tmp"))


def test_a_failed_write_keeps_the_previous_tables_and_leaves_no_temporary_files(
    data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events, users, _, spec = data
    write_feature_tables(events, users, spec, tmp_path)
    before = (tmp_path / "behavior.parquet").read_bytes()
    calls = []

    def fail_on_second(*args: object) -> object:
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return snapshot(*args)  # type: ignore[arg-type]

    monkeypatch.setattr("userembed.snapshots.snapshot", fail_on_second)
    with pytest.raises(OSError, match="disk full"):
        write_feature_tables(events, users, spec, tmp_path)
    assert (tmp_path / "behavior.parquet").read_bytes() == before
    assert not list(tmp_path.glob("*.tmp"))


def test_offline_latest_reads_the_final_snapshot_with_profile(data, tmp_path: Path) -> None:
    events, users, _, spec = data
    write_feature_tables(events, users, spec, tmp_path)
    latest = offline_latest(tmp_path, [3, 5])
    assert latest["user_id"].tolist() == [3, 5]
    ref = _reference(events, 5, pd.Timestamp(spec.data_end), 50)
    assert list(latest.loc[1, "item_seq"]) == ref["item_seq"]
    assert latest.loc[1, "gender"] == users.set_index("user_id").loc[5, "gender"]
