"""Data sources: the synthetic generator, MovieLens-100K mapping, a team's parquet files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from userembed.datasets import generate_synthetic, load_movielens, load_parquet
from userembed.datasets.movielens import default_path
from userembed.datasets.spec import DatasetSpec
from userembed.datasets.synthetic import TASKS, auc, true_probabilities
from userembed.errors import DataNotFoundError, SchemaError
from userembed.schema import EVENT_COLUMNS, validate_labels, validate_table, validate_users


@pytest.fixture(scope="module")
def synthetic() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, DatasetSpec]:
    return generate_synthetic(3000, seed=7)


def test_synthetic_is_deterministic_from_the_seed(synthetic) -> None:
    again = generate_synthetic(3000, seed=7)
    for a, b in zip(synthetic[:3], again[:3], strict=True):
        pd.testing.assert_frame_equal(a, b)
    assert synthetic[3] == again[3]
    other = generate_synthetic(3000, seed=8)
    assert not synthetic[0]["item_id"].equals(other[0]["item_id"])


def test_synthetic_tables_follow_the_input_schema(synthetic) -> None:
    events, users, labels, spec = synthetic
    validate_table(events, EVENT_COLUMNS, "events")
    validate_users(users, spec.model_profile_features + spec.heldout_profile_features, "users")
    validate_labels(labels, "labels")
    assert set(spec.model_profile_features).isdisjoint(spec.heldout_profile_features)
    # Every user has a label row at every cut, stamped with the cut.
    cuts = set(spec.cut_times)
    assert set(pd.to_datetime(labels["label_timestamp"], utc=True)) == cuts
    assert len(labels) == len(users) * len(cuts)
    assert events["event_type"].between(0, 3).all()


def test_purchase_is_labelled_only_where_click_is_positive(synthetic) -> None:
    labels = synthetic[2]
    clicked = labels["label_click"] == 1.0
    assert labels.loc[clicked, "label_purchase"].notna().all()
    assert labels.loc[~clicked, "label_purchase"].isna().all()


def test_spec_reports_the_bayes_auc_of_the_true_probabilities(synthetic) -> None:
    _, _, labels, spec = synthetic
    probs = true_probabilities(3000, seed=7)
    test = labels[labels["label_timestamp"] == pd.Timestamp(spec.test_cuts[0])].sort_values(
        "user_id"
    )
    for task in TASKS:
        expected = auc(probs[task], test["label_" + task].to_numpy())
        assert spec.bayes_auc[task] == pytest.approx(expected, abs=1e-4)
        assert 0.65 < spec.bayes_auc[task] < 0.95


def test_tasks_pull_in_opposite_directions(synthetic) -> None:
    """click rises with activity, churn falls with it: a seesaw for a naive multi-task model."""
    events, _, labels, spec = synthetic
    counts = events.groupby("user_id").size().reindex(range(3000), fill_value=0)
    heavy = counts > counts.median()
    by_user = labels.groupby("user_id")[["label_click", "label_churn"]].mean()
    assert (
        by_user.loc[heavy, "label_click"].mean() > by_user.loc[~heavy, "label_click"].mean() + 0.1
    )
    assert (
        by_user.loc[heavy, "label_churn"].mean() < by_user.loc[~heavy, "label_churn"].mean() - 0.1
    )


def test_spec_round_trips_through_json(synthetic, tmp_path: Path) -> None:
    spec = synthetic[3]
    spec.save(tmp_path)
    assert DatasetSpec.load(tmp_path) == spec
    splits = spec.split_of(pd.Series(pd.to_datetime(list(spec.cut_times), utc=True)))
    assert list(splits) == ["train", "train", "validation", "test"]


def test_movielens_maps_the_real_recbole_files() -> None:
    events, users, labels, spec = load_movielens()
    assert len(events) == 100_000 and len(users) == 943
    validate_table(events, EVENT_COLUMNS, "ml-100k")
    validate_labels(labels, "ml-100k labels")
    assert set(events["event_type"].unique()) == {1, 2, 3, 4, 5}
    assert set(users["gender"].unique()) == {0, 1}
    assert users["age_bucket"].between(0, 6).all()
    assert (
        "gender" in spec.heldout_profile_features and "occupation" in spec.heldout_profile_features
    )
    assert spec.model_profile_features == ("region",)
    # User 1 rated Toy Story (item 1, first genre Animation): its category is Animation's code.
    item = pd.read_csv(default_path() / "ml-100k.item", sep="\t", dtype=str)
    genres = sorted(item.iloc[:, 3].str.split(" ").str[0].unique())
    toy = events[(events["user_id"] == 1) & (events["item_id"] == 1)]
    assert toy["category_id"].tolist() == [genres.index("Animation")]


def test_movielens_labels_match_the_raw_ratings_in_the_window() -> None:
    events, _, labels, spec = load_movielens()
    horizon = pd.Timedelta(seconds=spec.label_horizon_seconds)
    for cut in spec.cut_times:
        rows = labels[labels["label_timestamp"] == cut].set_index("user_id")
        window = events[
            (events["event_timestamp"] >= cut) & (events["event_timestamp"] < cut + horizon)
        ]
        active = set(window["user_id"])
        assert set(rows.index[rows["label_active"] == 1.0]) == active & set(rows.index)
        high = set(window.loc[window["event_type"] >= 4, "user_id"])
        assert set(rows.index[rows["label_rate_high"] == 1.0]) == high & set(rows.index)
        assert rows.loc[rows["label_active"] == 0.0, "label_rate_high"].isna().all()
        # Only users with history before the cut get a row (nothing to embed otherwise).
        assert set(rows.index) == set(events.loc[events["event_timestamp"] < cut, "user_id"])


def test_movielens_missing_files_raise_data_not_found(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match="ml-100k.inter"):
        load_movielens(tmp_path)


def _write_team_files(tmp_path: Path, synthetic) -> tuple[Path, Path, Path]:
    events, users, labels, _ = synthetic
    paths = tmp_path / "events.parquet", tmp_path / "users.parquet", tmp_path / "labels.parquet"
    for df, p in zip((events, users, labels), paths, strict=True):
        df.to_parquet(p, index=False)
    return paths


def test_team_parquet_files_load_with_cuts_from_the_labels(tmp_path: Path, synthetic) -> None:
    events, _, labels, spec = load_parquet(*_write_team_files(tmp_path, synthetic))
    assert spec.tasks == TASKS
    assert spec.cut_times == synthetic[3].cut_times
    assert spec.test_cuts == synthetic[3].test_cuts
    assert len(events) == len(synthetic[0]) and len(labels) == len(synthetic[2])


def test_team_parquet_missing_column_names_file_and_column(tmp_path: Path, synthetic) -> None:
    ev, us, lb = _write_team_files(tmp_path, synthetic)
    synthetic[0].drop(columns=["category_id"]).to_parquet(ev, index=False)
    with pytest.raises(SchemaError) as err:
        load_parquet(ev, us, lb)
    assert err.value.column == "category_id" and err.value.source == str(ev)


def test_team_parquet_without_events_is_one_schema_error(tmp_path: Path, synthetic) -> None:
    ev, us, lb = _write_team_files(tmp_path, synthetic)
    synthetic[0].head(0).to_parquet(ev, index=False)
    with pytest.raises(SchemaError) as err:
        load_parquet(ev, us, lb)
    assert err.value.source == str(ev) and "has no rows" in str(err.value)


def test_team_parquet_wrong_type_names_file_and_column(tmp_path: Path, synthetic) -> None:
    ev, us, lb = _write_team_files(tmp_path, synthetic)
    synthetic[1].assign(region=synthetic[1]["region"].astype(str)).to_parquet(us, index=False)
    with pytest.raises(SchemaError) as err:
        load_parquet(ev, us, lb)
    assert err.value.column == "region" and str(us) in str(err.value)
    assert np.issubdtype(synthetic[1]["region"].dtype, np.integer)  # fixture untouched
