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
        delays, attempts, started = self.delays(), 0, time.monotonic()
        while True:
            attempts += 1
            try:
                return attempt()
            except Exception as exc:
                delay = _delay_or_raise(exc, delays, attempts, started)
                if stop is not None:
                    if stop.wait(delay):
                        raise ClientClosedError("client closed while waiting to retry") from exc
                else:
                    time.sleep(delay)

    async def acall(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """The asyncio form of `call` (cancellation of the task aborts the wait)."""
        delays, attempts, started = self.delays(), 0, time.monotonic()
        while True:
            attempts += 1
            try:
                return await attempt()
            except Exception as exc:
                await asyncio.sleep(_delay_or_raise(exc, delays, attempts, started))


def _delay_or_raise(error: Exception, delays: Iterator[float], attempts: int, started: float) -> float:
    """After a failed attempt (called inside its `except`): the wait before the next one, or raise."""
    if not is_retryable(error):
        raise error
    delay = next(delays, None)
    if delay is None:
        final = gave_up(error, attempts, started)
        if final is error:
            raise error
        raise final from error
    return delay


def gave_up(error: Exception, attempts: int, started: float) -> Exception:
    """The last error, its message saying how long we tried: "unavailable" alone hides that we retried."""
    if attempts <= 1:
        return error
    try:
        return type(error)(f"{error} (gave up after {attempts} attempts over {time.monotonic() - started:.1f} s)")
    except Exception:  # noqa: BLE001 - an error type with another constructor: keep it as it is
        return error
