"""Task orders: the CDDB scenarios of the paper, the synthetic benchmark's own, or one given by the user.

A scenario is only an order of task folder names; the data root decides whether they exist.
"""

from __future__ import annotations

import json
from pathlib import Path

from aigis.data.cddb import list_tasks, outside_root
from aigis.data.synth import DEFAULT_TASKS

_EASY = ("gaugan", "biggan", "cyclegan", "imle", "deepfake", "crn", "wild")
SCENARIOS: dict[str, tuple[str, ...]] = {
    "easy": _EASY,
    "hard": ("gaugan", "biggan", "wild", "whichfaceisreal", "san"),
    "long": _EASY + ("glow", "stargan_gf", "stylegan", "whichfaceisreal", "san"),
    "synth": DEFAULT_TASKS,
    "synth5": DEFAULT_TASKS[:5],
}


def scenario_tasks(name_or_file: str) -> list[str]:
    """A built-in scenario (case-insensitive) or a text file with one task per line (# starts a comment)."""
    key = name_or_file.strip().lower()
    if key in SCENARIOS:
        return list(SCENARIOS[key])
    path = Path(name_or_file)
    if not path.is_file():
        raise ValueError(f"unknown scenario {name_or_file!r}: use one of {', '.join(SCENARIOS)} "
                         f"or a file with one task per line")
    tasks = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            tasks.append(line)
    if not tasks:
        raise ValueError(f"scenario file {path} names no task")
    return tasks


def default_order(root: str | Path) -> list[str]:
    """The synthetic benchmark's own order (synth.json), else the task folders in name order."""
    synth = Path(root) / "synth.json"
    if synth.is_file():
        reason = outside_root(synth, root)
        if reason:
            raise ValueError(f"{synth}: {reason}")
        return list(json.loads(synth.read_text())["tasks"])
    return list_tasks(root)


def resolve_tasks(tasks: str | None, scenario: str | None, root: str | Path) -> list[str]:
    """The task order from --tasks (comma-separated) or --scenario, else the root's default; checked against root."""
    if tasks and scenario:
        raise ValueError("give --tasks or --scenario, not both")
    if tasks:
        order = [t.strip() for t in tasks.split(",") if t.strip()]
        if not order:
            raise ValueError(f"--tasks {tasks!r} names no task")
    elif scenario:
        order = scenario_tasks(scenario)
    else:
        order = default_order(root)
    duplicates = sorted({t for t in order if order.count(t) > 1})
    if duplicates:
        raise ValueError(f"task order names {', '.join(duplicates)} more than once")
    present = set(list_tasks(root)) if Path(root).is_dir() else set()
    missing = [t for t in order if t not in present]
    if missing:
        raise ValueError(f"task(s) {', '.join(missing)} not found under {root}; "
                         f"it holds: {', '.join(sorted(present)) or 'nothing'}")
    if not order:
        raise ValueError(f"no task folders under {root}")
    return order
