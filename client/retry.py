"""Retries until a request's deadline, for the failures that pass: a server that is unreachable or whose
model is not ready yet.

A restarting server first refuses connections, then answers while its models load: both heal by themselves,
so a request keeps trying (with backoff) until its own deadline. A bad input, a server-side error or a model
that does not exist would fail the same way again, so those are raised at once.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, TypeVar

from .errors import ClientClosedError, is_retryable

T = TypeVar("T")

# Long enough to cover a supervised server's restart (a few seconds to reload the models, more on a busy host).
DEFAULT_DEADLINE_S = 60.0


@dataclass(frozen=True)
class RetryPolicy:
    """Retry passing failures after backoff_s * 2**k (+-jitter, at most max_backoff_s) until `deadline_s`
    after the first attempt; `retries`, when set, also caps the number of extra attempts."""

    retries: int | None = None
    backoff_s: float = 0.1
    max_backoff_s: float = 1.0
    jitter: float = 0.1           # fraction of each delay, randomised so that clients do not retry in step
    deadline_s: float = DEFAULT_DEADLINE_S

    def __post_init__(self) -> None:
        if (self.retries is not None and self.retries < 0) or self.backoff_s < 0:
            raise ValueError("retries and backoff_s must be >= 0")
        if not self.deadline_s > 0:
            raise ValueError(f"deadline_s must be > 0, got {self.deadline_s}")

    def delay(self, attempt: int) -> float:
        """The wait after failed attempt number `attempt` (1-based)."""
        base = min(self.max_backoff_s, self.backoff_s * (2 ** min(attempt - 1, 30)))
        return base * (1 + self.jitter * (2 * random.random() - 1))

    def call(self, attempt: Callable[[float], T], stop: threading.Event | None = None) -> T:
        """Run attempt(seconds left before the deadline), retrying passing failures; `stop` aborts the waits
        when the client is closing."""
        tries = _Tries(self)
        while True:
            try:
                return attempt(tries.left())
            except Exception as exc:
                delay = tries.next_delay(exc)
                if stop is not None:
                    if stop.wait(delay):
                        raise ClientClosedError("client closed while waiting to retry") from exc
                else:
                    time.sleep(delay)

    async def acall(self, attempt: Callable[[float], Awaitable[T]]) -> T:
        """The asyncio form of `call` (cancellation of the task aborts the wait)."""
        tries = _Tries(self)
        while True:
            try:
                return await attempt(tries.left())
            except Exception as exc:
                await asyncio.sleep(tries.next_delay(exc))


class _Tries:
    """One request's attempts so far, against its policy."""

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self.attempts = 0
        self.started = time.monotonic()
        self.deadline = self.started + policy.deadline_s

    def left(self) -> float:
        """Seconds before the deadline (the next attempt's own timeout is at most this)."""
        self.attempts += 1
        return max(0.001, self.deadline - time.monotonic())

    def next_delay(self, error: Exception) -> float:
        """After a failed attempt (called inside its `except`): the wait before the next one, or raise."""
        if not is_retryable(error):
            raise error
        out_of_tries = self.policy.retries is not None and self.attempts > self.policy.retries
        delay = self.policy.delay(self.attempts)
        if out_of_tries or time.monotonic() + delay >= self.deadline:
            final = gave_up(error, self.attempts, self.started)
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

