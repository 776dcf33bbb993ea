"""Soak and chaos: minutes of mixed traffic against a real `userembed serve` while Redis is
restarted, a refresh flips the pointer, a new model is hot-loaded and a corrupt one is
published; every vector that comes back is checked.

    .venv/bin/python bench/soak.py --write-md       # 10 minutes, every fault once per 2 minutes
    .venv/bin/python bench/soak.py --seconds 30 --workers 1 --no-refresh-check
                                                    # every fault once (tests/bench/test_soak.py)

Loopback only, everything in a scratch folder: a redis-server of its own on a free port (with an
append-only file, so a restart keeps the data), the serving bench's world (bench/serving_data.py:
the synthetic encoder in a scratch registry, `--users` users' features in the offline files and
Feast, every vector stored), then `userembed serve --port 0` following the registry's `latest`
alias and the Redis pointer every `--reload-interval-s`. Traffic and checks: bench/soak_traffic.py
(stored reads, forced recomputes, batch calls; Zipf-distributed users; each vector compared with
the one this process computed with onnxruntime for the model version the answer claims). Faults:
bench/soak_chaos.py. Figures: bench/soak_report.py.

Prints tables, then one JSON object as the last line. Exit 1 on a wrong vector, an error no
fault explains (anything but UNAVAILABLE / DEADLINE_EXCEEDED during a Redis restart), a fault
whose effect the server never showed, or a server that is not SERVING at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench.* as a script

from bench.common import ROOT, log, write_section
from bench.serving_data import EV, MODEL, prepare
from bench.soak_chaos import (
    CORRUPT_MODEL,
    HOT_LOAD,
    Chaos,
    Fault,
    RedisProcess,
    schedule,
    stage_model,
)
from bench.soak_report import (
    BEGIN,
    END,
    arrays,
    markdown,
    print_tables,
    timeline,
    totals,
    unexplained,
    windows,
)
from bench.soak_traffic import Checker, Traffic, TrafficConfig, Truth
from refresh.config import RefreshConfig
from userembed import processes
from userembed.registry import LATEST, Registry

RESULT = ROOT / "bench" / "results" / "soak.json"  # --write-md keeps the full report here


@dataclass(frozen=True)
class SoakConfig:
    seconds: float = 600.0
    users: int = 5000
    concurrency: int = 8  # closed-loop callers
    batch_ids: int = 16  # ids per batch call
    zipf_a: float = 1.2
    redis_down_s: float = 2.0  # between the kill and the restart
    reload_interval_s: float = 1.0  # the server's registry alias and pointer poll
    workers: int = 0  # server processes on the port; 0: the server's default (one per core)
    window_s: float = 0.0  # 0: 60 s for runs of 5 minutes or more, else 10 s
    seed: int = 0
    keep: bool = False  # keep the scratch folder (server log, registry, AOF)
    # the refresh's consistency check (userembed.consistency; off: a shorter refresh)
    refresh_check: bool = True

    @property
    def window(self) -> float:
        return self.window_s or (60.0 if self.seconds >= 300 else 10.0)


@contextmanager
def restored_environ() -> Iterator[None]:
    """prepare() points this process's environment at the scratch folders: undo that after."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def start_server(env: dict[str, str], log_path: Path) -> tuple[subprocess.Popen[str], str, str]:
    """`userembed serve` on free ports, its output kept in `log_path`; -> (process, gRPC
    target, its listening line) once it prints that line."""
    argv = [str(Path(sys.executable).with_name("userembed")), "serve", "--port", "0",
            "--metrics-port", "0"]  # fmt: skip
    with log_path.open("w") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for line in log_path.read_text().splitlines():
            if processes.LISTENING in line:
                return proc, processes.listening_address(line), line.strip()
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    processes.stop(proc)
    raise RuntimeError(f"the server did not start; its log:\n{log_path.read_text()[-3000:]}")


def run(cfg: SoakConfig) -> dict[str, Any]:
    """Set up, soak, report (the dict printed as the last line)."""
    root = Path(tempfile.mkdtemp(prefix="userembed-soak-"))
    with ExitStack() as stack:
        if cfg.keep:
            log(f"keeping {root}")
        else:
            stack.callback(shutil.rmtree, root, ignore_errors=True)
        stack.enter_context(restored_environ())
        redis = RedisProcess(root / "redis")
        redis.start()
        stack.callback(redis.stop)
        world = prepare(root, redis.url, cfg.users, "synthetic")
        faults = schedule(cfg.seconds)
        kinds = [f.kind for f in faults]
        staged = [stage_model(root, world.spec, world.rows, 100 + i)
                  for i in range(kinds.count(HOT_LOAD))]  # fmt: skip
        staged += [stage_model(root, world.spec, None, 200 + i)
                   for i in range(kinds.count(CORRUPT_MODEL))]  # fmt: skip
        registry = Registry(root / "models")
        first = registry.resolve(MODEL, LATEST)
        truth = Truth()
        truth.add_model(first, world.vectors)
        truth.add_embedding_version(EV, first)
        env = {**world.env, "USEREMBED_RELOAD_INTERVAL_S": str(cfg.reload_interval_s)}
        if cfg.workers:
            env["USEREMBED_WORKERS"] = str(cfg.workers)
        refresh_cfg = RefreshConfig(
            model=MODEL, batch_size=512, drift_sample=100, intra_op_threads=1,
            progress_every_s=0.0, registry_root=str(registry.root), redis_url=redis.url,
            offline_dir=str(root / "offline"),
        )  # fmt: skip
        if not cfg.refresh_check:
            refresh_cfg = dataclasses.replace(refresh_cfg, check_sample=0)
        proc, target, line = start_server(env, root / "server.log")
        stack.callback(processes.stop, proc)
        metrics = re.search(r"metrics on :(\d+)", line)
        if metrics is None:
            raise RuntimeError(f"the server names no metrics port: {line!r}")
        metrics_port = int(metrics.group(1))
        log(f"{line} (pid {proc.pid}); soaking {cfg.seconds:.0f}s, faults at "
            + ", ".join(f"{f.at_s:.0f}s {f.kind}" for f in faults))  # fmt: skip

        async def soak() -> dict[str, Any]:
            checker = Checker(truth)
            traffic = Traffic(
                TrafficConfig(cfg.users, cfg.concurrency, cfg.batch_ids, cfg.zipf_a,
                              seed=cfg.seed),
                target, checker, time.monotonic(),
            )  # fmt: skip
            chaos = Chaos(
                faults=faults, redis=redis, registry=registry, spec=world.spec, staged=staged,
                truth=truth, checker=checker, target=target,
                metrics_url=f"http://127.0.0.1:{metrics_port}/metrics", refresh_cfg=refresh_cfg,
                current=first,
                redis_down_s=cfg.redis_down_s, now=traffic.now,
            )  # fmt: skip
            rss: list[tuple[float, int]] = []
            sampler = asyncio.create_task(sample_rss(proc.pid, rss, traffic.now, cfg.window / 5))
            calls = asyncio.create_task(traffic.run())
            try:
                await chaos.run()
                await asyncio.sleep(max(0.0, cfg.seconds - traffic.now()))
            finally:
                traffic.stop.set()
                await calls
                sampler.cancel()
            end_s = traffic.now()
            serving = await is_serving(target) and proc.poll() is None
            await traffic.close()
            checker.finish()
            rss.append((end_s, rss_bytes(proc.pid)))
            return report(cfg, faults, traffic, checker, rss, end_s, serving, chaos.current, line)

        result = asyncio.run(soak())
        if not result["ok"]:
            log(
                "server log tail:\n"
                + "\n".join((root / "server.log").read_text().splitlines()[-30:])
            )
    return result


def rss_bytes(pid: int) -> int:
    """RSS of the server and its worker processes (`workers` > 1), summed."""
    import psutil

    try:
        parent = psutil.Process(pid)
        procs = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:  # the server is gone: the verdict says so
        return 0
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return total


async def sample_rss(pid: int, out: list[tuple[float, int]], now: Any, every_s: float) -> None:
    while True:
        out.append((now(), rss_bytes(pid)))
        await asyncio.sleep(every_s)


async def is_serving(target: str) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(target) as channel:
        req = health_pb2.HealthCheckRequest(service="")
        try:
            resp = await health_pb2_grpc.HealthStub(channel).Check(req, timeout=5)
        except grpc.aio.AioRpcError:  # a server that is gone or hangs
            return False
        return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)


def report(
    cfg: SoakConfig,
    faults: list[Fault],
    traffic: Traffic,
    checker: Checker,
    rss: list[tuple[float, int]],
    end_s: float,
    serving: bool,
    final_version: str,
    server_line: str,
) -> dict[str, Any]:
    a = arrays(traffic.calls)
    rows = windows(a, cfg.window, end_s, rss)
    bad = unexplained(faults, a)
    observed = all(f.observed for f in faults)
    workers = re.search(r"(\d+) workers", server_line)  # `listening on ..., N workers`
    return {
        "bench": "soak",
        "generated": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "config": asdict(cfg),
        "seconds": round(end_s, 1),
        "users": cfg.users,
        "concurrency": cfg.concurrency,
        "server_processes": int(workers.group(1)) if workers else 1,
        "totals": totals(a),
        "vectors_checked": checker.checked,
        "wrong_vectors": checker.wrong,
        "wrong": checker.wrong_kept,
        "unexplained_errors": bad,
        "window_s": cfg.window,
        "p99_ms_per_window": [w["p99_ms"] for w in rows],
        "windows": rows,
        "rss_mib": {"start": round(rss[0][1] / 2**20, 1), "end": round(rss[-1][1] / 2**20, 1)},
        "timeline": timeline(faults, a, end_s),
        "faults_observed": observed,
        "serving_at_end": serving,
        "final_model_version": final_version,
        "cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "ok": checker.wrong == 0 and bad["count"] == 0 and observed and serving,
    }


def parse_args(argv: list[str] | None = None) -> tuple[SoakConfig, bool]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    length = ap.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float, default=None, help="default 10")
    length.add_argument("--seconds", type=float, default=None)
    d = SoakConfig()
    ap.add_argument("--users", type=int, default=d.users)
    ap.add_argument("--concurrency", type=int, default=d.concurrency)
    ap.add_argument("--batch-ids", type=int, default=d.batch_ids)
    ap.add_argument("--zipf-a", type=float, default=d.zipf_a)
    ap.add_argument("--redis-down-s", type=float, default=d.redis_down_s)
    ap.add_argument("--reload-interval-s", type=float, default=d.reload_interval_s)
    ap.add_argument("--workers", type=int, default=d.workers, help="0: the server's default")
    ap.add_argument("--window-s", type=float, default=d.window_s, help="0: 60 s, 10 s if short")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    ap.add_argument(
        "--write-md",
        action="store_true",
        help=f"write the soak section of BENCHMARKS.md and {RESULT.relative_to(ROOT)}",
    )
    ap.add_argument(
        "--no-refresh-check",
        dest="refresh_check",
        action="store_false",
        help="refresh without its consistency check (shorter)",
    )
    args = ap.parse_args(argv)
    seconds = args.seconds if args.seconds is not None else 60 * (args.minutes or 10)
    return SoakConfig(
        seconds=seconds, users=args.users, concurrency=args.concurrency,
        batch_ids=args.batch_ids, zipf_a=args.zipf_a, redis_down_s=args.redis_down_s,
        reload_interval_s=args.reload_interval_s, workers=args.workers,
        window_s=args.window_s, seed=args.seed, keep=args.keep,
        refresh_check=args.refresh_check,
    ), args.write_md  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    cfg, write_md = parse_args(argv)
    # A kill runs the finally blocks: the redis-server and the server are stopped, not orphaned.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    result = run(cfg)
    result["command"] = "python bench/soak.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if write_md:
        RESULT.parent.mkdir(parents=True, exist_ok=True)
        RESULT.write_text(json.dumps(result, indent=1) + "\n")
        write_section(markdown(result), BEGIN, END)
    print_tables(result)
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
