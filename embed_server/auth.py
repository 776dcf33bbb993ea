"""Who may call: bearer tokens from a mounted file, checked in one server interceptor.

A call carries the metadata `authorization: Bearer <token>`; the server accepts it when the
token equals a line of `auth_token_file` (compared with `hmac.compare_digest`). Several lines
allow a rotation without downtime: add the new token, move the clients, remove the old one.
The file is re-read every `reload_interval_s` (`TokenFile.reload`), so a rotated Kubernetes
Secret takes effect without a restart; a file that becomes unreadable or empty keeps the
tokens read before (logged).

Exempt: the standard health service, which probes (kubelet, Docker HEALTHCHECK, load
balancers) call without a token. Reflection is not exempt: it describes the API to whoever may
call it (`grpcurl -H "authorization: Bearer $TOKEN"`). No token appears in a log line or in an
error message.
"""

from __future__ import annotations

import hmac
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health

from embed_server.settings import SettingsError

logger = logging.getLogger(__name__)

AUTHORIZATION = "authorization"  # gRPC metadata keys are lower case
SCHEME = "bearer"  # RFC 6750; the scheme is matched case-insensitively
HEALTH_PREFIX = f"/{health.SERVICE_NAME}/"  # method paths of grpc.health.v1.Health
# printable ASCII, no spaces (a metadata value), long enough not to be guessed
_TOKEN = re.compile(rb"[\x21-\x7e]{16,}")
_TOKEN_RULE = "at least 16 printable ASCII characters without spaces, e.g. `openssl rand -hex 32`"

MISSING = "missing bearer token: send the metadata 'authorization: Bearer <token>'"
MALFORMED = "malformed authorization metadata: expected 'Bearer <token>'"
DUPLICATE = "more than one authorization metadata entry"
WRONG = "invalid bearer token"


def read_tokens(path: str) -> tuple[bytes, ...]:
    """The tokens of a token file: one per line, blank lines ignored. SettingsError when the
    file cannot be read or a line is not a token (the message never quotes the line)."""
    try:
        lines = Path(path).read_bytes().splitlines()
    except OSError as e:
        raise SettingsError(f"auth_token_file {path}: {e.strerror or e}") from e
    tokens = []
    for i, line in enumerate(lines, 1):
        token = line.strip()
        if not token:
            continue
        if not _TOKEN.fullmatch(token):
            raise SettingsError(f"auth_token_file {path}: line {i} is not a token ({_TOKEN_RULE})")
        tokens.append(token)
    if not tokens:
        raise SettingsError(f"auth_token_file {path}: no token in the file ({_TOKEN_RULE})")
    return tuple(tokens)


class TokenFile:
    """The accepted tokens, read from `path` now (errors raise) and on each `reload()`."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._tokens = read_tokens(path)

    def reload(self) -> None:
        try:
            tokens = read_tokens(self.path)
        except SettingsError as e:
            logger.warning("%s; keeping the %d token(s) read before", e, len(self._tokens))
            return
        if tokens != self._tokens:
            logger.info("auth_token_file %s changed: %d token(s) accepted", self.path, len(tokens))
            self._tokens = tokens

    def accepts(self, token: bytes) -> bool:
        ok = False
        for t in self._tokens:  # every token compared: the time does not say which one matched
            ok |= hmac.compare_digest(t, token)
        return ok


def problem_of(metadata: Sequence[tuple[str, Any]] | None, tokens: TokenFile) -> str | None:
    """Why a call's metadata does not authenticate it (None: it does)."""
    values = [v for k, v in metadata or () if k == AUTHORIZATION]
    if not values:
        return MISSING
    if len(values) > 1:
        return DUPLICATE
    value = values[0]
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != SCHEME or not token:
        return MALFORMED
    if not tokens.accepts(token.encode("utf-8", "replace")):
        return WRONG
    return None


def refusal(
    handler: grpc.RpcMethodHandler | None, code: grpc.StatusCode, message: str
) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` (unary/stream) that only aborts."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    if handler is None or handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(refuse)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(refuse)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(refuse)
    return grpc.stream_stream_rpc_method_handler(refuse)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Every call but health needs a token of `tokens`, else UNAUTHENTICATED (before the call
    takes a slot of the concurrency cap or reaches the servicer). `on_refused(method)` counts."""

    def __init__(self, tokens: TokenFile, on_refused: Callable[[str], None] | None = None) -> None:
        self.tokens = tokens
        self._on_refused = on_refused

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        handler = await continuation(handler_call_details)
        if method.startswith(HEALTH_PREFIX):
            return handler
        problem = problem_of(handler_call_details.invocation_metadata, self.tokens)
        if problem is None:
            return handler
        logger.debug("refused %s: %s", method, problem)
        if self._on_refused is not None:
            self._on_refused(method)
        return refusal(handler, grpc.StatusCode.UNAUTHENTICATED, problem)
