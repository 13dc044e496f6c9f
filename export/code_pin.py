"""A served Python model version pinned to the code it was published with.

A version whose code is too large to copy into it (mem_protect runs the protection package on torch) records
the sha256 of the modules it runs. Its model.py checks them before anything else and refuses to load, naming
both, when the installed aigis differs: rolling back a version then never serves its settings with other code.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Sequence

from aigis.errors import ExportError

PIN_FILE = "code.json"


class CodeMismatchError(ExportError):
    """The installed code is not the code a version was published with."""


def code_sha256(modules: Sequence[str]) -> str:
    """sha256 over the source files of `modules` (in the given order), found without importing them."""
    digest = hashlib.sha256()
    for name in modules:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise CodeMismatchError(f"module {name} is not installed")
        digest.update(name.encode())
        digest.update(Path(spec.origin).read_bytes())
    return digest.hexdigest()


def pin(modules: Sequence[str]) -> dict:
    """What a version records in PIN_FILE."""
    from aigis import __version__

    return {"aigis_version": __version__, "modules": list(modules), "sha256": code_sha256(modules)}


def require_pinned_code(version_dir: str | Path) -> None:
    """Raise CodeMismatchError unless the installed modules are the ones recorded in `version_dir`."""
    from aigis import __version__

    path = Path(version_dir) / PIN_FILE
    if not path.is_file():
        raise CodeMismatchError(f"{path.parent}: no {PIN_FILE}: this version does not say which code serves it; "
                                f"publish it again")
    recorded = json.loads(path.read_text())
    installed = code_sha256(recorded["modules"])
    if installed != recorded["sha256"]:
        raise CodeMismatchError(
            f"{path.parent} was published with aigis {recorded['aigis_version']} (code sha256 "
            f"{recorded['sha256'][:12]}...); the installed aigis {__version__} runs other code ({installed[:12]}...). "
            f"Serve it with the aigis it was published with, or publish its job again with this one")
