"""A micro-batcher: concurrent requests -> one batched call (feature read + encoder run).

Items wait in a bounded queue (full: OverloadedError -> RESOURCE_EXHAUSTED). A worker takes the
first item, then whatever else is queued, waiting at most `max_wait_s` for the batch to fill
(0: take only what is already there, so a lone request never waits). Items whose caller gave up
(cancelled, e.g. client deadline) or whose deadline passed are dropped before the work starts.
A worker filling a batch sleeps on one future per wait, woken by the next submit or by the
batch's deadline: no task and no timer per item (asyncio.wait_for on Queue.get costs both).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from embed_server.errors import DeadlineExceededError
from userembed.errors import OverloadedError

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

# process(values) -> one result or exception per value, in order.
ProcessFn = Callable[[list[T]], Awaitable[Sequence["R | BaseException"]]]


@dataclass(slots=True)
class _Item(Generic[T, R]):
    value: T
    future: asyncio.Future[R]
    deadline: float | None  # loop.time() after which the result is useless


class MicroBatcher(Generic[T, R]):
    def __init__(
        self,
        name: str,
        process: ProcessFn[T, R],
        max_batch_size: int,
        max_wait_s: float,
        queue_size: int,
        workers: int = 1,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self.name = name
        self._process = process
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.queue_size = queue_size
        self._queue: deque[_Item[T, R]] = deque()
        self._waiters: list[asyncio.Future[None]] = []  # idle workers, woken by a submit
        self._workers = workers
        self._tasks: list[asyncio.Task[None]] = []
        self._on_batch = on_batch

    def start(self) -> None:
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(self._run(), name=f"batcher-{self.name}-{i}")
                for i in range(self._workers)
            ]

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        while self._queue:
            item = self._queue.popleft()
            if not item.future.done():
                item.future.set_exception(OverloadedError(f"{self.name}: server shutting down"))

    @property
    def pending(self) -> int:
        return len(self._queue)

    def submit_many(
        self, values: Sequence[T], deadline: float | None = None
    ) -> list[asyncio.Future[R]]:
        """Queue all `values` or none (OverloadedError when they do not all fit)."""
        queue = self._queue
        if len(values) > self.queue_size - len(queue):
            raise OverloadedError(
                f"{self.name}: queue full ({len(queue)}/{self.queue_size} pending)"
            )
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[R]] = []
        for v in values:
            fut: asyncio.Future[R] = loop.create_future()
            queue.append(_Item(v, fut, deadline))
            futures.append(fut)
        self._wake()
        return futures

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            _set_done(w)

    async def _wait(self, timeout: float | None) -> None:
        """Until the next submit, or `timeout` seconds (None: no limit)."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.append(waiter)
        timer = None if timeout is None else loop.call_later(timeout, _set_done, waiter)
        try:
            await waiter
        finally:
            if timer is not None:
                timer.cancel()
            if waiter in self._waiters:  # cancelled, or woken by the timer
                self._waiters.remove(waiter)

    async def submit(self, value: T, deadline: float | None = None) -> R:
        (fut,) = self.submit_many([value], deadline)
        return await fut  # cancelling the caller cancels fut: the worker then skips it

    async def _collect(self) -> list[_Item[T, R]]:
        queue = self._queue
        while not queue:
            await self._wait(None)
        batch = [queue.popleft()]
        loop = asyncio.get_running_loop()
        until = loop.time() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            if queue:
                batch.append(queue.popleft())
                continue
            left = until - loop.time()
            if left <= 0:
                break
            await self._wait(left)
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            now = loop.time()
            live: list[_Item[T, R]] = []
            for item in batch:
                if item.future.done():  # cancelled by its caller
                    continue
                if item.deadline is not None and now >= item.deadline:
                    item.future.set_exception(DeadlineExceededError("deadline passed in queue"))
                    continue
                live.append(item)
            if not live:
                continue
            if self._on_batch is not None:
                self._on_batch(len(live))
            try:
                results = await self._process([it.value for it in live])
            except asyncio.CancelledError:
                for it in live:
                    if not it.future.done():
                        it.future.set_exception(OverloadedError(f"{self.name}: shutting down"))
                raise
            except Exception as e:  # the whole batch failed: every caller gets the error
                results = [e] * len(live)
            for it, r in zip(live, results, strict=True):
                if it.future.done():
                    continue
                if isinstance(r, BaseException):
                    it.future.set_exception(r)
                else:
                    it.future.set_result(r)


def _set_done(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
