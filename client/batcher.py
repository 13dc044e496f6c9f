"""Micro-batching for single submissions: one request per group instead of one per image.

Each gRPC hop costs about the same for 1 image as for 8, so grouping single submissions (up to
max_batch_size, or whatever arrived within max_delay of the oldest) multiplies throughput. While all
in-flight slots are busy, submissions keep accumulating, so batches grow exactly when the server is
the bottleneck. Every accepted submission's future is resolved: with its result, with the error of its
batch, or with ClientClosedError if the batcher is closed with cancel_pending=True.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Generic, Sequence, TypeVar, Union

from .errors import ClientClosedError

T = TypeVar("T")
R = TypeVar("R")

# A send function returns one entry per item: its result, or the exception for that item alone.
SendFn = Callable[[list[T]], Sequence[Union[R, BaseException]]]


@dataclass
class _Pending(Generic[T, R]):
    item: T
    future: Future
    enqueued_at: float = field(default_factory=time.monotonic)


@dataclass
class BatchStats:
    """What the batcher did, for tests and progress reports."""

    batch_sizes: Counter = field(default_factory=Counter)   # size -> number of batches sent

    @property
    def batches(self) -> int:
        return sum(self.batch_sizes.values())

    @property
    def items(self) -> int:
        return sum(size * count for size, count in self.batch_sizes.items())


class MicroBatcher(Generic[T, R]):
    """Groups `submit`ted items into batches and runs `send` on up to `max_in_flight` of them at once."""

    def __init__(
        self,
        send: SendFn,
        max_batch_size: int = 32,
        max_delay_s: float = 0.005,
        max_in_flight: int = 4,
        max_queue: int | None = None,
        name: str = "aigis-batcher",
    ) -> None:
        if max_batch_size < 1 or max_in_flight < 1 or max_delay_s < 0:
            raise ValueError("max_batch_size and max_in_flight must be >= 1, max_delay_s >= 0")
        self._send = send
        self._max_batch = max_batch_size
        self._max_delay = max_delay_s
        # Back-pressure: a producer faster than the server blocks in submit() instead of growing memory.
        self._max_queue = max_queue or 4 * max_batch_size * max_in_flight
        self._queue: deque[_Pending[T, R]] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._slots = threading.Semaphore(max_in_flight)
        self._pool = ThreadPoolExecutor(max_workers=max_in_flight, thread_name_prefix=f"{name}-send")
        self.stats = BatchStats()
        self._collector = threading.Thread(target=self._collect, name=f"{name}-collect", daemon=True)
        self._collector.start()

    def submit(self, item: T) -> Future:
        """Queue one item; blocks while the queue is full. Raises ClientClosedError after close()."""
        future: Future = Future()
        with self._cond:
            while len(self._queue) >= self._max_queue and not self._closing:
                self._cond.wait()
            if self._closing:
                raise ClientClosedError("the client is closed")
            self._queue.append(_Pending(item, future))
            self._cond.notify_all()
        return future

    def close(self, cancel_pending: bool = False) -> None:
        """Stop accepting; send what is queued (or fail it with ClientClosedError); wait for in-flight batches."""
        with self._cond:
            self._closing = True
            dropped = list(self._queue) if cancel_pending else []
            if cancel_pending:
                self._queue.clear()
            self._cond.notify_all()
        for pending in dropped:
            if pending.future.set_running_or_notify_cancel():
                pending.future.set_exception(ClientClosedError("the client was closed before this image was sent"))
        self._collector.join()
        self._pool.shutdown(wait=True)

    @property
    def pending(self) -> int:
        """Submissions waiting to be grouped (not counting those in flight)."""
        with self._cond:
            return len(self._queue)

    # ---- collector thread -------------------------------------------------------------------------
    def _collect(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return  # closing and drained
            self._slots.acquire()  # wait for a free slot; submissions keep accumulating meanwhile
            batch = self._take_batch()
            if batch:
                self._pool.submit(self._run, batch)
            else:
                self._slots.release()

    def _take_batch(self) -> list[_Pending[T, R]]:
        with self._cond:
            if self._queue:
                deadline = self._queue[0].enqueued_at + self._max_delay
                while len(self._queue) < self._max_batch and not self._closing:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
            batch = []
            while self._queue and len(batch) < self._max_batch:
                pending = self._queue.popleft()
                if pending.future.set_running_or_notify_cancel():  # skip futures the caller cancelled
                    batch.append(pending)
            if batch:
                self.stats.batch_sizes[len(batch)] += 1
            self._cond.notify_all()  # wake producers blocked on a full queue
            return batch

    # ---- sender threads ---------------------------------------------------------------------------
    def _run(self, batch: list[_Pending[T, R]]) -> None:
        try:
            try:
                outcomes = list(self._send([p.item for p in batch]))
                if len(outcomes) != len(batch):
                    raise RuntimeError(f"send returned {len(outcomes)} results for {len(batch)} items")
            except BaseException as exc:  # noqa: BLE001 - whatever happened, every future must hear of it
                outcomes = [exc] * len(batch)
            for pending, outcome in zip(batch, outcomes):
                if isinstance(outcome, BaseException):
                    pending.future.set_exception(outcome)
                else:
                    pending.future.set_result(outcome)
        finally:
            self._slots.release()


class AsyncMicroBatcher(Generic[T, R]):
    """The asyncio form of MicroBatcher: same grouping and guarantees, one event loop, no threads.

    `send` is a coroutine function; create, submit and close from the loop that owns the batcher.
    """

    def __init__(
        self,
        send: Callable[[list[T]], Awaitable[Sequence[Union[R, BaseException]]]],
        max_batch_size: int = 32,
        max_delay_s: float = 0.005,
        max_in_flight: int = 4,
        max_queue: int | None = None,
    ) -> None:
        if max_batch_size < 1 or max_in_flight < 1 or max_delay_s < 0:
            raise ValueError("max_batch_size and max_in_flight must be >= 1, max_delay_s >= 0")
        self._send = send
        self._max_batch = max_batch_size
        self._max_delay = max_delay_s
        self._max_queue = max_queue or 4 * max_batch_size * max_in_flight
        self._queue: deque[_Pending[T, R]] = deque()
        self._cond = asyncio.Condition()
        self._closing = False
        self._slots = asyncio.Semaphore(max_in_flight)
        self._sending: set[asyncio.Task] = set()
        self.stats = BatchStats()
        self._collector = asyncio.get_running_loop().create_task(self._collect())

    async def submit(self, item: T) -> asyncio.Future:
        """Queue one item and return the future of its result; waits while the queue is full."""
        future = asyncio.get_running_loop().create_future()
        async with self._cond:
            await self._cond.wait_for(lambda: len(self._queue) < self._max_queue or self._closing)
            if self._closing:
                raise ClientClosedError("the client is closed")
            self._queue.append(_Pending(item, future))  # type: ignore[arg-type]
            self._cond.notify_all()
        return future

    async def close(self, cancel_pending: bool = False) -> None:
        """Stop accepting; send (or fail) what is queued; wait for the batches in flight."""
        async with self._cond:
            self._closing = True
            dropped = list(self._queue) if cancel_pending else []
            if cancel_pending:
                self._queue.clear()
            self._cond.notify_all()
        for pending in dropped:
            if not pending.future.done():
                pending.future.set_exception(ClientClosedError("the client was closed before this image was sent"))
        await self._collector
        if self._sending:
            await asyncio.gather(*self._sending, return_exceptions=True)

    async def _collect(self) -> None:
        while True:
            async with self._cond:
                await self._cond.wait_for(lambda: bool(self._queue) or self._closing)
                if not self._queue:
                    return
            await self._slots.acquire()
            batch = await self._take_batch()
            if not batch:
                self._slots.release()
                continue
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _take_batch(self) -> list[_Pending[T, R]]:
        async with self._cond:
            if self._queue:
                deadline = self._queue[0].enqueued_at + self._max_delay
                while len(self._queue) < self._max_batch and not self._closing:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    try:
                        await asyncio.wait_for(self._cond.wait(), remaining)
                    except asyncio.TimeoutError:
                        break
            batch = []
            while self._queue and len(batch) < self._max_batch:
                pending = self._queue.popleft()
                if not pending.future.done():  # the caller may have cancelled it
                    batch.append(pending)
            if batch:
                self.stats.batch_sizes[len(batch)] += 1
            self._cond.notify_all()
        return batch

    async def _run(self, batch: list[_Pending[T, R]]) -> None:
        try:
            try:
                outcomes = list(await self._send([p.item for p in batch]))
                if len(outcomes) != len(batch):
                    raise RuntimeError(f"send returned {len(outcomes)} results for {len(batch)} items")
            except BaseException as exc:  # noqa: BLE001 - every future must hear of it, cancellation too
                outcomes = [exc] * len(batch)
                if isinstance(exc, asyncio.CancelledError):
                    outcomes = [ClientClosedError("the request was cancelled")] * len(batch)
            for pending, outcome in zip(batch, outcomes):
                if pending.future.done():
                    continue
                if isinstance(outcome, BaseException):
                    pending.future.set_exception(outcome)
                else:
                    pending.future.set_result(outcome)
        finally:
            self._slots.release()
