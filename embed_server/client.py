"""A small synchronous Python client of the embedding service.

    with EmbeddingClient("127.0.0.1:50051") as c:
        e = c.get("42")                       # Embedding(vector=np.ndarray (D,), source="stored", ...)
        results = c.batch_get(["1", "2", ""])  # Embedding or ItemError per id, request order
        models = c.list_models()
Errors of single calls raise `grpc.RpcError` (code() / details()).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from embed_server._proto import embedding_service_pb2 as pb
from embed_server._proto import embedding_service_pb2_grpc as pb_grpc
from embed_server.embedding import COMPUTED, STORED, Embedding

logger = logging.getLogger(__name__)

_CODES = {c.value[0]: c for c in grpc.StatusCode}
_SOURCES = {pb.STORED: STORED, pb.COMPUTED: COMPUTED}


@dataclass(frozen=True)
class ItemError:
    """A per-id failure inside a batch call."""

    user_id: str
    code: grpc.StatusCode
    message: str


def _embedding(m: pb.UserEmbedding, vector: np.ndarray | None = None) -> Embedding:
    return Embedding(
        user_id=m.user_id,
        vector=np.asarray(m.vector, dtype=np.float32) if vector is None else vector,
        model_name=m.model_name,
        model_version=m.model_version,
        embedding_version=m.embedding_version,
        computed_at_ms=m.computed_at_ms,
        feature_ts_ms=m.feature_timestamp_ms,
        source=_SOURCES.get(m.source, "unknown"),
    )


class EmbeddingClient:
    def __init__(self, target: str, timeout_s: float = 10.0, tls_ca: str | None = None) -> None:
        if tls_ca:
            creds = grpc.ssl_channel_credentials(Path(tls_ca).read_bytes())
            self.channel = grpc.secure_channel(target, creds)
        else:
            self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.UserEmbeddingServiceStub(self.channel)
        self.timeout_s = timeout_s

    def __enter__(self) -> EmbeddingClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def get(self, user_id: str, model: str = "", force: bool = False) -> Embedding:
        req = pb.GetUserEmbeddingRequest(
            user_id=user_id,
            model_name=model,
            prefer=pb.FORCE_RECOMPUTE if force else pb.ACCEPT_STORED,
        )
        return _embedding(self.stub.GetUserEmbedding(req, timeout=self.timeout_s).embedding)

    def batch_get(
        self, user_ids: Sequence[str], model: str = "", force: bool = False, packed: bool = False
    ) -> list[Embedding | ItemError]:
        req = pb.BatchGetUserEmbeddingsRequest(
            user_ids=list(user_ids),
            model_name=model,
            prefer=pb.FORCE_RECOMPUTE if force else pb.ACCEPT_STORED,
            packed=packed,
        )
        resp = self.stub.BatchGetUserEmbeddings(req, timeout=self.timeout_s)
        out: list[Embedding | ItemError] = []
        if packed:
            p = resp.packed
            vectors = np.asarray(p.vectors, dtype=np.float32).reshape(len(user_ids), resp.dim)
            for i, uid in enumerate(user_ids):
                if p.codes[i] != 0:
                    out.append(ItemError(uid, _CODES[p.codes[i]], p.messages[i]))
                    continue
                out.append(
                    Embedding(
                        user_id=uid,
                        vector=vectors[i],
                        model_name=resp.model_name,
                        model_version=resp.model_version,
                        embedding_version=p.embedding_versions[i],
                        computed_at_ms=p.computed_at_ms[i],
                        feature_ts_ms=p.feature_timestamp_ms[i],
                        source=_SOURCES.get(p.sources[i], "unknown"),
                    )
                )
            return out
        for uid, item in zip(user_ids, resp.items, strict=True):
            if item.status.code != 0:
                out.append(ItemError(uid, _CODES[item.status.code], item.status.message))
            else:
                out.append(_embedding(item.embedding))
        return out

    def list_models(self) -> pb.ListModelsResponse:
        return self.stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout_s)

    def health(self, service: str = "") -> str:
        """ "SERVING" / "NOT_SERVING" / ... of the standard gRPC health service."""
        stub = health_pb2_grpc.HealthStub(self.channel)
        resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout_s)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
