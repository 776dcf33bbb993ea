"""`userembed data build` and `userembed feast apply / materialize / online`.

Thin wrappers over userembed.dataset_build and userembed.feast_ops; each feast command first
checks its inputs (userembed.prerequisites), which costs no Feast import.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from userembed import prerequisites
from userembed.dataset_build import SOURCES, BuildRequest, build_dataset
from userembed.errors import UserNotFoundError
from userembed.ids import parse_user_id


def _data_build(args: argparse.Namespace) -> int:
    req = BuildRequest(
        source=args.source,
        num_users=args.users,
        seed=args.seed,
        events_path=args.events,
        users_path=args.users_file,
        labels_path=args.labels,
        movielens_path=args.path,
        items=args.items,
        items_path=args.items_file,
    )
    print(json.dumps(build_dataset(req)))
    return 0


def _feast_apply(args: argparse.Namespace) -> int:
    prerequisites.require_offline_tables()
    from userembed import feast_ops

    names = feast_ops.apply(feast_ops.open_store(args.redis_url), fresh=args.fresh)
    print(json.dumps({"applied": names}))
    return 0


def _feast_materialize(args: argparse.Namespace) -> int:
    prerequisites.require_offline_tables()
    prerequisites.require_feast_registry()
    from userembed import feast_ops

    end = feast_ops.materialize(feast_ops.open_store(args.redis_url))
    print(json.dumps({"materialized_until": end.isoformat()}))
    return 0


def _feast_online(args: argparse.Namespace) -> int:
    user_ids = [parse_user_id(u) for u in args.user_id]  # canonical spellings only
    prerequisites.require_feast_registry()
    from userembed import feast_ops

    store = feast_ops.open_store(args.redis_url)
    features = feast_ops.online_features(store, user_ids)
    values = [v for name, v in features.items() if name != "user_id"]
    if all(column[i] is None for column in values for i in range(len(args.user_id))):
        raise UserNotFoundError(
            prerequisites.run_first(
                f"no online features for user {' '.join(map(str, args.user_id))} (unknown user, "
                "or nothing materialised)",
                prerequisites.FEAST_MATERIALIZE,
            )
        )
    print(json.dumps(features, default=str))
    return 0


def register(subparsers: Any) -> None:
    data = subparsers.add_parser("data", help="build a data set and its feature tables")
    data_sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    build = data_sub.add_parser("build", help="load a source, write raw tables + feature tables")
    build.add_argument("--source", choices=SOURCES, default=BuildRequest.source)
    build.add_argument(
        "--users", type=int, default=BuildRequest.num_users, help="synthetic: number of users"
    )
    build.add_argument("--seed", type=int, default=BuildRequest.seed, help="synthetic: random seed")
    build.add_argument("--events", type=Path, help="parquet: events file")
    build.add_argument("--users-file", type=Path, help="parquet: users file")
    build.add_argument("--labels", type=Path, help="parquet: labels file")
    build.add_argument("--path", type=Path, help="movielens: ml-100k folder (default: recbole's)")
    build.add_argument(
        "--items",
        action="store_true",
        help="synthetic / movielens: also write the items table (every genre, price band, ...)",
    )
    build.add_argument("--items-file", type=Path, help="parquet: optional items file")
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
        help="first drop every online row (after `data build` of a different data set: the "
        "users it lacks would keep their rows of the earlier one)",
    )
    apply.set_defaults(func=_feast_apply)
    feast_sub.add_parser(
        "materialize",
        help="load the newest snapshots into Redis (a view whose offline file changed since "
        "is written over, equal timestamps included)",
    ).set_defaults(func=_feast_materialize)
    online = feast_sub.add_parser("online", help="print a user's serving features from Redis")
    online.add_argument("--user-id", nargs="+", required=True)
    online.set_defaults(func=_feast_online)
