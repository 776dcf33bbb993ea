"""A small synchronous Python client of the embedding service.

    with EmbeddingClient("127.0.0.1:50051") as c:
        e = c.get("42")                       # Embedding(vector=np.ndarray (D,), source="stored", ...)
        results = c.batch_get(["1", "2", ""])  # Embedding or ItemError per id, request order
        old = c.get("42", compatible_with="v1")  # in model version v1's space (a stored map)
        models = c.list_models()
        near = c.similar("42", k=10)          # SimilarUsers(user_ids, scores, embedding_version)
Errors of single calls raise `grpc.RpcError` (code() / details()).

A server with TLS, mutual TLS or tokens on (docs/serving.md, "Who may call") needs
`ClientSecurity`: by default the client reads it from the environment (`USEREMBED_TLS_CA`,
`USEREMBED_TLS_CLIENT_CERT` / `_KEY`, `USEREMBED_TLS_SERVER_NAME`, `USEREMBED_TOKEN_FILE`), so
every command and probe that talks to the server speaks the same way.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from embed_server._proto import embedding_service_pb2 as pb
from embed_server._proto import embedding_service_pb2_grpc as pb_grpc
from embed_server.embedding import COMPUTED, STORED, Embedding
from userembed.errors import InvalidInputError
from userembed.similar_index import SimilarUsers

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


@dataclass(frozen=True)
class ClientSecurity:
    """How a client reaches the server: TLS (verifying the server), a client certificate
    (mutual TLS) and a bearer token. Empty fields: plaintext, no certificate, no token."""

    tls_ca: str = ""  # PEM CA bundle that verifies the server's certificate; set -> TLS
    tls_cert: str = ""  # PEM client certificate and key (mutual TLS); set -> TLS
    tls_key: str = ""
    # the name the server's certificate must carry when the target does not (an IP address,
    # 127.0.0.1 in a probe, a port-forward)
    tls_server_name: str = ""
    token_file: str = ""  # the bearer token (its first line), sent with every call

    ENV: ClassVar[dict[str, str]] = {
        "tls_ca": "USEREMBED_TLS_CA",
        "tls_cert": "USEREMBED_TLS_CLIENT_CERT",
        "tls_key": "USEREMBED_TLS_CLIENT_KEY",
        "tls_server_name": "USEREMBED_TLS_SERVER_NAME",
        "token_file": "USEREMBED_TOKEN_FILE",
    }

    def __post_init__(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise InvalidInputError("a client certificate needs its key, and a key its certificate")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> ClientSecurity:
        """The environment's values (`ENV`), then `overrides` that are not None (CLI flags)."""
        env = os.environ if env is None else env
        values = {f: env.get(var, "") for f, var in cls.ENV.items()}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @property
    def tls(self) -> bool:
        return bool(self.tls_ca or self.tls_cert)

    def channel(self, target: str) -> grpc.Channel:
        if not self.tls:
            return grpc.insecure_channel(target)
        creds = grpc.ssl_channel_credentials(
            root_certificates=_read(self.tls_ca, "tls_ca") if self.tls_ca else None,
            private_key=_read(self.tls_key, "tls_key") if self.tls_key else None,
            certificate_chain=_read(self.tls_cert, "tls_cert") if self.tls_cert else None,
        )
        options = []
        if self.tls_server_name:
            options.append(("grpc.ssl_target_name_override", self.tls_server_name))
        return grpc.secure_channel(target, creds, options=options)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The call metadata: the bearer token when there is one."""
        if not self.token_file:
            return ()
        lines = _read(self.token_file, "token_file").decode("ascii", "replace").split()
        if not lines:
            raise InvalidInputError(f"token file {self.token_file} is empty")
        return (("authorization", f"Bearer {lines[0]}"),)


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        var = ClientSecurity.ENV[what]
        raise InvalidInputError(f"{var} / {what} {path}: {e.strerror or e}") from e


class EmbeddingClient:
    """`security` None: `ClientSecurity.from_env()`."""

    def __init__(
        self, target: str, timeout_s: float = 10.0, security: ClientSecurity | None = None
    ) -> None:
        self.security = ClientSecurity.from_env() if security is None else security
        self._metadata = self.security.metadata()
        self.channel = self.security.channel(target)
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

    def get(
        self, user_id: str, model: str = "", force: bool = False, compatible_with: str = ""
    ) -> Embedding:
        """`compatible_with` a model version: the vector in that version's space
        (docs/compatibility.md)."""
        req = pb.GetUserEmbeddingRequest(
            user_id=user_id,
            model_name=model,
            prefer=pb.FORCE_RECOMPUTE if force else pb.ACCEPT_STORED,
            compatible_with=compatible_with,
        )
        resp = self.stub.GetUserEmbedding(req, timeout=self.timeout_s, metadata=self._metadata)
        return _embedding(resp.embedding)

    def batch_get(
        self,
        user_ids: Sequence[str],
        model: str = "",
        force: bool = False,
        packed: bool = False,
        compatible_with: str = "",
    ) -> list[Embedding | ItemError]:
        req = pb.BatchGetUserEmbeddingsRequest(
            user_ids=list(user_ids),
            model_name=model,
            prefer=pb.FORCE_RECOMPUTE if force else pb.ACCEPT_STORED,
            packed=packed,
            compatible_with=compatible_with,
        )
        resp = self.stub.BatchGetUserEmbeddings(
            req, timeout=self.timeout_s, metadata=self._metadata
        )
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

    def similar(
        self,
        user_id: str | None = None,
        vector: Sequence[float] | np.ndarray | None = None,
        k: int = 0,
        model: str = "",
    ) -> SimilarUsers:
        """FindSimilarUsers: the k users nearest `user_id` or `vector` (give one; k 0: the
        server's default)."""
        req = pb.FindSimilarUsersRequest(k=k, model_name=model)
        if user_id is not None:
            req.user_id = user_id
        if vector is not None:
            req.vector.values.extend(np.asarray(vector, dtype=np.float32).tolist())
        resp = self.stub.FindSimilarUsers(req, timeout=self.timeout_s, metadata=self._metadata)
        return SimilarUsers(
            model_name=resp.model_name,
            model_version=resp.model_version,
            embedding_version=resp.embedding_version,
            user_ids=[n.user_id for n in resp.neighbors],
            scores=[n.score for n in resp.neighbors],
        )

    def list_models(self) -> pb.ListModelsResponse:
        return self.stub.ListModels(
            pb.ListModelsRequest(), timeout=self.timeout_s, metadata=self._metadata
        )

    def health(self, service: str = "") -> str:
        """ "SERVING" / "NOT_SERVING" / ... of the standard gRPC health service."""
        stub = health_pb2_grpc.HealthStub(self.channel)
        resp = stub.Check(
            health_pb2.HealthCheckRequest(service=service),
            timeout=self.timeout_s,
            metadata=self._metadata,
        )
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
