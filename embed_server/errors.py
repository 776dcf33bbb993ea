"""Server-side errors beyond userembed.errors, and the one place exceptions become statuses."""

from __future__ import annotations

import logging

import grpc
import redis
from redis.exceptions import RedisClusterException

from userembed.errors import BackendUnavailableError, UserEmbedError

logger = logging.getLogger(__name__)


class NotReadyError(UserEmbedError):
    """No model is loaded yet, or the server is draining."""

    grpc_status = "UNAVAILABLE"


class DeadlineExceededError(UserEmbedError):
    """The client's deadline passed before the work was done; the work was skipped."""

    grpc_status = "DEADLINE_EXCEEDED"


class RedisReplyError(UserEmbedError):
    """Redis answered one user's key with an error reply (WRONGTYPE, ...): that user fails and
    the other users of the call, and of the micro-batch it shared, are answered."""

    grpc_status = "UNAVAILABLE"


class NoCompatMapError(UserEmbedError):
    """`compatible_with` names a model version the served embedding version has no map into
    (embed_server/compat.py); the message names those it has."""

    grpc_status = "FAILED_PRECONDITION"


# Redis client errors that mean "cannot reach Redis" (the Feast online store is Redis too); on
# Redis Cluster also a slot no reachable master serves (redis-py's RedisClusterException family).
REDIS_OUTAGE = (
    redis.ConnectionError,
    redis.TimeoutError,
    RedisClusterException,
    ConnectionError,
    TimeoutError,
    OSError,
)
# ... and with the error replies of a reachable Redis (OOM, READONLY, LOADING, MISCONF,
# WRONGTYPE, ...): a read that gets one is UNAVAILABLE, a write-back that gets one is counted.
REDIS_ERRORS = (redis.RedisError, *REDIS_OUTAGE)


def as_unavailable(what: str, e: BaseException) -> BackendUnavailableError:
    return BackendUnavailableError(f"{what} unavailable: {type(e).__name__}: {e}")


def grpc_code(e: UserEmbedError) -> grpc.StatusCode:
    """The gRPC status code an error of the platform names (`UserEmbedError.grpc_status`)."""
    return grpc.StatusCode[e.grpc_status]


def status_of(e: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status of an exception raised while serving. Unexpected ones are logged with
    their traceback and become INTERNAL without leaking internals to the client."""
    if isinstance(e, UserEmbedError):
        return grpc_code(e), str(e)
    if isinstance(e, REDIS_ERRORS):
        return grpc.StatusCode.UNAVAILABLE, str(as_unavailable("redis", e))
    logger.error("internal error while serving", exc_info=e)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(e).__name__})"
