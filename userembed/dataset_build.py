"""Build a data set and put its features online: what `userembed data build` and
`userembed feast ...` run, and what the trainer reads back (`load_built`).

A build loads and validates a source, then writes the raw tables and spec under
`paths.data_dir()` and the Feast offline tables under `paths.offline_dir()`, all staged
(userembed.staged_files) and renamed into place once every file is written: a failed build
leaves the previous data set whole. Feast is imported inside the functions that need it (slow
import, ~10 s store start).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from userembed import paths
from userembed.datasets.spec import SPEC_FILE, DatasetSpec
from userembed.errors import InvalidInputError
from userembed.staged_files import StagedFiles

if TYPE_CHECKING:
    from feast import FeatureStore

    from userembed.items import ItemAttributeMap

logger = logging.getLogger(__name__)

SOURCES: tuple[str, ...] = ("synthetic", "movielens", "parquet")


@dataclass(frozen=True)
class BuildRequest:
    source: str = "synthetic"
    num_users: int = 10_000
    seed: int = 0
    events_path: Path | None = None
    users_path: Path | None = None
    labels_path: Path | None = None
    movielens_path: Path | None = None
    # The optional items table (userembed.items): synthetic and movielens write their own when
    # `items` is set; parquet reads `items_path`. Without one nothing changes.
    items: bool = False
    items_path: Path | None = None


def load_source(req: BuildRequest) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, DatasetSpec]:
    """(events, users, labels, spec) of the requested source; validates, writes nothing."""
    return load_source_with_items(req)[:4]


def load_source_with_items(
    req: BuildRequest,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, DatasetSpec, pd.DataFrame | None]:
    """`load_source` plus the validated items table (None when the build has none)."""
    from userembed.items import items_frame, read_items

    if req.source == "parquet":
        from userembed.datasets.parquet import load_parquet

        if not (req.events_path and req.users_path and req.labels_path):
            raise InvalidInputError("--source parquet needs --events, --users-file and --labels")
        if req.items:
            raise InvalidInputError("--source parquet reads its items table from --items-file")
        # The items file is validated first: a bad one fails before the (slower) events.
        team_items = read_items(req.items_path)[0] if req.items_path is not None else None
        return *load_parquet(req.events_path, req.users_path, req.labels_path), team_items
    if req.items_path is not None:
        raise InvalidInputError("--items-file is for --source parquet; use --items")
    items: pd.DataFrame | None
    if req.source == "synthetic":
        from userembed.datasets.synthetic import generate_synthetic_with_items

        events, users, labels, spec, items = generate_synthetic_with_items(req.num_users, req.seed)
    elif req.source == "movielens":
        from userembed.datasets.movielens import load_movielens, load_movielens_items

        events, users, labels, spec = load_movielens(req.movielens_path)
        items = load_movielens_items(req.movielens_path) if req.items else None
    else:
        raise InvalidInputError(f"unknown source {req.source!r}; expected one of {SOURCES}")
    if not req.items or items is None:
        return events, users, labels, spec, None
    items_frame(items, f"{req.source} items")
    return events, users, labels, spec, items


def build_dataset(req: BuildRequest) -> dict[str, Any]:
    """Load + validate the source, add the future targets to the labels, then write the raw
    tables, spec.json and the feature tables.

    Nothing is written unless the whole source validated, and nothing is replaced unless
    every file was written.
    """
    from userembed.future_targets import add_future_targets
    from userembed.items import history_attributes
    from userembed.snapshots import write_feature_tables

    t0 = time.perf_counter()
    events, users, labels, spec, items = load_source_with_items(req)
    # The self-supervised objective's targets ride with the labels (future information: never
    # a Feast feature); the spec records their window.
    labels, spec = add_future_targets(events, labels, spec)
    out = paths.data_dir()
    with StagedFiles() as staged:
        for file_name, df in (
            (paths.EVENTS_FILE, events),
            (paths.USERS_FILE, users),
            (paths.LABELS_FILE, labels),
        ):
            df.to_parquet(staged.path(out / file_name), index=False)
        if items is not None:
            items.to_parquet(staged.path(out / paths.ITEMS_FILE), index=False)
        else:  # an earlier build's items must not describe this data set
            staged.remove(out / paths.ITEMS_FILE)
        spec.write(staged.path(out / SPEC_FILE))
        tables = write_feature_tables(
            events,
            users,
            spec,
            paths.offline_dir(),
            spec.sequence_length,
            staged,
            history_attributes(items) if items is not None else None,
        )
        staged.commit()
    summary = {
        "source": req.source,
        "dataset": spec.name,
        "users": int(users["user_id"].nunique()),
        "events": len(events),
        "label_rows": len(labels),
        "items": 0 if items is None else len(items),
        "tasks": list(spec.tasks),
        "bayes_auc": dict(spec.bayes_auc),
        "data_dir": str(out),
        "offline_dir": tables["offline_dir"],
        "seconds": round(time.perf_counter() - t0, 2),
    }
    logger.info("data build: %s", summary)
    return summary


def load_built() -> tuple[pd.DataFrame, DatasetSpec]:
    """The labels and spec written by the last `data build` (for the trainer)."""
    out = paths.data_dir()
    return pd.read_parquet(out / paths.LABELS_FILE), DatasetSpec.load(out)


def load_built_items() -> ItemAttributeMap | None:
    """The item attribute map of the last `data build`'s items table; None without one."""
    from userembed.items import ItemAttributeMap, read_items

    path = paths.data_dir() / paths.ITEMS_FILE
    if not path.is_file():
        return None
    items, attributes = read_items(path)
    return ItemAttributeMap.from_frame(items, attributes)


def serve_online(redis_url: str | None = None) -> FeatureStore:
    """Put the current data set's features online: `feast apply --fresh`, then materialise
    into Redis. Fresh: users the new data set lacks would otherwise keep an earlier data
    set's online rows (materialize replaces the rows of the users it writes). Returns the
    FeatureStore."""
    from userembed import feast_ops

    store = feast_ops.open_store(redis_url)
    feast_ops.apply(store, fresh=True)
    feast_ops.materialize(store)
    return store


def build_and_materialize(
    source: str = "synthetic",
    num_users: int = 10_000,
    seed: int = 0,
    redis_url: str | None = None,
    **paths_kw: Any,
) -> dict[str, Any]:
    """Build the data set and put its features online (the demo's stages 2 and 3)."""
    summary = build_dataset(BuildRequest(source, num_users, seed, **paths_kw))
    serve_online(redis_url)
    summary["materialized"] = True
    return summary
