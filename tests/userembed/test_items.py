"""The optional items table: validation, the sources that fill it, `data build` with and
without it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from userembed import paths
from userembed.commands import main as cli
from userembed.datasets.movielens import load_movielens, load_movielens_items
from userembed.datasets.synthetic import generate_synthetic, generate_synthetic_with_items
from userembed.errors import SchemaError
from userembed.items import ItemAttribute, items_frame, read_items


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("USEREMBED_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("USEREMBED_OFFLINE_DIR", raising=False)
    return tmp_path / "home"


def _items() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "item_id": np.array([3, 1, 7], dtype=np.int64),
            "tags": [np.array([1, 2]), np.array([], dtype=np.int64), None],
            "brand": pd.array([0, None, 4], dtype="Int64"),
        }
    )


def test_attributes_are_read_from_the_table() -> None:
    assert items_frame(_items(), "x") == (
        ItemAttribute("tags", True),
        ItemAttribute("brand", False),
    )


@pytest.mark.parametrize(
    ("change", "column", "problem"),
    [
        (lambda d: d.drop(columns=["item_id"]), "item_id", "missing"),
        (lambda d: d.assign(item_id=[3, 3, 7]), "item_id", "duplicate"),
        (lambda d: d.assign(item_id=[3.0, 1.0, 7.0]), "item_id", "expected int"),
        (lambda d: d.assign(brand=[0.5, 1.0, 2.0]), "brand", "expected int or list of int"),
        (lambda d: d.assign(brand=["a", "b", "c"]), "brand", "expected int or list of int"),
        (lambda d: d.assign(tags=[[1], [-2], []]), "tags", "negative"),
        (lambda d: d.assign(tags=[["a"], [], []]), "tags", "expected int or list of int"),
        (lambda d: d[["item_id"]], "*", "no attribute column"),
        (lambda d: d.rename(columns={"brand": "Brand Name"}), "Brand Name", "plain"),
    ],
)
def test_a_bad_items_file_names_file_and_column(tmp_path: Path, change, column, problem) -> None:
    path = tmp_path / "items.parquet"
    change(_items()).to_parquet(path, index=False)
    with pytest.raises(SchemaError) as e:
        read_items(path)
    assert e.value.source == str(path) and e.value.column == column
    assert problem in e.value.problem


def test_movielens_items_list_every_genre() -> None:
    items = load_movielens_items()
    events = load_movielens()[0]
    assert items_frame(items, "ml") == (
        ItemAttribute("categories", True),
        ItemAttribute("release_year_bucket", False),
    )
    assert set(events["item_id"]) <= set(items["item_id"])
    lengths = items["categories"].map(len)
    assert lengths.min() == 1 and lengths.max() == 6 and (lengths > 1).mean() > 0.4
    toy_story = items.loc[items["item_id"] == 1, "categories"].iloc[0]
    assert len(toy_story) == 3  # Animation, Children's, Comedy


def test_synthetic_items_carry_the_event_category_and_leave_events_unchanged() -> None:
    events, users, labels, _, items = generate_synthetic_with_items(300, seed=5)
    plain = generate_synthetic(300, seed=5)
    assert events.equals(plain[0]) and users.equals(plain[1]) and labels.equals(plain[2])
    joined = events.merge(items, on="item_id", how="left", validate="many_to_one")
    assert (joined["categories"].str[0] == joined["category_id"]).all()
    assert sorted(items["price_bucket"].unique()) == [0, 1, 2, 3, 4]
    # The band says something about the category: per-category means spread out.
    means = items.assign(c=items["categories"].str[0]).groupby("c")["price_bucket"].mean()
    assert means.max() - means.min() > 1.0


def _team_files(tmp_path: Path) -> list[str]:
    events, users, labels, _, items = generate_synthetic_with_items(150, seed=1)
    argv = ["data", "build", "--source", "parquet"]
    for flag, name, frame in (
        ("--events", "ev", events),
        ("--users-file", "us", users),
        ("--labels", "lb", labels),
        ("--items-file", "it", items),
    ):
        frame.to_parquet(tmp_path / f"{name}.parquet", index=False)
        argv += [flag, str(tmp_path / f"{name}.parquet")]
    return argv


def test_build_writes_the_items_table_and_a_build_without_one_removes_it(
    home: Path, tmp_path: Path
) -> None:
    argv = _team_files(tmp_path)
    assert cli.main(argv) == 0
    written = paths.data_dir() / paths.ITEMS_FILE
    assert read_items(written)[1] == (
        ItemAttribute("categories", True),
        ItemAttribute("price_bucket", False),
    )
    assert cli.main(argv[:-2]) == 0  # the same files without --items-file
    assert not written.exists()
    assert cli.main(["data", "build", "--source", "synthetic", "--users", "100", "--items"]) == 0
    assert len(pd.read_parquet(written)) == 20 * 500


def test_a_bad_items_file_writes_nothing(home: Path, tmp_path: Path, capsys) -> None:
    argv = _team_files(tmp_path)
    items_path = Path(argv[-1])
    pd.read_parquet(items_path).assign(price_bucket=lambda d: d["price_bucket"] - 3).to_parquet(
        items_path, index=False
    )
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(items_path) in err[0] and "'price_bucket'" in err[0]
    assert not home.exists()
