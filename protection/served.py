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

from aigis import contract, preprocess
from aigis.export.code_pin import PIN_FILE, pin
from aigis.export.configs import tensor
from aigis.export.repository import publish_version, versions

from .settings import SurrogateSettings
from .triton_model import SETTINGS_FILE, SURROGATE_DIR

# The modules a served version runs: their sha256 is pinned in the version (aigis.export.code_pin), and its
# model.py refuses to load under other code, so a rollback never serves old settings with new code.
SERVED_MODULES = ("aigis.contract", "aigis.preprocess", "aigis.export.decode_model", "aigis.protection.triton_model",
                  "aigis.protection.method", "aigis.protection.per_image", "aigis.protection.attack",
                  "aigis.protection.search", "aigis.protection.pgd", "aigis.protection.state", "aigis.protection.surrogate",
                  "aigis.protection.upload", "aigis.protection.word_code", "aigis.protection.artefact",
                  "aigis.protection.clip", "aigis.protection.settings", "aigis.protection.tokenizer")
MODEL_SHIM = '''"""mem_protect: MEM protect-on-upload (aigis.protection.triton_model), pinned to the code in code.json."""
from pathlib import Path

from aigis.export.code_pin import require_pinned_code

require_pinned_code(Path(__file__).parent)
from aigis.protection.triton_model import TritonPythonModel  # noqa: E402,F401
'''


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


def _identity(surrogate_dir: Path) -> str:
    meta = json.loads((surrogate_dir / "meta.json").read_text())
    return meta.get("identity", meta.get("sha256"))


def existing_versions(repo: str | Path) -> list[int]:
    return versions(repo, contract.PROTECT_MODEL)


def publish_protect_model(repo: str | Path, surrogate_dir: str | Path, *, steps: int | None = None,
                          settings: SurrogateSettings | None = None, gpu: bool = False,
                          max_batch_size: int = 16) -> int:
    """Write mem_protect version N+1 from a protection job's artefact; return N+1, or the version that already
    holds it.

    The version protects uploads as the artefact's method does (method.load_protection): a word code applies
    the job's code, per-image MEM runs a trigger search and `steps` PGD steps per request (None: the job's
    pgd_steps). `settings` overrides the artefact's own. Like every model in the repository, the served version
    is the one `<model>/config.pbtxt` names: the first version sets it, later ones are served after
    `aigis.export.repository.point_to` (or a rollout) moves it.
    """
    from .method import load_protection
    from .settings import MEMSettings

    surrogate_dir = Path(surrogate_dir)
    if not surrogate_dir.is_dir():
        raise FileNotFoundError(f"surrogate artefact {surrogate_dir} does not exist (run `aigis protect` first)")
    protection = load_protection(surrogate_dir, settings)  # refuses a broken artefact before anything is written
    if steps is not None:
        if not isinstance(protection.settings, MEMSettings):
            raise ValueError(f"steps {steps}: a {protection.method} version runs no PGD per upload")
        protection = protection.with_settings(dataclasses.replace(protection.settings, upload_steps=int(steps)))
    source_hash = _tree_sha256(surrogate_dir)
    code = pin(SERVED_MODULES)
    record = {"settings": protection.settings.to_dict(), "surrogate_sha256": source_hash,
              "code_sha256": code["sha256"], "protects_with": protection.protects_with,
              "surrogate": _identity(surrogate_dir), "max_batch_size": max_batch_size, "gpu": gpu}
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
