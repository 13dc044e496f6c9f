"""What every protection benchmark writes beside its figures: the machine line and the result files.

Imported by the benchmark scripts (run as `python benchmarks/<script>.py`, so this folder is on sys.path).
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine_and_command(script: str, argv: list[str] | None) -> str:
    """"Machine: <cpu>, <n> cores, Python <v>, torch <v> (<kernels>). Command: python benchmarks/<script> <args>"
    for a results header. The kernels torch picks (AVX2, AVX512, ...) are named because float results, and so a
    long MEM job's chaotic path, differ between them: the same command can draw another job on another CPU."""
    import torch

    cpu = "unknown CPU"
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    except OSError:
        pass
    args = " ".join(argv if argv is not None else sys.argv[1:])
    kernels = torch.backends.cpu.get_cpu_capability()
    return (f"Machine: {cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"torch {torch.__version__} ({kernels} kernels). "
            f"Command: python benchmarks/{script} {args}")


def write_results(name: str, payload: dict, header: str, table: str) -> None:
    """benchmarks/results/<name>.json (payload) and <name>.md (header, table); the header and table printed."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str))
    (RESULTS / f"{name}.md").write_text(header + "\n" + table + "\n")
    print(header)
    print(table)

