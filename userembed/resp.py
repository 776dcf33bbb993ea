"""RESP (the Redis wire protocol) command encoding: the one encoder for code that packs Redis
commands by hand instead of through redis-py.

A command is an array of bulk strings: `*<n>\\r\\n` then `$<len>\\r\\n<bytes>\\r\\n` per argument
(https://redis.io/docs/latest/develop/reference/protocol-spec/). Hot paths build the constant
parts of their commands once from these pieces and join them per call.
"""

from __future__ import annotations

CRLF = b"\r\n"


def bulk(data: bytes) -> bytes:
    """One bulk string."""
    return b"$%d\r\n%b\r\n" % (len(data), data)


def bulk_header(length: int) -> bytes:
    """The head of a bulk string of `length` bytes: the caller appends the bytes and CRLF
    (a payload sliced from a larger buffer is then never copied)."""
    return b"$%d\r\n" % length


def array_header(length: int) -> bytes:
    """The head of an array of `length` elements (a command of that many arguments)."""
    return b"*%d\r\n" % length


def command(*args: bytes) -> bytes:
    """A whole command: `command(b"SELECT", b"1")`."""
    return array_header(len(args)) + b"".join(bulk(a) for a in args)
