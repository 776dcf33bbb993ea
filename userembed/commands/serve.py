"""Serving subcommands: `userembed serve`, `embed`, `similar`, `models`, `health`.

Thin wrappers over typed functions (`run_server`, `embed_summary`, `similar_summary`,
`models_summary`); heavy
imports (grpc server, onnxruntime, feast) happen inside the handlers.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import TYPE_CHECKING, Any

from userembed import prerequisites
from userembed.ids import parse_user_id
from userembed.processes import LISTENING
from userembed.similar_index import DEFAULT_K

if TYPE_CHECKING:
    from embed_server.client import ClientSecurity

logger = logging.getLogger(__name__)

DEFAULT_TARGET = os.environ.get("USEREMBED_TARGET", "127.0.0.1:50051")


def _add_client_flags(p: argparse.ArgumentParser) -> None:
    """How to reach a server with TLS / mutual TLS / tokens on; each flag defaults to its
    environment variable (embed_server.client.ClientSecurity.ENV)."""
    p.add_argument("--target", default=DEFAULT_TARGET, help="host:port of the server")
    p.add_argument("--tls-ca", help="CA (PEM) that verifies the server: TLS ($USEREMBED_TLS_CA)")
    p.add_argument("--tls-client-cert", help="client certificate (PEM) for mutual TLS")
    p.add_argument("--tls-client-key", help="its private key (PEM)")
    p.add_argument("--tls-server-name", help="name the server certificate carries, if not target")
    p.add_argument("--token-file", help="file holding the bearer token ($USEREMBED_TOKEN_FILE)")


def client_security(args: argparse.Namespace) -> ClientSecurity:
    """The flags over the environment (embed_server.client.ClientSecurity)."""
    from embed_server.client import ClientSecurity

    return ClientSecurity.from_env(
        tls_ca=args.tls_ca,
        tls_cert=args.tls_client_cert,
        tls_key=args.tls_client_key,
        tls_server_name=args.tls_server_name,
        token_file=args.token_file,
    )


def register(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the gRPC embedding service (prints the bound port)")
    p.add_argument("--config", help="YAML settings file (unknown keys rejected)")
    p.add_argument("--port", type=int, help="gRPC port (0: any free port)")
    p.add_argument("--metrics-port", type=int, help="Prometheus port (0: any, -1: off)")
    p.add_argument("--host", help="address to bind (default 127.0.0.1)")
    p.add_argument("--models", help="comma separated served models (default: all)")
    p.add_argument("--workers", type=int, help="server processes on the port (0: one per core)")
    p.set_defaults(func=_serve)

    p = sub.add_parser("embed", help="fetch one user's vector from a running server")
    p.add_argument("--user-id", required=True)
    p.add_argument("--model", default="", help="model name (default: the server's default)")
    _add_client_flags(p)
    p.add_argument("--force", action="store_true", help="recompute (FORCE_RECOMPUTE)")
    p.add_argument(
        "--compatible-with",
        default="",
        metavar="MODEL_VERSION",
        help="the vector in that model version's space (docs/compatibility.md)",
    )
    p.add_argument("--json", action="store_true", help="print the full vector as JSON")
    p.set_defaults(func=_embed)

    p = sub.add_parser("similar", help="the users nearest a user (lookalikes) on a running server")
    p.add_argument("user_id")
    p.add_argument("-k", type=int, default=DEFAULT_K, help="neighbours (default %(default)s)")
    p.add_argument("--model", default="", help="model name (default: the server's default)")
    _add_client_flags(p)
    p.add_argument("--json", action="store_true", help="print the answer as JSON")
    p.set_defaults(func=_similar)

    p = sub.add_parser("models", help="list the models a running server serves")
    _add_client_flags(p)
    p.set_defaults(func=_models)

    p = sub.add_parser("health", help="gRPC health check of a running server (exit 0: SERVING)")
    _add_client_flags(p)
    p.add_argument("--service", default="", help="service name ('' = the whole server)")
    p.set_defaults(func=_health)


def run_server(settings: Any) -> None:
    """Run until SIGTERM/SIGINT; prints `listening on HOST:PORT` once bound and loaded."""
    from embed_server.event_loop import run

    def started(srv: Any) -> None:  # an EmbeddingServer, or the WorkerPool of its workers
        metrics = f", metrics on :{srv.metrics_port}" if srv.metrics_port else ""
        workers = f", {srv.count} workers" if getattr(srv, "count", 1) > 1 else ""
        print(f"{LISTENING} {settings.host}:{srv.port}{metrics}{workers}", flush=True)

    if settings.worker_count() > 1:  # the parent never imports the server (workers.py)
        from embed_server.workers import serve_workers

        run(serve_workers(settings, on_started=started), settings.event_loop)
        return
    from embed_server.server import serve

    run(serve(settings, on_started=started), settings.event_loop)


def _serve(args: argparse.Namespace) -> int:
    from embed_server.settings import load_settings

    models = tuple(m for m in args.models.split(",") if m) if args.models else None
    settings = load_settings(
        args.config,
        grpc_port=args.port,
        metrics_port=args.metrics_port,
        host=args.host,
        models=models,
        workers=args.workers,
    )
    _warn_without_models(settings.registry_root, settings.models)
    run_server(settings)
    return 0


def _warn_without_models(registry_root: str, wanted: tuple[str, ...]) -> None:
    """The server waits for a model (it polls the registry, health NOT_SERVING until one
    loads): say so in one line when none is there to load at start."""
    from userembed.registry import Registry

    registry = Registry(registry_root)
    if not [m for m in registry.list_models() if not wanted or m in wanted]:
        what = ", ".join(wanted) if wanted else "model"
        export = prerequisites.EXPORT.format(run="RUN_DIR")
        print(
            f"waiting: no {what} in registry {registry.root} yet; health says NOT_SERVING until "
            f"'{export}' publishes one",
            file=sys.stderr,
            flush=True,
        )


# gRPC's own wording when no connection could be made (the server never answered); an
# UNAVAILABLE the server itself sends (e.g. Redis down) keeps its details.
_NO_CONNECTION = ("failed to connect", "connection refused", "connections to all backends")
_TLS_FAILED = ("handshake", "certificate")  # the client refused the server's certificate
# the server closed the connection at once: it serves TLS and this client spoke plaintext, or
# it wants a client certificate (mutual TLS) and got none it trusts
_CLOSED = "socket closed"


def _rpc_error(e: Any, target: str) -> int:
    """A failed call (grpc.RpcError) as one line on stderr, exit 2 (like UserEmbedError)."""
    details = e.details() or ""
    lowered = details.lower() if e.code().name == "UNAVAILABLE" else ""
    if any(p in lowered for p in _TLS_FAILED):
        print(
            f"error: the TLS handshake with {target} failed ({details}): check --tls-ca and "
            "--tls-server-name",
            file=sys.stderr,
        )
    elif _CLOSED in lowered:
        print(
            f"error: {target} closed the connection: it may serve TLS (--tls-ca) or want a "
            "client certificate (--tls-client-cert, --tls-client-key)",
            file=sys.stderr,
        )
    elif any(p in lowered for p in _NO_CONNECTION):
        logger.debug("%s: %s", target, details)
        print(
            f"error: no server answers at {target}: start one with '{prerequisites.SERVE}', "
            "or pass --target",
            file=sys.stderr,
        )
    elif e.code().name == "UNAUTHENTICATED":
        print(
            f"error: UNAUTHENTICATED: {details} (--token-file or USEREMBED_TOKEN_FILE)",
            file=sys.stderr,
        )
    else:
        print(f"error: {e.code().name}: {details}", file=sys.stderr)
    return 2


def embed_summary(
    target: str,
    user_id: str,
    model: str = "",
    force: bool = False,
    security: ClientSecurity | None = None,
    compatible_with: str = "",
) -> dict[str, Any]:
    """One user's vector and metadata; `security`: a ClientSecurity (None: the environment);
    `compatible_with`: a model version whose space the vector is mapped into."""
    from embed_server.client import EmbeddingClient

    with EmbeddingClient(target, security=security) as c:
        e = c.get(user_id, model=model, force=force, compatible_with=compatible_with)
    v = e.vector
    return {
        "user_id": e.user_id,
        "compatible_with": compatible_with,
        "model": e.model_name,
        "model_version": e.model_version,
        "embedding_version": e.embedding_version,
        "source": e.source,
        "computed_at_ms": e.computed_at_ms,
        "feature_timestamp_ms": e.feature_ts_ms,
        "dim": int(v.shape[0]),
        "norm": round(float((v**2).sum() ** 0.5), 6),
        "head": [round(float(x), 5) for x in v[:8]],
        "vector": v.tolist(),
    }


def _embed(args: argparse.Namespace) -> int:
    import grpc

    parse_user_id(args.user_id)  # refused here as the server would: no round trip
    try:
        s = embed_summary(
            args.target,
            args.user_id,
            args.model,
            args.force,
            client_security(args),
            args.compatible_with,
        )
    except grpc.RpcError as e:
        return _rpc_error(e, args.target)
    if args.json:
        print(json.dumps(s))
        return 0
    print(
        f"user {s['user_id']}: {s['source']} vector dim={s['dim']} norm={s['norm']} "
        f"head={s['head']}"
    )
    print(
        f"model {s['model']}/{s['model_version']} embedding version {s['embedding_version']} "
        f"computed_at_ms={s['computed_at_ms']} feature_timestamp_ms={s['feature_timestamp_ms']}"
    )
    if s["compatible_with"]:
        print(f"mapped into model version {s['compatible_with']}'s space")
    return 0


def similar_summary(
    target: str,
    user_id: str,
    k: int = DEFAULT_K,
    model: str = "",
    security: ClientSecurity | None = None,
) -> dict[str, Any]:
    """The k users nearest `user_id` and the embedding version that answered."""
    from embed_server.client import EmbeddingClient

    with EmbeddingClient(target, security=security) as c:
        found = c.similar(user_id, k=k, model=model)
    return {
        "user_id": user_id,
        "model": found.model_name,
        "model_version": found.model_version,
        "embedding_version": found.embedding_version,
        "neighbors": [
            {"user_id": u, "score": round(s, 6)}
            for u, s in zip(found.user_ids, found.scores, strict=True)
        ],
    }


def _similar(args: argparse.Namespace) -> int:
    import grpc

    parse_user_id(args.user_id)  # refused here as the server would: no round trip
    try:
        s = similar_summary(args.target, args.user_id, args.k, args.model, client_security(args))
    except grpc.RpcError as e:
        return _rpc_error(e, args.target)
    if args.json:
        print(json.dumps(s))
        return 0
    print(
        f"users nearest {s['user_id']} (model {s['model']}/{s['model_version']}, "
        f"embedding version {s['embedding_version']}):"
    )
    for n in s["neighbors"]:
        print(f"{n['user_id']}\t{n['score']:.4f}")
    return 0


def models_summary(target: str, security: ClientSecurity | None = None) -> dict[str, Any]:
    from google.protobuf.json_format import MessageToDict

    from embed_server.client import EmbeddingClient

    with EmbeddingClient(target, security=security) as c:
        return MessageToDict(c.list_models(), preserving_proto_field_name=True)


def _models(args: argparse.Namespace) -> int:
    import grpc

    try:
        print(json.dumps(models_summary(args.target, client_security(args)), indent=2))
    except grpc.RpcError as e:
        return _rpc_error(e, args.target)
    return 0


def _health(args: argparse.Namespace) -> int:
    import grpc

    from embed_server.client import EmbeddingClient

    try:
        with EmbeddingClient(args.target, timeout_s=5.0, security=client_security(args)) as c:
            status = c.health(args.service)
    except grpc.RpcError as e:
        _rpc_error(e, args.target)
        return 1  # health-check convention (Docker, Kubernetes exec probes): 1 = unhealthy
    print(status)
    return 0 if status == "SERVING" else 1
