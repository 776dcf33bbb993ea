"""`userembed demo`: the main job end to end on the embedded default.

data -> Feast (apply, materialise, online read) -> SUPERMOE training (TorchRec) -> ONNX export
with parity -> registry -> nightly refresh (new embedding version, atomic switch) -> the gRPC
server as its own process -> a real GetUserEmbedding answer -> the train/serve consistency
check (`userembed check`). Each stage is the same typed
function the CLI subcommands wrap; the server is started exactly as `userembed serve` would be.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import numpy as np

from userembed import paths, processes
from userembed.commands.logs import quiet_libraries
from userembed.errors import BackendUnavailableError
from userembed.redis_urls import redacted
from userembed.registry import DEFAULT_MODEL

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    source: str = "synthetic"
    users: int = 3000
    seed: int = 0
    max_steps: int = 300
    batch_size: int = 128
    redis_url: str = field(default_factory=paths.redis_url)
    start_redis: bool = True  # start redis-server on the URL's port when nothing answers


def _stage(n: int, total: int, text: str) -> float:
    print(f"\n[{n}/{total}] {text}", flush=True)
    return time.monotonic()


def _done(t0: float, text: str) -> None:
    print(f"      {text} ({time.monotonic() - t0:.1f}s)", flush=True)


def ensure_redis(url: str, start: bool) -> str:
    """Ping Redis at `url`; when nothing answers on a local address, start redis-server there."""
    import redis

    from userembed.local_redis import redis_server_argv, wait_until_up

    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
        return "already running"
    except redis.ConnectionError as e:
        parsed = urlparse(url)
        host, port = parsed.hostname or "127.0.0.1", parsed.port or 6379
        if not start or host not in ("127.0.0.1", "localhost"):
            raise BackendUnavailableError(
                f"no Redis answers at {redacted(url)} (start one, or set REDIS_URL)"
            ) from e
        argv = redis_server_argv(port, None, "--daemonize", "yes")
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        wait_until_up(url)
        return f"started redis-server on port {port}"


def _start_server(env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    """`userembed serve --port 0` as its own process; returns it and the bound host:port."""
    argv = [
        sys.executable,
        "-m",
        "userembed.commands",
        "serve",
        "--port",
        "0",
        "--metrics-port",
        "0",
    ]
    proc, line = processes.start(argv, env, processes.LISTENING)
    return proc, processes.listening_address(line)


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Run every stage; returns the figures printed along the way."""
    from userembed import feast_ops
    from userembed.dataset_build import BuildRequest, build_dataset, serve_online

    total = 8
    out: dict[str, Any] = {}
    os.environ["REDIS_URL"] = cfg.redis_url  # every stage (and the server process) reads it

    t = _stage(1, total, f"Redis at {redacted(cfg.redis_url)}")
    _done(t, ensure_redis(cfg.redis_url, cfg.start_redis))

    t = _stage(2, total, f"data: {cfg.source} ({cfg.users} users), point-in-time feature tables")
    summary = build_dataset(BuildRequest(cfg.source, cfg.users, cfg.seed))
    out["data"] = summary
    _done(t, ", ".join(f"{k}={v}" for k, v in summary.items() if isinstance(v, int | float | str)))

    t = _stage(3, total, "Feast: apply the feature repository, materialise into Redis")
    store = serve_online(cfg.redis_url)
    user = 1
    online = feast_ops.online_features(store, [user])
    print(f"      online features of user {user}, read back from Redis through Feast:")
    for name, values in online.items():
        value = values[0]
        shown = f"{value[-8:]} ({len(value)} events, last 8)" if isinstance(value, list) else value
        print(f"        {name}: {shown}")
    _done(t, "materialised")

    t = _stage(4, total, "train SUPERMOE (TorchRec tables, sparse MoE transformer, task heads)")
    from trainer.feast_run import train_from_feast

    quiet_libraries()
    run_dir = paths.runs_dir() / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    result = train_from_feast(
        run_dir, max_steps=cfg.max_steps, batch_size=cfg.batch_size, seed=cfg.seed
    )
    aucs = {task: round(m["auc"], 4) for task, m in result.test_metrics.items()}
    out["test_auc"] = aucs
    _done(t, f"{result.steps} steps; test AUC {aucs}; run dir {result.run_dir}")

    t = _stage(5, total, "export: ONNX encoder + manifest, parity against PyTorch, registry")
    from trainer.export import export_model

    exported = export_model(run_dir, paths.registry_root(), DEFAULT_MODEL)
    parity = exported.parity["fp32"]
    worst = max(parity[c]["user_vector_max_abs_diff"] for c in ("heldout", "crafted", "batch1"))
    out["model_version"] = exported.version
    out["parity_max_abs_diff"] = worst
    _done(t, f"published {DEFAULT_MODEL}/{exported.version}; max |onnxruntime - torch| {worst:.1e}")

    t = _stage(6, total, "nightly refresh: every user's vector into a new embedding version")
    from refresh.config import RefreshConfig
    from refresh.job import refresh

    refreshed = refresh(RefreshConfig(model=DEFAULT_MODEL, redis_url=cfg.redis_url))
    out["refresh"] = refreshed.line()
    _done(t, refreshed.line())

    t = _stage(7, total, "serve: gRPC server (onnxruntime, no torch) and GetUserEmbedding")
    from embed_server.client import EmbeddingClient

    env = dict(os.environ, REDIS_URL=cfg.redis_url)
    proc, target = _start_server(env)
    try:
        with EmbeddingClient(target) as client:
            stored = client.get(str(user))
            computed = client.get(str(user), force=True)
        for label, emb in (("stored", stored), ("recomputed", computed)):
            head = ", ".join(f"{x:+.4f}" for x in emb.vector[:6])
            print(
                f"      GetUserEmbedding(user_id={user}) [{label}]: dim {len(emb.vector)} "
                f"[{head}, ...] model {emb.model_name}/{emb.model_version} "
                f"source {emb.source} embedding version {emb.embedding_version}"
            )
        # The refresh read the offline files, the recompute reads Feast's online store: the two
        # vectors agree only if both hold the same features (see feast_ops.apply(fresh=True)).
        diff = float(np.max(np.abs(np.asarray(stored.vector) - np.asarray(computed.vector))))
        verdict = "agree" if diff < 1e-4 else "DIFFER: online and offline features disagree"
        print(f"      stored and recomputed vectors {verdict} (max |diff| {diff:.1e})")
        out["served"] = {
            "dim": len(stored.vector),
            "source": stored.source,
            "stored_vs_recomputed_max_abs_diff": diff,
        }
    finally:
        processes.stop(proc)
    _done(t, f"server at {target} answered and drained")

    t = _stage(8, total, "check: online rows vs the offline files, stored vectors vs a recompute")
    from userembed.consistency import CheckConfig, check

    report = check(CheckConfig(model=DEFAULT_MODEL, redis_url=cfg.redis_url), feature_store=store)
    for line in report.lines():
        print(f"      {line}")
    out["check"] = report.to_dict()
    _done(t, "consistent" if report.ok else "MISMATCH: see `userembed check`")
    print("\ndemo: done. State lives in", paths.home())
    return out


def _demo(args: argparse.Namespace) -> int:
    cfg = DemoConfig(source=args.source, users=args.users, seed=args.seed, max_steps=args.max_steps)
    out = run_demo(cfg)
    return 0 if out["check"]["ok"] else 1  # train/serve skew fails the demo


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo", help="the main job end to end: data, Feast, training, export, refresh, serving"
    )
    p.add_argument("--source", default="synthetic", choices=("synthetic", "movielens"))
    p.add_argument("--users", type=int, default=DemoConfig.users, help="synthetic users")
    p.add_argument("--seed", type=int, default=DemoConfig.seed)
    p.add_argument("--max-steps", type=int, default=DemoConfig.max_steps)
    p.set_defaults(func=_demo)
