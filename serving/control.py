"""Talk to a running Triton server about its models: readiness, load / unload, the repository index.

The server runs in explicit model-control mode, so models come and go only through the Load and
Unload APIs used here; a load may carry a JSON config override (and file overrides) instead of the
repository's config.pbtxt, and loading an already-loaded model re-reads it without a restart.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from aigis.errors import ServingError

from .server import CONTROL_HEADER

KEY_ENVIRONMENT = "AIGIS_CONTROL_KEY"


class ModelControlError(ServingError):
    """A load or unload failed, or the server refused the control key; the message names the model and
    carries the server's reason."""


def default_key_file(grpc_url: str) -> Path:
    """Where `aigis serve` keeps the key it made for the server on `grpc_url`'s port (0600)."""
    port = grpc_url.rsplit(":", 1)[-1]
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "aigis" / f"control-key-{port}"


def read_control_key(grpc_url: str, key_file: str | Path | None = None) -> str | None:
    """The control key for the server at `grpc_url`: `key_file`, else $AIGIS_CONTROL_KEY, else (for a server on
    this host only: the key is never sent to another host by default) the file `aigis serve` wrote for that
    port; None when there is none. An empty key is refused: it would mean no lock at all."""
    if key_file is not None:
        path = Path(key_file)
        if not path.is_file():
            raise ModelControlError(f"control key file {path} does not exist")
        return nonempty_key(path.read_text().strip(), str(path))
    if os.environ.get(KEY_ENVIRONMENT) is not None:
        return nonempty_key(os.environ[KEY_ENVIRONMENT].strip(), f"${KEY_ENVIRONMENT}")
    host = grpc_url.rsplit(":", 1)[0].strip("[]")
    path = default_key_file(grpc_url)
    if host in ("127.0.0.1", "localhost", "::1") and path.is_file():
        return nonempty_key(path.read_text().strip(), str(path))
    return None


def nonempty_key(key: str, source: str) -> str:
    if not key:
        raise ModelControlError(f"the control key in {source} is empty")
    return key


def write_key_file(path: str | Path, key: str) -> Path:
    """Write `key` to `path`, readable by its owner only: created 0600 (an existing file is made 0600 before the
    key is written), never through a symbolic link."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    os.fchmod(descriptor, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(key + "\n")
    return path


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
    """Load, unload and list the models of one server (explicit model-control mode).

    `control_key` is sent with every call (the server refuses repository control without it).
    """

    def __init__(self, grpc_url: str, timeout: float = 120.0, control_key: str | None = None) -> None:
        self.grpc_url = grpc_url
        self.timeout = timeout
        self._headers = {f"triton-grpc-protocol-{CONTROL_HEADER}": control_key} if control_key else None
        self._client = grpcclient.InferenceServerClient(url=grpc_url)

    def _refused(self, error: InferenceServerException, what: str) -> ModelControlError:
        message = error.message() or str(error)
        if "restricted" in message:
            return ModelControlError(f"{what}: {self.grpc_url} refuses repository control without its key "
                                     f"(give ${KEY_ENVIRONMENT} or --control-key-file; `aigis serve` prints where "
                                     f"it wrote the key)")
        return ModelControlError(f"{what} failed: {message}")

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
                name, config=config_json, files=file_overrides, headers=self._headers, client_timeout=self.timeout
            )
        except InferenceServerException as error:
            failure = self._refused(error, f"loading model {name!r}")
            if "failed to poll" in str(failure):
                failure = ModelControlError(f"{failure} (Triton logs the reason, e.g. a config it rejects, in the "
                                            f"server log)")
            raise failure from None

    def unload(self, name: str, *, unload_dependents: bool = False, wait: bool = True) -> None:
        """Unload `name`; with `wait`, return only once no version of it is READY any more."""
        try:
            self._client.unload_model(
                name, unload_dependents=unload_dependents, headers=self._headers, client_timeout=self.timeout
            )
        except InferenceServerException as error:
            raise self._refused(error, f"unloading model {name!r}") from None
        if wait:
            self.wait_unloaded([name])

    def wait_unloaded(self, names: Iterable[str]) -> None:
        """Return once no version of any of `names` is READY or UNLOADING (unloads asked for with wait=False
        run side by side: a Python-backend instance takes a second to stop)."""
        names = set(names)
        deadline = time.monotonic() + self.timeout
        while still := sorted({row.name for row in self.index()
                               if row.name in names and row.state in ("READY", "UNLOADING")}):
            if time.monotonic() >= deadline:
                raise ModelControlError(f"model(s) {', '.join(still)} still loaded {self.timeout:.0f} s after unload")
            time.sleep(0.05)

    def index(self, ready_only: bool = False) -> list[ModelStatus]:
        """Every model in the repository, one row per known version, sorted by name and version."""
        try:
            response = self._client.get_model_repository_index(headers=self._headers, client_timeout=self.timeout)
        except InferenceServerException as error:
            raise self._refused(error, "reading the repository index") from None
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
