"""How many threads a CPU job should use: what this process may run on, less what others keep busy.

PyTorch starts one intra-op thread per core of the machine. On a shared host that oversubscribes the cores:
with the other core busy, a 2-thread training step ran several times slower than a 1-thread one. So a job
takes OMP_NUM_THREADS when it is set; otherwise the CPUs of its affinity mask, less the load that other
processes put on them (the 1-minute load average, read before the job starts), and at least one.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    why: str


def choose_threads(environ: dict[str, str] | None = None, cpus: int | None = None,
                   load: float | None = None) -> ThreadChoice:
    """The thread count for a CPU job, and why (for the job's log line)."""
    environ = os.environ if environ is None else environ
    requested = environ.get("OMP_NUM_THREADS", "").strip()
    if requested:
        try:
            threads = int(requested)
        except ValueError:
            threads = 0
        if threads < 1:
            raise ValueError(f"OMP_NUM_THREADS={requested!r} must be a positive integer")
        return ThreadChoice(threads, f"OMP_NUM_THREADS={threads}")
    cpus = len(os.sched_getaffinity(0)) if cpus is None else cpus
    load = os.getloadavg()[0] if load is None else load
    busy = min(cpus - 1, int(load + 0.5))
    threads = max(1, cpus - busy)
    return ThreadChoice(threads, f"{cpus} CPU(s) this process may use, {busy} kept busy by others "
                                 f"(load {load:.1f}); OMP_NUM_THREADS overrides")


def apply_threads(quiet: bool = False) -> int:
    """Set PyTorch's intra-op threads to choose_threads() and log it; returns the count."""
    import torch

    choice = choose_threads()
    torch.set_num_threads(choice.threads)
    if not quiet:
        logging.getLogger(__name__).info(f"using {choice.threads} thread(s): {choice.why}")
    return choice.threads
