"""Errors of the refresh job beyond userembed.errors; each names its status like the others."""

from __future__ import annotations

from userembed.errors import UserEmbedError


class RefreshValidationError(UserEmbedError):
    """The new version failed a check; it is marked failed and readers were not switched."""

    grpc_status = "FAILED_PRECONDITION"


class NoVersionError(UserEmbedError):
    """No embedding version to roll back to (or the one named is not ready)."""

    grpc_status = "FAILED_PRECONDITION"
