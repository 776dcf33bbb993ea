"""A 2-D picture of the served vectors: PCA of a sample of users, each with a profile attribute.

Users are drawn from the Feast offline profile table (`profile.parquet`: one row per user and
snapshot time, the newest kept), so the attribute and the user come from one read; their
vectors are read from the version readers follow. Users without a vector there are dropped.

    p = project(store, ev, offline_dir, "age_bucket", sample=2000)
    p.points  # (n, 2)    p.labels  # (n,) attribute values (-1: unknown)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from userembed.errors import DataNotFoundError, InvalidInputError
from userembed.ids import format_user_ids
from userembed.paths import PROFILE_FILE
from userembed.vectors import VectorStore

USER_COLUMN = "user_id"
TIME_COLUMN = "event_timestamp"
UNKNOWN = -1  # a missing attribute value in the picture
SEED = 0  # the same sample on every load: the picture does not jump between reloads


@dataclass(frozen=True)
class Projection:
    version: str
    attribute: str
    points: np.ndarray  # (n, 2) float32
    labels: np.ndarray  # (n,) int64
    explained: tuple[float, float]  # share of variance on each axis
    asked: int  # users drawn from the profile table


def profile_path(offline_dir: str | Path) -> Path:
    return Path(offline_dir) / PROFILE_FILE


def attributes(offline_dir: str | Path) -> list[str]:
    """Integer profile columns a picture can be coloured by (empty without a profile table)."""
    path = profile_path(offline_dir)
    if not path.is_file():
        return []
    schema = pq.read_schema(path)
    return [
        f.name
        for f in schema
        if f.name not in (USER_COLUMN, TIME_COLUMN)
        and (str(f.type).startswith("int") or str(f.type) == "bool")
    ]


def _sample(offline_dir: str | Path, attribute: str, sample: int) -> tuple[list[str], np.ndarray]:
    path = profile_path(offline_dir)
    if not path.is_file():
        raise DataNotFoundError(f"no profile table at {path}")
    if attribute not in attributes(offline_dir):
        raise InvalidInputError(f"{attribute!r} is not an integer column of {path}")
    timed = TIME_COLUMN in pq.read_schema(path).names
    table = pq.read_table(path, columns=[USER_COLUMN, attribute, *([TIME_COLUMN] if timed else [])])
    users = table[USER_COLUMN].to_numpy()
    # One row per user: its newest snapshot.
    if timed:
        ts = table[TIME_COLUMN].cast("int64").to_numpy()
        order = np.lexsort((ts, users))
    else:
        order = np.arange(len(users))
    ordered = users[order]
    last = np.flatnonzero(np.r_[ordered[1:] != ordered[:-1], True]) if timed else None
    keep = order[last] if last is not None else np.unique(users, return_index=True)[1]
    rng = np.random.default_rng(SEED)
    if len(keep) > sample:
        keep = np.sort(rng.choice(keep, size=sample, replace=False))
    values = pc.fill_null(table[attribute].take(keep), UNKNOWN).to_numpy().astype(np.int64)
    return format_user_ids(users[keep]), values


def pca_2d(x: np.ndarray) -> tuple[np.ndarray, tuple[float, float]]:
    """The first two principal components of rows `x` (n, D) and their variance shares."""
    centred = x - x.mean(axis=0, keepdims=True)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    points = centred @ vt[:2].T
    if points.shape[1] < 2:  # a 1-D space: pad so the plot still has two axes
        points = np.pad(points, ((0, 0), (0, 2 - points.shape[1])))
    var = s**2
    total = float(var.sum()) or 1.0
    shares = [float(v) / total for v in var[:2]] + [0.0, 0.0]
    return points.astype(np.float32), (shares[0], shares[1])


def project(
    store: VectorStore, version: str, offline_dir: str | Path, attribute: str, sample: int
) -> Projection:
    user_ids, values = _sample(offline_dir, attribute, sample)
    got = store.read(version, user_ids)
    found = [i for i, g in enumerate(got) if g is not None]
    if len(found) < 3:
        raise DataNotFoundError(
            f"only {len(found)} of {len(user_ids)} sampled users have a vector in {version}"
        )
    x = np.stack([got[i].vector for i in found])  # type: ignore[union-attr]
    points, explained = pca_2d(x)
    return Projection(version, attribute, points, values[found], explained, len(user_ids))
