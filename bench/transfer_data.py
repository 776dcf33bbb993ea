"""The transfer benchmark's data: what the pipeline is given, what the probes must find, and
the hand-made profile every vector is compared with (bench/transfer.py runs them).

MovieLens-100K: the last `future_weeks` of the time line are a future window the pipeline never
sees. Its input is a team's own data written as the documented parquet files (README "Input
schema"): the ratings strictly before the window start T, a users file holding user_id and one
constant column (no profile attribute), and the three labels the issue's team defined from its
own logs, at three-week cuts whose windows end by T (active, rates 4+, rates a new genre:
userembed.datasets.movielens.labels_at_cuts). The probe tasks are held-out profile attributes
and the users' behaviour in the future window.

Synthetic: the generator's data set as `userembed data build --source synthetic` builds it; the
probe tasks are the traits it planted (userembed.datasets.synthetic.true_latents), binarised at
the median, and the held-out profile attributes.

Only users with history before T are probed (a user without one has no vector).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from userembed.datasets.spec import DatasetSpec
    from userembed.items import ItemAttributeMap

FUTURE_WEEKS = 9  # MovieLens-100K: 699 users with history before T, 132 of them active after
TOP_CATEGORIES = 3  # per-genre (per-category) tasks for the most common ones
# ML-100K occupations counted as technical (a one-vs-rest occupation group beside "student").
TECHNICAL = ("engineer", "programmer", "scientist", "technician")
AGE_35_BUCKET = 3  # movielens.AGE_EDGES: bucket 3 and up = 35 years or older
CONSTANT_PROFILE = "region"  # the users file's one column: 0 for everyone, so no information


@dataclass(frozen=True)
class ProbeData:
    """The probes' side of one data set.

    user_ids: (N,) the probed users, sorted; targets: task -> (N,) 1.0 / 0.0, NaN where the
    task does not apply to a user (e.g. future genre share of a user inactive in the window);
    profile: (N, F) the hand-made whole-history profile; definitions: task -> one line.
    """

    user_ids: np.ndarray
    targets: dict[str, np.ndarray]
    definitions: dict[str, str]
    profile: np.ndarray
    profile_columns: tuple[str, ...]


# --- saved probe inputs (bench/transfer.py --save-vectors) -------------------------------------


def save_probe_inputs(folder: Path, data: ProbeData) -> None:
    """user_ids.npy, profile.npy (columns in profile_columns.json) and targets.npz (arr_i =
    tasks.json's i-th task; NaN = no label) under `folder`; each run's vectors go beside
    them (`vectors_path`), rows in user_ids order."""
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "user_ids.npy", np.asarray(data.user_ids))
    np.save(folder / "profile.npy", data.profile)
    (folder / "profile_columns.json").write_text(json.dumps(list(data.profile_columns)))
    np.savez(folder / "targets.npz", *data.targets.values())  # arr_0.. in task order
    (folder / "tasks.json").write_text(json.dumps(list(data.targets)))


def vectors_path(folder: Path, model: str, seed: int) -> Path:
    return folder / f"vectors_{model}_s{seed}.npy"


def load_probe_inputs(folder: Path) -> ProbeData:
    """What save_probe_inputs wrote (definitions left empty: they are not saved)."""
    if not (folder / "tasks.json").exists():
        raise FileNotFoundError(
            f"{folder}: no saved probe inputs (bench/transfer.py --save-vectors)"
        )
    tasks = json.loads((folder / "tasks.json").read_text())
    with np.load(folder / "targets.npz") as z:
        targets = {t: z[f"arr_{i}"] for i, t in enumerate(tasks)}
    return ProbeData(
        user_ids=np.load(folder / "user_ids.npy"),
        targets=targets,
        definitions={t: "" for t in tasks},
        profile=np.load(folder / "profile.npy"),
        profile_columns=tuple(json.loads((folder / "profile_columns.json").read_text())),
    )


def load_vectors(folder: Path, model: str) -> dict[int, np.ndarray]:
    """Each saved seed's vectors of `model`, by seed."""
    # exact names only: another model's name may start with this one's and "_s"
    name = re.compile(re.escape(vectors_path(folder, model, 0).stem[:-1]) + r"(\d+)")
    seeds = sorted(int(m[1]) for p in folder.glob("*.npy") if (m := name.fullmatch(p.stem)))
    return {s: np.load(vectors_path(folder, model, s)) for s in seeds}


# --- the hand-made profile ----------------------------------------------------------------------


def hand_profile(
    events: pd.DataFrame,
    user_ids: np.ndarray,
    at: pd.Timestamp,
    users: pd.DataFrame | None = None,
    profile_features: tuple[str, ...] = (),
    item_categories: ItemAttributeMap | None = None,
) -> tuple[np.ndarray, tuple[str, ...]]:
    """What a data scientist writes in twenty lines of pandas from a user's WHOLE history
    before `at`: category histogram (shares), event-type histogram, mean and std, log counts
    (all, last 7 and 28 days), log distinct items and categories, log days since the last and
    the first event, and the model's profile attributes one-hot. (N, F) rows in `user_ids`
    order; a user without events gets zeros. `item_categories`: the category histogram counts
    every category of each event's item (MovieLens: every genre), not the event's one."""
    ev = events[events["event_timestamp"] < at]
    idx = pd.Index(user_ids)
    row = idx.get_indexer(ev["user_id"].to_numpy())
    ev, row = ev[row >= 0], row[row >= 0]
    n = len(user_ids)
    cats = int(ev["category_id"].max()) + 1 if len(ev) else 1
    kinds = int(ev["event_type"].max()) + 1 if len(ev) else 1
    cat_hist = np.zeros((n, cats))
    if item_categories is None:
        np.add.at(cat_hist, (row, ev["category_id"].to_numpy()), 1.0)
    else:
        values = np.concatenate(
            list(item_categories.lookup(ev["item_id"].to_numpy(dtype=np.int64)).values()), axis=1
        )  # (E, K), -1 = none
        cats = max(cats, int(values.max(initial=0)) + 1)
        cat_hist = np.zeros((n, cats))
        has = values >= 0
        np.add.at(cat_hist, (np.broadcast_to(row[:, None], values.shape)[has], values[has]), 1.0)
    kind = ev["event_type"].to_numpy(dtype=np.float64)
    type_hist = np.zeros((n, kinds))
    np.add.at(type_hist, (row, kind.astype(np.int64)), 1.0)
    count = type_hist.sum(axis=1)  # events
    denom = np.maximum(count, 1.0)[:, None]
    kind_sum = np.bincount(row, weights=kind, minlength=n)
    kind_sq = np.bincount(row, weights=kind * kind, minlength=n)
    kind_mean = kind_sum / np.maximum(count, 1.0)
    kind_std = np.sqrt(np.maximum(kind_sq / np.maximum(count, 1.0) - kind_mean**2, 0.0))
    days_ago = (at - ev["event_timestamp"]).dt.total_seconds().to_numpy() / 86_400.0
    recent7 = np.bincount(row, weights=days_ago < 7, minlength=n)
    recent28 = np.bincount(row, weights=days_ago < 28, minlength=n)
    last = np.full(n, np.nan)
    first = np.full(n, np.nan)
    by_user = pd.DataFrame({"row": row, "ago": days_ago}).groupby("row")["ago"]
    last[by_user.min().index] = by_user.min().to_numpy()
    first[by_user.max().index] = by_user.max().to_numpy()
    distinct = pd.DataFrame({"row": row, "item": ev["item_id"].to_numpy()}).groupby("row")
    items = np.zeros(n)
    items[distinct["item"].nunique().index] = distinct["item"].nunique().to_numpy()
    cols = [
        cat_hist / np.maximum(cat_hist.sum(axis=1), 1.0)[:, None],
        type_hist / denom,
        kind_mean[:, None],
        kind_std[:, None],
        np.log1p(np.c_[count, recent7, recent28, items, (cat_hist > 0).sum(axis=1)]),
        np.log1p(np.nan_to_num(np.c_[last, first], nan=0.0)),
    ]
    names = [f"category_{c}" for c in range(cats)] + [f"event_type_{k}" for k in range(kinds)]
    names += ["event_type_mean", "event_type_std", "log_count", "log_count_7d", "log_count_28d"]
    names += [
        "log_distinct_items",
        "log_distinct_categories",
        "log_recency_days",
        "log_tenure_days",
    ]
    if users is not None:
        u = users.set_index("user_id").reindex(user_ids)
        for f in profile_features:
            v = u[f].fillna(-1).to_numpy(dtype=np.int64)
            values = np.unique(v)
            cols.append((v[:, None] == values[None, :]).astype(np.float64))
            names += [f"{f}_{x}" for x in values]
    return np.concatenate(cols, axis=1), tuple(names)


# --- MovieLens-100K -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TeamFiles:
    """The documented parquet files a team would hand to `userembed data build --source
    parquet`, and the window start T."""

    events: Path
    users: Path
    labels: Path
    window_start: pd.Timestamp
    window_end: pd.Timestamp
    items: Path | None = None  # the optional items table (every genre, release-year bucket)


def movielens_team_files(
    folder: Path, future_weeks: int = FUTURE_WEEKS, items: bool = False
) -> tuple[TeamFiles, ProbeData]:
    """Write the pipeline's input under `folder` and return it with the probe data; `items`:
    also the items table (userembed.items: every genre, the release-year bucket)."""
    from userembed.datasets.movielens import (
        HORIZON,
        labels_at_cuts,
        load_movielens,
        load_movielens_items,
    )
    from userembed.datasets.spec import to_utc
    from userembed.items import history_attributes
    from userembed.schema import EVENT_COLUMNS

    events, users, _, spec = load_movielens()
    end = to_utc(spec.data_end)
    start = end - pd.Timedelta(weeks=future_weeks)
    past = events[events["event_timestamp"] < start]
    future = events[events["event_timestamp"] >= start]
    user_ids = np.sort(past["user_id"].unique())

    # The team's labels: three-week windows ending by T, as many as the history holds.
    num_cuts = int((start - past["event_timestamp"].min()) // HORIZON)
    cuts = [start - HORIZON * k for k in range(num_cuts, 0, -1)]
    labels = labels_at_cuts(past, cuts)[
        ["user_id", "label_timestamp", "label_active", "label_rate_high", "label_new_genre"]
    ]
    folder.mkdir(parents=True, exist_ok=True)
    files = TeamFiles(
        folder / "events.parquet",
        folder / "users.parquet",
        folder / "labels.parquet",
        start,
        end,
        folder / "items.parquet" if items else None,
    )
    genres = None
    if files.items is not None:
        team_items = load_movielens_items()
        team_items.to_parquet(files.items, index=False)
        genres = history_attributes(team_items)
    past[[c.name for c in EVENT_COLUMNS]].to_parquet(files.events, index=False)
    pd.DataFrame(
        {"user_id": user_ids, CONSTANT_PROFILE: np.zeros(len(user_ids), np.int64)}
    ).to_parquet(files.users, index=False)
    labels.to_parquet(files.labels, index=False)

    targets, definitions = _movielens_targets(users, future, user_ids, events)
    profile, names = hand_profile(past, user_ids, start, item_categories=genres)
    return files, ProbeData(user_ids, targets, definitions, profile, names)


def _vocabulary(file: str, column: str) -> list[str]:
    """An ML-100K column's values in code order: load_movielens codes the sorted vocabulary
    (genre: the movie's first genre, "unknown" when it has none)."""
    from userembed.datasets.movielens import default_path

    df = pd.read_csv(default_path() / file, sep="\t", dtype=str, keep_default_na=False)
    values = df[next(c for c in df.columns if c.split(":")[0] == column)]
    if column == "class":
        values = values.str.split(" ").str[0].replace("", "unknown")
    return sorted(values.unique())


def _median_split(values: np.ndarray) -> np.ndarray:
    """1.0 above the median of the defined values, 0.0 at or below it, NaN kept."""
    med = np.nanmedian(values)
    return np.where(np.isnan(values), np.nan, (values > med).astype(np.float64))


def _movielens_targets(
    users: pd.DataFrame, future: pd.DataFrame, user_ids: np.ndarray, events: pd.DataFrame
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    u = users.set_index("user_id").reindex(user_ids)
    occ = np.asarray(_vocabulary("ml-100k.user", "occupation"))[u["occupation"].to_numpy()]
    f = future[future["user_id"].isin(user_ids)]
    g = f.groupby("user_id")
    n_future = g.size().reindex(user_ids).to_numpy(dtype=np.float64)  # NaN: inactive
    active = ~np.isnan(n_future)
    mean_rating = g["event_type"].mean().reindex(user_ids).to_numpy(dtype=np.float64)
    share_high = (f["event_type"] >= 4).groupby(f["user_id"]).mean().reindex(user_ids).to_numpy()
    targets = {
        "gender": u["gender"].to_numpy(dtype=np.float64),
        "age_35_plus": (u["age_bucket"].to_numpy() >= AGE_35_BUCKET).astype(np.float64),
        "occ_student": (occ == "student").astype(np.float64),
        "occ_technical": np.isin(occ, TECHNICAL).astype(np.float64),
        "future_active": active.astype(np.float64),
        "future_volume": _median_split(n_future),
        "future_rating_level": _median_split(mean_rating),
        "future_share_4plus": _median_split(share_high.astype(np.float64)),
    }
    definitions = {
        "gender": "held-out profile: female",
        "age_35_plus": "held-out profile: age bucket 35 or older",
        "occ_student": "held-out profile: occupation student (one vs rest)",
        "occ_technical": "held-out profile: occupation " + "/".join(TECHNICAL),
        "future_active": "rates anything in the future window",
        "future_volume": "ratings in the window above the median of active users (active only)",
        "future_rating_level": "mean rating in the window above the median (active only)",
        "future_share_4plus": "share of 4-5 ratings in the window above the median (active only)",
    }
    genres = _vocabulary("ml-100k.item", "class")
    for c in events["category_id"].value_counts().index[:TOP_CATEGORIES]:
        share = (f["category_id"] == c).groupby(f["user_id"]).mean().reindex(user_ids)
        name = f"future_{genres[c].lower()}"
        targets[name] = _median_split(share.to_numpy(dtype=np.float64))
        definitions[name] = (
            f"share of window ratings in {genres[c]} (a top-{TOP_CATEGORIES} first genre) above "
            "the median (active only)"
        )
    return targets, definitions


# --- synthetic ----------------------------------------------------------------------------------


def synthetic_probe_data(
    events: pd.DataFrame, users: pd.DataFrame, spec: DatasetSpec, num_users: int, seed: int
) -> ProbeData:
    """Probe data of `generate_synthetic(num_users, seed)` as built: the planted traits of
    every user with at least one event, and the profile of the whole history."""
    from userembed.datasets.spec import to_utc
    from userembed.datasets.synthetic import true_latents

    lat = true_latents(num_users, seed)
    user_ids = np.sort(events["user_id"].unique())
    interests = lat.interests[user_ids]
    occupation = users.set_index("user_id")["occupation"].reindex(np.arange(num_users)).to_numpy()
    # Occupations set engagement (synthetic._draw_users): the half whose users engage most.
    occ_mean = pd.Series(lat.engagement).groupby(occupation).mean()
    engaged_occ = occ_mean.index[occ_mean > occ_mean.median()].to_numpy()
    targets = {
        "activity": _median_split(lat.z_act[user_ids]),
        "engagement": _median_split(lat.engagement[user_ids]),
        "buyer": _median_split(lat.buyer[user_ids]),
        "exploration": _median_split(lat.z_explore[user_ids]),
        "gender": users.set_index("user_id")["gender"].reindex(user_ids).to_numpy(np.float64),
        "occupation_engaged": np.isin(occupation[user_ids], engaged_occ).astype(np.float64),
    }
    definitions = {
        "activity": "planted activity (event rate) above the median",
        "engagement": "planted engagement (click depth) above the median",
        "buyer": "planted buyer trait (cart, purchase) above the median",
        "exploration": "planted exploration rate above the median",
        "gender": "held-out profile: gender",
        "occupation_engaged": "held-out profile: occupation among the more engaged half",
    }
    for c in np.argsort(-lat.interests.mean(axis=0))[:TOP_CATEGORIES]:
        name = f"interest_{int(c)}"
        targets[name] = _median_split(interests[:, c])
        definitions[name] = f"planted interest in category {int(c)} above the median"
    at = to_utc(spec.data_end)
    profile, names = hand_profile(events, user_ids, at, users, spec.model_profile_features)
    return ProbeData(user_ids, targets, definitions, profile, names)
