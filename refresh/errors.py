"""Errors of the refresh job beyond userembed.errors; each names its status like the others."""

from __future__ import annotations

from userembed.errors import UserEmbedError


class RefreshValidationError(UserEmbedError):
    """The new version failed a check; it is marked failed and readers were not switched."""

    grpc_status = "FAILED_PRECONDITION"


class NoVersionError(UserEmbedError):
    """No embedding version to roll back to (or the one named is not ready)."""

    grpc_status = "FAILED_PRECONDITION"


class RefreshLockedError(UserEmbedError):
    """Another refresh run of the model holds the lock (refresh/lock.py)."""

    grpc_status = "ABORTED"


class RefreshLockLostError(UserEmbedError):
    """This run's refresh lock expired or was taken: it stops without publishing."""

    grpc_status = "ABORTED"


class StaleFlipError(UserEmbedError):
    """The pointer flip was refused: the pointer moved since the run validated, the run's
    lock was lost, or its version is gone. Readers stay where they are."""

    grpc_status = "ABORTED"
