"""The item cost benchmark's measurements (bench/item_cost.py), each side in turn per round
(which goes first alternates): the encode step and onnxruntime alone, the refresh, the miss path
of a real server. Each run: (users/s, CPU us per user)."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.common import log
from bench.item_cost_models import MODEL_NAMES, SIDES, WITH
from bench.serving_data import SERVER_BATCH
from bench.serving_load import run_grpc_load, warm_up_calls
from bench.serving_measure import Side, start_server

if TYPE_CHECKING:
    from bench.item_cost import ItemCostConfig

Runs = dict[str, list[tuple[float, float]]]  # side -> per round (users/s, CPU us per user)


def rate(fn: Callable[[], int], seconds: float) -> tuple[float, float]:
    """(users/s, CPU us per user of this process, every thread) of `fn` (returns the users it
    did) run over and over for `seconds`, after one warm-up call."""
    fn()
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        n += fn()
    return n / (time.perf_counter() - t0), (time.process_time() - c0) / n * 1e6


def order(r: int) -> tuple[str, ...]:
    """The sides in round `r`: which goes first alternates (the machine's load drifts)."""
    return SIDES if r % 2 == 0 else SIDES[::-1]


def new_runs() -> Runs:
    return {s: [] for s in SIDES}


def _pair(runs: Runs, r: int) -> str:
    return " / ".join(f"{s} {runs[s][r][0]:,.0f} ({runs[s][r][1]:,.0f} us)" for s in SIDES)


def encoder_alone(cfg: ItemCostConfig, models: dict[str, Any]) -> dict[str, Runs]:
    """Per round and side: `encode_arrow` on the first `batch_size` users' offline rows (with
    the model's attribute map), and onnxruntime alone on the inputs it made, set up as the
    refresh sets it up (2 intra-op threads, no spinning)."""
    from refresh.source import OfflineSource
    from userembed import paths
    from userembed.features import encode_arrow
    from userembed.onnx_encoder import OnnxEncoder
    from userembed.registry import Registry

    loaded = {s: Registry().load_verified(m["model"], m["version"]) for s, m in models.items()}
    specs = {s: m.manifest.input_spec for s, m in loaded.items()}
    items = {s: m.items() for s, m in loaded.items()}
    encoders = {
        s: OnnxEncoder(m.session_source(), m.manifest.vector.dim, 2, allow_spinning=False)
        for s, m in loaded.items()
    }
    source = OfflineSource(paths.offline_dir(), specs[WITH])  # reads every column either reads
    table = source.read_part(source.plan(cfg.batch_size).parts[0], cfg.batch_size)
    inputs = {s: encode_arrow(table, specs[s], items[s]) for s in SIDES}

    def encode(s: str) -> int:
        encode_arrow(table, specs[s], items[s])
        return len(table)

    def infer(s: str) -> int:
        return len(encoders[s].run(inputs[s]))

    runs = {"encode": new_runs(), "onnxruntime": new_runs()}
    for r in range(cfg.rounds):
        for s in order(r):
            runs["encode"][s].append(rate(partial(encode, s), cfg.seconds))
            runs["onnxruntime"][s].append(rate(partial(infer, s), cfg.seconds))
        log(f"round {r + 1}, batch {len(table)}: encode " + _pair(runs["encode"], r)
            + "; onnxruntime " + _pair(runs["onnxruntime"], r))  # fmt: skip
    return runs


def refresh_rounds(cfg: ItemCostConfig, url: str) -> Runs:
    """Per round and side: a full refresh over every user, in this process: users/s (the
    job's own seconds) and this process' CPU time per user."""
    from refresh.config import RefreshConfig
    from refresh.job import refresh

    runs = new_runs()
    for r in range(cfg.rounds):
        for s in order(r):
            c0 = time.process_time()
            summary = refresh(
                RefreshConfig(
                    model=MODEL_NAMES[s],
                    redis_url=url,
                    batch_size=cfg.batch_size,
                    similar_index=False,
                    compat_sample=0,
                    check_sample=0,
                    progress_every_s=600.0,
                )
            )
            cpu_us = (time.process_time() - c0) / summary.computed * 1e6
            runs[s].append((summary.users_per_s, cpu_us))
        log(f"round {r + 1}: refresh " + _pair(runs, r))
    return runs


def server_env(model: str, workers: int) -> dict[str, str]:
    """A `userembed serve` of `model` only in this workspace: no vector cache (every call
    computes), the serving benchmark's micro-batch."""
    return {
        **os.environ,
        "USEREMBED_MODELS": model,
        "USEREMBED_WORKERS": str(workers),
        "USEREMBED_VECTOR_CACHE_MB": "0",
        "USEREMBED_METRICS_PORT": "-1",
        "USEREMBED_BATCH_SIZE": str(SERVER_BATCH),
        "USEREMBED_LOG_LEVEL": "WARNING",
    }


def miss_rounds(cfg: ItemCostConfig, users: int) -> dict[str, Any]:
    """Per round and side: FORCE_RECOMPUTE users/s and the server's CPU time per user (its
    worker processes included), one id per call (concurrency 64) and SERVER_BATCH ids per
    call (concurrency 4); load errors summed."""
    serve = [str(Path(sys.executable).parent / "userembed"), "serve", "--port", "0"]
    loads = {  # name: (mode, concurrency, calls, ids per call)
        "one_id": ("force", 64, cfg.force_calls, 1),
        "batch": ("batch_force", 4, cfg.batch_calls, SERVER_BATCH),
    }
    runs = {k: new_runs() for k in loads}
    errors: dict[str, int] = {}
    with contextlib.ExitStack() as stack:
        servers: dict[str, Side] = {
            s: start_server(stack, s, serve, server_env(MODEL_NAMES[s], cfg.workers)) for s in SIDES
        }

        def load(side: str, kind: str, calls: int, seed: int) -> tuple[float, float]:
            mode, conc, _, ids = loads[kind]
            c0 = servers[side].cpu_s()
            res = run_grpc_load(
                server_env(MODEL_NAMES[side], cfg.workers),
                target=servers[side].target,
                mode=mode,
                concurrency=conc,
                requests=calls,
                ids=ids,
                users=users,
                seed=seed,
                client="h2",
                connections=min(8, conc),
            )
            served = (calls + warm_up_calls(calls)) * ids  # the warm-up calls compute too
            cpu_us = (servers[side].cpu_s() - c0) / served * 1e6
            for name, n in res["errors"].items():
                errors[name] = errors.get(name, 0) + n
            return float(res["users_s"]), cpu_us

        for s in SIDES:  # warm-up: sessions, connections, onnxruntime's arena
            for kind, (_, _, calls, _) in loads.items():
                load(s, kind, max(calls // 5, 8), seed=99)
        for r in range(cfg.rounds):
            for s in order(r):
                for kind, (_, _, calls, _) in loads.items():
                    runs[kind][s].append(load(s, kind, calls, seed=r))
            log(f"round {r + 1}: miss path one id " + _pair(runs["one_id"], r)
                + f"; {SERVER_BATCH} ids " + _pair(runs["batch"], r))  # fmt: skip
    return {**runs, "errors": errors}
