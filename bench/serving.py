"""Serving benchmark: the embedding server beside its references, measured in one run.

    .venv/bin/python bench/serving.py [--users 20000] [--scale 1.0] [--rounds 3]
                                     [--client h2|grpcio] [--load-procs N]
                                     [--no-feast-serve] [--encoder supermoe|synthetic]
                                     [--baseline-env USEREMBED_READ_HOLD_MS=0,...]

Starts a private redis-server, publishes an encoder to a scratch registry, loads features
into the real Feast online store and stores every user's vector (bench/serving_data.py), then
runs `userembed serve --port 0` and, each in its own process, closed-loop load generators
(bench/serving_load.py). References:
- a no-op grpc.aio server of the same service returning a constant vector, and the same echo
  reading the stored vector on the server's read path (bench/serving_echo.py), both on the
  server's event loop (stored path),
- raw redis-py MGET of the same vectors (batch path) and raw onnxruntime at the server's batch
  size (miss path) (bench/serving_raw.py),
- `feast serve` (HTTP, 1 worker) serving the same vectors as a feature (bench/serving_feast.py).
Each comparison alternates the server and its reference in `--rounds` short runs and reports the
median run of each side (other jobs on a shared machine swing throughput 2x within a minute);
every run's figure is kept in the JSON (`runs_*`), with each stored-path side's CPU time per call.
`--baseline-env` adds a second server with other settings to the stored-path rounds, so a change
is measured side by side with what it replaces. Above concurrency 1 the gRPC load runs in
`--load-procs` processes started together (default 1 for h2, 2 for grpcio).
`--role` runs one of the helper processes instead (load generators, echo server).
Prints progress lines, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench.* as a script

from bench.common import private_redis
from bench.serving_data import DIM, ENCODERS, SEQ_LEN, prepare
from bench.serving_load import ENTRY
from bench.serving_measure import ServingBench, aims, start_server
from bench.serving_zipf import (
    admission_hit_ratios,
    extend_vectors,
    start_cached,
    world_model_version,
    zipf_path,
)
from userembed import processes


def main(args: argparse.Namespace) -> dict[str, Any]:
    from embed_server.event_loop import loop_factory
    from embed_server.settings import load_settings

    baseline = env_pairs(args.baseline_env)  # a typo fails here, before any set-up
    served = load_settings()  # the server's settings from this environment
    result: dict[str, Any] = {
        "users": args.users,
        "dim": DIM,
        "seq_len": SEQ_LEN,
        "encoder": args.encoder,
        "cores": os.cpu_count(),
        # the loop of the server and of the echo reference (USEREMBED_EVENT_LOOP)
        "event_loop": loop_factory(served.event_loop)[0],
        "read_hold_ms": served.read_hold_ms,  # USEREMBED_READ_HOLD_MS
        "load_client": args.client,  # the gRPC load generator (--client)
    }
    with ExitStack() as stack:
        root = Path(tempfile.mkdtemp(prefix="userembed-bench-"))
        stack.callback(shutil.rmtree, root, ignore_errors=True)
        url = stack.enter_context(private_redis(root))
        world = prepare(root, url, args.users, args.encoder)
        env = world.env
        extend_vectors(world, args.zipf_users, world_model_version(url))
        result["cache_admission"] = admission_hit_ratios(args.zipf, args.zipf_users)
        serve = [str(Path(sys.executable).parent / "userembed"), "serve", "--port", "0"]
        echo_argv = [sys.executable, str(ENTRY), "--role", "echo"]
        read_spec = ["--spec", json.dumps({"read_redis": url})]
        # the Redis path: the default workers, vector cache off; the same as one process
        no_cache = {**env, "USEREMBED_VECTOR_CACHE_MB": "0"}
        server = start_server(stack, "server", serve, no_cache)
        one_worker = start_server(
            stack, "one_worker", serve, {**no_cache, "USEREMBED_WORKERS": "1"}
        )
        # the defaults (vector cache on), and one process of them, for Zipf traffic
        cached = start_cached(stack, "cached", serve, env)
        cached_1w = start_cached(
            stack, "cached_one_worker", serve, {**env, "USEREMBED_WORKERS": "1"}
        )
        echo = start_server(stack, "echo", echo_argv, env)
        echo_redis = start_server(stack, "echo_redis", echo_argv + read_spec, env)
        sides = [echo, echo_redis, server, one_worker]  # each round runs them in this order
        if baseline:  # the same server with other settings, side by side
            sides.append(start_server(stack, "baseline", serve, {**env, **baseline}))
        bench = ServingBench(args, world, server, result, one_worker=one_worker, zipf_side=cached)
        result["workers"] = load_settings().worker_count()
        result["vector_cache_mb"] = served.vector_cache_mb
        bench.warm_up()
        bench.stored_path(sides)
        if baseline:
            result["baseline_env"] = baseline
        processes.stop(echo_redis.proc)  # done: its cores go back to the server
        zipf_path(bench, echo, [cached, cached_1w], [server])
        processes.stop(echo.proc)
        processes.stop(cached_1w.proc)
        bench.rss("after_stored")
        bench.batch_path()
        bench.miss_path()
        bench.rss_growth()
        if args.feast_serve:
            bench.against_feast_serve()
        result["aims"] = aims(result)
    return result


def env_pairs(text: str) -> dict[str, str]:
    """NAME=VALUE pairs, comma separated -> a dict: the baseline server's environment overrides."""
    pairs = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        k, eq, v = part.partition("=")
        if not eq or not k:
            raise ValueError(f"--baseline-env: expected NAME=VALUE, got {part!r}")
        pairs[k] = v
    return pairs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--role", default="main", choices=["main", "loadgen", "httpload", "echo"])
    ap.add_argument("--spec", default="{}", help="(internal) load generator settings as JSON")
    ap.add_argument("--users", type=int, default=20_000)
    ap.add_argument("--feast-users", type=int, default=2_000, help="vectors served by feast serve")
    ap.add_argument("--rss-requests", type=int, default=100_000, help="0: skip the RSS run")
    ap.add_argument("--scale", type=float, default=1.0, help="multiplies request counts")
    ap.add_argument("--no-feast-serve", dest="feast_serve", action="store_false")
    ap.add_argument("--rounds", type=int, default=3, help="alternating echo/server runs")
    ap.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of the cached runs")
    ap.add_argument("--zipf-users", type=int, default=100_000, help="users of the Zipf traffic")
    ap.add_argument(
        "--baseline-env",
        default="",
        help="also run a second server with these environment overrides (NAME=VALUE,...) in the "
        "stored-path rounds, e.g. USEREMBED_READ_HOLD_MS=0,USEREMBED_EVENT_LOOP=asyncio",
    )
    ap.add_argument(
        "--encoder",
        default="supermoe",
        choices=ENCODERS,
        help="supermoe: the trainer's default model, random weights (default); synthetic: a "
        "torch-free 2-layer FFN, much cheaper per user",
    )
    ap.add_argument(
        "--client",
        default="h2",
        choices=["h2", "grpcio"],
        help="gRPC load generator: h2 (raw HTTP/2 frames, bench/h2grpc.py, ~50 us of CPU per "
        "call, like the raw HTTP/1.1 client that drives feast serve) or grpcio (grpc.aio, ~400 us "
        "per call, more than the servers it measures)",
    )
    ap.add_argument(
        "--load-procs",
        type=int,
        default=None,
        help="load generator processes above concurrency 1 (default: 1 for h2, 2 for grpcio)",
    )
    args = ap.parse_args(argv)
    if args.load_procs is None:
        args.load_procs = 1 if args.client == "h2" else 2
    return args


def run_role(args: argparse.Namespace) -> None:
    """The helper processes: load generators (one JSON line) and the echo server."""
    spec = json.loads(args.spec)
    if args.role == "echo":
        from bench.serving_echo import run_echo

        run_echo(spec)
        return
    from bench.serving_load import grpc_load, http_load
    from embed_server.event_loop import run

    # both load generators on the same loop (uvloop when installed)
    load = grpc_load if args.role == "loadgen" else http_load
    print(json.dumps(run(load(spec), "auto")))


if __name__ == "__main__":
    a = parse_args()
    if a.role == "main":
        print(json.dumps(main(a)))
    else:
        run_role(a)
