"""Publish a protection job's frozen surrogate as a new version of the `mem_protect` Triton model.

    version = publish_protect_model(repo, job_dir / "surrogate" / "1", steps=..., gpu=False)

A version is self-contained (its own copy of the surrogate and the settings it protects with) and is
published like every versioned model of the repository (aigis.export.repository.publish_version): written
aside, renamed into place when complete, never rewritten.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from aigis import contract, preprocess
from aigis.export.code_pin import PIN_FILE, pin
from aigis.export.configs import tensor
from aigis.export.repository import publish_version, versions

from .triton_model import SETTINGS_FILE, SURROGATE_DIR

# The modules a served version runs: their sha256 is pinned in the version (aigis.export.code_pin), and its
# model.py refuses to load under other code, so a rollback never serves old settings with new code.
SERVED_MODULES = ("aigis.contract", "aigis.preprocess", "aigis.export.decode_model", "aigis.protection.triton_model",
                  "aigis.protection.mem", "aigis.protection.attack", "aigis.protection.search",
                  "aigis.protection.pgd", "aigis.protection.state", "aigis.protection.surrogate",
                  "aigis.protection.upload", "aigis.protection.word_code", "aigis.protection.artefact",
                  "aigis.protection.clip", "aigis.protection.settings", "aigis.protection.tokenizer")
MODEL_SHIM = '''"""mem_protect: MEM protect-on-upload (aigis.protection.triton_model), pinned to the code in code.json."""
from pathlib import Path

from aigis.export.code_pin import require_pinned_code

require_pinned_code(Path(__file__).parent)
from aigis.protection.triton_model import TritonPythonModel  # noqa: E402,F401
'''


# What a version protects uploads with (settings.json "protects_with"): the job's word code, or its own search.
PROTECTS_WITH_CODE = "word code"
PROTECTS_WITH_SEARCH = "search + PGD"


def protect_config(version: int, max_batch_size: int = 16, gpu: bool = False, max_queue_delay_us: int = 5000) -> dict:
    """mem_protect's config (Triton JSON form): uint8 images of any size + captions in, protected pairs out."""
    return {
        "name": contract.PROTECT_MODEL,
        "backend": "python",
        "version_policy": {"specific": {"versions": [version]}},
        "max_batch_size": max_batch_size,
        "input": [tensor(contract.PROTECT_IMAGES, "TYPE_UINT8", [-1, -1, 3]),
                  tensor(contract.PROTECT_CAPTIONS, "TYPE_STRING", [1])],
        "output": [tensor(contract.PROTECTED_IMAGES, "TYPE_UINT8", [-1, -1, 3]),
                   tensor(contract.PROTECTED_CAPTIONS, "TYPE_STRING", [1])],
        "dynamic_batching": {"max_queue_delay_microseconds": max_queue_delay_us},
        "instance_group": [{"kind": "KIND_GPU" if gpu else "KIND_CPU", "count": 1}],
        # The upload budget: a larger image is refused before any protection work.
        "parameters": {"max_pixels": {"string_value": str(preprocess.MAX_PIXELS)},
                       "max_side": {"string_value": str(preprocess.MAX_SIDE)}},
    }


def _tree_sha256(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def existing_versions(repo: str | Path) -> list[int]:
    return versions(repo, contract.PROTECT_MODEL)


def publish_protect_model(repo: str | Path, surrogate_dir: str | Path, *, steps: int | None = None,
                          mem_settings: Any = None, gpu: bool = False, max_batch_size: int = 16) -> int:
    """Write mem_protect version N+1 from a surrogate artefact; return N+1, or the version that already holds it.

    `steps` is the number of PGD steps per request (None: the settings' own); serving uses the
    surrogate's MEM settings unless `mem_settings` (a MEMSettings) overrides them (mem.served_settings: an
    artefact holding a word-texture job's code protects uploads with that code, no search). Like every model in the
    repository, the served version is the one `<model>/config.pbtxt` names: the first version sets it,
    later ones are served after `aigis.export.repository.point_to` (or a rollout) moves it.
    """
    from aigis.protection.mem import load_surrogate, served_settings

    surrogate_dir = Path(surrogate_dir)
    if not surrogate_dir.is_dir():
        raise FileNotFoundError(f"surrogate artefact {surrogate_dir} does not exist (run `aigis protect` first)")
    _, _, meta = load_surrogate(surrogate_dir)     # refuses a broken artefact before anything is written
    # A word-texture job's artefact holds its code, which uploads then get too; otherwise (and for artefacts
    # saved before the code was) a request gets its own trigger search + PGD, per image, as settings.json says.
    settings = served_settings(meta, mem_settings)
    settings.validate()
    source_hash = _tree_sha256(surrogate_dir)
    code = pin(SERVED_MODULES)

    record = {"mem": dataclasses.asdict(settings), "steps": steps, "surrogate_sha256": source_hash,
              "code_sha256": code["sha256"],
              "protects_with": PROTECTS_WITH_CODE if settings.word_textures else PROTECTS_WITH_SEARCH,
              "surrogate": meta.get("identity", meta.get("sha256")), "max_batch_size": max_batch_size, "gpu": gpu}
    repo = Path(repo)
    model_dir = repo / contract.PROTECT_MODEL
    for version in existing_versions(repo):  # the same artefact published the same way: that version
        recorded = model_dir / str(version) / SETTINGS_FILE
        if recorded.is_file() and json.loads(recorded.read_text()) == record:
            return version
    version = (existing_versions(repo) or [0])[-1] + 1
    settings_json = json.dumps(record, indent=2)

    def write(folder: Path) -> None:
        shutil.copytree(surrogate_dir, folder / SURROGATE_DIR)
        (folder / "model.py").write_text(MODEL_SHIM)
        (folder / SETTINGS_FILE).write_text(settings_json)
        (folder / PIN_FILE).write_text(json.dumps(code, indent=2))

    publish_version(repo, contract.PROTECT_MODEL, version, protect_config(version, max_batch_size, gpu), write)
    return version
