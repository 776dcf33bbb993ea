"""One refresh run per model at a time: a Redis lock with a TTL and a fencing token.

    with RefreshLock(store, ttl_s=60, wait_s=0).held() as lock:
        ... lock.token ...            # stamped on the version the run builds (`fence`)
        lock.check()                  # before the index and the flip: RefreshLockLostError once lost

The lock is `ue:{<model>}:refresh_lock` = "<token> <holder>" with a PX TTL; tokens come from
the `ue:{<model>}:fence` counter, so a later holder always has a larger one (key layout:
userembed/vectors.py). A thread renews the TTL every third of it while the run lives; a run
that stalls past the TTL (a stopped process, a lost network) loses the lock, and its flip is
refused because the pointer flip checks the token (`VectorStore.publish_if`). A second run
fails at once with one line naming the holder, or with `wait_s` polls until the lock is free.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

import redis

from refresh.errors import RefreshLockedError, RefreshLockLostError
from userembed.vectors import VectorStore

logger = logging.getLogger(__name__)

# KEYS: lock, fence counter. ARGV: holder, ttl ms. Returns {token, ""} or {0, value held}.
_ACQUIRE = """
local held = redis.call('GET', KEYS[1])
if held then return {0, held} end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], token .. ' ' .. ARGV[1], 'PX', ARGV[2])
return {token, ''}
"""


def unless_token_holds(lock_key: str, token: str) -> str:
    """Lua that returns 0 unless the lock (`lock_key`, e.g. "KEYS[1]") is held by the fencing
    token `token` (e.g. "ARGV[1]"): the one reading of the lock's "<token> <holder>" value in
    a script."""
    return (
        f"local held = redis.call('GET', {lock_key}) or ''\n"
        f"if string.match(held, '^%d+') ~= {token} then return 0 end\n"
    )


# KEYS: lock. ARGV: token, ttl ms ("" = release). Returns 1 while the token holds the lock.
_RENEW = (
    unless_token_holds("KEYS[1]", "ARGV[1]")
    + """
if ARGV[2] == '' then redis.call('DEL', KEYS[1]) else redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 1
"""
)


@dataclass(frozen=True)
class LockHolder:
    token: int
    holder: str  # "<host> pid <pid> since <UTC time>"
    ttl_ms: int  # left on the lock when read


def lock_holder(store: VectorStore) -> LockHolder | None:
    """Who holds the refresh lock of the store's model (None: nobody)."""
    pipe = store.r.pipeline(transaction=True)
    pipe.get(store.keys.refresh_lock)
    pipe.pttl(store.keys.refresh_lock)
    value, ttl = pipe.execute()
    if value is None:
        return None
    token, _, holder = value.decode().partition(" ")
    return LockHolder(int(token), holder, int(ttl))


def this_process() -> str:
    since = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"{socket.gethostname()} pid {os.getpid()} since {since}"


class RefreshLock:
    """The refresh lock of one model, held by this process (see module doc)."""

    def __init__(self, store: VectorStore, ttl_s: float, wait_s: float = 0.0) -> None:
        self.store = store
        self.ttl_ms = max(int(ttl_s * 1000), 1)
        self.wait_s = wait_s
        self.holder = this_process()
        self.token = 0
        self._lost = threading.Event()
        self._renewed_at = 0.0  # monotonic time of the last successful take or renewal
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def acquire(self) -> int:
        """Take the lock (waiting up to `wait_s`); returns the fencing token."""
        keys = [self.store.keys.refresh_lock, self.store.keys.fence]
        deadline = time.monotonic() + self.wait_s
        while True:
            token, held = self.store.r.eval(_ACQUIRE, 2, *keys, self.holder, self.ttl_ms)
            if token:
                self.token = int(token)
                self._renewed_at = time.monotonic()
                logger.info(
                    "refresh %s: lock taken, fencing token %d", self.store.keys.model, self.token
                )
                return self.token
            if time.monotonic() >= deadline:
                other = lock_holder(self.store)
                who = f"token {other.token}, {other.holder}" if other else held.decode()
                left = f"{other.ttl_ms / 1000:.0f}s" if other else "?"
                raise RefreshLockedError(
                    f"model {self.store.keys.model}: another refresh holds the lock ({who}; "
                    f"expires in {left} unless renewed); retry later or pass --lock-wait-s"
                )
            time.sleep(min(0.2, max(self.ttl_ms / 4000, 0.01)))

    def _renew(self, release: bool = False) -> bool:
        ttl = "" if release else str(self.ttl_ms)
        return bool(self.store.r.eval(_RENEW, 1, self.store.keys.refresh_lock, self.token, ttl))

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_ms / 3000):
            try:
                if not self._renew():
                    logger.error("refresh %s: lock lost to another run", self.store.keys.model)
                    self._lost.set()
                    return
                self._renewed_at = time.monotonic()
            except redis.RedisError as e:  # keep trying until the TTL has run out
                logger.warning("refresh %s: lock renewal failed: %s", self.store.keys.model, e)
                if self._expired():
                    self._lost.set()
                    return

    def _expired(self) -> bool:
        return time.monotonic() - self._renewed_at > self.ttl_ms / 1000

    def check(self) -> None:
        """Raise RefreshLockLostError once the lock is gone or taken, or may have expired (no
        renewal for a TTL: this process was stopped, the renewals failed)."""
        if self._lost.is_set() or self._expired():
            raise RefreshLockLostError(
                f"model {self.store.keys.model}: refresh lock (token {self.token}) expired or "
                "was taken by another run; this run stops without publishing"
            )

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        try:
            if self.token and not self._renew(release=True):
                logger.warning("refresh %s: lock already gone at release", self.store.keys.model)
        except redis.RedisError as e:  # the TTL frees it
            logger.warning("refresh %s: lock release failed: %s", self.store.keys.model, e)

    @contextmanager
    def held(self) -> Iterator[RefreshLock]:
        self.acquire()
        self._renewer = threading.Thread(target=self._renew_loop, name="refresh-lock", daemon=True)
        self._renewer.start()
        try:
            yield self
        finally:
            self.release()
