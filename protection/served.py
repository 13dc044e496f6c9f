"""Publish a protection job's frozen surrogate as a new version of the `mem_protect` Triton model.

    version = publish_protect_model(repo, job_dir / "surrogate" / "1", steps=..., gpu=False)

A version is self-contained (its own copy of the surrogate and the settings it protects with), is
written aside under a dot-prefixed staging name that Triton ignores, and appears only when complete.
Versions already in the repository are never rewritten.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from aigis import contract

from .triton_model import SETTINGS_FILE, SURROGATE_DIR

# model.py of every version: the implementation lives in the package, so fixing it needs no re-export.
MODEL_SHIM = '''"""mem_protect: MEM protect-on-upload (implementation: aigis.protection.triton_model)."""
from aigis.protection.triton_model import TritonPythonModel  # noqa: F401
'''


def protect_config(max_batch_size: int = 16, gpu: bool = False, max_queue_delay_us: int = 5000) -> str:
    """config.pbtxt of mem_protect: uint8 images of any size + captions in, protected pairs out."""
    kind = "KIND_GPU" if gpu else "KIND_CPU"
    return f'''name: "{contract.PROTECT_MODEL}"
backend: "python"
max_batch_size: {max_batch_size}
input [
  {{ name: "{contract.PROTECT_IMAGES}" data_type: TYPE_UINT8 dims: [ -1, -1, 3 ] }},
  {{ name: "{contract.PROTECT_CAPTIONS}" data_type: TYPE_STRING dims: [ 1 ] }}
]
output [
  {{ name: "{contract.PROTECTED_IMAGES}" data_type: TYPE_UINT8 dims: [ -1, -1, 3 ] }},
  {{ name: "{contract.PROTECTED_CAPTIONS}" data_type: TYPE_STRING dims: [ 1 ] }}
]
dynamic_batching {{ max_queue_delay_microseconds: {max_queue_delay_us} }}
instance_group [ {{ kind: {kind} count: 1 }} ]
'''


def _tree_sha256(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def existing_versions(repo: str | Path) -> list[int]:
    model_dir = Path(repo) / contract.PROTECT_MODEL
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def publish_protect_model(repo: str | Path, surrogate_dir: str | Path, *, steps: int | None = None,
                          mem_settings: Any = None, gpu: bool = False, max_batch_size: int = 16) -> int:
    """Write mem_protect version N+1 from a surrogate artefact; return N+1, or the version that already holds it.

    `steps` is the number of PGD steps per request (None: the settings' own); serving uses the
    surrogate's MEM settings unless `mem_settings` (a MEMSettings) overrides them.
    """
    from aigis.protection.mem import MEMSettings, load_surrogate

    surrogate_dir = Path(surrogate_dir)
    if not surrogate_dir.is_dir():
        raise FileNotFoundError(f"surrogate artefact {surrogate_dir} does not exist (run `aigis protect` first)")
    _, _, meta = load_surrogate(surrogate_dir)     # refuses a broken artefact before anything is written
    settings = mem_settings if mem_settings is not None else MEMSettings(**meta.get("settings", {}))
    settings.validate()
    source_hash = _tree_sha256(surrogate_dir)

    repo = Path(repo)
    model_dir = repo / contract.PROTECT_MODEL
    for version in existing_versions(repo):
        recorded = model_dir / str(version) / SETTINGS_FILE
        if recorded.is_file() and json.loads(recorded.read_text()).get("surrogate_sha256") == source_hash \
                and json.loads(recorded.read_text()).get("steps") == steps:
            return version
    version = (existing_versions(repo) or [0])[-1] + 1
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{version}-", dir=model_dir))
    try:
        shutil.copytree(surrogate_dir, staging / SURROGATE_DIR)
        (staging / "model.py").write_text(MODEL_SHIM)
        (staging / SETTINGS_FILE).write_text(json.dumps({
            "mem": dataclasses.asdict(settings), "steps": steps, "surrogate_sha256": source_hash,
            "surrogate": meta.get("identity", meta.get("sha256")),
        }, indent=2))
        (staging / "config.pbtxt").write_text(protect_config(max_batch_size, gpu))
        os.replace(staging, model_dir / str(version))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    # The model-level config serves the newest version; the per-version copy serves a rollback.
    config_tmp = model_dir / ".config.pbtxt.tmp"
    config_tmp.write_text(protect_config(max_batch_size, gpu))
    os.replace(config_tmp, model_dir / "config.pbtxt")
    return version
