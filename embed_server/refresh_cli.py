"""`userembed refresh` and `userembed rollback`: thin wrappers over embed_server.refresh."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict
from typing import Any

logger = logging.getLogger(__name__)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "refresh", help="recompute every user's vector into a new version, validate, switch"
    )
    p.add_argument("--model", default="supermoe", help="registry model name (default supermoe)")
    p.add_argument("--ref", default="latest", help="registry alias or version (default latest)")
    p.add_argument(
        "--incremental", action="store_true", help="only users with features newer than last run"
    )
    p.add_argument("--engine", choices=("local", "ray"), default="local")
    p.add_argument("--ray-address", default=None, help="Ray cluster (default: a local instance)")
    p.add_argument("--ray-actors", type=int, default=2, help="encoder actors (Ray engine)")
    p.add_argument("--batch-size", type=int, default=1024, help="users per encoder run")
    p.add_argument("--part-rows", type=int, default=50_000, help="file rows per checkpoint")
    p.add_argument("--keep", type=int, default=3, help="ready versions kept for rollback")
    p.add_argument("--min-norm", type=float, default=None, help="validation bound on norms")
    p.add_argument("--max-norm", type=float, default=None, help="validation bound on norms")
    p.add_argument("--no-resume", action="store_true", help="ignore a killed run's checkpoint")
    p.add_argument("--drift-sample", type=int, default=1000, help="users in the drift report")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    p.add_argument("--pause-s", type=float, default=0.0, help="pause between parts (throttle)")
    p.add_argument("--offline-dir", default=None, help="default $USEREMBED_OFFLINE_DIR")
    p.add_argument("--registry-root", default=None, help="default $USEREMBED_REGISTRY_ROOT")
    p.add_argument("--redis-url", default=None, help="default $REDIS_URL")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_refresh)

    p = sub.add_parser("rollback", help="point readers back at the previous ready version")
    p.add_argument("--model", default="supermoe")
    p.add_argument("--to", default=None, help="embedding version id (default: the previous one)")
    p.add_argument("--list", action="store_true", help="only list the versions")
    p.add_argument("--redis-url", default=None, help="default $REDIS_URL")
    p.set_defaults(func=_rollback)


def _refresh(args: argparse.Namespace) -> int:
    from embed_server.refresh import RefreshConfig, refresh

    given = {
        "offline_dir": args.offline_dir,
        "registry_root": args.registry_root,
        "redis_url": args.redis_url,
    }
    cfg = RefreshConfig(
        model=args.model,
        model_ref=args.ref,
        mode="incremental" if args.incremental else "full",
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
        **{k: v for k, v in given.items() if v is not None},
    )
    summary = refresh(cfg)
    print(json.dumps(asdict(summary)) if args.json else summary.line())
    return 0


def _rollback(args: argparse.Namespace) -> int:
    import redis

    from embed_server.refresh import rollback, version_lines
    from userembed import paths
    from userembed.vectors import VectorStore

    store = VectorStore(redis.Redis.from_url(args.redis_url or paths.redis_url()), args.model)
    if not args.list:
        prev, now = rollback(store, args.to)
        print(f"{args.model}: readers switched {prev} -> {now}")
    for line in version_lines(store):
        print(line)
    return 0
