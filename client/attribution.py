"""Synchronous attribution client: direct batches, micro-batched single submissions, thin-client bytes.

    with AttributionClient("127.0.0.1:8001") as client:     # or "a:8001,b:8001" / a list: a fleet of replicas
        client.attribute("photo.jpg")                 # -> Attribution
        client.attribute(batch_uint8_nhwc)            # -> list[Attribution]
        futures = [client.submit(p) for p in paths]   # grouped into batches behind the scenes
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from aigis import contract

from .batcher import BatchStats, MicroBatcher
from .endpoints import EndpointHealth
from .errors import InvalidInputError, ManifestError
from .images import ImageLike, ImagePreparer, as_items, describe, is_single
from .manifest import Manifest, ServedModel
from .results import Attribution, attributions
from .retry import DEFAULT_DEADLINE_S, RetryPolicy
from .transport import Answer, Transport, bytes_array



class Prepared(NamedTuple):
    """One checked input, ready to send, with the name its errors should carry."""

    name: str                       # the file path, or images[i]
    payload: Any                    # uint8 [crop, crop, 3] array, or encoded bytes for the bytes model


class AttributionCodec:
    """Everything model-specific about a request: what to send, in which chunks, how to read answers.

    Shared by the sync and asyncio clients so that both send byte-identical requests.
    """

    OUTPUTS = (contract.PROBS,)

    def __init__(self, served: ServedModel, manifest: Manifest, max_batch_size: int) -> None:
        if served.input_datatype not in ("UINT8", "BYTES"):
            raise ManifestError(f"model {served.name!r} input {served.input_name} is {served.input_datatype}")
        if contract.PROBS not in served.output_names:
            raise ManifestError(f"model {served.name!r} has no {contract.PROBS} output ({list(served.output_names)})")
        self.served = served
        self.manifest = manifest
        # Answers are read with the manifest of the version that produced them: during a rollout the server
        # answers with the old and the new version side by side. A config that pins no version describes
        # whichever version answers (key None).
        self._manifests: dict[str | None, Manifest] = {}
        self.learn(served, manifest)
        self.preparer = ImagePreparer(manifest.crop)
        limit = served.max_batch_size if served.max_batch_size > 0 else 1
        self.max_batch_size = max(1, min(max_batch_size, limit))

    def learn(self, served: ServedModel, manifest: Manifest) -> None:
        """Remember `manifest` for the versions `served`'s config serves; it becomes the current manifest."""
        if manifest.crop != self.manifest.crop or served.input_name != self.served.input_name:
            raise ManifestError(f"model {served.name!r} now takes {served.input_name} at crop {manifest.crop}, "
                                f"this client was opened for {self.served.input_name} at crop {self.manifest.crop}: "
                                f"open a new client")
        for version in served.versions or (None,):
            self._manifests[version] = manifest
        self.manifest = manifest

    def manifest_for(self, version: str) -> Manifest | None:
        """The manifest of `version`, if this client has seen that version's config."""
        return self._manifests.get(version) or self._manifests.get(None)

    @staticmethod
    def expected_inputs() -> tuple[str, ...]:
        return (contract.IMAGES, contract.IMAGE_BYTES)

    def prepare(self, item: ImageLike, index: int | None = None) -> Prepared:
        """Decode/check one input now, in the caller's thread, so bad input fails before sending."""
        name = describe(item, index)
        if self.served.takes_bytes:
            return Prepared(name, self.preparer.encoded(item, index))
        return Prepared(name, self.preparer.pixels(item, index))

    def prepare_all(self, images: Any) -> tuple[list[Prepared], bool]:
        single = is_single(images)
        items = as_items(images)
        if not items:
            raise InvalidInputError("no images given")
        return [self.prepare(item, None if single else i) for i, item in enumerate(items)], single

    def chunks(self, prepared: list[Prepared]) -> list[list[Prepared]]:
        size = self.max_batch_size
        return [prepared[i : i + size] for i in range(0, len(prepared), size)]

    def request(self, prepared: Sequence[Prepared]) -> dict[str, np.ndarray]:
        payloads = [item.payload for item in prepared]
        if self.served.takes_bytes:
            spec = self.served.inputs[self.served.input_name]
            return {spec.name: bytes_array(payloads).reshape(spec.batch_shape(len(payloads)))}
        return {self.served.input_name: np.stack(payloads)}

    @staticmethod
    def named(item: Prepared, error: BaseException) -> BaseException:
        """A server-side rejection of one input, re-raised with that input's name in front."""
        if isinstance(error, InvalidInputError) and not str(error).startswith(item.name):
            named = InvalidInputError(f"{item.name}: {error}")
            named.__cause__ = error
            return named
        return error

    def read(self, answer: Answer, count: int) -> list[Attribution]:
        """The attributions of one answer, read with its version's manifest (ManifestError if unknown)."""
        probs = answer.arrays[contract.PROBS]
        if probs is None or probs.shape[0] != count:
            raise ManifestError(f"{self.served.name}: expected {count} rows of {contract.PROBS}, got {None if probs is None else probs.shape}")
        manifest = self.manifest_for(answer.model_version)
        if manifest is None:
            raise ManifestError(f"{self.served.name} version {answer.model_version} answered, and its manifest is "
                                f"not served (the server serves {sorted(v for v in self._manifests if v)})")
        if probs.ndim != 2 or probs.shape[1] != len(manifest.class_names):
            raise ManifestError(f"{self.served.name} version {answer.model_version}: {contract.PROBS} has shape "
                                f"{list(probs.shape)}, its manifest names {len(manifest.class_names)} classes")
        return attributions(probs, manifest, answer.model_version)


# How long a client waits for the config of a version that answered but that it has not seen yet: the server
# switches its config when the new version is ready, and answers from it can arrive a moment before.
MANIFEST_WAIT_S = 5.0


def read_answer(codec: AttributionCodec, answer: Answer, count: int,
                refresh: Callable[[Answer], None]) -> list[Attribution]:
    """codec.read, first re-reading the served config (`refresh(answer)`, from the endpoint that answered) while
    the answering version is unknown."""
    deadline = time.monotonic() + MANIFEST_WAIT_S
    while codec.manifest_for(answer.model_version) is None and time.monotonic() < deadline:
        refresh(answer)
        if codec.manifest_for(answer.model_version) is None:
            time.sleep(0.05)
    return codec.read(answer, count)


def resolve_manifest(served: ServedModel, fetch_ensemble: Any) -> Manifest:
    """The served model's own manifest, else (bytes ensemble without one) the image ensemble's."""
    manifest = served.manifest()
    if manifest is None and served.name != contract.ENSEMBLE_MODEL:
        manifest = fetch_ensemble().manifest()
    if manifest is None:
        raise ManifestError(
            f"model {served.name!r} has no {contract.MANIFEST_PARAMETER!r} parameter in its config"
        )
    return manifest


class AttributionClient:
    """Attribution over gRPC with batching, a bound on requests in flight, deadlines and retries.

    `url` is one Triton gRPC address, or several replicas of one server (a list, or "a:8001,b:8001"): requests
    then go round robin over the healthy ones and fail over when one dies (client/endpoints.py); a name with
    several addresses (a headless Service's) is spread over all of them by gRPC.

    timeout_s bounds each attempt; while the server is unreachable or the model not ready (a restart, a
    load), a request is re-sent after backoff_s * 2**k until deadline_s after its first attempt (and at
    most `retries` times, when given). Reads the manifest (classes, tasks, crop) from the served model on
    creation, and again when an answer comes from a version it has not seen (a rollout).
    """

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
        self.model = model
        self.version = "" if version is None else str(version)
        self._transport = Transport(url, timeout_s, RetryPolicy(retries, backoff_s, deadline_s=deadline_s))
        self._refresh_lock = threading.Lock()
        try:
            self._codec = AttributionCodec(*self._read_served(), max_batch_size)
        except BaseException:
            self._transport.close()
            raise
        self._in_flight = threading.BoundedSemaphore(max_in_flight)
        self._chunk_pool = ThreadPoolExecutor(max_workers=max_in_flight, thread_name_prefix="aigis-chunks")
        self._batcher: MicroBatcher[Prepared, Attribution] = MicroBatcher(
            self._send_isolating,
            max_batch_size=self._codec.max_batch_size,
            max_delay_s=max_delay_ms / 1000.0,
            max_in_flight=max_in_flight,
        )
        self._closed = False

    # ---- what the server told us -----------------------------------------------------------------
    @property
    def manifest(self) -> Manifest:
        return self._codec.manifest

    @property
    def served(self) -> ServedModel:
        return self._codec.served

    @property
    def class_names(self) -> tuple[str, ...]:
        return self._codec.manifest.class_names

    @property
    def batch_stats(self) -> BatchStats:
        """Sizes of the batches the micro-batcher sent."""
        return self._batcher.stats

    @property
    def urls(self) -> tuple[str, ...]:
        """The endpoints this client sends to (one, or the replicas of a fleet)."""
        return self._transport.endpoints.urls

    def health(self) -> list[EndpointHealth]:
        """What the client knows of each endpoint: healthy or backing off, requests answered and failed over."""
        return self._transport.endpoints.health()

    def statistics(self, model: str | None = None, url: str | None = None) -> dict[str, Any]:
        """The server's inference statistics for `model` (default: the one this client calls), from endpoint `url`
        (default: the first endpoint that answers; each replica of a fleet counts its own requests)."""
        return self._transport.statistics(self.model if model is None else model, "", url)

    # ---- inference -------------------------------------------------------------------------------
    def attribute(self, images: Any) -> Attribution | list[Attribution]:
        """One image -> Attribution; a batch (4-D array or sequence) -> list, in input order.

        Arrays must be uint8 [crop, crop, 3] (the evaluation view); paths and bytes are decoded and
        centre-cropped here with aigis.preprocess. Everything is checked before anything is sent.
        """
        prepared, single = self._codec.prepare_all(images)
        chunks = self._codec.chunks(prepared)
        if len(chunks) == 1:
            outcomes = self._send_isolating(chunks[0])
        else:
            futures = [self._chunk_pool.submit(self._send_isolating, chunk) for chunk in chunks]
            outcomes = [outcome for future in futures for outcome in future.result()]
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return outcomes[0] if single else outcomes  # type: ignore[return-value]

    def submit(self, image: ImageLike) -> "Future[Attribution]":
        """Queue one image for the micro-batcher; the future resolves with its Attribution or error.

        Raises InvalidInputError at once for an unusable input, ClientClosedError after close().
        """
        return self._batcher.submit(self._codec.prepare(image))

    def _read_served(self, prefer: str | None = None) -> tuple[ServedModel, Manifest]:
        served = self._transport.served_model(self.model, self.version, AttributionCodec.expected_inputs(), prefer)
        # A model without a manifest (lorax_bytes) borrows the image ensemble's, from the same replica.
        manifest = resolve_manifest(served, lambda: self._transport.served_model(
            contract.ENSEMBLE_MODEL, "", (contract.IMAGES,), served.source))
        return served, manifest

    def _refresh(self, answer: Answer) -> None:
        """Re-read the served config (a rollout switched the version) from the endpoint that answered (replicas of
        a fleet may serve different versions) and learn its manifest; one thread reads it while the others wait,
        then finds the version known."""
        with self._refresh_lock:
            if self._codec.manifest_for(answer.model_version) is None:
                self._codec.learn(*self._read_served(answer.url))

    def _send(self, prepared: Sequence[Prepared]) -> list[Attribution]:
        with self._in_flight:
            answer = self._transport.infer(self.model, self.version, self._codec.request(prepared), AttributionCodec.OUTPUTS)
        return read_answer(self._codec, answer, len(prepared), self._refresh)

    def _send_isolating(self, prepared: list[Prepared]) -> list[Attribution | BaseException]:
        """Send a micro-batch; if the server rejects its input, resend each image alone so that one
        corrupt upload (bytes model) fails only its own future, not its neighbours'."""
        try:
            return list(self._send(prepared))
        except InvalidInputError as exc:
            if len(prepared) == 1:
                raise self._codec.named(prepared[0], exc) from None
        outcomes: list[Attribution | BaseException] = []
        for item in prepared:
            try:
                outcomes.append(self._send([item])[0])
            except Exception as exc:  # noqa: BLE001 - reported on that item's future
                outcomes.append(self._codec.named(item, exc))
        return outcomes

    # ---- lifetime --------------------------------------------------------------------------------
    def close(self, cancel_pending: bool = False) -> None:
        """Send what was submitted (or fail it with ClientClosedError), wait for it, then disconnect."""
        if self._closed:
            return
        self._closed = True
        if cancel_pending:
            self._transport.abort.set()
        self._batcher.close(cancel_pending=cancel_pending)
        self._chunk_pool.shutdown(wait=True)
        self._transport.close()

    def __enter__(self) -> "AttributionClient":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
