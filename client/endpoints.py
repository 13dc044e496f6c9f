"""The endpoints a client talks to: several replicas of one server, or one, and which gets the next request.

A client takes one endpoint or a fleet: a list of addresses, or one string "a:8001,b:8001,c:8001". Requests go
round robin over the healthy endpoints. An endpoint that fails a request in a way that passes (unreachable,
its model not ready, an attempt that timed out) is marked down for a back-off (0.25 s, doubling to 2 s while it
keeps failing) and the same request goes at once to the next endpoint, within the request's own deadline.
Endpoints marked down are skipped until their back-off expires; the next request then tries them again, and
the first one answered marks the endpoint healthy (that request is the health check: if the endpoint is still
down it costs a refused connection, and the request moves on). When every endpoint has failed, the request waits
its retry back-off (client/retry.py) and tries the whole fleet again until its deadline.

Errors that are the caller's (invalid input, a model or version that does not exist) or the server's own
(INTERNAL) are raised at once: the same request would fail the same way on any replica. A fleet of one
endpoint behaves exactly as a single-server client.

A gRPC target that resolves to several addresses -- a DNS name such as a Kubernetes headless Service's
(`name:8001` or `dns:///name:8001`), or gRPC's own list `ipv4:10.0.0.1:8001,10.0.0.2:8001` -- is ONE endpoint
here: its channel balances over every address with gRPC's round_robin policy, skipping addresses whose
connection is down (see `channel_options`).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from .errors import (ClientError, DeadlineExceededError, InvalidInputError, ModelNotFoundError, ModelNotReadyError,
                     ServerUnavailableError)

# gRPC's own address lists hold commas of their own: such a string is one target, not a list to split.
LIST_SCHEMES = ("ipv4:", "ipv6:")

DOWN_S = 0.25        # first back-off of an endpoint that failed
MAX_DOWN_S = 2.0     # longest back-off (an endpoint down for good is retried this often, by one request)


def parse_urls(urls: str | Sequence[str]) -> tuple[str, ...]:
    """One address, "a:8001,b:8001" or a list of addresses -> the endpoints, each once, in the given order.

    The string and the list forms give the same endpoints; `ipv4:`/`ipv6:` targets (gRPC's own lists) are kept
    whole. Raises InvalidInputError when no endpoint is given."""
    items = [urls] if isinstance(urls, str) else list(urls)
    found: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise InvalidInputError(f"url: expected a 'host:port' string, got {type(item).__name__}")
        text = item.strip()
        for url in ([text] if text.startswith(LIST_SCHEMES) else text.split(",")):
            url = url.strip()
            if url and url not in found:
                found.append(url)
    if not found:
        raise InvalidInputError(f"url: no endpoint given in {urls!r} (one 'host:port', or several separated by commas)")
    return tuple(found)


def channel_options(url: str) -> list[tuple[str, Any]]:
    """The channel options for one endpoint on top of the shared ones: round_robin over whatever addresses its name
    resolves to. gRPC's default, pick_first, would send everything to the first address; for a name with one
    address the two behave the same.

    gRPC resolves a DNS name again when a connection breaks, not on a timer: replicas added behind a name are
    found when one of the current connections closes (or by a new client)."""
    return [("grpc.lb_policy_name", "round_robin")]


def fails_over(error: BaseException) -> bool:
    """Errors that say nothing about the request, only about the endpoint: another endpoint may answer it."""
    if isinstance(error, ModelNotFoundError):
        return False
    return isinstance(error, (ServerUnavailableError, ModelNotReadyError, DeadlineExceededError))


@dataclass
class EndpointHealth:
    """What the client knows of one endpoint (a snapshot)."""

    url: str
    healthy: bool
    down_for_s: float        # seconds left of its back-off (0 when healthy)
    failures: int            # failures in a row
    answered: int            # requests it answered through this client
    failed_over: int         # requests that failed there and moved to another endpoint (or waited)
    last_error: str


class _State:
    def __init__(self, url: str) -> None:
        self.url = url
        self.down_until = 0.0
        self.failures = 0
        self.answered = 0
        self.failed_over = 0
        self.last_error = ""


class Endpoints:
    """The endpoint set of one client: health per endpoint and the order a request tries them in (thread-safe;
    no I/O, so the asyncio client shares it)."""

    def __init__(self, urls: str | Sequence[str], down_s: float = DOWN_S, max_down_s: float = MAX_DOWN_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.urls = parse_urls(urls)
        self.down_s, self.max_down_s = down_s, max_down_s
        self._clock = clock
        self._states = [_State(url) for url in self.urls]
        self._next = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.urls)

    def __repr__(self) -> str:
        return f"Endpoints({', '.join(self.urls)})"

    def index(self, url: str) -> int:
        """The position of endpoint `url` (InvalidInputError if it is not one of them)."""
        if url not in self.urls:
            raise InvalidInputError(f"{url!r} is not one of this client's endpoints ({', '.join(self.urls)})")
        return self.urls.index(url)

    def order(self, prefer: str | None = None, rotate: bool = True) -> list[int]:
        """The order in which one attempt tries the endpoints: `prefer` first (when it is one of them), then the
        healthy ones round robin, then those marked down, the soonest back first. A call that prefers an endpoint,
        or `rotate=False`, reads the order without moving the turn on."""
        with self._lock:
            now = self._clock()
            count = len(self._states)
            rotation = [(self._next + k) % count for k in range(count)]
            healthy = [i for i in rotation if self._states[i].down_until <= now]
            down = sorted((i for i in rotation if self._states[i].down_until > now),
                          key=lambda i: self._states[i].down_until)
            if healthy and rotate and prefer is None:
                self._next = (healthy[0] + 1) % count
            order = healthy + down
            if prefer in self.urls:
                first = self.urls.index(prefer)
                order.remove(first)
                order.insert(0, first)
            return order

    def succeeded(self, index: int) -> None:
        with self._lock:
            state = self._states[index]
            state.answered += 1
            state.failures = 0
            state.down_until = 0.0

    def failed(self, index: int, error: BaseException) -> None:
        """Mark endpoint `index` down after a failure that fails over, for a back-off that grows while it keeps
        failing."""
        with self._lock:
            state = self._states[index]
            state.failures += 1
            state.failed_over += 1
            state.last_error = f"{type(error).__name__}: {error}"
            back_off = min(self.max_down_s, self.down_s * 2 ** min(state.failures - 1, 30))
            state.down_until = max(state.down_until, self._clock() + back_off)

    def health(self) -> list[EndpointHealth]:
        with self._lock:
            now = self._clock()
            return [EndpointHealth(s.url, s.down_until <= now, max(0.0, s.down_until - now), s.failures, s.answered,
                                   s.failed_over, s.last_error) for s in self._states]

    def attempt(self, left_s: float, timeout_s: float, prefer: str | None = None) -> "FleetAttempt":
        """One attempt of a request over the endpoints, in `order(prefer)`."""
        return FleetAttempt(self, left_s, timeout_s, self.order(prefer))


class FleetAttempt:
    """One attempt of one request over the fleet: each endpoint at most once, in `Endpoints.order`, each call
    within the per-call timeout and the time left before the request's deadline.

        tries = endpoints.attempt(left_s, timeout_s)
        for index, timeout in tries:
            try:
                result = call(clients[index], timeout)
            except ClientError as error:
                tries.failed(index, error)     # raises what must not fail over
                continue
            tries.succeeded(index)
            return result
        raise tries.error()
    """

    def __init__(self, endpoints: Endpoints, left_s: float, timeout_s: float, order: Sequence[int]) -> None:
        self.endpoints = endpoints
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + left_s
        self.order = list(order)
        self.errors: list[tuple[str, ClientError]] = []

    def __iter__(self) -> Iterator[tuple[int, float]]:
        for position, index in enumerate(self.order):
            left = self.deadline - time.monotonic()
            if position > 0 and left <= 0:
                return
            yield index, max(0.001, min(self.timeout_s, left))

    def succeeded(self, index: int) -> None:
        self.endpoints.succeeded(index)

    def failed(self, index: int, error: ClientError) -> None:
        """Note the failure of endpoint `index` and mark it down; raise `error` itself when another endpoint would
        fail the same way (bad input, no such model, a server error)."""
        if not fails_over(error):
            raise error
        self.endpoints.failed(index, error)
        self.errors.append((self.endpoints.urls[index], error))

    def error(self) -> ClientError:
        """The error of an attempt no endpoint answered: the one error of a single endpoint as it was; for several,
        one error naming every endpoint and what each said (ModelNotReadyError or DeadlineExceededError when all
        said that, else ServerUnavailableError)."""
        if not self.errors:
            return ServerUnavailableError(f"no endpoint of {', '.join(self.endpoints.urls)} was tried")
        if len(self.errors) == 1:
            return self.errors[0][1]
        kinds = {type(error) for _, error in self.errors}
        kind: type[ClientError] = kinds.pop() if len(kinds) == 1 else ServerUnavailableError
        said = "; ".join(str(error) if url in str(error) else f"{url}: {error}" for url, error in self.errors)
        tried = [url for url, _ in self.errors]
        untried = [url for url in self.endpoints.urls if url not in tried]
        text = f"none of {len(self.endpoints)} endpoints answered ({', '.join(self.endpoints.urls)}): {said}"
        if untried:
            text += f" (no time left to try {', '.join(untried)})"
        return kind(text)
