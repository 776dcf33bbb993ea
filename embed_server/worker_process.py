"""The worker side of embed_server/workers.py: one spawned process running a whole
`EmbeddingServer` on the shared port, its health answering for every worker. Only workers
import this module (and the server's heavy imports with it); the parent stays small."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import os
import signal
from typing import Any

from embed_server.server import EmbeddingServer
from embed_server.settings import ServerSettings
from embed_server.worker_state import SERVING_STATE, STARTED, STARTING, FeaturesFactory

logger = logging.getLogger(__name__)

HEALTH_WATCH_S = 0.1  # how often a worker re-reads the others' states
_PR_SET_PDEATHSIG = 1


class WorkerServer(EmbeddingServer):
    """One worker's server: its health is SERVING only while every worker's own state is."""

    def __init__(self, settings: ServerSettings, slot: int, states: Any, **kw: Any) -> None:
        super().__init__(settings, reuse_port=True, **kw)
        self._slot = slot
        self._states = states
        self._own_serving = False
        self._started = False
        self._shown: bool | None = None  # the status last set on the health service

    async def _set_health(self, serving: bool) -> None:
        self._own_serving = serving
        if self._started:
            self._states[self._slot] = SERVING_STATE if serving else STARTED
        await self._show(serving)

    async def _show(self, own_serving: bool) -> None:
        shown = own_serving and all(s == SERVING_STATE for s in self._states)
        if shown != self._shown:
            self._shown = shown
            await super()._set_health(shown)

    async def watch_health(self) -> None:
        """Mark this worker started, then follow the other workers' states."""
        self._started = True
        self._states[self._slot] = SERVING_STATE if self._own_serving else STARTED
        while True:
            await self._show(self._own_serving and not self._draining)
            await asyncio.sleep(HEALTH_WATCH_S)


def freeze_heap() -> None:
    """Move what start-up allocated (Feast, onnxruntime, pandas: millions of objects) out of the
    cyclic GC's reach: a full collection otherwise walks all of it, again and again, on the
    request path (gc.freeze, as large forking servers do)."""
    gc.collect()
    gc.freeze()


def _die_with_parent(parent_pid: int) -> None:
    """SIGTERM this worker when the parent dies (Linux); a parent already gone: exit now."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent_pid:
        os._exit(1)


def run_worker(
    settings: ServerSettings,
    slot: int,
    states: Any,
    parent_pid: int,
    log_level: int,
    features_factory: FeaturesFactory | None,
) -> None:
    """A spawned worker: one EmbeddingServer on the shared port until SIGTERM."""
    _die_with_parent(parent_pid)
    logging.basicConfig(
        level=log_level, format=f"%(asctime)s worker-{slot} %(levelname)s %(name)s: %(message)s"
    )
    from embed_server.event_loop import run

    run(_worker(settings, slot, states, features_factory), settings.event_loop)


async def _worker(
    settings: ServerSettings, slot: int, states: Any, features_factory: FeaturesFactory | None
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    features = features_factory(settings) if features_factory is not None else None
    srv = WorkerServer(settings, slot, states, features=features)
    await srv.start()
    freeze_heap()
    watch = asyncio.create_task(srv.watch_health(), name="worker-health")
    await stop.wait()
    await srv.stop()  # drain: its health NOT_SERVING first, so the others' say so too
    watch.cancel()
    states[slot] = STARTING
