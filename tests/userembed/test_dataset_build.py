"""`userembed data build` and the demo's build_and_materialize helper."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from userembed import paths
from userembed.commands import main as cli
from userembed.dataset_build import build_and_materialize
from userembed.datasets import generate_synthetic
from userembed.datasets.spec import DatasetSpec


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("USEREMBED_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("USEREMBED_OFFLINE_DIR", raising=False)
    monkeypatch.delenv("USEREMBED_FEAST_REGISTRY", raising=False)
    return tmp_path / "home"


def _team_files(tmp_path: Path) -> dict[str, Path]:
    events, users, labels, _ = generate_synthetic(200, seed=1)
    files = {
        "events": tmp_path / "ev.parquet",
        "users": tmp_path / "us.parquet",
        "labels": tmp_path / "lb.parquet",
    }
    events.to_parquet(files["events"], index=False)
    users.to_parquet(files["users"], index=False)
    labels.to_parquet(files["labels"], index=False)
    return files


def _build_argv(files: dict[str, Path]) -> list[str]:
    return [
        "data", "build", "--source", "parquet",
        "--events", str(files["events"]), "--users-file", str(files["users"]),
        "--labels", str(files["labels"]),
    ]  # fmt: skip


def test_data_build_synthetic_writes_tables_spec_and_feature_files(home: Path, capsys) -> None:
    assert (
        cli.main(["data", "build", "--source", "synthetic", "--users", "300", "--seed", "2"]) == 0
    )
    spec = DatasetSpec.load(paths.data_dir())
    assert spec.name == "synthetic" and set(spec.bayes_auc) == set(spec.tasks)
    for name in ("events", "users", "labels"):
        assert (home / "data" / f"{name}.parquet").is_file()
    behavior = pd.read_parquet(home / "offline" / "behavior.parquet")
    assert len(behavior) == 300 * len(spec.snapshot_times)
    assert '"users": 300' in capsys.readouterr().out


def test_schema_error_exits_nonzero_with_one_line_and_writes_nothing(
    home: Path, tmp_path: Path, capsys
) -> None:
    files = _team_files(tmp_path)
    pd.read_parquet(files["events"]).drop(columns=["event_type"]).to_parquet(files["events"])
    assert cli.main(_build_argv(files)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert str(files["events"]) in err[0] and "'event_type'" in err[0] and "missing" in err[0]
    assert not home.exists()  # neither data/ nor offline/ nor the Feast registry


def test_wrong_type_leaves_a_previous_build_untouched(home: Path, tmp_path: Path, capsys) -> None:
    files = _team_files(tmp_path)
    assert cli.main(_build_argv(files)) == 0
    before = {p: p.stat().st_mtime_ns for p in home.rglob("*") if p.is_file()}
    labels = pd.read_parquet(files["labels"])
    labels["label_click"] = labels["label_click"].astype(str)
    labels.to_parquet(files["labels"])
    assert cli.main(_build_argv(files)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(files["labels"]) in err[0] and "'label_click'" in err[0]
    assert {p: p.stat().st_mtime_ns for p in home.rglob("*") if p.is_file()} == before


def test_a_build_that_fails_part_way_leaves_the_previous_data_set_whole(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Raw tables, spec.json and feature tables are replaced together, once all are written:
    a build that dies half way through its feature tables changes no file and leaves none."""
    from userembed import snapshots

    files = _team_files(tmp_path)
    assert cli.main(_build_argv(files)) == 0
    before = {p: p.read_bytes() for p in home.rglob("*") if p.is_file()}
    events, users, labels, _ = generate_synthetic(150, seed=9)  # another data set
    for name, frame in (("events", events), ("users", users), ("labels", labels)):
        frame.to_parquet(files[name], index=False)
    real, calls = snapshots.snapshot, []

    def snapshot_then_fail(*args, **kwargs):  # the disk fills up at the second snapshot
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(snapshots, "snapshot", snapshot_then_fail)
    assert cli.main(_build_argv(files)) == 1
    assert {p: p.read_bytes() for p in home.rglob("*") if p.is_file()} == before
    monkeypatch.setattr(snapshots, "snapshot", real)
    assert cli.main(_build_argv(files)) == 0  # the same build, whole: every file replaced
    after = {p: p.read_bytes() for p in home.rglob("*") if p.is_file()}
    assert after.keys() == before.keys()
    assert all(after[p] != before[p] for p in before), [p for p in before if after[p] == before[p]]


def test_build_and_materialize_serves_users_from_redis(home: Path, redis_url: str, capsys) -> None:
    summary = build_and_materialize("synthetic", num_users=150, seed=4, redis_url=redis_url)
    assert summary["materialized"] and summary["users"] == 150
    assert cli.main(["feast", "--redis-url", redis_url, "online", "--user-id", "5", "99999"]) == 0
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert '"user_id": [5, 99999]' in out and '"item_seq": [[' in out and "null]" in out


def test_a_new_data_set_with_older_dates_is_what_feast_serves(
    home: Path, tmp_path: Path, redis_url: str
) -> None:
    """Feast's Redis store keeps the newer of two rows of a user: without the teardown in
    build_and_materialize, the first data set's rows (dated later) would shadow the second's
    and the server would compute vectors from the wrong data set."""
    from userembed import feast_ops

    build_and_materialize("synthetic", num_users=150, seed=4, redis_url=redis_url)
    files = _team_files(tmp_path)  # another synthetic draw, moved 400 days back
    for name, column in (("events", "event_timestamp"), ("labels", "label_timestamp")):
        frame = pd.read_parquet(files[name])
        frame[column] -= pd.Timedelta(days=400)
        frame.to_parquet(files[name], index=False)
    build_and_materialize(
        "parquet",
        redis_url=redis_url,
        events_path=files["events"],
        users_path=files["users"],
        labels_path=files["labels"],
    )
    behavior = pd.read_parquet(home / "offline" / "behavior.parquet")
    latest = behavior[behavior["user_id"] == 5].sort_values("event_timestamp").iloc[-1]
    online = feast_ops.online_features(feast_ops.open_store(redis_url), [5])
    assert online["item_seq"][0] == list(latest["item_seq"])
