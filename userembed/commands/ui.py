"""`userembed ui`: the read-only web page (userembed/ui/), on 127.0.0.1 by default.

userembed.ui reads the registry, Redis and the transfer results itself; this module passes in
what only the composition root may read: a refresh's record of each embedding version
(refresh.checkpoint), a recompute through the gRPC server, and the pipeline status.
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

from userembed import paths
from userembed.commands.serve import DEFAULT_TARGET
from userembed.redis_urls import redacted
from userembed.ui.data import (
    Recomputed,
    Recomputer,
    RefreshRecord,
    StatusReader,
    UiConfig,
    UiSources,
)
from userembed.vectors import VectorStore

logger = logging.getLogger(__name__)

DEFAULT_PORT = UiConfig.port
TRANSFER_DIR = paths.REPO_ROOT / "bench" / "results" / "transfer"
RECOMPUTE_TIMEOUT_S = 10.0


def refresh_record(store: VectorStore, version: str) -> RefreshRecord | None:
    """What the refresh wrote into the version's metadata; None for a version it did not
    build (an `online-*` version of server write-backs)."""
    from refresh.checkpoint import (
        DRIFT_FIELD,
        ENGINE_FIELD,
        FINISHED_AT_FIELD,
        MODE_FIELD,
        SECONDS_FIELD,
        Checkpoint,
    )

    checkpoint = Checkpoint(store, version)
    parts = list(checkpoint.done().values())
    finished = checkpoint.get_field(FINISHED_AT_FIELD)
    if not parts and finished is None:
        return None
    seconds = checkpoint.get_field(SECONDS_FIELD)
    computed = [p for p in parts if p.computed > p.nonfinite]
    return RefreshRecord(
        drift=json.loads(checkpoint.get_field(DRIFT_FIELD) or "{}"),
        parts=len(parts),
        computed=sum(p.computed for p in parts),
        copied=sum(p.copied for p in parts),
        nonfinite=sum(p.nonfinite for p in parts),
        min_norm=min((p.min_norm for p in computed), default=None),
        max_norm=max((p.max_norm for p in computed), default=None),
        mode=checkpoint.get_field(MODE_FIELD) or "",
        engine=checkpoint.get_field(ENGINE_FIELD) or "",
        seconds=float(seconds) if seconds else None,
        finished_at=finished or "",
    )


def recomputer(target: str) -> Recomputer:
    def recompute(model: str, user_id: str) -> Recomputed:
        import grpc

        from embed_server.client import EmbeddingClient

        try:
            with EmbeddingClient(target, timeout_s=RECOMPUTE_TIMEOUT_S) as client:
                e = client.get(user_id, model=model, force=True)
        except grpc.RpcError as err:
            return Recomputed(None, error=f"{err.code().name} from {target}: {err.details()}")
        return Recomputed(
            e.vector,
            e.model_version,
            e.embedding_version,
            e.computed_at_ms,
            e.feature_ts_ms,
            e.source,
        )

    return recompute


def _status_source(target: str) -> StatusReader:
    from userembed.commands.status import probe, runs
    from userembed.status import gather

    return lambda model: gather(runs(), probe(target), model)


def build(args: argparse.Namespace) -> tuple[UiConfig, UiSources]:
    from trainer.run_dir import REPORT_FILE

    config = UiConfig(
        redis_url=paths.redis_url(),
        registry_root=args.registry_root or paths.registry_root(),
        offline_dir=str(paths.offline_dir()),
        transfer_dir=str(args.transfer_dir),
        target=args.target,
        report_file=REPORT_FILE,
        host=args.host,
        port=args.port,
        projection_sample=args.sample,
    )
    sources = UiSources(
        refresh_record=refresh_record,
        recompute=None if args.no_recompute else recomputer(args.target),
        status=_status_source(args.target),
    )
    return config, sources


def _ui(args: argparse.Namespace) -> int:
    from userembed.ui.server import make_server

    config, sources = build(args)
    server = make_server(config, sources)
    port = server.server_address[1]
    print(
        f"userembed ui on http://{config.host}:{port}/ (Redis {redacted(config.redis_url)}, "
        f"registry {config.registry_root}); Ctrl-C stops it",
        flush=True,
    )
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("ui", help="a read-only web page: models, versions, drift, transfer, users")
    p.add_argument("--host", default=UiConfig.host, help="address to listen on (%(default)s)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="0: any free port")
    p.add_argument("--target", default=DEFAULT_TARGET, help="gRPC server asked for recomputes")
    p.add_argument("--no-recompute", action="store_true", help="never ask the server")
    p.add_argument("--registry-root", default=None, help="default $USEREMBED_REGISTRY_ROOT")
    p.add_argument("--transfer-dir", default=TRANSFER_DIR, help="transfer benchmark results")
    p.add_argument(
        "--sample", type=int, default=UiConfig.projection_sample, help="users in the projection"
    )
    p.set_defaults(func=_ui)
