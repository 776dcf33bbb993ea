"""Point-in-time feature tables: a snapshot at s holds the last N events strictly before s."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from userembed.datasets import generate_synthetic
from userembed.datasets.spec import DatasetSpec
from userembed.features import PROFILE_FEATURES, SEQUENCE_FEATURES, gap_buckets
from userembed.snapshots import offline_latest, snapshot, sort_events, write_feature_tables


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
