"""CLI commands of the data pipeline: `userembed data build`, `userembed feast ...`.

Handlers are thin wrappers over `build_dataset`, `serve_online` and `build_and_materialize`,
which tests and the demo call directly. Feast is imported inside handlers (slow import, ~10 s
store start).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from userembed import paths
from userembed.datasets.spec import DatasetSpec
from userembed.errors import InvalidInputError

if TYPE_CHECKING:
    from feast import FeatureStore

logger = logging.getLogger(__name__)

SOURCES: tuple[str, ...] = ("synthetic", "movielens", "parquet")


def data_dir() -> Path:
    """Raw tables + spec.json of the current data set: <USEREMBED_HOME>/data."""
    return paths.home() / "data"


@dataclass(frozen=True)
class BuildRequest:
    source: str = "synthetic"
    num_users: int = 10_000
    seed: int = 0
    events_path: Path | None = None
    users_path: Path | None = None
    labels_path: Path | None = None
    movielens_path: Path | None = None


def load_source(req: BuildRequest) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, DatasetSpec]:
    """(events, users, labels, spec) of the requested source; validates, writes nothing."""
    if req.source == "synthetic":
        from userembed.datasets.synthetic import generate_synthetic

        return generate_synthetic(req.num_users, req.seed)
    if req.source == "movielens":
        from userembed.datasets.movielens import load_movielens

        return load_movielens(req.movielens_path)
    if req.source == "parquet":
        from userembed.datasets.parquet import load_parquet

        if not (req.events_path and req.users_path and req.labels_path):
            raise InvalidInputError("--source parquet needs --events, --users-file and --labels")
        return load_parquet(req.events_path, req.users_path, req.labels_path)
    raise InvalidInputError(f"unknown source {req.source!r}; expected one of {SOURCES}")


def build_dataset(req: BuildRequest) -> dict[str, Any]:
    """Load + validate the source, then write the raw tables, spec.json and the feature tables.

    Nothing is written unless the whole source validated.
    """
    from userembed.snapshots import write_feature_tables

    t0 = time.perf_counter()
    events, users, labels, spec = load_source(req)
    out = data_dir()
    out.mkdir(parents=True, exist_ok=True)
    for name, df in (("events", events), ("users", users), ("labels", labels)):
        df.to_parquet(out / f"{name}.parquet", index=False)
    spec.save(out)
    tables = write_feature_tables(events, users, spec, paths.offline_dir(), spec.sequence_length)
    summary = {
        "source": req.source,
        "dataset": spec.name,
        "users": int(users["user_id"].nunique()),
        "events": len(events),
        "label_rows": len(labels),
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
    out = data_dir()
    return pd.read_parquet(out / "labels.parquet"), DatasetSpec.load(out)


def serve_online(redis_url: str | None = None) -> FeatureStore:
    """Put the current data set's features online: `feast apply --fresh`, then materialise
    into Redis. Fresh: the online rows of an earlier data set, dated later, would shadow the
    new ones. Returns the FeatureStore."""
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
    **paths_kw: Path | None,
) -> dict[str, Any]:
    """Build the data set and put its features online (the demo's stages 2 and 3)."""
    summary = build_dataset(BuildRequest(source, num_users, seed, **paths_kw))
    serve_online(redis_url)
    summary["materialized"] = True
    return summary


# --- handlers ------------------------------------------------------------------------------
def _data_build(args: argparse.Namespace) -> int:
    req = BuildRequest(
        source=args.source,
        num_users=args.users,
        seed=args.seed,
        events_path=args.events,
        users_path=args.users_file,
        labels_path=args.labels,
        movielens_path=args.path,
    )
    print(json.dumps(build_dataset(req)))
    return 0


def _feast_apply(args: argparse.Namespace) -> int:
    from userembed import feast_ops

    names = feast_ops.apply(feast_ops.open_store(args.redis_url), fresh=args.fresh)
    print(json.dumps({"applied": names}))
    return 0


def _feast_materialize(args: argparse.Namespace) -> int:
    from userembed import feast_ops

    end = feast_ops.materialize(feast_ops.open_store(args.redis_url))
    print(json.dumps({"materialized_until": end.isoformat()}))
    return 0


def _feast_online(args: argparse.Namespace) -> int:
    from userembed import feast_ops

    store = feast_ops.open_store(args.redis_url)
    print(json.dumps(feast_ops.online_features(store, args.user_id), default=str))
    return 0


def register(subparsers: Any) -> None:
    data = subparsers.add_parser("data", help="build a data set and its feature tables")
    data_sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    build = data_sub.add_parser("build", help="load a source, write raw tables + feature tables")
    build.add_argument("--source", choices=SOURCES, default="synthetic")
    build.add_argument("--users", type=int, default=10_000, help="synthetic: number of users")
    build.add_argument("--seed", type=int, default=0, help="synthetic: random seed")
    build.add_argument("--events", type=Path, help="parquet: events file")
    build.add_argument("--users-file", type=Path, help="parquet: users file")
    build.add_argument("--labels", type=Path, help="parquet: labels file")
    build.add_argument("--path", type=Path, help="movielens: ml-100k folder (default: recbole's)")
    build.set_defaults(func=_data_build)

    feast = subparsers.add_parser(
        "feast", help="the Feast feature store (apply, materialize, online)"
    )
    feast.add_argument("--redis-url", default=None, help="default: $REDIS_URL")
    feast_sub = feast.add_subparsers(dest="feast_command", metavar="SUBCOMMAND", required=True)
    apply = feast_sub.add_parser("apply", help="register feature_repo/ objects")
    apply.add_argument(
        "--fresh",
        action="store_true",
        help="first drop the online rows of an earlier data set (after `data build` of a new "
        "one: Feast keeps the newer of two rows of a user, whichever data set it came from)",
    )
    apply.set_defaults(func=_feast_apply)
    feast_sub.add_parser("materialize", help="load the newest snapshots into Redis").set_defaults(
        func=_feast_materialize
    )
    online = feast_sub.add_parser("online", help="print a user's serving features from Redis")
    online.add_argument("--user-id", type=int, nargs="+", required=True)
    online.set_defaults(func=_feast_online)
