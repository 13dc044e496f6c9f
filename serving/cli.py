"""Subcommands of the serving stage: `aigis serve`."""

from __future__ import annotations

import argparse
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from aigis import contract
from aigis.serving.server import GRPC_PORT, HTTP_PORT, METRICS_PORT   # standard library only: `aigis --help` stays fast

if TYPE_CHECKING:
    from aigis.objectstore import RepositoryReader
    from aigis.serving.server import TritonServer

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def register(sub: argparse._SubParsersAction) -> None:
    """Add `serve` to the `aigis` command."""
    serve = sub.add_parser(
        "serve",
        help="run the embedded Triton server on a model repository until Ctrl-C / SIGTERM, restarting it if it dies",
        description="Start the tritonserver binary from the nvidia-pytriton wheel (no container) on a "
        "model repository, in explicit model-control mode; onnxruntime_onnx models are served by the "
        "bundled Python-based onnxruntime backend. If tritonserver dies it is restarted (with backoff) on the "
        "same ports, serving the versions last rolled out. Inference is open on the bound address; repository "
        "control (load, unload, index), shared memory, traces and logging need the control key. Port 0 picks "
        "a free port.",
    )
    serve.add_argument("--repo", default="model_repository",
                       help="model repository: a folder, or s3://BUCKET/PREFIX read by tritonserver itself, with the "
                            "endpoint and credentials of the standard AWS environment (AWS_ENDPOINT_URL for a store "
                            "other than AWS, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE); several "
                            "replicas can serve one bucket (default: %(default)s)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default: %(default)s; any other address exposes inference to the "
                            "network)")
    serve.add_argument("--grpc-port", type=int, default=GRPC_PORT, help="default: %(default)s")
    serve.add_argument("--http", action="store_true", help="also serve Triton's HTTP/REST endpoint (off by default)")
    serve.add_argument("--http-port", type=int, default=HTTP_PORT, help="with --http (default: %(default)s)")
    serve.add_argument("--metrics-port", type=int, default=METRICS_PORT, help="default: %(default)s")
    serve.add_argument(
        "--load", nargs="*", metavar="MODEL", default=None,
        help="models to load at start (default: every model that no ensemble pins as a step; the ensembles "
             "bring the steps of the version they serve. `--load` alone: none)",
    )
    serve.add_argument("--control-key-file", default=None,
                       help="the control key: read from this file, or made and written there (0600) when it does "
                            "not exist. Default: $AIGIS_CONTROL_KEY, else a new key written to "
                            "~/.config/aigis/control-key-<grpc port>")
    serve.add_argument("--max-restarts", type=int, default=None,
                       help="give up after this many restarts in a row without a minute of uptime (default: never)")
    serve.add_argument("--log", default=None, help="write the server log here (default: a temporary file)")
    serve.add_argument("--startup-timeout", type=float, default=300.0, help="seconds (default: %(default)s)")
    serve.add_argument("--log-verbose", type=int, default=0, help="Triton's --log-verbose level")
    serve.set_defaults(func=run_serve)


def control_key_for(args: argparse.Namespace) -> tuple[str, Path | None, str]:
    """(key, file to write it to once the port is known or None, where it came from): --control-key-file,
    $AIGIS_CONTROL_KEY, or a new key."""
    import os
    import secrets

    from aigis.serving.control import KEY_ENVIRONMENT, nonempty_key

    if args.control_key_file is not None:
        path = Path(args.control_key_file)
        if path.is_file():
            return nonempty_key(path.read_text().strip(), str(path)), None, f"read from {path}"
        return secrets.token_urlsafe(32), path, "new"
    if os.environ.get(KEY_ENVIRONMENT) is not None:
        return nonempty_key(os.environ[KEY_ENVIRONMENT].strip(), f"${KEY_ENVIRONMENT}"), None, f"from ${KEY_ENVIRONMENT}"
    return secrets.token_urlsafe(32), None, "new"


def default_models(repo: str | Path | RepositoryReader) -> list[str]:
    """Every model of the repository (a folder, an s3:// URL or an open reader) that no ensemble pins as a step:
    Triton loads an ensemble's steps with it, so only the served version's steps are loaded (not every old
    classifier)."""
    from aigis.objectstore import CONFIG_FILE, open_repository

    reader = open_repository(repo) if isinstance(repo, (str, Path)) else repo
    files = reader.files()
    models = sorted({name.split("/")[0] for name in files if name.count("/") == 1 and name.endswith(f"/{CONFIG_FILE}")})
    steps: set[str] = set()
    for model in models:
        if not ensemble_steps(reader.read_text(f"{model}/{CONFIG_FILE}"))[0]:
            continue   # the served-version pointer is a copy of a version's config: not an ensemble, no steps
        for name in files:
            parts = name.split("/")
            if len(parts) == 3 and parts[0] == model and parts[1].isdigit() and parts[2] == CONFIG_FILE:
                steps.update(ensemble_steps(reader.read_text(name))[1])
    served = [name for name in models if name not in steps]
    if contract.FUSED_MODEL in served:
        fused, ensemble = (served_version_in(reader.read_text(f"{name}/{CONFIG_FILE}")) if name in models else None
                           for name in (contract.FUSED_MODEL, contract.ENSEMBLE_MODEL))
        if fused != ensemble:   # the ensemble went on to a version exported without --fused: no stale answers
            served.remove(contract.FUSED_MODEL)
    return served


def served_version_in(config_text: str) -> int | None:
    """The one version a model-level config.pbtxt (its text) serves (None when it names no single version)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse(config_text, model_config_pb2.ModelConfig())
    found = list(config.version_policy.specific.versions)
    return int(found[0]) if len(found) == 1 else None


def ensemble_steps(config_text: str) -> tuple[bool, list[str]]:
    """(is it an ensemble, the models its steps name) from a config.pbtxt's text."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse(config_text, model_config_pb2.ModelConfig())
    return config.platform == "ensemble", [step.model_name for step in config.ensemble_scheduling.step]


def run_serve(args: argparse.Namespace) -> int:
    """Start the server, report what it serves, restart it when it dies, stop cleanly on Ctrl-C or SIGTERM."""
    import signal
    import sys

    from aigis.errors import ServingError
    from aigis.serving.control import default_key_file, write_key_file
    from aigis.objectstore import ObjectStoreError, open_repository
    from aigis.serving.server import LaunchError, TritonServer

    try:   # for S3: bucket, endpoint, credentials and models checked here, before tritonserver could blame them
        repository = open_repository(args.repo)
        startup_models = default_models(repository) if args.load is None else args.load
    except ObjectStoreError as error:
        print(f"aigis serve: {error}", file=sys.stderr)
        return 1
    grpc_port = args.grpc_port or None
    try:
        key, key_file, key_source = control_key_for(args)
    except ServingError as error:
        print(f"aigis serve: {error}", file=sys.stderr)
        return 2
    server = TritonServer(
        args.repo,
        models=startup_models,
        host=args.host,
        grpc_port=grpc_port,
        http_port=args.http_port or None,
        metrics_port=args.metrics_port or None,
        log_path=args.log,
        log_verbose=args.log_verbose,
        startup_timeout=args.startup_timeout,
        control_key=key,
        http=args.http,
    )
    stop_requested = threading.Event()
    server.abort = stop_requested  # a SIGTERM during a restart ends the wait for readiness at once
    started = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        if not started.is_set():
            raise KeyboardInterrupt  # abort a slow start; start() cleans up after itself
        stop_requested.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            server.start()
        except LaunchError as error:
            print(f"aigis serve: {error}", file=sys.stderr)
            return 1
        started.set()
        if key_source == "new":   # the default file is named by the port, known only now
            key_file = write_key_file(key_file or default_key_file(server.grpc_url), key)
            key_source = f"new, written to {key_file} (0600)"
        report(server, key_source)
        models = (lambda: default_models(args.repo)) if args.load is None else (lambda: args.load)
        return supervise(server, stop_requested, args.max_restarts, models)
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def report(server: TritonServer, key_source: str) -> None:
    """What is served, where, and what is exposed."""
    with server.control() as control:
        loaded = control.loaded()
    print(f"Triton serving {server.model_repository} (pid {server.pid})")
    print(f"  gRPC     {server.grpc_url}   inference open; repository control needs the key")
    print("  HTTP     " + (f"http://{server.http_url}" if server.http else "off (--http turns it on)"))
    print(f"  metrics  {server.metrics_url}")
    print(f"  key      {key_source}")
    if server.s3 is not None:
        print(f"  S3       {server.s3.describe()}")
        for note in server.s3.notes:
            print(f"  note     {note}")
    if server.log_path is not None:
        print(f"  log      {server.log_path}")
    if server.host not in LOOPBACK:
        endpoints = "gRPC, metrics" + (" and HTTP" if server.http else "")
        print(f"  WARNING  bound to {server.host}: {endpoints} are reachable from the network; anyone who reaches "
              f"them can run inference and read metrics (repository control still needs the key, and the key "
              f"travels in clear text: put TLS in front for untrusted networks)")
    for name, versions in sorted(loaded.items()):
        print(f"  model    {name} (versions {', '.join(versions)})")
    if not loaded:
        print("  models   none loaded")
    print("Ctrl-C or SIGTERM stops the server.", flush=True)


def supervise(server: TritonServer, stop_requested: threading.Event, max_restarts: int | None = None,
              models: Callable[[], list[str]] | None = None) -> int:
    """Wait for a stop request; restart tritonserver each time it dies: at once, then after 2, 4, 8 ... 30 s
    while it keeps dying within a minute of its last start (a crash loop is not hammered). `models` names the
    models to load at each restart, read anew (a model published since the start is loaded too)."""
    import sys
    import time

    from aigis.errors import ServingError
    from aigis.serving.server import LaunchError

    restarts = failures_in_a_row = 0
    up_since = time.monotonic()
    while not stop_requested.wait(0.2):
        if server.is_running():
            if time.monotonic() - up_since > 60:
                failures_in_a_row = 0
            continue
        status = server.exit_status()
        failures_in_a_row += 1
        if max_restarts is not None and failures_in_a_row > max_restarts:
            print(f"aigis serve: tritonserver died {failures_in_a_row} times in a row; giving up\n"
                  + server.log_tail(), file=sys.stderr)
            return 1
        delay = min(30.0, 2.0 ** (failures_in_a_row - 1)) if failures_in_a_row > 1 else 0.0
        message = f"aigis serve: tritonserver exited (status {status}); restart {restarts + 1} in {delay:.0f} s"
        print(message, file=sys.stderr, flush=True)
        server.note(message)
        if stop_requested.wait(delay):
            break
        died_at = time.monotonic()
        if models is not None:
            try:
                server.models = models()
            except ServingError as error:   # e.g. the bucket unreachable: the restart below names it too
                print(f"aigis serve: restart {restarts + 1} keeps the models named before: {error}", file=sys.stderr,
                      flush=True)
        try:
            server.restart()
        except LaunchError as error:
            print(f"aigis serve: restart {restarts + 1} failed: {error}", file=sys.stderr, flush=True)
            up_since = time.monotonic()
            continue
        restarts += 1
        up_since = time.monotonic()
        message = f"aigis serve: restart {restarts}: serving again (pid {server.pid}) after {up_since - died_at:.1f} s"
        print(message, flush=True)
        server.note(message)
    print("stopping...", flush=True)
    status = server.stop()
    print(f"stopped (tritonserver exit status {status}; {restarts} restart{'s' if restarts != 1 else ''})",
          flush=True)
    return 0
