"""Subcommands of the serving stage: `aigis serve`."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add `serve` to the `aigis` command."""
    serve = sub.add_parser(
        "serve",
        help="run the embedded Triton server on a model repository until Ctrl-C / SIGTERM",
        description="Start the tritonserver binary from the nvidia-pytriton wheel (no container) on a "
        "model repository, in explicit model-control mode; onnxruntime_onnx models are served by the "
        "bundled Python-based onnxruntime backend. Port 0 picks a free port.",
    )
    serve.add_argument("--repo", default="model_repository", help="model repository (default: %(default)s)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    serve.add_argument("--grpc-port", type=int, default=8001, help="default: %(default)s")
    serve.add_argument("--http-port", type=int, default=8000, help="default: %(default)s")
    serve.add_argument("--metrics-port", type=int, default=8002, help="default: %(default)s")
    serve.add_argument(
        "--load", nargs="*", metavar="MODEL", default=None,
        help="models to load at start (default: every model; `--load` alone: none)",
    )
    serve.add_argument("--log", default=None, help="write the server log here (default: a temporary file)")
    serve.add_argument("--startup-timeout", type=float, default=300.0, help="seconds (default: %(default)s)")
    serve.add_argument("--log-verbose", type=int, default=0, help="Triton's --log-verbose level")
    serve.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    """Start the server, report what it serves, wait for Ctrl-C or SIGTERM, stop it cleanly."""
    import signal
    import sys
    import threading

    from aigis.serving.control import ModelControl
    from aigis.serving.server import ServerError, TritonServer

    server = TritonServer(
        args.repo,
        models=args.load,
        host=args.host,
        grpc_port=args.grpc_port or None,
        http_port=args.http_port or None,
        metrics_port=args.metrics_port or None,
        log_path=args.log,
        log_verbose=args.log_verbose,
        startup_timeout=args.startup_timeout,
    )
    stop_requested = threading.Event()
    started = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        if not started.is_set():
            raise KeyboardInterrupt  # abort a slow start; start() cleans up after itself
        stop_requested.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            server.start()
        except ServerError as error:
            print(f"aigis serve: {error}", file=sys.stderr)
            return 1
        started.set()
        with ModelControl(server.grpc_url) as control:
            loaded = control.loaded()
        print(f"Triton serving {server.model_repository} (pid {server.pid})")
        print(f"  gRPC     {server.grpc_url}")
        print(f"  HTTP     http://{server.http_url}")
        print(f"  metrics  {server.metrics_url}")
        if server.log_path is not None:
            print(f"  log      {server.log_path}")
        if loaded:
            for name, versions in sorted(loaded.items()):
                print(f"  model    {name} (versions {', '.join(versions)})")
        else:
            print("  models   none loaded")
        print("Ctrl-C or SIGTERM stops the server.", flush=True)

        while not stop_requested.wait(0.5):
            if not server.is_running():
                print("aigis serve: tritonserver exited unexpectedly\n" + server.log_tail(), file=sys.stderr)
                return 1
        print("stopping...", flush=True)
        status = server.stop()
        print(f"stopped (tritonserver exit status {status})", flush=True)
        return 0
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
