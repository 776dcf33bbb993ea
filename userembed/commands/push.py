"""`userembed push FILE`: a thin wrapper over userembed.freshness.push_fresh (docs/freshness.md)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser(
        "push",
        help="push fresh behaviour online (Feast push source); servers recompute the users' "
        "stored vectors at their next read",
    )
    p.add_argument(
        "file",
        type=Path,
        help="rows to push, .parquet or .jsonl: user_id, event_timestamp and every feature of "
        "the behaviour view (docs/data.md)",
    )
    p.add_argument("--feature-repo", default=None, help="Feast repository (default feature_repo/)")
    p.add_argument("--redis-url", default=None, help="default $REDIS_URL")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_push)


def _push(args: argparse.Namespace) -> int:
    from userembed import paths
    from userembed.feast_ops import open_store
    from userembed.freshness import push_fresh, read_rows
    from userembed.prerequisites import require_feast_registry
    from userembed.redis_urls import open_redis

    rows = read_rows(args.file)  # before the slow store: a bad file answers at once
    require_feast_registry()
    url = args.redis_url or paths.redis_url()
    store = open_store(url, Path(args.feature_repo) if args.feature_repo else None)
    report = push_fresh(store, open_redis(url), rows)
    print(json.dumps(asdict(report)) if args.json else report.line())
    return 0
