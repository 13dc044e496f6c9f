"""`aigis protect-eval`: registered here, implemented in aigis.protection.evaluate (filled in by that stage)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add `protect-eval` (filled in with the evaluation)."""
