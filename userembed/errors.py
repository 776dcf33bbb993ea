"""Errors of the platform. Each names the gRPC status it maps to (`grpc_status`, a
`grpc.StatusCode` member name), so one place in the server translates without this package
importing grpc."""

from __future__ import annotations


class UserEmbedError(Exception):
    """Base class of every error the platform raises on purpose."""

    grpc_status: str = "INTERNAL"


class InvalidInputError(UserEmbedError):
    """Input data or a request that breaks the documented schema."""

    grpc_status = "INVALID_ARGUMENT"


class SchemaError(InvalidInputError):
    """A table (parquet file, data frame) misses a required column or has a wrong type."""

    def __init__(self, source: str, column: str, problem: str) -> None:
        super().__init__(f"{source}: column '{column}' {problem}")
        self.source = source
        self.column = column
        self.problem = problem


class FeatureMismatchError(UserEmbedError):
    """Feature rows that do not carry what a model reads (built by an older data build, or
    with other parameters): rebuild the data set, `feast apply --fresh`, materialise."""

    grpc_status = "FAILED_PRECONDITION"


class DataNotFoundError(UserEmbedError):
    """An input file or data set that should exist is absent."""

    grpc_status = "NOT_FOUND"


class ModelNotFoundError(UserEmbedError):
    grpc_status = "NOT_FOUND"


class UserNotFoundError(UserEmbedError):
    """The user is unknown to the feature store (not an outage)."""

    grpc_status = "NOT_FOUND"


class CorruptModelError(UserEmbedError):
    """A registry entry whose manifest or files do not check out."""

    grpc_status = "FAILED_PRECONDITION"


class BackendUnavailableError(UserEmbedError):
    """Redis or the feature store cannot be reached."""

    grpc_status = "UNAVAILABLE"


class OverloadedError(UserEmbedError):
    grpc_status = "RESOURCE_EXHAUSTED"


class UntrustedModelError(CorruptModelError):
    """A registry version whose manifest is unsigned, or not signed by the configured key
    (userembed.signing): refused like a corrupt one."""


class UnsafeFileError(UserEmbedError):
    """A file that could run code when loaded (a pickle of more than tensors and plain data):
    refused unread, whoever wrote it."""

    grpc_status = "FAILED_PRECONDITION"
