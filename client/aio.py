"""The asyncio attribution client: the same requests, batching and errors as AttributionClient.

    async with AsyncAttributionClient("127.0.0.1:8001") as client:   # or several: "a:8001,b:8001" / a list
        result = await client.attribute("photo.jpg")
        future = await client.submit(image)          # micro-batched
        result = await future

File decoding runs in the default executor so a large JPEG does not stall the event loop.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Sequence

import numpy as np

from aigis import contract

from .attribution import MANIFEST_WAIT_S, AttributionCodec, Prepared, resolve_manifest
from .batcher import AsyncMicroBatcher, BatchStats
from .endpoints import EndpointHealth, parse_urls
from .errors import ClientClosedError, ClientError, InvalidInputError
from .images import ImageLike
from .manifest import Manifest, ServedModel
from .results import Attribution
from .retry import DEFAULT_DEADLINE_S, RetryPolicy
from .transport import AsyncTransport


class AsyncAttributionClient:
    """Asyncio twin of AttributionClient (one endpoint or a fleet of replicas, as there); call `await open()` (or use
    `async with`) before use."""

    def __init__(
        self,
        url: str | Sequence[str] = "127.0.0.1:8001",
        model: str = contract.ENSEMBLE_MODEL,
        version: int | str | None = None,
        max_batch_size: int = 32,
        max_delay_ms: float = 5,
        max_in_flight: int = 4,
        timeout_s: float = 10,
        retries: int | None = None,
        backoff_s: float = 0.1,
        deadline_s: float = DEFAULT_DEADLINE_S,
    ) -> None:
        self.url = url
        self.urls = parse_urls(url)
        self.model = model
        self.version = "" if version is None else str(version)
        self._settings = dict(max_batch_size=max_batch_size, max_delay_ms=max_delay_ms, max_in_flight=max_in_flight)
        self._timeout_s = timeout_s
        self._retry = RetryPolicy(retries, backoff_s, deadline_s=deadline_s)
        self._transport: AsyncTransport | None = None
        self._codec: AttributionCodec | None = None
        self._batcher: AsyncMicroBatcher[Prepared, Attribution] | None = None
        self._in_flight: asyncio.Semaphore | None = None
        self._stats: BatchStats | None = None

    async def open(self) -> "AsyncAttributionClient":
        """Connect and read the manifest (with retries while the server is unavailable)."""
        if self._codec is not None:
            return self
        transport = AsyncTransport(self.urls, self._timeout_s, self._retry)
        try:
            codec = AttributionCodec(*await self._read_served(transport), int(self._settings["max_batch_size"]))
        except BaseException:
            await transport.close()
            raise
        self._transport, self._codec = transport, codec
        in_flight = int(self._settings["max_in_flight"])
        self._in_flight = asyncio.Semaphore(in_flight)
        self._batcher = AsyncMicroBatcher(
            self._send_isolating,
            max_batch_size=codec.max_batch_size,
            max_delay_s=float(self._settings["max_delay_ms"]) / 1000.0,
            max_in_flight=in_flight,
        )
        self._stats = self._batcher.stats
        return self

    @property
    def manifest(self) -> Manifest:
        return self._ready().manifest

    @property
    def batch_stats(self) -> BatchStats:
        """Sizes of the batches the micro-batcher sent (still readable after close)."""
        if self._batcher is None and self._stats is None:
            raise ClientClosedError("call `await client.open()` (or use `async with`) first")
        return self._stats if self._stats is not None else BatchStats()

    def health(self) -> list[EndpointHealth]:
        """As AttributionClient.health: what the client knows of each endpoint."""
        self._ready()
        assert self._transport is not None
        return self._transport.endpoints.health()

    async def statistics(self, model: str | None = None, url: str | None = None) -> dict[str, Any]:
        self._ready()
        assert self._transport is not None
        return await self._transport.statistics(self.model if model is None else model, "", url)

    async def attribute(self, images: Any) -> Attribution | list[Attribution]:
        """One image -> Attribution; a batch -> list in input order (chunks sent concurrently)."""
        codec = self._ready()
        prepared, single = await _off_loop(codec.prepare_all, images)
        chunks = await asyncio.gather(*(self._send_isolating(chunk) for chunk in codec.chunks(prepared)))
        outcomes = [outcome for chunk in chunks for outcome in chunk]
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return outcomes[0] if single else outcomes  # type: ignore[return-value]

    async def submit(self, image: ImageLike) -> "asyncio.Future[Attribution]":
        """Queue one image for the micro-batcher; await the returned future for its result."""
        codec = self._ready()
        prepared = await _off_loop(codec.prepare, image)
        assert self._batcher is not None
        return await self._batcher.submit(prepared)

    async def _read_served(self, transport: AsyncTransport, prefer: str | None = None) -> tuple[ServedModel, Manifest]:
        served = await transport.served_model(self.model, self.version, AttributionCodec.expected_inputs(), prefer)
        ensemble = None
        if served.manifest() is None and served.name != contract.ENSEMBLE_MODEL:
            ensemble = await transport.served_model(contract.ENSEMBLE_MODEL, "", (contract.IMAGES,), served.source)
        return served, resolve_manifest(served, lambda: ensemble)

    async def _send(self, prepared: Sequence[Prepared]) -> list[Attribution]:
        codec = self._ready()
        assert self._transport is not None and self._in_flight is not None
        async with self._in_flight:
            answer = await self._transport.infer(self.model, self.version, codec.request(prepared), codec.OUTPUTS)
        # As AttributionClient: an answer from a version not seen yet (a rollout) -> re-read the served config, from
        # the endpoint that answered.
        deadline = time.monotonic() + MANIFEST_WAIT_S
        while codec.manifest_for(answer.model_version) is None and time.monotonic() < deadline:
            codec.learn(*await self._read_served(self._transport, answer.url))
            if codec.manifest_for(answer.model_version) is None:
                await asyncio.sleep(0.05)
        return codec.read(answer, len(prepared))

    async def _send_isolating(self, prepared: list[Prepared]) -> list[Attribution | BaseException]:
        """As AttributionClient: a server-side input rejection is retried image by image."""
        codec = self._ready()
        try:
            return list(await self._send(prepared))
        except InvalidInputError as exc:
            if len(prepared) == 1:
                raise codec.named(prepared[0], exc) from None
        outcomes: list[Attribution | BaseException] = []
        for item in prepared:
            try:
                outcomes.append((await self._send([item]))[0])
            except ClientError as exc:
                outcomes.append(codec.named(item, exc))
        return outcomes

    async def close(self, cancel_pending: bool = False) -> None:
        """Send (or fail) what was submitted, wait for it, then disconnect."""
        if self._batcher is not None:
            await self._batcher.close(cancel_pending=cancel_pending)
        if self._transport is not None:
            await self._transport.close()
        self._batcher = None
        self._transport = None

    def _ready(self) -> AttributionCodec:
        if self._codec is None:
            raise ClientClosedError("call `await client.open()` (or use `async with`) first")
        if self._transport is None:
            raise ClientClosedError("the client is closed")
        return self._codec

    async def __aenter__(self) -> "AsyncAttributionClient":
        return await self.open()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


async def _off_loop(function: Any, images: Any) -> Any:
    """Decode files in the default executor; arrays are only checked, which is cheap enough inline."""
    items = images if isinstance(images, (list, tuple)) else [images]
    if all(isinstance(item, np.ndarray) for item in items) or isinstance(images, np.ndarray):
        return function(images)
    return await asyncio.get_running_loop().run_in_executor(None, function, images)
