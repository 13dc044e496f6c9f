"""The server's processes, through psutil: what a launcher needs to stop a tritonserver and every Python-backend
stub it started, even after a crash, without ever killing a process that reused a remembered pid."""

from __future__ import annotations

import os
import signal

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


def set_parent_death_signal() -> None:
    """Runs in the child before exec: if our process dies, the kernel sends the server SIGTERM."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass
