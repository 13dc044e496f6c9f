"""Exponential backoff for the one failure worth retrying: the server being unreachable.

A deadline, a bad input or a server-side error would fail the same way again, so those are raised at
once; an unavailable server (restarting, briefly overloaded) often answers a moment later.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterator, TypeVar

from .errors import ClientClosedError, is_retryable

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """`retries` extra attempts after the first, waiting backoff_s * 2**k (+-jitter) before attempt k+1."""

    retries: int = 3
    backoff_s: float = 0.1
    max_backoff_s: float = 10.0
    jitter: float = 0.1           # fraction of each delay, randomised so that clients do not retry in step

    def __post_init__(self) -> None:
        if self.retries < 0 or self.backoff_s < 0:
            raise ValueError("retries and backoff_s must be >= 0")

    def delays(self) -> Iterator[float]:
        for attempt in range(self.retries):
            delay = min(self.max_backoff_s, self.backoff_s * (2**attempt))
            yield delay * (1 + self.jitter * (2 * random.random() - 1))

    def budget_s(self) -> float:
        """The longest total wait between attempts: how long a server may be gone without failing calls."""
        return sum(min(self.max_backoff_s, self.backoff_s * (2**k)) * (1 + self.jitter) for k in range(self.retries))

    def call(self, attempt: Callable[[], T], stop: threading.Event | None = None) -> T:
        """Run `attempt`, retrying retryable errors; `stop` aborts the waits when the client is closing."""
        delays = self.delays()
        while True:
            try:
                return attempt()
            except Exception as exc:
                delay = next(delays, None) if is_retryable(exc) else None
                if delay is None:
                    raise
                if stop is not None:
                    if stop.wait(delay):
                        raise ClientClosedError("client closed while waiting to retry") from exc
                else:
                    time.sleep(delay)

    async def acall(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """The asyncio form of `call` (cancellation of the task aborts the wait)."""
        delays = self.delays()
        while True:
            try:
                return await attempt()
            except Exception as exc:
                delay = next(delays, None) if is_retryable(exc) else None
                if delay is None:
                    raise
                await asyncio.sleep(delay)
