"""`aigis` command line: one subcommand group per stage, each registered by its own package."""

from __future__ import annotations

import argparse
import importlib
import sys

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aigis", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _STAGES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
