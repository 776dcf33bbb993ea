"""A minimal HTTP/2 client for unary gRPC calls, for load generation only.

Why it exists: the grpc.aio client spends about 400 us of CPU per call here, more than the
servers it measures (170-500 us). With the load generator on the same 2 cores, a client that
costs more than the server measures the client: the server under test gets what is left of the
machine, and a reference with a cheaper client (`feast serve`'s raw HTTP/1.1 one) gets more.
This client writes HTTP/2 frames straight onto an asyncio transport (about 10x cheaper per
call), so every server in the bench is driven by a raw-protocol client of the same kind.

What it does and does not do:
- One connection, many concurrent streams. Request headers are one pre-encoded HPACK block per
  method (literal fields, never indexed, so the server's decoder table is never touched).
- It never decodes the server's header blocks. A call succeeded when its stream carried one
  whole gRPC message and then ended with trailers. A gRPC error is a trailers-only answer
  (HEADERS with END_STREAM and no message) or RST_STREAM: both are counted as errors. That is
  how gRPC servers answer a non-OK status on a unary call (no message is sent), and the
  callers here also parse the message and check its content.
- Flow control: it opens its own windows wide at the start and tops up the connection window
  as data arrives; it honours the server's connection window for what it sends. It answers
  SETTINGS and PING (gRPC servers send BDP pings). GOAWAY or a lost connection fails every
  open call.
- No TLS, no compression, no CONTINUATION frames from the client (header blocks are small).
  It does not count open streams against the server's MAX_CONCURRENT_STREAMS (grpc.aio
  servers do not limit it by default; the bench opens at most 64), nor per-stream send
  windows (a request is far smaller than the 64 KiB a stream starts with).
"""

from __future__ import annotations

import asyncio
import struct
from collections import deque
from typing import cast

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = (
    0x0, 0x1, 0x3, 0x4, 0x6, 0x7, 0x8, 0x9
)  # fmt: skip
END_STREAM, ACK, END_HEADERS, PADDED = 0x1, 0x1, 0x4, 0x8
WIDE = 2**31 - 1  # the largest window HTTP/2 allows
TOP_UP = 1 << 20  # give the server back this many bytes of connection window at a time


class CallFailed(Exception):
    """The call ended without a message: a gRPC error status (trailers only) or a reset."""


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes((kind, flags))
        + struct.pack(">I", stream)
        + payload
    )


def _hpack_str(b: bytes) -> bytes:
    """An HPACK string literal, not Huffman coded (RFC 7541 5.2), length < 127."""
    assert len(b) < 127, "header values here are short"
    return bytes((len(b),)) + b


def _literal(index: int, value: bytes) -> bytes:
    """Literal header field without indexing, name from the static table (RFC 7541 6.2.2)."""
    assert 0 < index < 15
    return bytes((index,)) + _hpack_str(value)


def _literal_new(name: bytes, value: bytes) -> bytes:
    """Literal header field without indexing, new name (RFC 7541 6.2.2)."""
    return b"\x00" + _hpack_str(name) + _hpack_str(value)


def request_headers(authority: str, path: str, timeout_s: int = 30) -> bytes:
    """The header block of a unary gRPC call to `path` ("/package.Service/Method"). The server
    ends a call after `timeout_s` (grpc-timeout) with DEADLINE_EXCEEDED: a failed call here."""
    return b"".join(
        (
            b"\x83",  # :method POST (static index 3)
            b"\x86",  # :scheme http (static index 6)
            _literal(4, path.encode()),  # :path
            _literal(1, authority.encode()),  # :authority
            # content-type is static index 31: the 4-bit prefix 15, then 16 (RFC 7541 5.1)
            b"\x0f\x10" + _hpack_str(b"application/grpc"),
            _literal_new(b"te", b"trailers"),
            _literal_new(b"grpc-timeout", b"%dS" % timeout_s),
        )
    )


class _Stream:
    __slots__ = ("future", "data")

    def __init__(self, future: asyncio.Future[bytes]) -> None:
        self.future = future
        self.data = bytearray()


class H2Channel(asyncio.Protocol):
    """One HTTP/2 connection carrying unary gRPC calls; `await call(headers, message)`."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, _Stream] = {}
        self.next_id = 1
        self.buf = bytearray()
        self.unacked = 0  # connection-window bytes received and not yet given back
        self.send_window = 65_535  # the server's connection window for our DATA
        self.waiting: deque[bytes] = deque()  # frames held back for send window
        self.closed: Exception | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @classmethod
    async def connect(cls, host: str, port: int) -> H2Channel:
        loop = asyncio.get_running_loop()
        _, ch = await loop.create_connection(cls, host, port)
        await ch.ready
        return ch

    # --- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a cast, not isinstance: uvloop's TCP transport is not an asyncio.Transport subclass
        self.transport = t = cast(asyncio.Transport, transport)
        settings = struct.pack(">HI", 0x2, 0) + struct.pack(">HI", 0x4, WIDE)  # no push, window
        t.write(
            PREFACE
            + _frame(SETTINGS, 0, 0, settings)
            + _frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", WIDE - 65_535))
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail_all(exc or ConnectionResetError("connection closed"))

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos = 0
        n = len(buf)
        while n - pos >= 9:
            length = int.from_bytes(buf[pos : pos + 3], "big")
            if n - pos < 9 + length:
                break
            kind, flags = buf[pos + 3], buf[pos + 4]
            stream = int.from_bytes(buf[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
            payload = bytes(buf[pos + 9 : pos + 9 + length])
            pos += 9 + length
            self._on_frame(kind, flags, stream, payload)
        del buf[:pos]

    # --- frames ---------------------------------------------------------------------------------

    def _on_frame(self, kind: int, flags: int, stream: int, payload: bytes) -> None:
        if kind == DATA:
            self.unacked += len(payload)
            if self.unacked >= TOP_UP:
                assert self.transport is not None
                self.transport.write(_frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", self.unacked)))
                self.unacked = 0
            if flags & PADDED:
                payload = payload[1 : len(payload) - payload[0]]
            s = self.streams.get(stream)
            if s is not None:
                s.data += payload
                if flags & END_STREAM:  # a message with no trailers: not gRPC
                    self._end(stream, CallFailed("stream ended without trailers"))
        elif kind == HEADERS:
            if flags & END_STREAM:
                s = self.streams.get(stream)
                if s is not None:
                    self._end(
                        stream, None if s.data else CallFailed("trailers only: an error status")
                    )
        elif kind == RST_STREAM:
            code = int.from_bytes(payload[:4], "big")
            self._end(stream, CallFailed(f"stream reset, HTTP/2 error code {code}"))
        elif kind == SETTINGS:
            if not flags & ACK:
                assert self.transport is not None
                self.transport.write(_frame(SETTINGS, ACK, 0))
                if not self.ready.done():
                    self.ready.set_result(None)
        elif kind == PING:
            if not flags & ACK:
                assert self.transport is not None
                self.transport.write(_frame(PING, ACK, 0, payload))
        elif kind == WINDOW_UPDATE:
            if stream == 0:
                self.send_window += int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
                self._flush_waiting()
        elif kind == GOAWAY:
            code = int.from_bytes(payload[4:8], "big")
            self._fail_all(ConnectionError(f"GOAWAY, HTTP/2 error code {code}"))
        elif kind == CONTINUATION:
            # the rest of a header block: never decoded here, and END_STREAM sits on the
            # HEADERS frame that started it, so a call has already ended there
            pass

    def _end(self, stream: int, error: Exception | None) -> None:
        s = self.streams.pop(stream, None)
        if s is None or s.future.done():
            return
        data = s.data
        if error is None:
            # one length-prefixed gRPC message: flag byte 0 (not compressed), 4-byte length
            if len(data) < 5 or data[0] != 0 or int.from_bytes(data[1:5], "big") != len(data) - 5:
                error = CallFailed(f"not one uncompressed gRPC message ({len(data)} bytes)")
        if error is None:
            s.future.set_result(bytes(data[5:]))
        else:
            s.future.set_exception(error)

    def _fail_all(self, error: Exception) -> None:
        self.closed = error
        if not self.ready.done():
            self.ready.set_exception(error)
        for sid in list(self.streams):
            s = self.streams.pop(sid)
            if not s.future.done():
                s.future.set_exception(error)

    def _flush_waiting(self) -> None:
        assert self.transport is not None
        while self.waiting and self.send_window >= len(self.waiting[0]) - 9:
            frame = self.waiting.popleft()
            self.send_window -= len(frame) - 9
            self.transport.write(frame)

    # --- calls ----------------------------------------------------------------------------------

    async def call(self, headers: bytes, message: bytes) -> bytes:
        """Send one unary call (`headers` from request_headers); the reply message's bytes."""
        if self.closed is not None:
            raise self.closed
        assert self.transport is not None
        sid = self.next_id
        self.next_id += 2
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.streams[sid] = _Stream(fut)
        body = b"\x00" + struct.pack(">I", len(message)) + message
        data = _frame(DATA, END_STREAM, sid, body)
        head = _frame(HEADERS, END_HEADERS, sid, headers)
        if self.waiting or self.send_window < len(body):
            self.transport.write(head)
            self.waiting.append(data)
        else:
            self.send_window -= len(body)
            self.transport.write(head + data)
        return await fut

    def close(self) -> None:
        if self.transport is not None:
            self.transport.write(_frame(GOAWAY, 0, 0, struct.pack(">II", self.next_id - 2, 0)))
            self.transport.close()
