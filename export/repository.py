"""The versioned Triton model repository of the attribution models.

    <repo>/lorax_extractor_<task>/1/model.onnx       written once per task, never rewritten
    <repo>/lorax_extractor_<task>/1/source.json      which adapter it holds (its sha256)
    <repo>/lorax_classifier/<v>/model.onnx           classifier over the v extractors of tasks 1..v
    <repo>/lorax/<v>/                                ensemble version v = the model after task v
    <repo>/lorax_decode/<v>/model.py, lorax_bytes/<v>/   the same for encoded-bytes clients
    <repo>/<model>/<v>/config.pbtxt                  the full config of version v
    <repo>/<model>/config.pbtxt                      the newest version's config (a plain start serves it)

Every version directory is written under a dot-prefixed staging name (Triton skips hidden entries),
then renamed into place in one step, so a reader sees a version whole or not at all. Serving a given
version loads each model with that version's stored config as the Load API override: no restart.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from aigis import contract

from .configs import (CONFIG_FILE, TargetOptions, classifier_config, decode_config, ensemble_config,
                      extractor_config, manifest_of, read_config, to_pbtxt)

SOURCE_FILE = "source.json"
STAGING_PREFIX = ".staging-"
DECODE_SHIM = '''"""lorax_decode (implementation: aigis.export.decode_model)."""
from aigis.export.decode_model import TritonPythonModel  # noqa: F401
'''
MANIFEST_FORMAT = "aigis-served-manifest/1"


class RepositoryError(RuntimeError):
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


def publish_version(repo: Path, model: str, version: int, config: dict, write: Callable[[Path], None]) -> Path:
    """Write version `version` of `model` aside, then move it into place; never over an existing one."""
    model_dir = repo / model
    final = model_dir / str(version)
    if final.exists():
        raise RepositoryError(f"{model} version {version} already exists in {repo}; versions are never rewritten")
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{version}-", dir=model_dir))
    try:
        write(staging)
        (staging / CONFIG_FILE).write_text(to_pbtxt(config))
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if version == max(versions(repo, model)):
        _write_atomic(model_dir / CONFIG_FILE, to_pbtxt(config))
    return final


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


# ---- export -------------------------------------------------------------------------------------------

@dataclass
class ExportReport:
    """What one export did: the ensemble version, models written or reused, and the numerical checks."""

    version: int
    tasks: list[str]
    written: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    checks: list[Any] = field(default_factory=list)
    already_published: bool = False

    def summary(self) -> str:
        if self.already_published:
            return f"version {self.version} ({len(self.tasks)} tasks) is already in the repository: nothing written"
        lines = [f"published version {self.version} ({len(self.tasks)} tasks: {', '.join(self.tasks)}); "
                 f"wrote {', '.join(self.written)}" + (f"; kept {', '.join(self.reused)}" if self.reused else "")]
        lines += [f"  {check}" for check in self.checks]
        return "\n".join(lines)


def run_source_hash(run_dir: Path, entries: list[dict]) -> str:
    """Identity of the checkpoint a version comes from: the adapter and head files of its tasks."""
    files = []
    for entry in entries:
        files += [run_dir / entry["files"][name] for name in sorted(entry["files"]) if name.endswith(".safetensors")]
    return _sha256_files(files)


def served_manifest(model_manifest: dict, version: int, source_sha256: str) -> dict:
    """What the client reads from the ensemble: tasks, class names, crop, version, and where it came from."""
    return {
        "format": MANIFEST_FORMAT,
        "version": str(version),
        "tasks": list(model_manifest["tasks"]),
        "class_names": list(model_manifest["class_names"]),
        "crop": int(model_manifest["crop"]),
        "backbone": {k: model_manifest["backbone"][k] for k in ("name", "sha256") if k in model_manifest["backbone"]},
        "lora": model_manifest.get("lora"),
        "source_sha256": source_sha256,
        "metrics": {k: (model_manifest.get("metrics") or {}).get(k)
                    for k in ("average_accuracy", "forgetting", "binary_accuracy")},
    }


def real_images(run_dir: Path, model_manifest: dict, crop: int, data_root: str | Path | None,
                per_task: int = 4):
    """A few held-out images of each task, as the client sends them; None when the data is not at hand."""
    import numpy as np

    from aigis import preprocess
    from aigis.data.cddb import CDDB, CDDBLayoutError

    root = data_root
    if root is None:
        exemplars = run_dir / model_manifest["task_entries"][-1]["dir"] / "exemplars.json"
        if exemplars.is_file():
            root = json.loads(exemplars.read_text()).get("data_root")
    if root is None or not Path(root).is_dir():
        return None
    try:
        data = CDDB(root, list(model_manifest["tasks"]), on_bad="skip", progress=False)
        paths = [s.path for t in range(len(data.tasks)) for s in data.samples(t, "val")[:per_task]]
    except (CDDBLayoutError, ValueError):
        return None
    return np.stack([preprocess.eval_view_from_file(p, crop) for p in paths]) if paths else None


def export_run(run_dir: str | Path, repo: str | Path, num_tasks: int | None = None, *,
               data_root: str | Path | None = None, options: TargetOptions | None = None,
               progress: bool = True) -> ExportReport:
    """Publish the run's model after `num_tasks` tasks (default: all finished) as ensemble version num_tasks."""
    import numpy as np
    import torch

    from aigis.training.run import load_run

    from . import onnx_export

    options = options or TargetOptions()
    options.validate()
    run_dir, repo = Path(run_dir), Path(repo)
    say = print if progress else (lambda *a, **k: None)
    model = load_run(run_dir, num_tasks)
    manifest = model.manifest
    tasks = list(manifest["tasks"])
    version = len(tasks)
    crop = int(manifest["crop"])
    source = run_source_hash(run_dir, manifest["task_entries"])
    served = served_manifest(manifest, version, source)
    report = ExportReport(version=version, tasks=tasks)

    existing = versions(repo, contract.ENSEMBLE_MODEL)
    if version in existing:
        old = manifest_of(version_config(repo, contract.ENSEMBLE_MODEL, version)) or {}
        if old.get("source_sha256") == source and old.get("tasks") == tasks:
            report.already_published = True
            return report
        raise RepositoryError(f"{repo}: ensemble version {version} exists and holds another model "
                              f"(tasks {old.get('tasks')}, source {str(old.get('source_sha256'))[:12]}...); "
                              f"versions are never rewritten: export into a new repository")

    rng = np.random.default_rng(0)
    random_images = rng.integers(0, 256, size=(8, crop, crop, 3), dtype=np.uint8)
    held_out = real_images(run_dir, manifest, crop, data_root)
    image_sets = [("random", random_images)] + ([("real images", held_out)] if held_out is not None else [])
    if held_out is None:
        say("  no data root at hand: checking on random images only (give --data to check on real images)")

    # Extractors: one per task, written once. An existing one must hold the same adapter.
    features: dict[str, list] = {name: [] for name, _ in image_sets}
    pending: list[tuple[str, int, bytes, dict, dict]] = []
    for k, task in enumerate(tasks):
        name = contract.extractor_model(task)
        entry = manifest["task_entries"][k]
        adapter_sha = _sha256_files([run_dir / entry["files"]["adapter.safetensors"]])
        extractor = model.merged_extractor(k)
        for set_name, images in image_sets:
            with torch.no_grad():
                features[set_name].append(extractor(torch.from_numpy(images)).numpy())
        if 1 in versions(repo, name):
            recorded = json.loads((repo / name / "1" / SOURCE_FILE).read_text())
            if recorded.get("adapter_sha256") != adapter_sha or recorded.get("backbone_sha256") != manifest["backbone"]["sha256"]:
                raise RepositoryError(f"{repo / name} holds another adapter for task {task!r} "
                                      f"(adapter {recorded.get('adapter_sha256', '?')[:12]}... here, "
                                      f"{adapter_sha[:12]}... in {run_dir}); export into a new repository")
            report.reused.append(name)
            continue
        say(f"  exporting {name} ...", flush=True)
        graph = onnx_export.extractor_onnx(extractor, crop)
        checks = [onnx_export.check_extractor(name, graph, extractor, images, set_name) for set_name, images in image_sets]
        onnx_export.require(checks)
        report.checks += checks
        source_info = {"task": task, "task_index": k, "adapter_sha256": adapter_sha,
                       "backbone": manifest["backbone"]["name"], "backbone_sha256": manifest["backbone"]["sha256"],
                       "run": str(run_dir.resolve())}
        pending.append((name, 1, graph, extractor_config(task, crop, model.feature_dim, options), source_info))

    classifier = model.classifier_module()
    graph = onnx_export.classifier_onnx(classifier, len(tasks), model.feature_dim)
    checks = [onnx_export.check_classifier(contract.CLASSIFIER_MODEL, graph, classifier, features[set_name], set_name)
              for set_name, _ in image_sets]
    onnx_export.require(checks)
    report.checks += checks

    # Everything is checked: publish. Extractors first, the ensembles last, so a version never
    # names a model that is not there yet.
    for name, v, onnx_bytes, config, source_info in pending:
        publish_version(repo, name, v, config, _writer({"model.onnx": onnx_bytes,
                                                        SOURCE_FILE: json.dumps(source_info, indent=2).encode()}))
        report.written.append(name)
    publish_version(repo, contract.CLASSIFIER_MODEL, version,
                    classifier_config(version, len(tasks), model.feature_dim, options),
                    _writer({"model.onnx": graph}))
    publish_version(repo, contract.DECODE_MODEL, version, decode_config(version, crop, options),
                    _writer({"model.py": DECODE_SHIM.encode()}))
    publish_version(repo, contract.ENSEMBLE_MODEL, version, ensemble_config(version, tasks, crop, served, options),
                    _writer({}))
    publish_version(repo, contract.BYTES_ENSEMBLE_MODEL, version,
                    ensemble_config(version, tasks, crop, served, options, from_bytes=True), _writer({}))
    report.written += [contract.CLASSIFIER_MODEL, contract.DECODE_MODEL, contract.ENSEMBLE_MODEL,
                       contract.BYTES_ENSEMBLE_MODEL]
    return report


def _writer(files: dict[str, bytes]) -> Callable[[Path], None]:
    def write(folder: Path) -> None:
        for name, data in files.items():
            (folder / name).write_bytes(data)
    return write


# ---- serving a version ------------------------------------------------------------------------------

def ensemble_dependencies(config: dict) -> list[tuple[str, int]]:
    return [(step["model_name"], int(step["model_version"])) for step in config["ensemble_scheduling"]["step"]]


def load_version(control: Any, repo: str | Path, version: int, bytes_ensemble: bool = True) -> list[str]:
    """Serve ensemble version `version` on a running server (ModelControl), with no restart.

    Each step's model is loaded with the stored config of the version the step pins, then the ensembles.
    Returns the models loaded, in order.
    """
    repo = Path(repo)
    if version not in versions(repo, contract.ENSEMBLE_MODEL):
        raise RepositoryError(f"{repo}: no ensemble version {version}; versions: "
                              f"{versions(repo, contract.ENSEMBLE_MODEL) or 'none'}")
    ensembles = [contract.ENSEMBLE_MODEL] + ([contract.BYTES_ENSEMBLE_MODEL] if bytes_ensemble else [])
    loaded: list[str] = []
    for ensemble in ensembles:
        config = version_config(repo, ensemble, version)
        for model, model_version in ensemble_dependencies(config):
            if model in loaded:
                continue
            step_config = version_config(repo, model, model_version)
            current = _served_config(control, model)
            if current is None or _policy_versions(current) != [model_version] or \
                    _comparable(current) != _comparable(step_config):
                control.load(model, config=step_config)
            loaded.append(model)
    for ensemble in ensembles:
        control.load(ensemble, config=version_config(repo, ensemble, version))
        loaded.append(ensemble)
    return loaded


def _served_config(control: Any, model: str) -> dict | None:
    if not control.is_ready(model):
        return None
    return control.config(model)


def _policy_versions(config: dict) -> list[int]:
    return [int(v) for v in ((config.get("version_policy") or {}).get("specific") or {}).get("versions", [])]


def _comparable(config: dict) -> tuple:
    """The parts of a config that decide what a loaded model computes (the server adds defaults to the rest)."""
    return (json.dumps([(i["name"], [int(d) for d in i.get("dims", [])]) for i in config.get("input", [])]),
            json.dumps([(o["name"], [int(d) for d in o.get("dims", [])]) for o in config.get("output", [])]))


def served_version(control: Any) -> int | None:
    """The ensemble version the server answers with now, or None."""
    if not control.is_ready(contract.ENSEMBLE_MODEL):
        return None
    found = _policy_versions(control.config(contract.ENSEMBLE_MODEL))
    return found[0] if found else None


# ---- listing and validation ----------------------------------------------------------------------------

def list_models(repo: str | Path) -> list[dict]:
    """Every model: its versions, the newest, and for ensembles the tasks of each version."""
    repo = Path(repo)
    if not repo.is_dir():
        raise RepositoryError(f"model repository {repo} does not exist")
    rows = []
    for folder in sorted(p for p in repo.iterdir() if p.is_dir() and not p.name.startswith(".")):
        found = versions(repo, folder.name)
        row: dict[str, Any] = {"model": folder.name, "versions": found, "latest": found[-1] if found else None}
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
    """Every problem found (empty = valid): steps resolve, tensor names/dtypes/shapes agree, no leftovers."""
    repo = Path(repo)
    if not repo.is_dir():
        return [f"model repository {repo} does not exist"]
    problems: list[str] = []
    onnx_io: dict[tuple[str, int], dict[str, tuple[str, list[int]]]] = {}
    configs: dict[tuple[str, int], dict] = {}
    for folder in sorted(p for p in repo.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for leftover in sorted(p.name for p in folder.iterdir() if p.name.startswith(STAGING_PREFIX)):
            problems.append(f"{folder.name}/{leftover}: a half-written version (an export was interrupted); "
                            f"delete it")
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
    for (name, v), config in configs.items():
        if config.get("platform") == "ensemble":
            problems += _check_ensemble(f"{name}/{v}", config, configs)
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
