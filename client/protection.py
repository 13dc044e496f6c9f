"""Protect-on-upload: send images with their captions to the served MEM model, get protected pairs back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from aigis import contract

from .endpoints import EndpointHealth
from .errors import InvalidInputError, ManifestError
from .images import check_batch
from .retry import DEFAULT_DEADLINE_S, RetryPolicy
from .transport import Transport, bytes_array


@dataclass(frozen=True)
class Protected:
    """Protected images (uint8 [N, H, W, 3], same shape as sent) and their protected captions."""

    images: np.ndarray
    captions: list[str]
    model_version: str


class ProtectionClient:
    """Synchronous client for contract.PROTECT_MODEL, with the same deadline/retry/error policies, on one endpoint
    or a fleet of replicas (a list or "a:8001,b:8001": each batch goes to the next healthy one, failing over)."""

    OUTPUTS = (contract.PROTECTED_IMAGES, contract.PROTECTED_CAPTIONS)

    def __init__(
        self,
        url: str | Sequence[str] = "127.0.0.1:8001",
        model: str = contract.PROTECT_MODEL,
        version: int | str | None = None,
        timeout_s: float = 60,
        retries: int | None = None,
        backoff_s: float = 0.1,
        deadline_s: float = DEFAULT_DEADLINE_S,
    ) -> None:
        self.model = model
        self.version = "" if version is None else str(version)
        self._transport = Transport(url, timeout_s, RetryPolicy(retries, backoff_s, deadline_s=deadline_s))
        try:
            served = self._transport.served_model(model, self.version, (contract.PROTECT_IMAGES,))
        except BaseException:
            self._transport.close()
            raise
        missing = [name for name in self.OUTPUTS if name not in served.output_names]
        if missing:
            self._transport.close()
            raise ManifestError(f"model {model!r} lacks outputs {missing}")
        if contract.PROTECT_CAPTIONS not in served.inputs:
            self._transport.close()
            raise ManifestError(f"model {model!r} lacks input {contract.PROTECT_CAPTIONS}")
        self._captions = served.inputs[contract.PROTECT_CAPTIONS]
        self.max_batch_size = served.max_batch_size if served.max_batch_size > 0 else 1

    def protect(self, images: np.ndarray | Sequence[np.ndarray], captions: str | Sequence[str]) -> Protected:
        """uint8 images [N, H, W, 3] (or one [H, W, 3]) + N captions -> their protected versions."""
        batch = check_batch(_stack(images))
        texts = [captions] if isinstance(captions, str) else list(captions)
        if len(texts) != batch.shape[0]:
            raise InvalidInputError(f"captions: {len(texts)} captions for {batch.shape[0]} images")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise InvalidInputError(f"captions[{i}]: expected str, got {type(text).__name__}")
        out_images, out_captions, version = [], [], ""
        for start in range(0, batch.shape[0], self.max_batch_size):
            stop = start + self.max_batch_size
            answer = self._transport.infer(
                self.model,
                self.version,
                {contract.PROTECT_IMAGES: batch[start:stop], contract.PROTECT_CAPTIONS: self._captions_tensor(texts[start:stop])},
                self.OUTPUTS,
            )
            out_images.append(answer.arrays[contract.PROTECTED_IMAGES])
            out_captions += [_text(value) for value in answer.arrays[contract.PROTECTED_CAPTIONS].reshape(-1)]
            version = answer.model_version
        return Protected(np.concatenate(out_images).astype(np.uint8, copy=False), out_captions, version)

    @property
    def urls(self) -> tuple[str, ...]:
        """The endpoints this client sends to (one, or the replicas of a fleet)."""
        return self._transport.endpoints.urls

    def health(self) -> list[EndpointHealth]:
        """What the client knows of each endpoint (as AttributionClient.health)."""
        return self._transport.endpoints.health()

    def _captions_tensor(self, texts: list[str]) -> np.ndarray:
        return bytes_array(texts).reshape(self._captions.batch_shape(len(texts)))

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> "ProtectionClient":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def _stack(images: Any) -> Any:
    """A list of same-shaped images -> one array; anything else is left for check_batch to judge."""
    if not isinstance(images, (list, tuple)) or not images:
        return images
    shapes = {(getattr(i, "dtype", None), getattr(i, "shape", None)) for i in images}
    if len(shapes) != 1:
        raise InvalidInputError(f"images: one call takes images of one dtype and shape, got {sorted(map(str, shapes))}")
    return np.stack(images)


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, (bytes, bytearray)) else str(value)
