"""`aigis attribute PATHS...`: attribute image files against a running server, one JSON line per file.

Lines come out in input order, one per file: the answer, or the error for that file (a corrupt file
never stops the run). The exit code is non-zero if any file failed, so scripts can tell.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import deque
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

from aigis import contract

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}

EXIT_OK, EXIT_SOME_FAILED, EXIT_SETUP = 0, 1, 2


def register(sub: argparse._SubParsersAction) -> None:
    """Add `aigis attribute`."""
    parser = sub.add_parser(
        "attribute",
        help="attribute image files with the served model (JSON lines out)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders (searched recursively)")
    parser.add_argument("--url", default="127.0.0.1:8001",
                        help="Triton gRPC address (default %(default)s), or several replicas of one server separated "
                             "by commas (batches go round robin over the healthy ones and fail over when one dies); "
                             "a name with several addresses (a headless Service's) is spread over all of them")
    parser.add_argument("--model", default=None, help=f"served model (default {contract.ENSEMBLE_MODEL}, "
                        f"or {contract.BYTES_ENSEMBLE_MODEL} with --bytes; {contract.FUSED_MODEL} where the "
                        f"version was exported with --fused)")
    parser.add_argument("--version", default=None, help="model version (default: the latest)")
    parser.add_argument("--out", default="-", help="JSON lines file (default: standard output)")
    parser.add_argument("--bytes", action="store_true", help="send encoded files; the server decodes (thin client)")
    parser.add_argument("--batch-size", type=int, default=32, help="largest micro-batch (default %(default)s)")
    parser.add_argument("--in-flight", type=int, default=4, help="requests in flight at once (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=30.0, help="deadline per request attempt, seconds")
    parser.add_argument("--deadline", type=float, default=60.0,
                        help="retry while the server is unavailable or the model not ready, for up to this many "
                             "seconds per request (default %(default)s: covers a server restart)")
    parser.add_argument("--retries", type=int, default=None, help="also cap the retries per request at this number")
    parser.add_argument("--quiet", action="store_true", help="no progress on standard error")
    parser.set_defaults(func=run_attribute)


def find_images(paths: Iterable[str | Path]) -> Iterator[Path]:
    """Named files as given (so a bad one is reported, whatever its extension); folders recursively
    for files with an image extension, in sorted order so that runs are reproducible."""
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for found in sorted(path.rglob("*")):
                if found.is_file() and found.suffix.lower() in IMAGE_EXTENSIONS:
                    yield found
        else:
            yield path


class Progress:
    """Progress with rates on standard error, at most once per `interval_s`, plus a final summary."""

    def __init__(self, total: int, stream: IO[str] | None, interval_s: float = 1.0) -> None:
        self.total, self.stream, self.interval_s = total, stream, interval_s
        self.done = self.failed = 0
        self._start = self._last = time.monotonic()

    def update(self, ok: bool) -> None:
        self.done += 1
        self.failed += 0 if ok else 1
        now = time.monotonic()
        if now - self._last >= self.interval_s:
            self._last = now
            self._print("\r")

    def finish(self) -> None:
        self._print("\r", end="\n")

    def _print(self, prefix: str, end: str = "") -> None:
        if self.stream is None:
            return
        elapsed = max(time.monotonic() - self._start, 1e-9)
        self.stream.write(
            f"{prefix}attributed {self.done}/{self.total} files, {self.failed} failed, "
            f"{self.done / elapsed:.1f} images/s, {elapsed:.1f} s{end}"
        )
        self.stream.flush()


def _record(path: Path, outcome: Any) -> dict[str, Any]:
    if isinstance(outcome, BaseException):
        return {"path": str(path), "error": str(outcome), "error_type": type(outcome).__name__}
    return {"path": str(path), **outcome.to_dict()}


def run_attribute(args: argparse.Namespace) -> int:
    from concurrent.futures import Future

    from .attribution import AttributionClient
    from .errors import ClientError

    paths = list(find_images(args.paths))
    if not paths:
        print("no image files found in the given paths", file=sys.stderr)
        return EXIT_SETUP
    model = args.model or (contract.BYTES_ENSEMBLE_MODEL if args.bytes else contract.ENSEMBLE_MODEL)
    try:
        client = AttributionClient(
            args.url, model=model, version=args.version, max_batch_size=args.batch_size,
            max_in_flight=args.in_flight, timeout_s=args.timeout, retries=args.retries,
            deadline_s=args.deadline,
        )
    except ClientError as exc:
        print(f"cannot use {model} at {args.url}: {exc}", file=sys.stderr)
        return EXIT_SETUP

    progress = Progress(len(paths), None if args.quiet else sys.stderr)
    out = sys.stdout if args.out == "-" else open(args.out, "w", encoding="utf-8")
    window: deque[tuple[Path, Any]] = deque()  # results are written in input order as they complete

    def write_ready(wait: bool) -> None:
        while window and (wait or not isinstance(window[0][1], Future) or window[0][1].done()):
            path, outcome = window.popleft()
            if isinstance(outcome, Future):
                error = outcome.exception()
                outcome = error if error is not None else outcome.result()
            out.write(json.dumps(_record(path, outcome)) + "\n")
            progress.update(not isinstance(outcome, BaseException))

    try:
        with client:
            for path in paths:
                try:
                    window.append((path, client.submit(path)))
                except ClientError as exc:  # unreadable or corrupt file: report it, go on
                    window.append((path, exc))
                write_ready(wait=False)
            write_ready(wait=True)
    finally:
        if out is not sys.stdout:
            out.close()
        else:
            out.flush()
    progress.finish()
    return EXIT_SOME_FAILED if progress.failed else EXIT_OK


if __name__ == "__main__":  # pragma: no cover - convenience: python -m aigis.client.cli attribute ...
    parser = argparse.ArgumentParser(prog="aigis-client")
    register(parser.add_subparsers(dest="command", required=True))
    parsed = parser.parse_args()
    sys.exit(parsed.func(parsed))
