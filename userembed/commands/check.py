"""`userembed check`: train/serve consistency for a sample of users.

A thin wrapper over userembed.consistency.check: prints the report (or JSON) and exits 1 when
anything differs (online rows vs the newest offline rows, a stored vector vs a recompute, an
offline file changed since it was materialised), 0 when all agree.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from userembed import prerequisites
from userembed.consistency import CheckConfig


def _check(args: argparse.Namespace) -> int:
    locations = {
        "offline_dir": args.offline_dir,
        "registry_root": args.registry_root,
        "redis_url": args.redis_url,
    }
    cfg = CheckConfig(
        model=args.model,
        embedding_version=args.version,
        sample=args.sample,
        seed=args.seed,
        **{k: v for k, v in locations.items() if v is not None},  # unset: the config's env default
    )
    prerequisites.require_offline_tables(cfg.offline_dir)
    prerequisites.require_feast_registry()
    from userembed.consistency import check

    report = check(cfg)
    print(json.dumps(report.to_dict()) if args.json else "\n".join(report.lines()))
    return 0 if report.ok else 1


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "check",
        help="train/serve consistency: online rows vs offline rows, stored vectors vs a "
        "recompute (exit 1 on a mismatch)",
    )
    p.add_argument("--model", default=CheckConfig.model, help="default %(default)s")
    p.add_argument(
        "--version", default=None, help="embedding version (default: the one readers follow)"
    )
    p.add_argument(
        "--sample", type=int, default=CheckConfig.sample, help="users (default %(default)s)"
    )
    p.add_argument("--seed", type=int, default=CheckConfig.seed, help="draws the sample")
    p.add_argument("--offline-dir", default=None, help="default $USEREMBED_OFFLINE_DIR")
    p.add_argument("--registry-root", default=None, help="default $USEREMBED_REGISTRY_ROOT")
    p.add_argument("--redis-url", default=None, help="default $REDIS_URL")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_check)
