"""A team's own parquet files through the whole path, as a new user runs it: `data build
--source parquet` -> `feast apply` -> `feast materialize` -> `train` -> `export` -> `refresh` ->
`serve`, then a real GetUserEmbedding whose stored (refresh) and recomputed (Feast online
features) vectors agree. Three shapes of data that differ from the demo's: a users file with
`user_id` alone (no profile feature: no EmbeddingBagCollection, no `profile` encoder input),
a labels file with a single task, and one with no task column at all."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.output import last_json
from userembed import processes
from userembed.commands import main as cli
from userembed.datasets.parquet import load_parquet
from userembed.datasets.synthetic import generate_synthetic
from userembed.features import PROFILE_INPUT
from userembed.registry import DEFAULT_MODEL, Registry

SMALL = ["--batch-size", "64", "--eval-every", "5", "--embedding-dim", "16"]


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_url: str) -> Path:
    monkeypatch.setenv("USEREMBED_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("REDIS_URL", redis_url)
    for var in ("USEREMBED_OFFLINE_DIR", "USEREMBED_FEAST_REGISTRY", "USEREMBED_REGISTRY_ROOT"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path / "home"


def _write_team_files(folder: Path, user_columns: list[str], tasks: list[str]) -> list[str]:
    """The synthetic data written as a team's three parquet files, with only `user_columns` in
    the users file and only `tasks` as label columns; -> the `data build` flags."""
    events, users, labels, _ = generate_synthetic(300, seed=0)
    folder.mkdir(parents=True)
    files = {
        "events": events,
        "users-file": users[user_columns],
        "labels": labels[["user_id", "label_timestamp", *(f"label_{t}" for t in tasks)]],
    }
    flags = []
    for flag, df in files.items():
        path = folder / f"{flag}.parquet"
        df.to_parquet(path, index=False)
        flags += [f"--{flag}", str(path)]
    return flags


def _load(flags: list[str]):  # type: ignore[no-untyped-def]
    """load_parquet on the files `_write_team_files` wrote."""
    named = dict(zip(flags[::2], flags[1::2], strict=True))
    return load_parquet(
        Path(named["--events"]), Path(named["--users-file"]), Path(named["--labels"])
    )


def test_a_users_file_with_user_id_alone_gives_a_model_without_profile(tmp_path: Path) -> None:
    *_, spec = _load(_write_team_files(tmp_path / "team", ["user_id"], ["click"]))
    assert spec.model_profile_features == () and spec.tasks == ("click",)


def test_labels_without_rows_are_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("USEREMBED_HOME", str(tmp_path / "home"))
    flags = _write_team_files(tmp_path / "team", ["user_id"], ["click"])
    labels = Path(flags[flags.index("--labels") + 1])
    pd.read_parquet(labels).head(0).to_parquet(labels, index=False)
    assert cli.main(["data", "build", "--source", "parquet", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "has no rows" in err
    assert not (tmp_path / "home" / "data").exists()


def test_labels_at_two_times_warn_that_training_needs_three(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    flags = _write_team_files(tmp_path / "team", ["user_id"], ["click"])
    labels = Path(flags[flags.index("--labels") + 1])
    df = pd.read_parquet(labels)
    last_two = sorted(df["label_timestamp"].unique())[-2:]
    df[df["label_timestamp"].isin(last_two)].to_parquet(labels, index=False)
    with caplog.at_level(logging.WARNING, logger="userembed.datasets.parquet"):
        *_, spec = _load(flags)
    assert spec.validation_cuts == () and "needs at least 3" in caplog.text


def _serve_one_user(user: str) -> tuple[np.ndarray, np.ndarray, str]:
    """`userembed serve` as its own process; user's (stored, recomputed) vectors and the stored
    answer's source."""
    from embed_server.client import EmbeddingClient

    argv = [sys.executable, "-m", "userembed.commands", "serve", "--port", "0"]
    proc, line = processes.start(
        [*argv, "--metrics-port", "-1"], dict(os.environ), processes.LISTENING
    )
    try:
        with EmbeddingClient(processes.listening_address(line)) as client:
            stored = client.get(user)
            computed = client.get(user, force=True)
    finally:
        processes.stop(proc)
    return np.asarray(stored.vector), np.asarray(computed.vector), stored.source


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    ("user_columns", "tasks"),
    [
        (["user_id"], ["click", "purchase", "churn", "explore"]),
        (["user_id", "age_bucket", "region"], ["click"]),
        (["user_id", "age_bucket", "region"], []),  # the self-supervised objective alone
    ],
    ids=[
        "users-file-without-profile-columns",
        "labels-file-with-one-task",
        "labels-file-without-task-columns",
    ],
)
def test_own_parquet_files_train_export_refresh_and_serve(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], user_columns, tasks
) -> None:
    flags = _write_team_files(tmp_path / "team", user_columns, tasks)
    assert cli.main(["data", "build", "--source", "parquet", *flags]) == 0
    spec = json.loads((home / "data" / "spec.json").read_text())
    profile = [c for c in user_columns if c != "user_id"]
    assert spec["model_profile_features"] == profile and spec["tasks"] == tasks
    assert cli.main(["feast", "apply", "--fresh"]) == 0
    assert cli.main(["feast", "materialize"]) == 0
    assert cli.main(["train", "--run-id", "own", "--max-steps", "10", *SMALL]) == 0
    report = json.loads((home / "runs" / "own" / "report.json").read_text())
    assert set(report["test"]) == set(tasks)
    assert all(np.isfinite(m["auc"]) for m in report["test"].values())

    assert cli.main(["export", "--run", str(home / "runs" / "own")]) == 0
    summary = last_json(capsys.readouterr().out)
    assert summary["user_vector_max_abs_diff"] < 1e-4
    manifest = Registry().read_manifest(DEFAULT_MODEL, summary["version"])
    # No profile feature, no profile input: the graph would not have one to feed.
    assert (PROFILE_INPUT in manifest.variants[0].inputs) == bool(profile)
    assert [f.name for f in manifest.input_spec.profile_features] == profile

    assert cli.main(["refresh"]) == 0
    user = str(int(pd.read_parquet(tmp_path / "team" / "labels.parquet")["user_id"].iloc[0]))
    stored, computed, source = _serve_one_user(user)
    assert source == "stored" and stored.shape == (64,)
    # the refresh (offline files) and the miss path (Feast online rows) encode identically
    assert np.abs(stored - computed).max() < 1e-4
