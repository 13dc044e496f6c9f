"""The versioned Triton model repository of the attribution models.

    <repo>/lorax_extractor_<task>/1/model.onnx       written once per task, never rewritten
    <repo>/lorax_extractor_<task>/1/source.json      which adapter it holds (its sha256)
    <repo>/lorax_trunk/1/model.onnx                  with a shared trunk: the frozen early blocks, written once;
                                                     each extractor is then only its task's tail
    <repo>/lorax_classifier_v<v>/1/model.onnx        classifier over the extractors of tasks 1..v
    <repo>/lorax_decode_v<v>/1/model.py              bytes -> images, the first step of lorax_bytes version v
    <repo>/lorax/<v>/, <repo>/lorax_bytes/<v>/        ensemble version v = the model after task v
    <repo>/<model>/<v>/config.pbtxt                  the full config of version v (never rewritten)
    <repo>/<model>/config.pbtxt                      the SERVED version's config: the one pointer that moves

Every version directory is written under a dot-prefixed staging name (Triton skips hidden entries),
then renamed into place in one step, so a reader sees a version whole or not at all.

Triton keeps one config per model, and the ensembles change inputs and steps from version to version, so
the model-level config.pbtxt says which version is served; export sets it only for a model's first version:
publishing never changes what a running server answers with. Every step an ensemble version pins is a model
of its own that never changes (extractors per task, classifier and decode per version). A rollout
(load_version) therefore loads the new version's steps beside the served ones, then switches the ensembles
(Triton swaps an ensemble's versions without a gap), and unloads the old steps only once the old ensemble
versions have drained: no request sees a missing model, and a restarted server comes back on the same version.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
import time
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from aigis import contract
from aigis.errors import ExportError

from .configs import CONFIG_FILE, manifest_of, read_config, to_pbtxt
from .remote import pointer_moved

log = logging.getLogger(__name__)
SOURCE_FILE = "source.json"
STAGING_PREFIX = ".staging-"
LOCK_FILE = ".aigis-writer.lock"
ROLLOUT_LOCK_FILE = ".aigis-rollout.lock"
MANIFEST_FORMAT = "aigis-served-manifest/1"


class RepositoryError(ExportError):
    """The repository cannot take this export (a version exists with other content, a foreign extractor...)."""


# ---- versions on disk -------------------------------------------------------------------------------

def versions(repo: str | Path, model: str) -> list[int]:
    """Complete versions of `model`, ascending (staging leftovers are not versions)."""
    folder = Path(repo) / model
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


def version_config(repo: str | Path, model: str, version: int) -> dict:
    path = Path(repo) / model / str(version) / CONFIG_FILE
    if not path.is_file():
        raise RepositoryError(f"{model} version {version}: no {CONFIG_FILE} in {path.parent}")
    return read_config(path)


@contextmanager
def _flock(path: Path, timeout_s: float, holder: str) -> Iterator[None]:
    """An exclusive flock on `path` (the kernel releases it when its holder dies), waited for up to `timeout_s`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise RepositoryError(f"{path.parent}: {holder} has held {path.name} for {timeout_s:.0f} s") \
                        from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def repository_lock(repo: str | Path, timeout_s: float = 600.0) -> Iterator[Path]:
    """Hold the repository's writer lock; under it, remove what writers that died left behind.

    Every write (a version published, a pointer moved) happens under this lock, so any staging folder or
    temporary file found while holding it belongs to a writer that is gone (the kernel releases a dead
    process's flock): removing it can never touch a live one.
    """
    repo = Path(repo)
    with _flock(repo / LOCK_FILE, timeout_s, "another writer (an export, a publish or a pointer move)"):
        for leftover in leftovers(repo):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
        yield repo


def rollout_lock(repo: str | Path, timeout_s: float = 600.0) -> AbstractContextManager[None]:
    """One rollout at a time per repository: two interleaved ones could leave pointers and the served versions
    disagreeing. Separate from the writer lock, which each pointer move takes on its own."""
    return _flock(Path(repo) / ROLLOUT_LOCK_FILE, timeout_s, "another rollout")


def leftovers(repo: str | Path) -> list[Path]:
    """Staging folders and temporary files of writers (live ones too, unless the lock is held)."""
    repo = Path(repo)
    if not repo.is_dir():
        return []
    found = sorted(repo.glob(f"{STAGING_PREFIX}*")) + sorted(repo.glob(f"*/{STAGING_PREFIX}*"))
    return found + sorted(repo.glob(f"*/.{CONFIG_FILE}.tmp"))


def publish_version(repo: Path, model: str, version: int, config: dict, write: Callable[[Path], None],
                    model_files: dict[str, bytes] | None = None) -> Path:
    """Write version `version` of `model` aside, then move it into place in one rename; never over an
    existing one. A model's first version arrives as the whole model folder (version, the model-level
    config that serves it, and `model_files` beside it, e.g. a label file), so a writer killed at any point
    leaves either nothing or a whole version."""
    with repository_lock(repo):
        model_dir = Path(repo) / model
        final = model_dir / str(version)
        if final.exists():
            raise RepositoryError(f"{model} version {version} already exists in {repo}; versions are never rewritten")
        text = to_pbtxt(config)
        first = not versions(repo, model)
        if model_files and not first:
            raise RepositoryError(f"{model}: files beside the config come with a model's first version only")
        staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{model}-" if first else f"{STAGING_PREFIX}{version}-",
                                        dir=Path(repo) if first else model_dir))
        try:
            target = staging / str(version) if first else staging
            target.mkdir(exist_ok=True)
            write(target)
            if config.get("backend") == "python":
                # The stub imports model.py from this folder, and Python would write __pycache__ into it; Triton
                # would then see the version changed and load it again with the next ensemble that uses it. A
                # plain file of that name makes the write fail, which Python ignores, in any Triton and whatever
                # the stub's environment (the wheel's stub ignores PYTHONDONTWRITEBYTECODE).
                (target / "__pycache__").write_bytes(b"")
            (target / CONFIG_FILE).write_text(text)
            if first:
                (staging / CONFIG_FILE).write_text(text)
                for name, data in (model_files or {}).items():
                    (staging / name).write_bytes(data)
                if model_dir.exists():   # a folder with no version holds nothing published
                    shutil.rmtree(model_dir)
                os.replace(staging, model_dir)
            else:
                os.replace(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if not (model_dir / CONFIG_FILE).exists():   # a repository written before first versions came whole
            _write_atomic(model_dir / CONFIG_FILE, text)
    return final


def point_to(repo: str | Path, model: str, version: int) -> bool:
    """Make version `version` the one a (re)load of `model` serves; returns whether the pointer moved."""
    source = Path(repo) / model / str(version) / CONFIG_FILE
    target = Path(repo) / model / CONFIG_FILE
    if not source.is_file():
        raise RepositoryError(f"{model} version {version} does not exist in {repo}")
    text = source.read_text()
    with repository_lock(repo):
        if target.is_file() and target.read_text() == text:
            return False
        _write_atomic(target, text)
        pointer_moved(repo, model)  # a local mirror of a bucket: the servers read the pointer there
    return True


def pointed_version(repo: str | Path, model: str) -> int | None:
    """The version the model-level config serves (None when it names none)."""
    path = Path(repo) / model / CONFIG_FILE
    if not path.is_file():
        return None
    found = _policy_versions(read_config(path))
    return found[0] if found else None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _sha256_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


# ---- what a version holds ------------------------------------------------------------------------

ENSEMBLES = (contract.ENSEMBLE_MODEL, contract.BYTES_ENSEMBLE_MODEL)


def version_models(version: int) -> list[tuple[str, int]]:
    """(model, model version) that ensemble version `version` adds besides its extractors, in the order
    they are published: the ensembles last, so a published ensemble never names a step that is not there."""
    return [(contract.classifier_model(version), 1), (contract.decode_model(version), 1),
            (contract.ENSEMBLE_MODEL, version), (contract.BYTES_ENSEMBLE_MODEL, version)]


def ensemble_dependencies(config: dict) -> list[tuple[str, int]]:
    return [(step["model_name"], int(step["model_version"])) for step in config["ensemble_scheduling"]["step"]]


def _policy_versions(config: dict) -> list[int]:
    return [int(v) for v in ((config.get("version_policy") or {}).get("specific") or {}).get("versions", [])]


# ---- listing and validation ----------------------------------------------------------------------------

def list_models(repo: str | Path) -> list[dict]:
    """Every model: its versions, the newest, and for ensembles the tasks of each version."""
    repo = Path(repo)
    if not repo.is_dir():
        raise RepositoryError(f"model repository {repo} does not exist")
    rows = []
    for folder in sorted(p for p in repo.iterdir() if p.is_dir() and not p.name.startswith(".")):
        found = versions(repo, folder.name)
        row: dict[str, Any] = {"model": folder.name, "versions": found, "latest": found[-1] if found else None,
                               "served": pointed_version(repo, folder.name)}
        tasks = {}
        for v in found:
            config_path = folder / str(v) / CONFIG_FILE
            if config_path.is_file():
                manifest = manifest_of(read_config(config_path))
                if manifest:
                    tasks[v] = manifest.get("tasks")
        if tasks:
            row["tasks"] = tasks
        rows.append(row)
    return rows


def validate(repo: str | Path) -> list[str]:
    """Every problem found (empty = valid): steps resolve, tensor names/dtypes/shapes agree, pointers agree.

    What an interrupted writer leaves (staging folders, a version published in part) serves nothing and is
    healed by the next writer: `notes` lists it, it is no problem.
    """
    repo = Path(repo)
    if not repo.is_dir():
        return [f"model repository {repo} does not exist"]
    problems: list[str] = []
    onnx_io: dict[tuple[str, int], dict[str, tuple[str, list[int]]]] = {}
    configs: dict[tuple[str, int], dict] = {}
    for folder in sorted(p for p in repo.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for v in versions(repo, folder.name):
            vdir = folder / str(v)
            try:
                config = read_config(vdir / CONFIG_FILE)
            except Exception as exc:  # a config that does not parse is a problem to report, not a crash
                problems.append(f"{folder.name}/{v}/{CONFIG_FILE}: {exc}")
                continue
            configs[(folder.name, v)] = config
            if config.get("name") != folder.name:
                problems.append(f"{folder.name}/{v}: config names model {config.get('name')!r}")
            if config.get("platform") == "onnxruntime_onnx":
                model_file = vdir / "model.onnx"
                if not model_file.is_file():
                    problems.append(f"{folder.name}/{v}: model.onnx is missing")
                    continue
                try:
                    onnx_io[(folder.name, v)] = _onnx_signature(model_file)
                except Exception as exc:
                    problems.append(f"{folder.name}/{v}/model.onnx: unreadable ({exc})")
                    continue
                problems += _compare_config_with_onnx(f"{folder.name}/{v}", config, onnx_io[(folder.name, v)])
            elif config.get("backend") == "python" and not (vdir / "model.py").is_file():
                problems.append(f"{folder.name}/{v}: model.py is missing")
        pointer = folder / CONFIG_FILE
        found = versions(repo, folder.name)
        if found and not pointer.is_file():
            problems.append(f"{folder.name}: no {CONFIG_FILE} naming the served version")
        elif found and not any((folder / str(v) / CONFIG_FILE).is_file() and
                               (folder / str(v) / CONFIG_FILE).read_text() == pointer.read_text() for v in found):
            problems.append(f"{folder.name}/{CONFIG_FILE} matches no version's config (edited by hand?); "
                            f"`aigis models rollout` rewrites it")
    for (name, v), config in configs.items():
        if config.get("platform") == "ensemble":
            problems += _check_ensemble(f"{name}/{v}", config, configs)
        if name == contract.FUSED_MODEL:
            ensemble = configs.get((contract.ENSEMBLE_MODEL, v))
            if ensemble is None:
                problems.append(f"{name}/{v}: there is no {contract.ENSEMBLE_MODEL} version {v} for it to stand for")
            elif manifest_of(ensemble) != manifest_of(config):
                problems.append(f"{name}/{v}: its manifest is not that of {contract.ENSEMBLE_MODEL} version {v}")
    problems += _check_pointers(repo, configs)
    return problems


def notes(repo: str | Path) -> list[str]:
    """What interrupted writers left: harmless (Triton skips hidden folders, and no served ensemble version
    names a part-published one), and removed or finished by the next export."""
    repo = Path(repo)
    if not repo.is_dir():
        return []
    found = [f"{path.relative_to(repo)}: left by an interrupted writer; the next export or publish removes it"
             for path in leftovers(repo)]
    return found + _check_versions_complete(repo)


def _check_pointers(repo: Path, configs: dict[tuple[str, int], dict]) -> list[str]:
    """<model>/config.pbtxt (what a (re)load serves) is one of its versions, and the ensembles' steps
    pin exactly the versions their models point at (else a restart would serve a mixed set)."""
    problems = []
    pointed: dict[str, int] = {}
    for folder in sorted(p for p in repo.iterdir() if p.is_dir() and not p.name.startswith(".")):
        path = folder / CONFIG_FILE
        if not versions(repo, folder.name):
            problems.append(f"{folder.name}: no version directories")
            continue
        if not path.is_file():
            problems.append(f"{folder.name}/{CONFIG_FILE} is missing (it names the version a load serves)")
            continue
        try:
            top = read_config(path)
        except Exception as exc:  # reported, not raised: validate lists every problem
            problems.append(f"{folder.name}/{CONFIG_FILE}: {exc}")
            continue
        found = _policy_versions(top)
        if len(found) != 1 or configs.get((folder.name, found[0])) != top:
            problems.append(f"{folder.name}/{CONFIG_FILE} is not the config of any one of its versions "
                            f"{versions(repo, folder.name)}")
            continue
        pointed[folder.name] = found[0]
    for ensemble in (contract.ENSEMBLE_MODEL, contract.BYTES_ENSEMBLE_MODEL):
        if ensemble not in pointed:
            continue
        for model, version in ensemble_dependencies(configs[(ensemble, pointed[ensemble])]):
            if model in pointed and pointed[model] != version:
                problems.append(f"{ensemble}/{CONFIG_FILE} serves version {pointed[ensemble]}, whose step "
                                f"{model} is version {version}, but {model}/{CONFIG_FILE} serves version "
                                f"{pointed[model]} (a rollout was interrupted: run aigis models rollout again)")
    return problems


def _check_versions_complete(repo: Path) -> list[str]:
    """Ensemble version v comes with its classifier, its decode step and bytes-ensemble version v."""
    problems = []
    found = {v for name in ENSEMBLES for v in versions(repo, name)}
    for folder in repo.iterdir():   # a classifier or decode step whose ensembles were never published
        for prefix in (contract.classifier_model(""), contract.decode_model("")):
            if folder.name.startswith(prefix) and folder.name[len(prefix):].isdigit():
                found.add(int(folder.name[len(prefix):]))
    for v in sorted(found):
        missing = [f"{name}/{model_version}" for name, model_version in version_models(v)
                   if model_version not in versions(repo, name)]
        if missing:
            problems.append(f"version {v} is incomplete: {', '.join(missing)} missing (an export was interrupted: "
                            f"run aigis export again with the same run to finish it)")
    return problems


_ONNX_TO_TRITON = {1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 6: "TYPE_INT32", 7: "TYPE_INT64",
                   10: "TYPE_FP16", 11: "TYPE_FP64", 8: "TYPE_STRING", 9: "TYPE_BOOL"}


def _onnx_signature(path: Path) -> dict[str, tuple[str, list[int]]]:
    """name -> (Triton dtype, dims without the batch axis; -1 for symbolic) of every graph input and output."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    found = {}
    for value in list(graph.input) + list(graph.output):
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim]
        found[value.name] = (_ONNX_TO_TRITON.get(tensor_type.elem_type, f"onnx type {tensor_type.elem_type}"), dims[1:])
    return found


def _compare_config_with_onnx(where: str, config: dict, signature: dict) -> list[str]:
    problems = []
    for item in config.get("input", []) + config.get("output", []):
        name = item["name"]
        if name not in signature:
            problems.append(f"{where}: config tensor {name} is not in model.onnx ({sorted(signature)})")
            continue
        dtype, dims = signature[name]
        if dtype != item["data_type"]:
            problems.append(f"{where}: {name} is {item['data_type']} in the config, {dtype} in model.onnx")
        want = [int(d) for d in item.get("dims", [])]
        if len(want) != len(dims) or any(a != b and -1 not in (a, b) for a, b in zip(want, dims)):
            problems.append(f"{where}: {name} has dims {want} in the config, {dims} in model.onnx")
    return problems


def _check_ensemble(where: str, config: dict, configs: dict[tuple[str, int], dict]) -> list[str]:
    """Each step resolves to a model version on disk, and the tensors it passes agree in dtype and dims."""
    problems = []
    produced: dict[str, tuple[str, list[int]]] = {
        i["name"]: (i["data_type"], [int(d) for d in i.get("dims", [])]) for i in config.get("input", [])}
    for step in config.get("ensemble_scheduling", {}).get("step", []):
        model, v = step["model_name"], int(step["model_version"])
        target = configs.get((model, v))
        if target is None:
            problems.append(f"{where}: step {model} version {v} does not exist in the repository")
            continue
        inputs = {i["name"]: i for i in target.get("input", [])}
        for model_input, ensemble_tensor in step.get("input_map", {}).items():
            if model_input not in inputs:
                problems.append(f"{where}: step {model}/{v} has no input {model_input}")
                continue
            if ensemble_tensor not in produced:
                problems.append(f"{where}: step {model}/{v} reads {ensemble_tensor}, which no earlier step produces")
                continue
            dtype, dims = produced[ensemble_tensor]
            want = inputs[model_input]
            if dtype != want["data_type"] or dims != [int(d) for d in want.get("dims", [])]:
                problems.append(f"{where}: {ensemble_tensor} is {dtype} {dims} but {model}/{v} input {model_input} "
                                f"wants {want['data_type']} {want.get('dims')}")
        outputs = {o["name"]: o for o in target.get("output", [])}
        for model_output, ensemble_tensor in step.get("output_map", {}).items():
            if model_output not in outputs:
                problems.append(f"{where}: step {model}/{v} has no output {model_output}")
                continue
            produced[ensemble_tensor] = (outputs[model_output]["data_type"],
                                         [int(d) for d in outputs[model_output].get("dims", [])])
    for item in config.get("output", []):
        got = produced.get(item["name"])
        if got is None:
            problems.append(f"{where}: ensemble output {item['name']} is produced by no step")
        elif got != (item["data_type"], [int(d) for d in item.get("dims", [])]):
            problems.append(f"{where}: ensemble output {item['name']} is {got} from its step, "
                            f"{item['data_type']} {item.get('dims')} in the config")
    return problems
