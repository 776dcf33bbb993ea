"""The gRPC server (grpc.aio): embedding service, health, reflection, metrics, hot reload.

Lifecycle: bind (port 0 = any) -> health NOT_SERVING -> load models -> SERVING. A background
task polls the registry alias, the Redis pointer and the forgotten users (docs/forget.md) every
`reload_interval_s`. `stop()` (SIGTERM
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
from embed_server.auth import BearerTokenInterceptor, TokenFile
from embed_server.call_limit import CallLimit
from embed_server.lookup import EmbeddingLookup
from embed_server.metrics import ServerMetrics
from embed_server.model_manager import ModelManager
from embed_server.online_features import FeastFeatureSource, OnlineFeatureSource
from embed_server.servicer import UserEmbeddingServicer, add_to_server
from embed_server.settings import ServerSettings
from embed_server.similar import SimilarSearch
from embed_server.version_policy import WRITER_TTL_S
from userembed.registry import Registry
from userembed.similar_index import IndexStore

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["UserEmbeddingService"].full_name
# method path -> the `method` label of userembed_requests_total (anything else: "other")
_METHOD_LABELS = {
    f"/{SERVICE_NAME}/{m.name}": m.name
    for m in pb.DESCRIPTOR.services_by_name["UserEmbeddingService"].methods
}
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class EmbeddingServer:
    """One server process' worth of state; `await start()`, then `await stop()`."""

    def __init__(
        self,
        settings: ServerSettings,
        features: OnlineFeatureSource | None = None,
        registry: Registry | None = None,
        reuse_port: bool = False,
    ) -> None:
        self.settings = settings
        self.reuse_port = reuse_port  # a worker sharing the port (embed_server/workers.py)
        self.metrics = ServerMetrics()
        # The server only reads the registry: it verifies and never signs.
        self.registry = registry or Registry(
            settings.registry_root, verify_key=settings.model_verify_key, signing_key=""
        )
        self.manager = ModelManager(settings, self.registry, self.metrics)
        self._features = features
        self.lookup: EmbeddingLookup | None = None
        self.similar: SimilarSearch | None = None
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self.metrics_port: int | None = None
        self._draining = False
        self._stop = asyncio.Event()
        self._poller: asyncio.Task[None] | None = None
        # read now: a missing or empty token file stops the server before it binds
        self.tokens = TokenFile(settings.auth_token_file) if settings.auth_token_file else None

    def _interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """The token check (a refused call takes no slot of the cap, which the servicer
        holds: call_limit.py)."""
        out: list[grpc.aio.ServerInterceptor] = []
        if self.tokens is not None:
            out.append(BearerTokenInterceptor(self.tokens, self._count_refused("UNAUTHENTICATED")))
        return out

    def _count_refused(self, code: str) -> Callable[[str], None]:
        def count(method: str) -> None:
            self.metrics.requests.labels(_METHOD_LABELS.get(method, "other"), code).inc()

        return count

    async def start(self) -> int:
        """Bind, serve, load the models; returns the bound gRPC port."""
        s = self.settings
        features = self._features
        if features is None:
            features = await asyncio.to_thread(FeastFeatureSource.open, s.redis_url, s.feature_repo)
        self.lookup = EmbeddingLookup(s, self.manager, features, self.metrics)
        await self.lookup.start()
        # so_reuseport off: a second server on a fixed port must fail, not share it silently
        # (the workers of one server share it on purpose: workers.py)
        self.server = grpc.aio.server(
            options=[("grpc.so_reuseport", int(self.reuse_port))],
            interceptors=self._interceptors(),
        )
        self.similar = SimilarSearch(IndexStore(), self.lookup.versions, self.manager)
        servicer = UserEmbeddingServicer(
            self.lookup,
            self.manager,
            self.metrics,
            lambda: self._draining,
            self.similar,
            CallLimit(s.max_concurrent_rpcs),
        )
        add_to_server(servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        address = f"{s.host}:{s.grpc_port}"
        if s.tls_cert:
            client_ca = Path(s.tls_client_ca).read_bytes() if s.tls_client_ca else None
            creds = grpc.ssl_server_credentials(
                [(Path(s.tls_key).read_bytes(), Path(s.tls_cert).read_bytes())],
                root_certificates=client_ca,
                require_client_auth=client_ca is not None,
            )
            self.port = self.server.add_secure_port(address, creds)
        else:
            self.port = self.server.add_insecure_port(address)
        await self._set_health(False)
        await self.server.start()
        transport = "mutual TLS" if s.tls_client_ca else "TLS" if s.tls_cert else "plaintext"
        auth = "bearer token" if self.tokens is not None else "no token"
        logger.info("gRPC on %s:%d (%s, %s)", s.host, self.port, transport, auth)
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
        if self.tokens is not None:
            self.tokens.reload()  # a rotated Secret applies without a restart
        await self.manager.poll_once()
        assert self.lookup is not None
        # the write-back heartbeat must outlive a few polls, however long the period
        writer_ttl_s = max(WRITER_TTL_S, 3 * self.settings.reload_interval_s)
        await self.lookup.versions.refresh_pointers(writer_ttl_s)
        await self.lookup.refresh_forgotten()
        if self.similar is not None:  # the index follows the pointer just read
            self.similar.forgotten = self.lookup.forgotten
            await self.similar.poll()
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
    """One server process until SIGTERM / SIGINT, then drain and stop (several processes on
    one port: embed_server/workers.py `serve_workers`)."""
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
