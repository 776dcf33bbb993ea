"""A micro-batcher: concurrent requests -> one batched call (feature read + encoder run).

Items wait in a bounded queue (full: OverloadedError -> RESOURCE_EXHAUSTED). A worker takes the
first item, then whatever else is queued, waiting at most `max_wait_s` for the batch to fill
(0: take only what is already there, so a lone request never waits). Items whose caller gave up
(cancelled, e.g. client deadline) or whose deadline passed are dropped before the work starts.
"""

from __future__ import annotations

import asyncio
import logging
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
        self._queue: asyncio.Queue[_Item[T, R]] = asyncio.Queue(maxsize=queue_size)
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
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if not item.future.done():
                item.future.set_exception(OverloadedError(f"{self.name}: server shutting down"))

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def submit_many(
        self, values: Sequence[T], deadline: float | None = None
    ) -> list[asyncio.Future[R]]:
        """Queue all `values` or none (OverloadedError when they do not all fit)."""
        free = self._queue.maxsize - self._queue.qsize()
        if len(values) > free:
            raise OverloadedError(
                f"{self.name}: queue full ({self._queue.qsize()}/{self._queue.maxsize} pending)"
            )
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[R]] = []
        for v in values:
            fut: asyncio.Future[R] = loop.create_future()
            self._queue.put_nowait(_Item(v, fut, deadline))
            futures.append(fut)
        return futures

    async def submit(self, value: T, deadline: float | None = None) -> R:
        (fut,) = self.submit_many([value], deadline)
        return await fut  # cancelling the caller cancels fut: the worker then skips it

    async def _collect(self) -> list[_Item[T, R]]:
        batch = [await self._queue.get()]
        loop = asyncio.get_running_loop()
        until = loop.time() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            left = until - loop.time()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), left))
            except TimeoutError:
                break
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
