"""MovieLens-100K from the files shipped in the recbole wheel, mapped to the input schema.

Files: <site-packages>/recbole/dataset_example/ml-100k/ml-100k.{inter,item,user} (recbole
atomic files: tab-separated, typed headers such as `user_id:token`). The folder is found with
importlib.util.find_spec, never by importing recbole (which pulls in torch and more).

Mapping: an event is a rating; event_type = the rating (1..5); category = the movie's first
genre (the optional items table, `load_movielens_items`, lists every genre); profile = age_bucket, gender, occupation, region (first zip digit). Cuts are calendar
windows of three weeks ending at the data end, as many as the history holds (10 for the 31
weeks of ml-100k); a label at cut c describes [c, c + 3 weeks) and is known at c + 3 weeks.
docs/data.md lists the task definitions.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from userembed.datasets.spec import DatasetSpec, iso, split_cuts
from userembed.errors import DataNotFoundError

logger = logging.getLogger(__name__)

HORIZON = pd.Timedelta(weeks=3)
MIN_CUTS = 3  # train, validation, test
TASKS: tuple[str, ...] = ("active", "rate_high", "rate_low", "new_genre")
LABEL_DEFINITIONS: dict[str, str] = {
    "active": "rates any movie in [cut, cut + 3 weeks); known at cut + 3 weeks",
    "rate_high": "rates some movie 4 or 5 in the window; labelled only if active (NaN otherwise)",
    "rate_low": "rates some movie 1 or 2 in the window; labelled only if active (NaN otherwise)",
    "new_genre": "rates a movie whose first genre the user never rated before the cut; "
    "labelled only if active (NaN otherwise)",
}
# ML-100K age buckets as in ML-1M: <18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+.
AGE_EDGES = np.array([18, 25, 35, 45, 50, 56])
# Release-year buckets of the items table: <1950, 1950s-60s, 1970s, 1980s, 1990-93, then one a
# year (most of ml-100k's movies are from 1994-1998).
RELEASE_YEAR_EDGES = np.array([1950, 1970, 1980, 1990, 1994, 1995, 1996, 1997, 1998])


def default_path() -> Path:
    """The ml-100k folder inside the installed recbole wheel (recbole is not imported)."""
    spec = importlib.util.find_spec("recbole")
    if spec is None or spec.origin is None:
        raise DataNotFoundError(
            "MovieLens-100K: the recbole wheel is not installed (its dataset_example/ml-100k "
            "files are the source); pass the folder with --path"
        )
    return Path(spec.origin).parent / "dataset_example" / "ml-100k"


def _read_atomic(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise DataNotFoundError(f"MovieLens-100K: {path} is missing")
    df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    df.columns = [c.split(":")[0] for c in df.columns]  # drop recbole's `:type` suffixes
    return df


def _codes(values: pd.Series) -> np.ndarray:
    """Strings -> stable int codes (sorted vocabulary)."""
    vocab = {v: i for i, v in enumerate(sorted(values.unique()))}
    return values.map(vocab).to_numpy(dtype=np.int64)


def load_movielens(
    path: Path | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, DatasetSpec]:
    """Read ML-100K and return (events, users, labels, spec) in the input schema."""
    folder = Path(path) if path is not None else default_path()
    inter = _read_atomic(folder / "ml-100k.inter")
    item = _read_atomic(folder / "ml-100k.item")
    user = _read_atomic(folder / "ml-100k.user")

    genre = item["class"].str.split(" ").str[0].replace("", "unknown")
    genre_code = pd.Series(_codes(genre), index=item["item_id"].astype(np.int64))
    item_id = inter["item_id"].astype(np.int64)
    events = pd.DataFrame(
        {
            "user_id": inter["user_id"].astype(np.int64),
            "item_id": item_id,
            "category_id": genre_code.reindex(item_id).fillna(0).to_numpy(dtype=np.int64),
            "event_type": inter["rating"].astype(float).round().astype(np.int64),
            "event_timestamp": pd.to_datetime(
                inter["timestamp"].astype(float).astype(np.int64), unit="s", utc=True
            ),
        }
    ).sort_values(["user_id", "event_timestamp"], ignore_index=True)

    zip_first = user["zip_code"].str[:1]
    users = pd.DataFrame(
        {
            "user_id": user["user_id"].astype(np.int64),
            "age_bucket": np.searchsorted(AGE_EDGES, user["age"].astype(np.int64), side="right"),
            "gender": (user["gender"] == "F").astype(np.int64),
            "occupation": _codes(user["occupation"]),
            # First zip digit = US region; non-numeric (Canadian) zips -> 10.
            "region": np.where(
                zip_first.str.isdigit(), pd.to_numeric(zip_first, errors="coerce"), 10
            ).astype(np.int64),
        }
    )
    users["age_bucket"] = users["age_bucket"].astype(np.int64)

    end = events["event_timestamp"].max().ceil("D") + pd.Timedelta(days=1)
    # Every whole window of the history is a cut: ml-100k's 31 weeks give 10, 3,200 training
    # rows (the last four windows alone gave 1,343, too few for the single-task baselines).
    start = events["event_timestamp"].min()
    num_cuts = max(MIN_CUTS, int((end - start) // HORIZON))
    cuts = [end - HORIZON * k for k in range(num_cuts, 0, -1)]
    labels = labels_at_cuts(events, cuts)
    train, validation, test = split_cuts(cuts)
    spec = DatasetSpec(
        name="movielens-100k",
        tasks=TASKS,
        model_profile_features=("region",),
        heldout_profile_features=("age_bucket", "gender", "occupation"),
        train_cuts=train,
        validation_cuts=validation,
        test_cuts=test,
        data_start=iso(events["event_timestamp"].min().floor("D")),
        data_end=iso(end),
        label_horizon_seconds=int(HORIZON.total_seconds()),
        label_definitions=LABEL_DEFINITIONS,
        notes=f"source={folder}",
    )
    logger.info(
        "movielens: %d users, %d events, %d label rows", len(users), len(events), len(labels)
    )
    return events, users, labels, spec


def load_movielens_items(path: Path | None = None) -> pd.DataFrame:
    """The items table of ML-100K: every genre of a movie (`categories`, codes of the sorted
    genre names) and its release-year bucket (`release_year_bucket`, null when unknown)."""
    folder = Path(path) if path is not None else default_path()
    item = _read_atomic(folder / "ml-100k.item")
    genres = item["class"].str.split(" ").map(lambda g: [x for x in g if x] or ["unknown"])
    vocab = {v: i for i, v in enumerate(sorted({g for gs in genres for g in gs}))}
    year = pd.to_numeric(item["release_year"], errors="coerce")
    bucket = pd.array(
        np.searchsorted(RELEASE_YEAR_EDGES, year.fillna(0).to_numpy(), side="right"),
        dtype="Int64",
    )
    bucket[year.isna().to_numpy()] = pd.NA
    return pd.DataFrame(
        {
            "item_id": item["item_id"].astype(np.int64),
            "categories": [np.array([vocab[g] for g in gs], dtype=np.int64) for gs in genres],
            "release_year_bucket": bucket,
        }
    )


def labels_at_cuts(events: pd.DataFrame, cuts: list[pd.Timestamp]) -> pd.DataFrame:
    """One label row per (user with a rating before the cut, cut); users without history are
    dropped (nothing to embed)."""
    frames = []
    for cut in cuts:
        past = events[events["event_timestamp"] < cut]
        window = events[
            (events["event_timestamp"] >= cut) & (events["event_timestamp"] < cut + HORIZON)
        ]
        users = np.sort(past["user_id"].unique())
        seen = set(zip(past["user_id"], past["category_id"], strict=True))
        new = np.fromiter(
            (
                (u, g) not in seen
                for u, g in zip(window["user_id"], window["category_id"], strict=True)
            ),
            dtype=bool,
            count=len(window),
        )
        w = window.assign(high=window["event_type"] >= 4, low=window["event_type"] <= 2, new=new)
        agg = w.groupby("user_id")[["high", "low", "new"]].any().reindex(users, fill_value=False)
        active = np.isin(users, window["user_id"].to_numpy())

        def cond(col: str, agg: pd.DataFrame = agg, active: np.ndarray = active) -> np.ndarray:
            return np.where(active, agg[col].to_numpy(dtype=float), np.nan)

        frames.append(
            pd.DataFrame(
                {
                    "user_id": users,
                    "label_timestamp": cut,
                    "label_active": active.astype(float),
                    "label_rate_high": cond("high"),
                    "label_rate_low": cond("low"),
                    "label_new_genre": cond("new"),
                }
            )
        )
    labels = pd.concat(frames, ignore_index=True)
    labels["label_timestamp"] = pd.to_datetime(labels["label_timestamp"], utc=True)
    return labels
