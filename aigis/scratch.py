"""Scratch folders that a killed process does not leave behind for good.

A server's work folder or an object-store mirror lives in the system's temporary folder for as long as its
process runs, and is removed when the process ends cleanly. A SIGKILL, an OOM kill or a power cut leaves it
there; a mirror holds a whole model repository, so a host whose launcher keeps crashing would fill its disk.
Each folder therefore records its owner's pid and boot-relative start time, and whoever creates the next
folder of the same kind removes those whose owner is gone.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

OWNER_FILE = ".aigis-owner"


def process_start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22): a pid and its start
    time name one process, a pid alone may be reused. None where /proc cannot say."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _owner_alive(folder: Path) -> bool:
    """Whether the process that made `folder` still runs; True when that cannot be told (no owner file, an
    unreadable one, no /proc), so that nothing of unknown ownership is removed."""
    try:
        pid_text, started = (folder / OWNER_FILE).read_text().split()
        pid = int(pid_text)
    except (OSError, ValueError):
        return True
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True          # another user's live process
    now = process_start_time(pid)
    return now is None or started == "0" or now == started


def remove_abandoned(prefix: str, root: str | Path | None = None) -> list[Path]:
    """Remove the `prefix`* folders under `root` (default: the temporary folder) whose owner has died;
    return them. Folders of live owners, of other users and without an owner file are left alone."""
    removed = []
    base = Path(root or tempfile.gettempdir())
    for folder in base.glob(f"{prefix}*"):
        if folder.is_dir() and not folder.is_symlink() and not _owner_alive(folder):
            shutil.rmtree(folder, ignore_errors=True)
            if not folder.exists():
                removed.append(folder)
    return removed


def owned_tempdir(prefix: str, root: str | Path | None = None) -> Path:
    """A new folder `prefix`XXXX under `root` (default: the temporary folder) that names this process as its
    owner, after removing the folders of the same prefix whose owners have died."""
    remove_abandoned(prefix, root)
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
    (folder / OWNER_FILE).write_text(f"{os.getpid()} {process_start_time(os.getpid()) or 0}\n")
    return folder
