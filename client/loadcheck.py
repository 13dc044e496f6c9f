"""Steady loads that count every request, for checking that a rollout or a restart loses nothing.

Each load sends until told to stop and tallies what it sent, what was answered, what failed (by error) and
what was misread: an answer must come from one version, carry that version's classes, and -- when the
caller knows them -- give the label that version is expected to give. Four kinds of caller, as they reach
a server: the sync client's micro-batcher (`client_load`), the asyncio client on the bytes ensemble
(`async_client_load`), and plain tritonclient calls to either ensemble (`tritonclient_load`).

    tally = Tally()
    thread = threading.Thread(target=client_load, args=(url, images, tasks, expected, stop, tally))
"""

from __future__ import annotations

import asyncio
import io
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from aigis import contract

from .aio import AsyncAttributionClient
from .attribution import AttributionClient


@dataclass
class Tally:
    """What one load saw (each load has one writer thread)."""

    sent: int = 0
    answered: int = 0
    misread: list[str] = field(default_factory=list)
    failed: Counter = field(default_factory=Counter)
    versions: Counter = field(default_factory=Counter)

    @property
    def lost(self) -> int:
        """Requests that got neither an answer nor an error."""
        return self.sent - self.answered - sum(self.failed.values())

    def check(self, version: str, labels: list[str], indices: list[int], tasks: Sequence[str],
              expected: dict[str, list[str]] | None) -> None:
        """Count one answer. Ensemble version v serves tasks[:v]; a misread is a label outside its classes, or
        other than `expected[version][image]` when given (an unexpected version is a misread too)."""
        self.answered += 1
        self.versions[version] += 1
        names = contract.class_names(list(tasks[: int(version)])) if version.isdigit() else []
        if not all(label in names for label in labels):
            self.misread.append(f"version {version}: {labels} are not all among its classes {names}")
        elif expected is not None and labels != [expected[version][i] for i in indices if version in expected]:
            self.misread.append(f"version {version}: {labels} for images {indices}")

    def summary(self) -> dict:
        return {"sent": self.sent, "answered": self.answered, "failed": sum(self.failed.values()),
                "lost": self.lost, "misread": len(self.misread), "versions": dict(self.versions),
                "errors": dict(self.failed)}


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def tritonclient_load(url: str, model: str, images: np.ndarray, tasks: Sequence[str],
                      expected: dict[str, list[str]] | None, stop: threading.Event, tally: Tally,
                      batch: int = 4, timeout_s: float = 30.0) -> None:
    """tritonclient alone, as a pipeline that does not use this package calls the server (no retries)."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    rng = np.random.default_rng(len(model))
    encoded = [png_bytes(image) for image in images] if model == contract.BYTES_ENSEMBLE_MODEL else None
    try:
        while not stop.is_set():
            indices = rng.choice(len(images), size=min(batch, len(images)), replace=False).tolist()
            if encoded is not None:
                data = np.array([encoded[i] for i in indices], dtype=object).reshape(-1, 1)
                tensor = grpcclient.InferInput(contract.IMAGE_BYTES, list(data.shape), "BYTES")
            else:
                data = images[indices]
                tensor = grpcclient.InferInput(contract.IMAGES, list(data.shape), "UINT8")
            tensor.set_data_from_numpy(data)
            tally.sent += 1
            try:
                result = client.infer(model, [tensor], client_timeout=timeout_s)
            except Exception as exc:  # noqa: BLE001 - counted by kind
                tally.failed[str(exc)[:200]] += 1
                continue
            version = result.get_response().model_version
            probs = result.as_numpy(contract.PROBS)
            names = contract.class_names(list(tasks[: probs.shape[1] // 2]))
            tally.check(version, [names[k] for k in probs.argmax(1)], indices, tasks, expected)
    finally:
        client.close()


def client_load(url: str, images: np.ndarray, tasks: Sequence[str], expected: dict[str, list[str]] | None,
                stop: threading.Event, tally: Tally, group: int = 8, timeout_s: float = 30.0) -> None:
    """The sync client's micro-batcher: single submissions, `group` at a time, grouped behind the scenes."""
    with AttributionClient(url, timeout_s=timeout_s) as client:
        i = 0
        while not stop.is_set():
            batch = [(k % len(images), client.submit(images[k % len(images)])) for k in range(i, i + group)]
            i += group
            for index, future in batch:
                tally.sent += 1
                try:
                    answer = future.result()
                except Exception as exc:  # noqa: BLE001
                    tally.failed[f"{type(exc).__name__}: {str(exc)[:200]}"] += 1
                    continue
                tally.check(answer.model_version, [answer.label], [index], tasks, expected)


def async_client_load(url: str, images: np.ndarray, tasks: Sequence[str], expected: dict[str, list[str]] | None,
                      stop: threading.Event, tally: Tally, batch: int = 4, timeout_s: float = 30.0) -> None:
    """The asyncio client on the bytes ensemble (encoded files, decoded server-side)."""
    encoded = [png_bytes(image) for image in images]

    async def run() -> None:
        async with AsyncAttributionClient(url, model=contract.BYTES_ENSEMBLE_MODEL, timeout_s=timeout_s) as client:
            i = 0
            while not stop.is_set():
                indices = [k % len(images) for k in range(i, i + batch)]
                i += batch
                tally.sent += 1
                try:
                    answers = await client.attribute([encoded[k] for k in indices])
                except Exception as exc:  # noqa: BLE001
                    tally.failed[f"{type(exc).__name__}: {str(exc)[:200]}"] += 1
                    continue
                versions = {a.model_version for a in answers}
                version = versions.pop() if len(versions) == 1 else f"mixed {sorted(versions)}"
                tally.check(version, [a.label for a in answers], indices, tasks, expected)

    asyncio.run(run())


LOADS = {
    "client, lorax": lambda url, *rest: client_load(url, *rest),
    "asyncio client, lorax_bytes": lambda url, *rest: async_client_load(url, *rest),
    "tritonclient, lorax": lambda url, *rest: tritonclient_load(url, contract.ENSEMBLE_MODEL, *rest),
    "tritonclient, lorax_bytes": lambda url, *rest: tritonclient_load(url, contract.BYTES_ENSEMBLE_MODEL, *rest),
}


def start_loads(url: str, images: np.ndarray, tasks: Sequence[str], expected: dict[str, list[str]] | None,
                names: Sequence[str] = tuple(LOADS)) -> tuple[threading.Event, dict[str, Tally], list[threading.Thread]]:
    """Start the named loads in threads; set the returned event, then join the threads, to stop them."""
    stop = threading.Event()
    tallies = {name: Tally() for name in names}
    threads = [threading.Thread(target=LOADS[name], args=(url, images, tasks, expected, stop, tallies[name]),
                                name=name, daemon=True) for name in names]
    for thread in threads:
        thread.start()
    return stop, tallies, threads
