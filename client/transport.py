"""The gRPC connections to Triton (one server, or a fleet of replicas) with the policies every call shares:
deadline, retries, failing over between endpoints, typed errors.

The attribution and protection clients (sync and asyncio) differ only in what they send; how a call
is made, retried, sent to which endpoint and how its failure is reported lives here, once per flavour.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import Any, Awaitable, Callable, Sequence, TypeVar

import numpy as np

from .endpoints import Endpoints, FleetAttempt, channel_options
from .errors import ClientClosedError, ClientError, ModelNotFoundError, ModelNotReadyError, from_triton
from .manifest import ServedModel
from .retry import RetryPolicy

T = TypeVar("T")

_MAX_MESSAGE = 2**31 - 1


def channel_args(reconnect_backoff_ms: int = 100, max_reconnect_backoff_ms: int = 1000) -> list[tuple[str, Any]]:
    """gRPC channel options: big messages (image batches) and a short reconnect backoff.

    gRPC's default reconnect backoff grows to minutes; a client that retries for a few seconds while a
    server restarts would then keep failing after the server is back. Capping it makes retries useful.
    """
    return [
        ("grpc.max_send_message_length", _MAX_MESSAGE),
        ("grpc.max_receive_message_length", _MAX_MESSAGE),
        ("grpc.initial_reconnect_backoff_ms", reconnect_backoff_ms),
        ("grpc.min_reconnect_backoff_ms", reconnect_backoff_ms),
        ("grpc.max_reconnect_backoff_ms", max_reconnect_backoff_ms),
        ("grpc.keepalive_time_ms", 2**31 - 1),
        ("grpc.keepalive_timeout_ms", 20000),
    ]


def make_input(module: Any, name: str, array: np.ndarray) -> Any:
    """An InferInput (from tritonclient.grpc, whose InferInput the aio client shares) for a numpy array."""
    datatype = "BYTES" if array.dtype == object else module.np_to_triton_dtype(array.dtype)
    tensor = module.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def bytes_array(items: Sequence[bytes | str]) -> np.ndarray:
    """A 1-D object array, the form tritonclient sends as a BYTES tensor."""
    array = np.empty(len(items), dtype=object)
    array[:] = [item.encode("utf-8") if isinstance(item, str) else bytes(item) for item in items]
    return array


def explain_not_ready(name: str, version: str, url: str, index: dict[str, Any] | None,
                      ready: dict[str, list[str]] | None = None) -> ModelNotReadyError:
    """Say WHY a model is not ready, from the server's repository index.

    "no such model" (a typo, a missing export), "no such version" and "present but not loaded" call
    for different fixes, so the message names which one it is and what the server does have. A server
    whose index needs the control key (`aigis serve`) tells only what is ready (`ready`: model -> ready
    versions, from the open metadata and statistics APIs): a model with no ready version may be loading
    (a restart), so that error is one worth retrying.
    """
    what = f"{name!r}" + (f" version {version}" if version else "")
    if index is None:
        if ready is None:
            return ModelNotReadyError(f"{what} at {url}: model is not ready")
        if ready.get(name) and version:
            return ModelNotFoundError(f"{what} at {url} is not loaded (ready versions of {name!r}: "
                                      f"{', '.join(ready[name])})")
        return ModelNotReadyError(f"{what} at {url} is not ready: it is loading, not loaded, or does not exist "
                                  f"(ready models: {', '.join(sorted(ready)) or 'none'})")
    entries = [entry for entry in index.get("models", []) if isinstance(entry, dict)]
    ready_names = sorted({str(e.get("name")) for e in entries if e.get("state") == "READY"})
    mine = [e for e in entries if e.get("name") == name]
    if not mine:
        return ModelNotFoundError(f"no model named {name!r} at {url} (ready models: {', '.join(ready_names) or 'none'})")
    ready_versions = sorted({str(e.get("version")) for e in mine if e.get("state") == "READY" and e.get("version")})
    if version and ready_versions:
        return ModelNotFoundError(
            f"{what} at {url} is not loaded (ready versions of {name!r}: {', '.join(ready_versions)})"
        )
    states = "; ".join(
        f"{e.get('state') or 'not loaded'}" + (f": {e['reason']}" if e.get("reason") else "") for e in mine
    )
    return ModelNotReadyError(f"{what} at {url} is in the model repository but not ready ({states})")


def ready_from_statistics(statistics: dict[str, Any] | None) -> dict[str, list[str]] | None:
    """model -> ready versions, from the statistics API (open to every client, unlike the index)."""
    if statistics is None:
        return None
    ready: dict[str, list[str]] = {}
    for entry in statistics.get("model_stats", []):
        ready.setdefault(str(entry.get("name")), []).append(str(entry.get("version")))
    return ready


class Answer:
    """Named outputs of one response, the version that produced them and the endpoint that answered."""

    def __init__(self, result: Any, outputs: Sequence[str], url: str = "") -> None:
        self.arrays = {name: result.as_numpy(name) for name in outputs}
        self.model_version = str(result.get_response().model_version)
        self.url = url


def _what_served(name: str, version: str) -> Callable[[str], str]:
    return lambda url: f"{name} (version {version or 'latest'}) at {url}"


def _statistics_of(model: str) -> Callable[[str], str]:
    return lambda url: f"statistics of {model or 'all models'} at {url}"


class Transport:
    """Synchronous calls to one Triton server or to a fleet of replicas (client/endpoints.py); thread-safe: unary
    calls share one channel per endpoint."""

    def __init__(self, url: str | Sequence[str], timeout_s: float, retry: RetryPolicy) -> None:
        import tritonclient.grpc as grpcclient

        self._grpc = grpcclient
        self.endpoints = Endpoints(url)
        self.url = ",".join(self.endpoints.urls)
        self.timeout_s = timeout_s
        self.retry = retry
        self.abort = threading.Event()  # set to cut retry waits short when the client is closed hard
        self._closed = False
        self._clients: list[Any] = []
        try:
            for endpoint in self.endpoints.urls:
                self._clients.append(grpcclient.InferenceServerClient(
                    endpoint, channel_args=channel_args() + channel_options(endpoint)))
        except BaseException:
            self.close()
            raise

    def _failure(self, exc: Exception, what: str) -> ClientError:
        """The typed error for a failed call; after close() the closed channel's error means just that."""
        if self._closed:
            return ClientClosedError(f"{what}: the client is closed")
        return from_triton(exc, what)

    def _call(self, what: Callable[[str], str], call: Callable[[Any, str, float], T],
              prefer: str | None = None) -> T:
        """call(tritonclient client, its url, timeout) on the fleet: each attempt tries the endpoints in turn
        (client/endpoints.py), and attempts are retried while they fail in ways that pass, until the deadline."""

        def attempt(left_s: float) -> T:
            tries = self.endpoints.attempt(left_s, self.timeout_s, prefer)
            for index, timeout in tries:
                url = self.endpoints.urls[index]
                try:
                    result = call(self._clients[index], url, timeout)
                except ClientError as error:
                    failure = error
                except Exception as exc:
                    failure = self._failure(exc, what(url))
                else:
                    tries.succeeded(index)
                    return result
                tries.failed(index, failure)
            raise tries.error()

        return self.retry.call(attempt, self.abort)

    def served_model(self, name: str, version: str, expected_inputs: tuple[str, ...],
                     prefer: str | None = None) -> ServedModel:
        """Check the model is ready, then read its config (both with retries while the server is down); `prefer`:
        the endpoint to ask first (the one whose answer named a version this client has not seen)."""

        def call(client: Any, url: str, timeout: float) -> ServedModel:
            if not client.is_model_ready(name, version, client_timeout=timeout):
                raise explain_not_ready(name, version, url, *self._index(client))
            config = client.get_model_config(name, version, as_json=True, client_timeout=timeout)
            return replace(ServedModel.from_config(config, expected_inputs), source=url)

        return self._call(_what_served(name, version), call, prefer)

    def infer(self, model: str, version: str, inputs: dict[str, np.ndarray], outputs: Sequence[str]) -> Answer:
        """One inference: each attempt within timeout_s, failed over to another endpoint and retried while the
        server or model is away, until the request's deadline."""
        tensors = [make_input(self._grpc, name, array) for name, array in inputs.items()]
        requested = [self._grpc.InferRequestedOutput(name) for name in outputs]

        def call(client: Any, url: str, timeout: float) -> Answer:
            result = client.infer(model, tensors, model_version=version, outputs=requested, client_timeout=timeout)
            return Answer(result, outputs, url)

        return self._call(lambda url: f"{model} at {url}", call)

    def _index(self, client: Any) -> tuple[dict[str, Any] | None, dict[str, list[str]] | None]:
        """(the repository index, or None where it needs the control key; what is ready, from statistics)."""
        try:
            return client.get_model_repository_index(as_json=True, client_timeout=self.timeout_s), None
        except Exception:  # noqa: BLE001 - only used to word an error; the caller raises anyway
            pass
        try:
            statistics = client.get_inference_statistics(as_json=True, client_timeout=self.timeout_s)
        except Exception:  # noqa: BLE001
            statistics = None
        return None, ready_from_statistics(statistics)

    def statistics(self, model: str = "", version: str = "", url: str | None = None) -> dict[str, Any]:
        """The per-model statistics (execution and batch counts), as JSON, of endpoint `url`, or else of the first
        endpoint that answers (no retries)."""
        what = _statistics_of(model)
        order = [self.endpoints.index(url)] if url is not None else self.endpoints.order(rotate=False)
        tries = FleetAttempt(self.endpoints, self.timeout_s, self.timeout_s, order)
        for index, timeout in tries:
            try:
                return self._clients[index].get_inference_statistics(model, version, as_json=True,
                                                                     client_timeout=timeout)
            except Exception as exc:
                tries.failed(index, self._failure(exc, what(self.endpoints.urls[index])))
        raise tries.error()

    def close(self) -> None:
        self._closed = True
        for client in self._clients:
            client.close()


class AsyncTransport:
    """The asyncio flavour of Transport, over tritonclient.grpc.aio (create and use inside one loop)."""

    def __init__(self, url: str | Sequence[str], timeout_s: float, retry: RetryPolicy) -> None:
        import tritonclient.grpc as grpcclient
        import tritonclient.grpc.aio as aioclient

        self._grpc = grpcclient
        self.endpoints = Endpoints(url)
        self.url = ",".join(self.endpoints.urls)
        self.timeout_s = timeout_s
        self.retry = retry
        self._clients = [aioclient.InferenceServerClient(endpoint,
                                                         channel_args=channel_args() + channel_options(endpoint))
                         for endpoint in self.endpoints.urls]

    async def _call(self, what: Callable[[str], str], call: Callable[[Any, str, float], Awaitable[T]],
                    prefer: str | None = None) -> T:
        async def attempt(left_s: float) -> T:
            tries = self.endpoints.attempt(left_s, self.timeout_s, prefer)
            for index, timeout in tries:
                url = self.endpoints.urls[index]
                try:
                    result = await call(self._clients[index], url, timeout)
                except ClientError as error:
                    failure = error
                except Exception as exc:
                    failure = from_triton(exc, what(url))
                else:
                    tries.succeeded(index)
                    return result
                tries.failed(index, failure)
            raise tries.error()

        return await self.retry.acall(attempt)

    async def served_model(self, name: str, version: str, expected_inputs: tuple[str, ...],
                           prefer: str | None = None) -> ServedModel:
        async def call(client: Any, url: str, timeout: float) -> ServedModel:
            if not await client.is_model_ready(name, version, client_timeout=timeout):
                raise explain_not_ready(name, version, url, *await self._index(client))
            config = await client.get_model_config(name, version, as_json=True, client_timeout=timeout)
            return replace(ServedModel.from_config(config, expected_inputs), source=url)

        return await self._call(_what_served(name, version), call, prefer)

    async def infer(
        self, model: str, version: str, inputs: dict[str, np.ndarray], outputs: Sequence[str]
    ) -> Answer:
        tensors = [make_input(self._grpc, name, array) for name, array in inputs.items()]
        requested = [self._grpc.InferRequestedOutput(name) for name in outputs]

        async def call(client: Any, url: str, timeout: float) -> Answer:
            result = await client.infer(model, tensors, model_version=version, outputs=requested,
                                        client_timeout=timeout)
            return Answer(result, outputs, url)

        return await self._call(lambda url: f"{model} at {url}", call)

    async def _index(self, client: Any) -> tuple[dict[str, Any] | None, dict[str, list[str]] | None]:
        try:
            return await client.get_model_repository_index(as_json=True, client_timeout=self.timeout_s), None
        except Exception:  # noqa: BLE001 - only used to word an error; the caller raises anyway
            pass
        try:
            statistics = await client.get_inference_statistics(as_json=True, client_timeout=self.timeout_s)
        except Exception:  # noqa: BLE001
            statistics = None
        return None, ready_from_statistics(statistics)

    async def statistics(self, model: str = "", version: str = "", url: str | None = None) -> dict[str, Any]:
        what = _statistics_of(model)
        order = [self.endpoints.index(url)] if url is not None else self.endpoints.order(rotate=False)
        tries = FleetAttempt(self.endpoints, self.timeout_s, self.timeout_s, order)
        for index, timeout in tries:
            try:
                return await self._clients[index].get_inference_statistics(model, version, as_json=True,
                                                                           client_timeout=timeout)
            except Exception as exc:
                tries.failed(index, from_triton(exc, what(self.endpoints.urls[index])))
        raise tries.error()

    async def close(self) -> None:
        for client in self._clients:
            await client.close()
