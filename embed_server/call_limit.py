"""A cap on the embedding calls in flight in one server process: past it, RESOURCE_EXHAUSTED.

Each call holds memory (its request, its queued reads and computations) until it ends; without
a cap a burst queues without bound and every call waits longer. The client retries with
backoff, or another replica takes the call. Only the embedding service's calls take a slot
(the servicer's `rpc` wrapper holds one per call): health is not counted, so a probe still
answers on a saturated server, which is busy, not dead.
(grpc.aio.server(maximum_concurrent_rpcs=...) refuses past its cap too, but counts health
checks, so a liveness probe would fail and restart a server under load. A server interceptor
would exempt health too, but grpc.aio runs every call through its interceptor chain's extra
coroutines: about 15 us of CPU per call, measured, more than the cache-hit handler itself.)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class CallLimit:
    """At most `limit` calls in flight (`in_flight`, kept by the servicer); 0: no cap."""

    limit: int
    in_flight: int = 0

    @property
    def full(self) -> bool:
        return 0 < self.limit <= self.in_flight

    def refusal(self) -> str:
        """The RESOURCE_EXHAUSTED message of a call refused while full."""
        return (
            f"server busy: {self.limit} calls in flight (max_concurrent_rpcs); retry with backoff"
        )
