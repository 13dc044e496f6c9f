"""Talk to a running Triton server about its models: readiness, load / unload, the repository index.

The server runs in explicit model-control mode, so models come and go only through the Load and
Unload APIs used here; a load may carry a JSON config override (and file overrides) instead of the
repository's config.pbtxt, and loading an already-loaded model re-reads it without a restart.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


class ModelControlError(RuntimeError):
    """A load or unload failed; the message names the model and carries the server's reason."""


@dataclass(frozen=True)
class ModelStatus:
    """One row of the repository index."""

    name: str
    version: str    # '' for a model that was never loaded
    state: str      # READY, UNAVAILABLE, LOADING, UNLOADING, or '' when never loaded
    reason: str     # why it is not READY (the load error, 'unloaded', ...)

    @property
    def ready(self) -> bool:
        return self.state == "READY"


def wait_ready(
    grpc_url: str,
    timeout: float = 60.0,
    models: Iterable[str] = (),
    *,
    check: Callable[[], None] | None = None,
    interval: float = 0.1,
) -> None:
    """Block until the server at `grpc_url` (and each of `models`) is ready.

    Raises TimeoutError after `timeout` seconds. `check` is called between polls so a caller can
    abort early (TritonServer raises there when its process has died).
    """
    models = list(models)
    deadline = time.monotonic() + timeout
    client = grpcclient.InferenceServerClient(url=grpc_url)
    try:
        while True:
            if check is not None:
                check()
            try:
                if client.is_server_ready(client_timeout=2.0) and all(
                    client.is_model_ready(name, client_timeout=2.0) for name in models
                ):
                    return
            except InferenceServerException:
                pass  # not listening yet
            if time.monotonic() >= deadline:
                waiting = f"models {models} on " if models else ""
                raise TimeoutError(f"{waiting}Triton at {grpc_url} not ready after {timeout:.0f} s")
            time.sleep(interval)
    finally:
        client.close()


class ModelControl:
    """Load, unload and list the models of one server (explicit model-control mode)."""

    def __init__(self, grpc_url: str, timeout: float = 120.0) -> None:
        self.grpc_url = grpc_url
        self.timeout = timeout
        self._client = grpcclient.InferenceServerClient(url=grpc_url)

    def __enter__(self) -> "ModelControl":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def load(
        self,
        name: str,
        config: Mapping[str, Any] | str | None = None,
        files: Mapping[str, bytes] | None = None,
    ) -> None:
        """Load (or re-load) `name`; returns once it is ready.

        `config` (a dict or JSON text in Triton's model-config JSON form) replaces the repository's
        config.pbtxt for this load. `files` maps paths inside the model directory (e.g.
        "1/model.onnx") to their bytes; Triton requires `config` with them.
        """
        if isinstance(config, str):
            config = json.loads(config)
        if config is not None and config.get("name", name) != name:
            # Triton only says "failed to poll from model repository" in this case.
            raise ModelControlError(f"config override for model {name!r} names model {config['name']!r}")
        config_json = None if config is None else json.dumps(config)
        file_overrides = None if files is None else {f"file:{path}": data for path, data in files.items()}
        try:
            self._client.load_model(
                name, config=config_json, files=file_overrides, client_timeout=self.timeout
            )
        except InferenceServerException as error:
            message = error.message()
            if "failed to poll" in message:
                message += " (Triton logs the reason, e.g. a config it rejects, in the server log)"
            raise ModelControlError(f"loading model {name!r} failed: {message}") from None

    def unload(self, name: str, *, unload_dependents: bool = False, wait: bool = True) -> None:
        """Unload `name`; with `wait`, return only once no version of it is READY any more."""
        try:
            self._client.unload_model(
                name, unload_dependents=unload_dependents, client_timeout=self.timeout
            )
        except InferenceServerException as error:
            raise ModelControlError(f"unloading model {name!r} failed: {error.message()}") from None
        if not wait:
            return
        deadline = time.monotonic() + self.timeout
        while any(row.name == name and row.state in ("READY", "UNLOADING") for row in self.index()):
            if time.monotonic() >= deadline:
                raise ModelControlError(f"model {name!r} still loaded {self.timeout:.0f} s after unload")
            time.sleep(0.05)

    def index(self, ready_only: bool = False) -> list[ModelStatus]:
        """Every model in the repository, one row per known version, sorted by name and version."""
        response = self._client.get_model_repository_index(client_timeout=self.timeout)
        rows = [
            ModelStatus(name=m.name, version=m.version, state=m.state, reason=m.reason)
            for m in response.models
        ]
        if ready_only:
            rows = [row for row in rows if row.ready]
        return sorted(rows, key=lambda row: (row.name, _version_key(row.version)))

    def loaded(self) -> dict[str, list[str]]:
        """Ready models and their ready versions."""
        ready: dict[str, list[str]] = {}
        for row in self.index(ready_only=True):
            ready.setdefault(row.name, []).append(row.version)
        return ready

    def is_ready(self, name: str, version: str = "") -> bool:
        try:
            return bool(self._client.is_model_ready(name, version, client_timeout=self.timeout))
        except InferenceServerException:
            return False

    def config(self, name: str, version: str = "") -> dict[str, Any]:
        """The configuration the server uses for `name` (after its auto-completion), as a dict."""
        try:
            response = self._client.get_model_config(name, version, as_json=True, client_timeout=self.timeout)
        except InferenceServerException as error:
            raise ModelControlError(f"model {name!r}: {error.message()}") from None
        return response["config"]


def _version_key(version: str) -> tuple[int, str]:
    return (int(version), "") if version.isdigit() else (-1, version)
