"""`userembed refresh` and `userembed rollback`: thin wrappers over refresh.job and
refresh.versions. Flag defaults are read from `RefreshConfig`, their one spelling."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict
from typing import Any

from refresh.config import COMPAT_METHODS, ENGINES, FULL, INCREMENTAL, RefreshConfig
from refresh.errors import NoVersionError
from userembed import prerequisites

logger = logging.getLogger(__name__)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "refresh", help="recompute every user's vector into a new version, validate, switch"
    )
    p.add_argument(
        "--model", default=RefreshConfig.model, help="registry model name (default %(default)s)"
    )
    p.add_argument(
        "--ref",
        default=RefreshConfig.model_ref,
        help="registry alias or version (default %(default)s)",
    )
    p.add_argument(
        "--incremental", action="store_true", help="only users with features newer than last run"
    )
    p.add_argument("--engine", choices=ENGINES, default=RefreshConfig.engine)
    p.add_argument(
        "--ray-address",
        default=RefreshConfig.ray_address,
        help="Ray cluster (default: a local instance)",
    )
    p.add_argument(
        "--ray-actors",
        type=int,
        default=RefreshConfig.ray_actors,
        help="encoder actors (Ray engine)",
    )
    p.add_argument(
        "--batch-size", type=int, default=RefreshConfig.batch_size, help="users per encoder run"
    )
    p.add_argument(
        "--part-rows", type=int, default=RefreshConfig.part_rows, help="file rows per checkpoint"
    )
    p.add_argument(
        "--keep", type=int, default=RefreshConfig.keep, help="ready versions kept for rollback"
    )
    p.add_argument(
        "--min-norm", type=float, default=RefreshConfig.min_norm, help="validation bound on norms"
    )
    p.add_argument(
        "--max-norm", type=float, default=RefreshConfig.max_norm, help="validation bound on norms"
    )
    p.add_argument("--no-resume", action="store_true", help="ignore a killed run's checkpoint")
    p.add_argument(
        "--drift-sample",
        type=int,
        default=RefreshConfig.drift_sample,
        help="users in the drift report",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=RefreshConfig.intra_op_threads,
        help="onnxruntime intra-op threads",
    )
    p.add_argument(
        "--pause-s",
        type=float,
        default=RefreshConfig.pause_between_parts_s,
        help="pause between parts (throttle)",
    )
    p.add_argument(
        "--lock-ttl-s",
        type=float,
        default=RefreshConfig.lock_ttl_s,
        help="refresh lock TTL (renewed while the run lives)",
    )
    p.add_argument(
        "--lock-wait-s",
        type=float,
        default=RefreshConfig.lock_wait_s,
        help="wait this long for another run's lock (0: fail at once)",
    )
    p.add_argument(
        "--check-sample",
        type=int,
        default=RefreshConfig.check_sample,
        help="users the consistency check samples before the flip (0: no check)",
    )
    p.add_argument(
        "--check-blocks-flip",
        action="store_true",
        help="a consistency mismatch fails the run and keeps readers where they are",
    )
    p.add_argument(
        "--similar-index",
        action=argparse.BooleanOptionalAction,
        default=RefreshConfig.similar_index,
        help="build the version's similar-users index before the flip (docs/similar.md)",
    )
    p.add_argument(
        "--compat-sample",
        type=int,
        default=RefreshConfig.compat_sample,
        help="users the map into the previous model version's space is fitted on "
        "(docs/compatibility.md; 0: no map)",
    )
    p.add_argument(
        "--compat-method",
        choices=COMPAT_METHODS,
        default=RefreshConfig.compat_method,
        help="how that map is fitted",
    )
    p.add_argument("--offline-dir", default=None, help="default $USEREMBED_OFFLINE_DIR")
    p.add_argument("--registry-root", default=None, help="default $USEREMBED_REGISTRY_ROOT")
    p.add_argument("--redis-url", default=None, help="default $REDIS_URL")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_refresh)

    p = sub.add_parser("rollback", help="point readers back at the previous ready version")
    p.add_argument("--model", default=RefreshConfig.model)
    p.add_argument("--to", default=None, help="embedding version id (default: the previous one)")
    p.add_argument("--list", action="store_true", help="only list the versions")
    p.add_argument("--redis-url", default=None, help="default $REDIS_URL")
    p.set_defaults(func=_rollback)


def _refresh(args: argparse.Namespace) -> int:
    from refresh.job import refresh

    locations = {
        "offline_dir": args.offline_dir,
        "registry_root": args.registry_root,
        "redis_url": args.redis_url,
    }
    cfg = RefreshConfig(
        model=args.model,
        model_ref=args.ref,
        mode=INCREMENTAL if args.incremental else FULL,
        engine=args.engine,
        ray_address=args.ray_address,
        ray_actors=args.ray_actors,
        batch_size=args.batch_size,
        part_rows=args.part_rows,
        resume=not args.no_resume,
        keep=args.keep,
        min_norm=args.min_norm,
        max_norm=args.max_norm,
        drift_sample=args.drift_sample,
        intra_op_threads=args.threads,
        pause_between_parts_s=args.pause_s,
        lock_ttl_s=args.lock_ttl_s,
        lock_wait_s=args.lock_wait_s,
        check_sample=args.check_sample,
        check_blocks_flip=args.check_blocks_flip,
        similar_index=args.similar_index,
        compat_sample=args.compat_sample,
        compat_method=args.compat_method,
        **{k: v for k, v in locations.items() if v is not None},  # unset: the config's env default
    )
    prerequisites.require_offline_tables(cfg.offline_dir)
    prerequisites.require_model(cfg.model, cfg.registry_root)
    summary = refresh(cfg)
    print(json.dumps(asdict(summary)) if args.json else summary.line())
    return 0


def _rollback(args: argparse.Namespace) -> int:
    from refresh.versions import rollback, version_lines
    from userembed import paths
    from userembed.redis_urls import open_redis, redacted
    from userembed.vectors import VectorStore

    url = args.redis_url or paths.redis_url()
    store = VectorStore(open_redis(url), args.model)
    lines = version_lines(store)
    if not lines:
        problem = f"no embedding version of {args.model} in Redis at {redacted(url)}"
        if args.list:
            print(f"{problem}: '{prerequisites.REFRESH}' makes one")
            return 0
        raise NoVersionError(prerequisites.run_first(problem, prerequisites.REFRESH))
    if not args.list:
        try:
            previous, now = rollback(store, args.to)
        except NoVersionError as e:
            # Each refresh that validates adds a ready version to come back to.
            raise NoVersionError(
                f"{e}: each '{prerequisites.REFRESH}' that validates adds one"
            ) from e
        print(f"{args.model}: readers switched {previous} -> {now}")
        lines = version_lines(store)
    for line in lines:
        print(line)
    return 0
