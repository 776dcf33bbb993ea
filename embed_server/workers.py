"""Several server processes behind one gRPC port (`workers` > 1): one Python process is bound by
one GIL, so each core gets its own process running a whole `EmbeddingServer`.

The gRPC Python multiprocessing pattern: the parent reserves the port with a bound, never
listening SO_REUSEPORT socket (port 0 resolves here, once for all), then spawns the workers; each
binds the same port with `grpc.so_reuseport` and the kernel spreads new connections over them (a
connection, with all its calls, stays on one worker). Before reserving a fixed port the parent
binds it once without SO_REUSEPORT, so a port another server already holds fails at start as
with one process. (Linux lets only the same user join a SO_REUSEPORT group: a process of this
user started later with SO_REUSEPORT could still join; the server's own 1-worker mode cannot.)

What the parent does, and why:
- metrics: it points PROMETHEUS_MULTIPROC_DIR at a fresh folder before the workers start
  (spawned, so they import prometheus_client with it set) and serves the sum on `metrics_port`
  (metrics.serve_multiprocess); workers serve none of their own.
- health: each worker's health service answers for the whole server. Every worker writes its
  own state into a shared array (starting / started / serving) and says SERVING only while every
  slot says serving, so a probe reaching any worker sees a worker that is down, restarting or
  draining (`worker_process.WorkerServer`).
- crashes: a worker that exits is logged and restarted in its slot (backing off while it keeps
  dying young); workers die with the parent (PR_SET_PDEATHSIG, and a check of the parent pid).
- SIGTERM / SIGINT: forwarded to every worker, each drains as one server does
  (`EmbeddingServer.stop`), then the parent waits for them (drain_grace_s + a margin) and
  kills what is left.
Model reloads and pointer flips: every worker polls the registry and the Redis pointer itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any

from embed_server.metrics import MULTIPROC_ENV, serve_multiprocess
from embed_server.settings import ServerSettings
from embed_server.worker_state import STARTED, STARTING, FeaturesFactory
from userembed.errors import InvalidInputError

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)

SUPERVISE_S = 0.1  # how often the parent looks for exited workers
STOP_MARGIN_S = 5.0  # beyond drain_grace_s before a draining worker is killed
YOUNG_S = 10.0  # a worker that dies younger than this is restarted after a growing delay
MAX_BACKOFF_S = 30.0


class PortInUseError(InvalidInputError):
    """The gRPC port is held by another process."""


class WorkerStartError(RuntimeError):
    """A worker exited before it was serving its port at start."""


def reserve_port(host: str, port: int) -> socket.socket:
    """A bound (not listening) SO_REUSEPORT socket on host:port; port 0 picks a free one."""
    family, _, _, _, address = socket.getaddrinfo(
        host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    if port:
        probe = socket.socket(family, socket.SOCK_STREAM)
        try:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds
            probe.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise PortInUseError(f"port {host}:{port} is in use by another process") from e
            raise
        finally:
            probe.close()
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(address)
    return sock


@dataclass
class _Slot:
    process: BaseProcess | None = None
    started_at: float = 0.0
    restarts: int = 0
    not_before: float = 0.0  # the next start, while backing off


class WorkerPool:
    """The parent: `await start()` (the port, metrics, every worker started), `await
    supervise(stop)` (restarts crashed workers until `stop` is set), `await stop()` (drain)."""

    def __init__(
        self, settings: ServerSettings, features_factory: FeaturesFactory | None = None
    ) -> None:
        self.settings = settings
        self.count = settings.worker_count()
        self._factory = features_factory
        self._ctx = multiprocessing.get_context("spawn")  # fresh imports: metrics files, no fork
        self._states = self._ctx.RawArray("b", self.count)
        self._slots = [_Slot() for _ in range(self.count)]
        self.port = 0
        self.metrics_port: int | None = None
        self._socket: socket.socket | None = None
        self._metrics_http: Any = None
        self.metrics_dir = ""
        self._old_env: str | None = None
        self._worker_settings: ServerSettings | None = None

    @property
    def pids(self) -> list[int | None]:
        return [s.process.pid if s.process is not None else None for s in self._slots]

    def states(self) -> list[int]:
        return list(self._states)

    async def start(self) -> int:
        """Reserve the port, start the metrics endpoint and every worker; returns the port once
        each worker has started (bound, models polled once)."""
        s = self.settings
        self._socket = reserve_port(s.host, s.grpc_port)
        self.port = int(self._socket.getsockname()[1])
        base = os.environ.get(MULTIPROC_ENV) or None  # a given folder: a fresh one inside it
        if base is not None:
            os.makedirs(base, exist_ok=True)
        self.metrics_dir = tempfile.mkdtemp(prefix="userembed-metrics-", dir=base)
        self._old_env = os.environ.get(MULTIPROC_ENV)
        os.environ[MULTIPROC_ENV] = self.metrics_dir
        if s.metrics_port >= 0:
            self._metrics_http, self.metrics_port = serve_multiprocess(
                s.host, s.metrics_port, self.metrics_dir
            )
        self._worker_settings = replace(s, grpc_port=self.port, metrics_port=-1)
        for i in range(self.count):
            self._spawn(i)
        try:
            while not all(state >= STARTED for state in self._states):
                for i, slot in enumerate(self._slots):
                    if slot.process is not None and not slot.process.is_alive():
                        raise WorkerStartError(
                            f"worker {i} exited with code {slot.process.exitcode} at start"
                        )
                await asyncio.sleep(SUPERVISE_S)
        except BaseException:
            await self.stop()
            raise
        logger.info("%d workers on %s:%d", self.count, s.host, self.port)
        return self.port

    def _spawn(self, i: int) -> None:
        self._states[i] = STARTING
        from embed_server.worker_process import run_worker  # its imports stay in the workers

        p = self._ctx.Process(
            target=run_worker,
            args=(
                self._worker_settings,
                i,
                self._states,
                os.getpid(),
                logging.getLogger().getEffectiveLevel(),
                self._factory,
            ),
            name=f"userembed-worker-{i}",
            daemon=True,  # multiprocessing's exit handler ends them too
        )
        p.start()
        slot = self._slots[i]
        slot.process, slot.started_at = p, time.monotonic()
        logger.info("worker %d started (pid %d)", i, p.pid)

    def _reap(self, i: int) -> None:
        """Worker i exited: log it, forget its live gauges, schedule its restart."""
        from prometheus_client import multiprocess

        slot = self._slots[i]
        p = slot.process
        assert p is not None
        self._states[i] = STARTING
        if p.pid is not None:
            multiprocess.mark_process_dead(p.pid, self.metrics_dir)
        lived = time.monotonic() - slot.started_at
        slot.restarts = slot.restarts + 1 if lived < YOUNG_S else 0
        delay = min(MAX_BACKOFF_S, 0.5 * 2 ** (slot.restarts - 1)) if slot.restarts else 0.0
        slot.not_before = time.monotonic() + delay
        slot.process = None
        logger.warning(
            "worker %d (pid %s) exited with code %s after %.1f s: restarting in %.1f s",
            i,
            p.pid,
            p.exitcode,
            lived,
            delay,
        )
        p.close()

    async def supervise(self, stop: asyncio.Event) -> None:
        """Restart workers that exit, until `stop` is set."""
        while not stop.is_set():
            for i, slot in enumerate(self._slots):
                p = slot.process
                if p is not None and p.exitcode is not None:
                    self._reap(i)
                if slot.process is None and time.monotonic() >= slot.not_before:
                    self._spawn(i)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SUPERVISE_S)

    async def stop(self) -> None:
        """SIGTERM every worker (each drains), wait for them, kill what is left; then the
        metrics endpoint, its files and the port reservation go."""
        live = [s.process for s in self._slots if s.process is not None]
        for p in live:
            if p.exitcode is None and p.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.settings.drain_grace_s + STOP_MARGIN_S
        while any(p.exitcode is None for p in live) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for p in live:
            if p.exitcode is None:
                logger.warning("worker pid %s did not drain in time: killed", p.pid)
                p.kill()
                p.join(5)
        for s in self._slots:
            if s.process is not None:
                s.process.close()
                s.process = None
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
            self._metrics_http = None
        if self._old_env is None:
            os.environ.pop(MULTIPROC_ENV, None)
        else:
            os.environ[MULTIPROC_ENV] = self._old_env
        if self.metrics_dir:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        logger.info("all workers stopped")


async def serve_workers(
    settings: ServerSettings,
    on_started: Callable[[WorkerPool], None] | None = None,
    features_factory: FeaturesFactory | None = None,
) -> None:
    """`settings.worker_count()` workers on one port until SIGTERM / SIGINT, then drain all."""
    pool = WorkerPool(settings, features_factory)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):  # before the start: a signal then still drains
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await pool.start()
    if on_started is not None:
        on_started(pool)
    try:
        await pool.supervise(stop)
        logger.info("signal received: draining %d workers", pool.count)
    finally:
        await pool.stop()
