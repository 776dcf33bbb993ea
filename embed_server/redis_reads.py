"""Redis transport of the stored-vector reads: a lean pipelined connection and a read coalescer.

Why not redis.asyncio: the stored path is one Redis round trip per call, and a round trip
through redis.asyncio costs several times the Python of a bare asyncio protocol with the
hiredis parser (BENCHMARKS.md, serving). Everything else (write-backs, pointers, the version
registry) stays on redis-py, and so do the reads on Redis Cluster: this connection speaks to
one server and does not route by slot (embed_server/stored_reader.py picks redis-py's cluster
pipeline there).

`ReadCoalescer` folds concurrent single-key reads into one `EVAL` of the read script (many
keys, one round trip); a lone read goes out at once as a plain `HMGET`. With a `marker`, each row
also carries the user's pushed-behaviour marker (docs/freshness.md), read in the same round trip.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import ssl
import time
from collections.abc import Callable, Sequence
from typing import Any

import hiredis
import redis
from redis.connection import SSLConnection, UnixDomainSocketConnection, parse_url

from userembed import resp

logger = logging.getLogger(__name__)

# One round trip for a batch of stored reads on a single Redis server: HMGET of each key.
# pcall: a key that fails (WRONGTYPE) gets its error reply in its own place, so it fails only
# its own caller, not every read sharing the script call.
# Redis Cluster rejects multi-key scripts across slots: there the reads are a pipeline of one
# HMGET per key instead (redis-py's cluster client; stored_reader.open_stored_reader).
READ_SCRIPT = """
local out = {}
for i, k in ipairs(KEYS) do
  out[i] = redis.pcall('HMGET', k, unpack(ARGV))
end
return out
"""

# The same with each user's pushed-behaviour marker (userembed/vectors.py `pushed_key_of`)
# appended to its row: KEYS are n vector keys then their n marker keys (same user hash tag).
# A marker of the wrong type reads as none.
READ_MARKED_SCRIPT = """
local out = {}
local n = #KEYS / 2
for i = 1, n do
  local row = redis.pcall('HMGET', KEYS[i], unpack(ARGV))
  if row.err == nil then
    local m = redis.pcall('GET', KEYS[n + i])
    if type(m) == 'table' then m = false end
    row[#row + 1] = m
  end
  out[i] = row
end
return out
"""

# Short timeouts: an unreachable Redis must become UNAVAILABLE within seconds.
CONNECT_TIMEOUT_S = 2.0
REPLY_TIMEOUT_S = 5.0

_URL_KEYS = {"host", "port", "db", "username", "password", "path", "connection_class"}


class _Protocol(asyncio.Protocol):
    """Replies arrive in request order (RESP pipelining): the oldest waiter gets each one."""

    def __init__(self, on_lost: Callable[[BaseException], None]) -> None:
        self.reader = hiredis.Reader()
        self.waiters: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self._on_lost = on_lost

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            fut = self.waiters.popleft()
            if fut.done():  # its caller gave up (cancelled); the reply is dropped
                continue
            if isinstance(reply, hiredis.ReplyError):
                fut.set_exception(redis.ResponseError(str(reply)))
            else:
                fut.set_result(reply)

    def connection_lost(self, exc: BaseException | None) -> None:
        err = redis.ConnectionError(f"connection to redis lost: {exc or 'closed by server'}")
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_exception(err)
        self._on_lost(err)


class PipelinedRedis:
    """One pipelined connection for commands whose replies the caller awaits (reads only).
    Reconnects on the next call after a loss; a reply slower than `timeout_s` closes the
    connection (every waiter gets redis.TimeoutError, then the next call reconnects)."""

    def __init__(
        self,
        url: str,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        timeout_s: float = REPLY_TIMEOUT_S,
    ) -> None:
        kw = parse_url(url)
        unknown = set(kw) - _URL_KEYS
        if unknown:
            raise ValueError(f"URL options {sorted(unknown)} are not supported by the fast reader")
        self._kw = kw
        self._connect_timeout_s = connect_timeout_s
        self._timeout_s = timeout_s
        self._proto: _Protocol | None = None
        self._connecting: asyncio.Lock | None = None

    @staticmethod
    def supports(url: str) -> bool:
        try:
            return not (set(parse_url(url)) - _URL_KEYS)
        except ValueError:
            return False

    async def _connect(self) -> _Protocol:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._proto is not None:
                return self._proto
            loop = asyncio.get_running_loop()
            kw = self._kw
            cls = kw.get("connection_class")

            def on_lost(_: BaseException) -> None:
                if self._proto is proto:
                    self._proto = None

            proto = _Protocol(on_lost)
            if cls is UnixDomainSocketConnection:
                coro = loop.create_unix_connection(lambda: proto, kw["path"])
            else:
                tls = ssl.create_default_context() if cls is SSLConnection else None
                coro = loop.create_connection(
                    lambda: proto, kw.get("host", "localhost"), kw.get("port", 6379), ssl=tls
                )
            await asyncio.wait_for(coro, self._connect_timeout_s)
            self._proto = proto
            try:
                if kw.get("password"):
                    auth = [b"AUTH"] + ([kw["username"].encode()] if kw.get("username") else [])
                    await self._send(proto, resp.command(*auth, kw["password"].encode()))
                if kw.get("db"):
                    await self._send(proto, resp.command(b"SELECT", str(kw["db"]).encode()))
            except redis.ResponseError as e:
                # Wrong password or db: for the caller this Redis is unusable, i.e. UNAVAILABLE.
                self._drop(proto)
                raise redis.ConnectionError(f"redis refused AUTH/SELECT: {e}") from e
            except BaseException:
                self._drop(proto)
                raise
            return proto

    def _drop(self, proto: _Protocol) -> None:
        if proto.transport is not None:
            proto.transport.close()
        if self._proto is proto:
            self._proto = None

    def _expire(self, proto: _Protocol, fut: asyncio.Future[Any]) -> None:
        if not fut.done():
            fut.set_exception(redis.TimeoutError(f"no redis reply within {self._timeout_s}s"))
            self._drop(proto)  # later replies would be matched to the wrong waiters

    def _send(self, proto: _Protocol, command: bytes) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        proto.waiters.append(fut)
        assert proto.transport is not None
        proto.transport.write(command)
        timer = loop.call_later(self._timeout_s, self._expire, proto, fut)
        fut.add_done_callback(lambda _: timer.cancel())
        return fut

    @property
    def connected(self) -> bool:
        return self._proto is not None

    def submit_pair(self, commands: bytes) -> tuple[asyncio.Future[Any], asyncio.Future[Any]]:
        """Two RESP commands in one write (`connected` must be true): their replies' futures.
        One timer, on the second: a reply missing past it drops the connection, failing both."""
        assert self._proto is not None
        proto = self._proto
        loop = asyncio.get_running_loop()
        first, second = loop.create_future(), loop.create_future()
        proto.waiters.append(first)
        proto.waiters.append(second)
        assert proto.transport is not None
        proto.transport.write(commands)
        timer = loop.call_later(self._timeout_s, self._expire, proto, second)
        second.add_done_callback(lambda _: timer.cancel())
        return first, second

    def submit(self, command: bytes) -> asyncio.Future[Any]:
        """Send on the open connection (`connected` must be true); the future gets the reply."""
        assert self._proto is not None
        return self._send(self._proto, command)

    async def call(self, command: bytes) -> Any:
        """Send one RESP-encoded command, return its parsed reply (hiredis types)."""
        proto = self._proto or await self._connect()
        return await self._send(proto, command)

    def close(self) -> None:
        if self._proto is not None:
            self._drop(self._proto)


class ReadCoalescer:
    """Stored reads of single keys -> few `EVAL READ_SCRIPT` round trips (adaptive batching).

    `read(key)` queues the key. While `max_in_flight` reads are out, keys wait for the next
    reply and then leave together, so under load one round trip (one send, one script call)
    serves many requests. Otherwise a read that is not clustered (below) goes at once; with
    `hold_s` 0 it goes two event-loop turns later, to catch the RPCs gRPC hands the loop (about
    one per turn). A batch of one key is a plain HMGET (no script call in Redis).

    Hold (`hold_s` > 0): a round trip is shorter than the gap between two calls of a busy
    server, so waiting for the reply in flight alone leaves most reads going one by one. When
    reads come clustered, the first read of a batch waits up to `hold_s` for more. Clustered
    means that more than `CLUSTERED` of the recent reads arrived within the last measured round
    trip of the read before them: those reads would have shared a round trip anyway. A lone
    client (one call at a time, however fast) never looks clustered: its next call cannot
    start before the reply to its last read, whose round trip is the last one measured, so its
    gap is always longer. (A running mean of round trips would not do: after one slow reply it
    stays above the next gaps of a lone client.) A hold that catches no other read ends
    holding at once, so after a burst a lone client waits out at most one hold. Held calls
    also finish together, which lowers the server's CPU per call under load (docs/serving.md).
    """

    CLUSTERED = 0.1  # share of recent reads within the last round trip of the read before
    _EWMA = 1 / 32  # weight of the newest read in the running share

    def __init__(
        self,
        conn: PipelinedRedis,
        fields: Sequence[str],
        max_keys: int = 256,
        on_batch: Callable[[int], None] | None = None,
        max_in_flight: int = 1,
        hold_s: float = 0.0,
        marker: Callable[[bytes], bytes] | None = None,
    ) -> None:
        self.conn = conn
        # vector key -> its marker key: each row then ends with the marker's value
        self._marker = marker
        self.max_keys = max_keys
        self.max_in_flight = max_in_flight
        self.hold_s = hold_s
        self._in_flight = 0
        self._scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        script = READ_SCRIPT if marker is None else READ_MARKED_SCRIPT
        self._head = resp.bulk(b"EVAL") + resp.bulk(script.encode())
        self._fields = b"".join(resp.bulk(f.encode()) for f in fields)
        self._n_fields = len(fields)
        self._hmget_head = resp.array_header(2 + len(fields)) + resp.bulk(b"HMGET")
        self._get_head = resp.array_header(2) + resp.bulk(b"GET")
        self._keys: list[bytes] = []
        self._futures: list[asyncio.Future[Any]] = []
        self._on_batch = on_batch
        self._tasks: set[asyncio.Task[None]] = set()
        # perf_counter, not loop.time(): uvloop's clock ticks in milliseconds
        self._last_read = 0.0
        self._first_queued = 0.0  # when the oldest queued key came
        self._round_trip = 0.0  # send -> reply of the last batch, seconds
        self.clustered = 0.0  # running share of reads within the last round trip of the one before

    def command(self, keys: Sequence[bytes]) -> bytes:
        """`EVAL READ_SCRIPT n key... field...` as RESP (with a marker: READ_MARKED_SCRIPT over
        the keys, then their marker keys)."""
        if self._marker is not None:
            keys = [*keys, *[self._marker(k) for k in keys]]
        n = len(keys)
        return b"".join(
            (
                resp.array_header(3 + n + self._n_fields),
                self._head,
                resp.bulk(b"%d" % n),
                *[resp.bulk(k) for k in keys],
                self._fields,
            )
        )

    def hmget(self, key: bytes) -> bytes:
        """`HMGET key field...` as RESP: the reply is the one row `command` would give."""
        return self._hmget_head + resp.bulk(key) + self._fields

    async def read_many(self, keys: Sequence[bytes]) -> list[Any]:
        """One round trip: the raw field values of each key (None where absent)."""
        return list(await self.conn.call(self.command(keys)))

    @property
    def holding(self) -> bool:
        return self.hold_s > 0 and self.clustered > self.CLUSTERED

    def read(self, key: bytes) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        if self.hold_s > 0:
            now = time.perf_counter()
            near = 1.0 if now - self._last_read < self._round_trip else 0.0
            self.clustered += (near - self.clustered) * self._EWMA
            self._last_read = now
            if not self._keys:
                self._first_queued = now
        self._keys.append(key)
        self._futures.append(fut)
        if self._in_flight >= self.max_in_flight:
            return fut  # the reply in flight schedules it
        if self._timer is not None and len(self._keys) >= self.max_keys:
            self._flush()  # a full batch does not wait out its hold
        elif not self._scheduled:
            self._schedule(loop)
        return fut

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        self._scheduled = True
        if self.holding:  # until the oldest queued key has waited hold_s
            wait = self._first_queued + self.hold_s - time.perf_counter()
            self._timer = loop.call_later(max(wait, 0.0), self._flush_held)
        elif self.hold_s > 0:  # not clustered: nothing is coming to share the trip, go now
            self._flush()
        else:  # no hold: the next loop turns are the only chance to share the trip
            loop.call_soon(self._flush_later)

    def _flush_held(self) -> None:
        # A hold that caught nobody: the reads are not clustered (any more). Otherwise a server
        # that falls quiet after a burst would hold its lone reads until the running share
        # decays, dozens of reads of `hold_s` each.
        if len(self._keys) == 1:
            self.clustered = 0.0
        self._flush()

    def _flush_later(self) -> None:
        # one more loop turn: gRPC hands the loop about one new RPC per turn
        asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._keys or self._in_flight >= self.max_in_flight:
            return  # the reply in flight flushes these
        n = self.max_keys
        keys, futures = self._keys[:n], self._futures[:n]
        del self._keys[:n], self._futures[:n]
        if self._on_batch is not None:
            self._on_batch(len(keys))
        self._in_flight += 1
        if self.conn.connected:  # the common case: no task, just a reply callback
            # one key: a plain HMGET, which Redis answers without a script call
            single = len(keys) == 1
            if not single:
                reply = self.conn.submit(self.command(keys))
            elif self._marker is None:
                reply = self.conn.submit(self.hmget(keys[0]))
            else:  # HMGET and GET of the marker, pipelined: one round trip
                reply = self._hmget_marked(keys[0])
            reply.add_done_callback(
                functools.partial(self._deliver, futures, time.perf_counter(), single)
            )
        else:  # (re)connect first
            task = asyncio.ensure_future(self._run(keys, futures))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if self._keys:  # more than max_keys were waiting
            self._flush()

    def _hmget_marked(self, key: bytes) -> asyncio.Future[Any]:
        assert self._marker is not None
        row, marker = self.conn.submit_pair(
            self.hmget(key) + self._get_head + resp.bulk(self._marker(key))
        )
        both: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        marker.add_done_callback(functools.partial(_join_marker, row, both))
        return both

    def _deliver(
        self,
        futures: list[asyncio.Future[Any]],
        sent: float,
        single: bool,
        reply: asyncio.Future[Any],
    ) -> None:
        self._in_flight -= 1
        if sent:
            self._round_trip = time.perf_counter() - sent
        if self._keys and not self._scheduled:  # the keys that queued up during this trip
            if self.holding and len(self._keys) < self.max_keys:
                self._schedule(asyncio.get_running_loop())  # wait out the oldest one's hold
            else:
                self._flush()  # go now
        if reply.cancelled():
            for f in futures:
                f.cancel()
            return
        e = reply.exception()
        if e is not None:
            for f in futures:
                if not f.done():
                    f.set_exception(e)
            return
        rows = [reply.result()] if single else reply.result()
        for f, row in zip(futures, rows, strict=True):
            if f.done():
                continue
            if row.__class__ is list:
                f.set_result(row)
            else:  # this key's own error reply (READ_SCRIPT's pcall): this caller alone
                f.set_exception(redis.ResponseError(str(row)))

    async def _run(self, keys: list[bytes], futures: list[asyncio.Future[Any]]) -> None:
        reply: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        try:
            reply.set_result(await self.read_many(keys))
        except (redis.RedisError, OSError) as e:
            reply.set_exception(e)
        except asyncio.CancelledError:
            self._in_flight -= 1
            for f in futures:
                f.cancel()
            raise
        self._deliver(futures, 0.0, False, reply)  # a reconnect: no round trip to learn from


def _join_marker(row: asyncio.Future[Any], both: asyncio.Future[Any], marker: Any) -> None:
    """The HMGET row with the marker's value appended (replies come in order: the row's first).
    A marker of the wrong type reads as none."""
    if both.done():
        return
    if row.cancelled() or marker.cancelled():
        both.cancel()
        return
    if not row.done():
        both.set_exception(redis.TimeoutError("no redis reply to the stored read"))
        return
    e = row.exception()
    m = marker.exception()
    if e is not None:
        both.set_exception(e)
    elif m is not None and not isinstance(m, redis.ResponseError):
        both.set_exception(m)
    else:
        both.set_result([*row.result(), None if m is not None else marker.result()])
