"""`userembed forget USER...`: a thin wrapper over userembed.forget (docs/forget.md)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser(
        "forget",
        help="delete users' vectors, online features and index entries; keep them out of "
        "refreshes (a tombstone)",
    )
    p.add_argument("user_ids", nargs="+", metavar="USER", help="user ids (canonical decimal)")
    p.add_argument(
        "--model",
        action="append",
        default=None,
        help="delete the vectors of this model only (repeat for more; default: every model "
        "of the registry); the tombstone holds for every model",
    )
    p.add_argument(
        "--release",
        action="store_true",
        help="drop the users' tombstones instead (deletes nothing)",
    )
    p.add_argument(
        "--keep-features",
        action="store_true",
        help="leave the Feast online rows alone (the tombstone still refuses the user)",
    )
    p.add_argument("--feature-repo", default=None, help="Feast repository (default feature_repo/)")
    p.add_argument("--registry-root", default=None, help="default $USEREMBED_REGISTRY_ROOT")
    p.add_argument("--redis-url", default=None, help="default $REDIS_URL")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_forget)


def _forget(args: argparse.Namespace) -> int:
    from userembed.forget import forget_users, release_users

    if args.release:
        released = release_users(args.user_ids, args.redis_url)
        if args.json:
            print(json.dumps({"released": released, "users": len(args.user_ids)}))
        else:
            print(
                f"released {released} of {len(args.user_ids)} users (the others had no tombstone)"
            )
        return 0
    report = forget_users(
        args.user_ids,
        redis_url=args.redis_url,
        models=args.model,
        registry_root=args.registry_root,
        feature_repo=Path(args.feature_repo) if args.feature_repo else None,
        features=not args.keep_features,
    )
    print(json.dumps(asdict(report)) if args.json else report.line())
    return 0
