"""A run directory on disk: per-task checkpoints and the one manifest that says which tasks are finished.

    <run>/manifest.json                        what export reads; lists ONLY finished tasks
    <run>/tasks/<k>_<task>/adapter.safetensors  adapter k (LoRAX) or model.safetensors (baselines)
    <run>/tasks/<k>_<task>/heads.safetensors    unified classifier over k+1 extractors (+ diversity head)
    <run>/tasks/<k>_<task>/exemplars.json       the exemplar memory after task k (paths relative to data root)
    <run>/metrics.json, <run>/accuracy_matrix.png

A task directory is written under a temporary name and renamed into place, then the manifest is
replaced atomically. A crash at any point leaves either the old manifest (the task is redone on
resume) or the new one (the task is finished and complete on disk): never a half-written task.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from torch import Tensor

from aigis.errors import TrainingError

MANIFEST = "manifest.json"
METRICS = "metrics.json"
MATRIX_PNG = "accuracy_matrix.png"
FORMAT = "aigis-lorax-run"
FORMAT_VERSION = 1
ADAPTER_FILE = "adapter.safetensors"
MODEL_FILE = "model.safetensors"
HEADS_FILE = "heads.safetensors"
EXEMPLARS_FILE = "exemplars.json"


class RunError(TrainingError, RuntimeError):
    """A run directory that cannot be used as asked (missing, incomplete, or from another config)."""


def task_dir_name(index: int, task: str) -> str:
    return f"{index}_{task.replace('/', '_')}"


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so that readers see the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp",
                                     delete=False) as handle:
        json.dump(data, handle, indent=2, sort_keys=False)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(handle.name, path)


def write_file_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Let `write(tmp_path)` produce the file, then move it into place in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temporary name keeps the real suffix: writers such as matplotlib choose the format from it.
    descriptor, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.close(descriptor)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    write_file_atomic(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                                                  metadata=metadata))


def load_tensors(path: Path, device: str = "cpu") -> dict[str, Tensor]:
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise RunError(f"{path}: checkpoint file missing")
    return load_file(str(path), device=device)


def write_task_dir(run_dir: Path, index: int, task: str, files: dict[str, Callable[[Path], None]]) -> Path:
    """Write a finished task's files into a temporary directory and rename it into place.

    `files` maps file names to writers `write(path)`. A leftover directory of the same task (from a
    run that died before its manifest named it) is replaced.
    """
    tasks_root = Path(run_dir) / "tasks"
    tasks_root.mkdir(parents=True, exist_ok=True)
    final = tasks_root / task_dir_name(index, task)
    staging = Path(tempfile.mkdtemp(dir=tasks_root, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        for name, write in files.items():
            write(staging / name)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return final


def checked_subpath(root: str | Path, relative: str) -> Path:
    """`root / relative`, refusing a manifest path that would lead outside `root` (absolute, `..`, links)."""
    root = Path(root).resolve()
    path = (root / relative).resolve()
    if Path(relative).is_absolute() or not path.is_relative_to(root):
        raise RunError(f"{root}: manifest path {relative!r} leads outside the run directory")
    return path


def read_manifest(run_dir: str | Path) -> dict:
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        raise RunError(f"{run_dir}: no {MANIFEST}; not a training run directory (or no task finished yet)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RunError(f"{path}: not valid JSON ({exc})") from None
    if manifest.get("format") != FORMAT:
        raise RunError(f"{path}: format {manifest.get('format')!r} is not {FORMAT!r}")
    if int(manifest.get("format_version", 0)) > FORMAT_VERSION:
        raise RunError(f"{path}: format version {manifest['format_version']} is newer than this code "
                       f"understands ({FORMAT_VERSION}); upgrade aigis")
    return manifest


def clear_stale_task_dirs(run_dir: Path, finished: int) -> None:
    """Remove task directories the manifest does not name (left by a run that died mid-task)."""
    tasks_root = Path(run_dir) / "tasks"
    if not tasks_root.is_dir():
        return
    for entry in tasks_root.iterdir():
        index = entry.name.split("_", 1)[0]
        if entry.name.startswith(".") or (index.isdigit() and int(index) >= finished):
            shutil.rmtree(entry, ignore_errors=True)
