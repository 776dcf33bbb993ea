"""The gRPC server (grpc.aio): embedding service, health, reflection, metrics, hot reload.

Lifecycle: bind (port 0 = any) -> health NOT_SERVING -> load models -> SERVING. A background
task polls the registry alias and the Redis pointer every `reload_interval_s`. `stop()` (SIGTERM
in `serve`) drains: health NOT_SERVING, new calls refused with UNAVAILABLE, in-flight calls get
`drain_grace_s` to finish, then everything closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from embed_server._proto import embedding_service_pb2 as pb
from embed_server._proto import embedding_service_pb2_grpc as pb_grpc
from embed_server.lookup import EmbeddingLookup
from embed_server.metrics import ServerMetrics
from embed_server.model_manager import ModelManager
from embed_server.online_features import FeastFeatureSource, OnlineFeatureSource
from embed_server.servicer import UserEmbeddingServicer
from embed_server.settings import ServerSettings
from embed_server.version_policy import WRITER_TTL_S
from userembed.registry import Registry

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["UserEmbeddingService"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class EmbeddingServer:
    """One server process' worth of state; `await start()`, then `await stop()`."""

    def __init__(
        self,
        settings: ServerSettings,
        features: OnlineFeatureSource | None = None,
        registry: Registry | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = ServerMetrics()
        # The server only reads the registry: it verifies and never signs.
        self.registry = registry or Registry(
            settings.registry_root, verify_key=settings.model_verify_key, signing_key=""
        )
        self.manager = ModelManager(settings, self.registry, self.metrics)
        self._features = features
        self.lookup: EmbeddingLookup | None = None
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self.metrics_port: int | None = None
        self._draining = False
        self._stop = asyncio.Event()
        self._poller: asyncio.Task[None] | None = None

    async def start(self) -> int:
        """Bind, serve, load the models; returns the bound gRPC port."""
        s = self.settings
        features = self._features
        if features is None:
            features = await asyncio.to_thread(FeastFeatureSource.open, s.redis_url, s.feature_repo)
        self.lookup = EmbeddingLookup(s, self.manager, features, self.metrics)
        await self.lookup.start()
        # so_reuseport off: a second server on a fixed port must fail, not share it silently.
        self.server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        servicer = UserEmbeddingServicer(
            self.lookup, self.manager, self.metrics, lambda: self._draining
        )
        pb_grpc.add_UserEmbeddingServiceServicer_to_server(servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        address = f"{s.host}:{s.grpc_port}"
        if s.tls_cert:
            creds = grpc.ssl_server_credentials(
                [(Path(s.tls_key).read_bytes(), Path(s.tls_cert).read_bytes())]
            )
            self.port = self.server.add_secure_port(address, creds)
        else:
            self.port = self.server.add_insecure_port(address)
        await self._set_health(False)
        await self.server.start()
        logger.info("gRPC on %s:%d (%s)", s.host, self.port, "TLS" if s.tls_cert else "plaintext")
        if s.metrics_port >= 0:
            self.metrics_port = self.metrics.serve(s.host, s.metrics_port)
        await self._poll()
        self._poller = asyncio.create_task(self._poll_loop(), name="registry-poller")
        return self.port

    async def _set_health(self, serving: bool) -> None:
        status = SERVING if serving else NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def _poll(self) -> None:
        await self.manager.poll_once()
        assert self.lookup is not None
        # the write-back heartbeat must outlive a few polls, however long the period
        writer_ttl_s = max(WRITER_TTL_S, 3 * self.settings.reload_interval_s)
        await self.lookup.versions.refresh_pointers(writer_ttl_s)
        if not self._draining:
            await self._set_health(self.manager.ready)

    async def _poll_loop(self) -> None:
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._stop.wait(), self.settings.reload_interval_s)
            except TimeoutError:
                try:
                    await self._poll()
                except Exception:  # the poller must survive anything; each poll logs its own
                    logger.exception("registry / pointer poll failed")

    async def stop(self, grace: float | None = None) -> None:
        """Drain, then stop: NOT_SERVING, refuse new calls, let in-flight ones finish."""
        if self.server is None:
            return
        self._draining = True
        await self._set_health(False)
        self._stop.set()
        if self._poller is not None:
            await asyncio.gather(self._poller, return_exceptions=True)
        grace = self.settings.drain_grace_s if grace is None else grace
        logger.info("draining (up to %.1f s)", grace)
        await self.server.stop(grace)
        if self.lookup is not None:
            await self.lookup.close()
        self.metrics.stop()
        self.server = None
        logger.info("stopped")


async def serve(
    settings: ServerSettings,
    on_started: Callable[[EmbeddingServer], None] | None = None,
) -> None:
    """Run until SIGTERM / SIGINT, then drain and stop."""
    srv = EmbeddingServer(settings)
    await srv.start()
    if on_started is not None:
        on_started(srv)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):  # not on every platform
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logger.info("signal received: shutting down")
    await srv.stop()
