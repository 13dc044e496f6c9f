"""The server's processes, through psutil: what a launcher needs to stop a tritonserver and every Python-backend
stub it started, even after a crash, without ever killing a process that reused a remembered pid."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess

# The Python backend's stub: a process of its own per model instance, in the server's process group.
STUB_NAME = "triton_python_backend_stub"


def descendants(pid: int) -> list[int]:
    """All live descendants of `pid` (children, grandchildren, ...)."""
    import psutil

    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def process_group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is `pgid` (stubs of a crashed server keep its group)."""
    import psutil

    members = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE:
                members.append(process.pid)
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
    return members


def is_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def is_triton_process(pid: int) -> bool:
    """Guard against pid reuse before killing a remembered child."""
    import psutil

    try:
        command = " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return False
    return "tritonserver" in command or STUB_NAME in command


@functools.lru_cache(maxsize=1)
def parent_death_prefix() -> list[str]:
    """A command prefix that makes the kernel send the started process SIGTERM when we die: util-linux's
    `setpriv --pdeathsig TERM --` (it sets the signal and execs the command, so the pid is the command's), or
    nothing where setpriv lacks the option (the launcher's own cleanup still stops the server)."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return []
    try:
        probe = subprocess.run([setpriv, "--pdeathsig", "TERM", "--", "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [setpriv, "--pdeathsig", "TERM", "--"] if probe.returncode == 0 else []
