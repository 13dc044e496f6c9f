"""`aigis demo`: the main job end to end on the embedded default."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Added once the stages exist."""
