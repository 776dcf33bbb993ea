"""Prometheus metrics of one server (own CollectorRegistry, so tests can run several servers).

With several worker processes (embed_server/workers.py) the parent sets PROMETHEUS_MULTIPROC_DIR
before starting them: every worker's values then live in files there and the parent serves their
sum (`serve_multiprocess`); each gauge says how workers combine (`multiprocess_mode`).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's name for the folder

logger = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# seconds: a minute to a month (a nightly refresh makes most stored vectors about a day old)
AGE_BUCKETS = (60, 600, 3600, 6 * 3600, 86400, 2 * 86400, 7 * 86400, 30 * 86400)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "userembed_requests", "RPCs by method and status code", ["method", "code"], registry=r
        )
        self.latency = Histogram(
            "userembed_request_seconds",
            "RPC latency by method",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.vectors = Counter(
            "userembed_vectors",
            "Vectors returned, by model and source (stored / computed)",
            ["model", "source"],
            registry=r,
        )
        self.item_errors = Counter(
            "userembed_item_errors",
            "Per-user failures by model and code",
            ["model", "code"],
            registry=r,
        )
        self.batch_size = Histogram(
            "userembed_batch_size",
            "Users per micro-batch, by stage (stored_read / compute)",
            ["stage"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.writeback_failures = Counter(
            "userembed_writeback_failures",
            "Computed vectors not written back",
            ["model"],
            registry=r,
        )
        self.model_info = Gauge(
            "userembed_model_loaded",
            "1 for the loaded version of each served model",
            ["model", "version", "provider"],
            registry=r,
            # a worker that swapped sets its old version to 0: max over live workers is 1
            # while any of them still serves that version
            multiprocess_mode="livemax",
        )
        self.reloads = Counter(
            "userembed_model_reloads",
            "Hot reload attempts by model and outcome",
            ["model", "outcome"],
            registry=r,
        )
        # the vector cache of each worker (embed_server/vector_cache.py), summed over workers
        self.cache_lookups = Counter(
            "userembed_vector_cache_lookups",
            "Vector cache lookups by result (hit / miss)",
            ["result"],
            registry=r,
        )
        self.cache_evictions = Counter(
            "userembed_vector_cache_evictions",
            "Vectors evicted from the cache to make room",
            registry=r,
        )
        self.cache_rejections = Counter(
            "userembed_vector_cache_rejections",
            "Vectors the admission policy kept out (rarer than the one they would evict)",
            registry=r,
        )
        self.cache_bytes = Gauge(
            "userembed_vector_cache_bytes",
            "Bytes held by the vector cache",
            registry=r,
            multiprocess_mode="livesum",
        )
        # freshness (embed_server/freshness.py, docs/freshness.md)
        self.vector_age = Histogram(
            "userembed_vector_age_seconds",
            "Age of served stored vectors' features (now - feature_ts), by model",
            ["model"],
            buckets=AGE_BUCKETS,
            registry=r,
        )
        self.stale_served = Counter(
            "userembed_stale_served",
            "Stored vectors served while newer behaviour was pushed (a background recompute "
            "follows)",
            ["model"],
            registry=r,
        )
        self.background_recomputes = Counter(
            "userembed_background_recomputes",
            "Background recomputes of stale vectors by model and outcome (ok / failed / dropped)",
            ["model", "outcome"],
            registry=r,
        )
        self._http: Any = None
        self.port: int | None = None

    def set_loaded(self, model: str, version: str, provider: str) -> None:
        """One series per model: drop the previous version's label set."""
        multiprocess = MULTIPROC_ENV in os.environ
        for labels in list(self.model_info._metrics):  # (model, version, provider)
            if labels[0] == model:
                if multiprocess:  # the worker's file keeps a removed series: zero it instead
                    self.model_info.labels(*labels).set(0)
                else:
                    self.model_info.remove(*labels)
        self.model_info.labels(model, version, provider).set(1)

    def serve(self, host: str, port: int) -> int:
        """Expose /metrics over HTTP; returns the bound port."""
        self._http, _thread = start_http_server(port, addr=host, registry=self.registry)
        self.port = int(self._http.server_address[1])
        logger.info("metrics on http://%s:%d/metrics", host, self.port)
        return self.port

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


def serve_multiprocess(host: str, port: int, path: str) -> tuple[Any, int]:
    """/metrics summed over the worker processes writing into `path`; returns (the HTTP
    server, its port). Stop it with `.shutdown()`."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=path)
    http, _thread = start_http_server(port, addr=host, registry=registry)
    bound = int(http.server_address[1])
    logger.info("metrics of all workers on http://%s:%d/metrics", host, bound)
    return http, bound
