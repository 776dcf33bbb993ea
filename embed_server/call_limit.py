"""A cap on the embedding calls in flight in one server process: past it, RESOURCE_EXHAUSTED.

Each call holds memory (its request, its queued reads and computations) until it ends; without
a cap a burst queues without bound and every call waits longer. The client retries with
backoff, or another replica takes the call. Only unary calls other than health are counted: a
probe still answers on a saturated server, which is busy, not dead.
(grpc.aio.server(maximum_concurrent_rpcs=...) refuses past its cap too, but counts health
checks, so a liveness probe would fail and restart a server under load.)
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from embed_server.auth import HEALTH_PREFIX

logger = logging.getLogger(__name__)

Behavior = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


class CallLimitInterceptor(grpc.aio.ServerInterceptor):
    """At most `limit` unary calls (health aside) in flight; `on_refused(method)` counts."""

    def __init__(self, limit: int, on_refused: Callable[[str], None] | None = None) -> None:
        self.limit = limit
        self.in_flight = 0
        self._on_refused = on_refused
        # method -> (its handler, the limited one): built once per method, not per call
        self._limited: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None or method.startswith(HEALTH_PREFIX):
            return handler
        cached = self._limited.get(method)
        if cached is None or cached[0] is not handler:
            limited = grpc.unary_unary_rpc_method_handler(
                self._limit(method, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
            cached = self._limited[method] = (handler, limited)
        return cached[1]

    def _limit(self, method: str, behavior: Behavior) -> Behavior:
        async def limited(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if self.in_flight >= self.limit:
                if self._on_refused is not None:
                    self._on_refused(method)
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"server busy: {self.limit} calls in flight (max_concurrent_rpcs); "
                    "retry with backoff",
                )
            self.in_flight += 1
            try:
                return await behavior(request, context)
            finally:
                self.in_flight -= 1

        return limited
