"""Waiting for a server-side value that lags the reply (the test modules import this; tests/ is on sys.path)."""

from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def poll(read: Callable[[], T], done: Callable[[T], bool], timeout: float = 10.0) -> T:
    """read() until done(value) or `timeout` seconds passed; the last value either way.

    Triton records a model's statistics just after it sends the response, so a read right after a call
    can miss the last request. Callers assert on the returned value, so a value that never arrives, or one
    that overshoots, still fails the test.
    """
    deadline = time.monotonic() + timeout
    value = read()
    while not done(value) and time.monotonic() < deadline:
        time.sleep(0.05)
        value = read()
    return value
