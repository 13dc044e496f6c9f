"""Export a training run's attribution models into the versioned repository (repository.py's layout): one
extractor per task (with a shared trunk: the trunk once, then one tail per task), then per version its classifier,
decode step and ensembles, each version published whole."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from aigis import contract

from .configs import (CONFIG_FILE, LABELS_FILE, TargetOptions, classifier_config, decode_config, ensemble_config,
                      extractor_config, fused_config, manifest_of, read_config, trunk_config)
from .repository import (MANIFEST_FORMAT, SOURCE_FILE, RepositoryError, _sha256_files, publish_version, version_models,
                         versions)

log = logging.getLogger(__name__)


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
        count = f"{len(self.tasks)} task{'s' if len(self.tasks) != 1 else ''}"
        if self.already_published:
            return f"version {self.version} ({count}) is already in the repository: nothing written"
        lines = [f"published version {self.version} ({count}: {', '.join(self.tasks)}); "
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
    from aigis.data.cddb import CDDB, CDDBLayoutError

    root = data_root
    if root is None:
        exemplars = run_dir / model_manifest["task_entries"][-1]["dir"] / "exemplars.json"
        if exemplars.is_file():
            root = json.loads(exemplars.read_text()).get("data_root")
    if root is None or not Path(root).is_dir():
        return None
    try:
        images, _ = CDDB(root, list(model_manifest["tasks"]), on_bad="skip", progress=False).eval_images(
            crop, per_task=per_task)
    except (CDDBLayoutError, ValueError):
        return None
    return images


def _recorded_source(repo: Path, model: str, version: int) -> dict:
    """What a published version says it was made from (source.json; an ensemble's manifest as a fallback)."""
    vdir = repo / model / str(version)
    if (vdir / SOURCE_FILE).is_file():
        return json.loads((vdir / SOURCE_FILE).read_text())
    if (vdir / CONFIG_FILE).is_file():
        return manifest_of(read_config(vdir / CONFIG_FILE)) or {}
    return {}


def _version_state(repo: Path, model: str, version: int, source: str, tasks: list[str]) -> str:
    """'missing', 'same' (this run's model after these tasks) or 'other' for one model's version."""
    if version not in versions(repo, model):
        return "missing"
    recorded = _recorded_source(repo, model, version)
    return "same" if recorded.get("source_sha256") == source and recorded.get("tasks") == tasks else "other"


def export_run(run_dir: str | Path, repo: str | Path, num_tasks: int | None = None, *,
               data_root: str | Path | None = None, options: TargetOptions | None = None,
               progress: bool = True, rtol: float | None = None, fused: bool = False) -> ExportReport:
    """Publish the run's model after `num_tasks` tasks (default: all finished) as ensemble version num_tasks,
    and with `fused` the same version as one graph (contract.FUSED_MODEL) beside it.

    Every ONNX model is compared with PyTorch on random and (when the data is at hand) real images and is
    not published beyond `rtol` (default onnx_export.RTOL) of its output scale. Exporting a version that
    is already published from the same run is a no-op; a version published from another run is refused;
    a version left incomplete by an interrupted export is finished.
    """
    from aigis.training.run import load_run

    from . import onnx_export

    options = options or TargetOptions()
    options.validate()
    rtol = onnx_export.RTOL if rtol is None else float(rtol)
    if not rtol >= 0:
        raise ValueError(f"rtol must be 0 or more, got {rtol}")
    run_dir, repo = Path(run_dir), Path(repo)
    say = log.info if progress else (lambda *a, **k: None)
    model = load_run(run_dir, num_tasks)
    manifest = model.manifest
    tasks = list(manifest["tasks"])
    version = len(tasks)
    source = run_source_hash(run_dir, manifest["task_entries"])
    report = ExportReport(version=version, tasks=tasks)
    states = _version_states(repo, version, source, tasks, fused)
    if all(state == "same" for state in states.values()):
        report.already_published = True
        return report
    check = _Check(_check_images(run_dir, manifest, data_root, say), rtol, options.runtimes, report)
    ensemble_states = {name: state for name, state in states.items() if name != contract.FUSED_MODEL}
    if all(state == "same" for state in ensemble_states.values()):
        report.reused += list(ensemble_states)
    else:
        if any(state == "same" for state in ensemble_states.values()):
            say(f"  version {version} is incomplete (an export was interrupted): finishing it")
        need_classifier = states[contract.classifier_model(version)] == "missing"
        pending, features = _extractors(model, run_dir, repo, check, need_classifier, options, say)
        classifier_graph = _classifier(model, version, features, check) if need_classifier else b""

        # Everything is checked: publish, extractors first and the ensembles last.
        for name, v, onnx_bytes, config, source_info in pending:
            publish_version(repo, name, v, config, _writer({"model.onnx": onnx_bytes,
                                                            SOURCE_FILE: json.dumps(source_info, indent=2).encode()}))
            report.written.append(name)
        _publish_version_models(repo, model, version, source, run_dir, states, classifier_graph, options, report)
    if states.get(contract.FUSED_MODEL) == "missing":
        _publish_fused(repo, model, version, source, run_dir, check, options, say)
    return report


@dataclass
class _Check:
    """How every exported graph is checked against PyTorch before it is published."""

    image_sets: list[tuple[str, Any]]  # (name, uint8 images [N, crop, crop, 3])
    rtol: float
    runtimes: Any
    report: ExportReport


def _version_states(repo: Path, version: int, source: str, tasks: list[str], fused: bool) -> dict[str, str]:
    """Each model of the version (with `fused`, the fused graph too): "missing", "same" (published from this run)
    or refused if another's."""
    wanted = version_models(version) + ([(contract.FUSED_MODEL, version)] if fused else [])
    states = {name: _version_state(repo, name, model_version, source, tasks) for name, model_version in wanted}
    foreign = [name for name, state in states.items() if state == "other"]
    if foreign:
        old = _recorded_source(repo, foreign[0], version)
        raise RepositoryError(f"{repo}: version {version} exists and holds another model "
                              f"({', '.join(foreign)}: tasks {old.get('tasks')}, source "
                              f"{str(old.get('source_sha256'))[:12]}...; this run: tasks {tasks}, source "
                              f"{source[:12]}...); versions are never rewritten: export into a new repository")
    return states


def _check_images(run_dir: Path, manifest: dict, data_root: str | Path | None,
                  say: Callable[..., None]) -> list[tuple[str, Any]]:
    """Random images, and held-out real ones when the data is at hand."""
    import numpy as np

    crop = int(manifest["crop"])
    random_images = np.random.default_rng(0).integers(0, 256, size=(8, crop, crop, 3), dtype=np.uint8)
    held_out = real_images(run_dir, manifest, crop, data_root)
    if held_out is None:
        say("  no data root at hand: checking on random images only (give --data to check on real images)")
        return [("random", random_images)]
    return [("random", random_images), ("real images", held_out)]


def _extractors(model: Any, run_dir: Path, repo: Path, check: _Check, need_classifier: bool, options: TargetOptions,
                say: Callable[..., None]) -> tuple[list, dict[str, list]]:
    """One extractor per task (with a shared trunk: the trunk once, then one tail per task), each written once (an
    existing one must hold the same adapter): the checked graphs to publish, and every extractor's features of
    the check images when the classifier must be checked too."""
    import torch

    from . import onnx_export

    manifest = model.manifest
    crop = int(manifest["crop"])
    features: dict[str, list] = {name: [] for name, _ in check.image_sets}
    pending: list[tuple[str, int, bytes, dict, dict]] = []
    # What every extractor takes, per check set: the images, or the trunk's activations of them.
    extractor_inputs = dict(check.image_sets)
    tensor_names, trunk_dims = (contract.IMAGES, contract.FEATURES), None
    if model.shared_trunk:
        trunk_dims, extractor_inputs = _trunk(model, run_dir, repo, check, options, pending, say)
        tensor_names = (contract.TRUNK, contract.FEATURES)
    for k, task in enumerate(manifest["tasks"]):
        name = contract.extractor_model(task)
        adapter_sha = _sha256_files([run_dir / manifest["task_entries"][k]["files"]["adapter.safetensors"]])
        exists = 1 in versions(repo, name)
        if exists:
            _require_same_adapter(repo, name, task, adapter_sha, manifest, run_dir)
            check.report.reused.append(name)
            if not need_classifier:
                continue
        extractor = model.merged_extractor(k)
        for set_name, batch in extractor_inputs.items():
            with torch.no_grad():
                features[set_name].append(extractor(torch.from_numpy(batch)).numpy())
        if exists:
            continue
        say(f"  exporting {name} ...")
        # Export a copy (export may fix input-size-dependent constants); check against the untouched one.
        if model.shared_trunk:
            graph = onnx_export.tail_onnx(model.merged_extractor(k), torch.from_numpy(next(iter(extractor_inputs.values()))))
        else:
            graph = onnx_export.extractor_onnx(model.merged_extractor(k), crop)
        checks = [onnx_export.check_one_to_one(name, graph, extractor, tensor_names, batch, set_name, check.rtol, runtime)
                  for set_name, batch in extractor_inputs.items() for runtime in check.runtimes]
        onnx_export.require(checks)
        check.report.checks += checks
        source_info = {"task": task, "task_index": k, "adapter_sha256": adapter_sha,
                       "backbone": manifest["backbone"]["name"], "backbone_sha256": manifest["backbone"]["sha256"],
                       "run": str(run_dir.resolve())}
        if model.shared_trunk:
            source_info["trunk_split"] = model.trunk_split
        pending.append((name, 1, graph, extractor_config(task, crop, model.feature_dim, options, trunk_dims),
                        source_info))
    return pending, features


def _trunk(model: Any, run_dir: Path, repo: Path, check: _Check, options: TargetOptions, pending: list,
           say: Callable[..., None]) -> tuple[list[int], dict[str, Any]]:
    """The shared trunk, written once for every version (an existing one must be this run's): its activations'
    dims, and its activations of each check set, which the tails take."""
    import torch

    from . import onnx_export

    manifest = model.manifest
    crop = int(manifest["crop"])
    trunk = model.trunk_module()
    with torch.no_grad():
        activations = {set_name: trunk(torch.from_numpy(images)).numpy() for set_name, images in check.image_sets}
    dims = list(next(iter(activations.values())).shape[1:])
    identity = {"backbone": manifest["backbone"]["name"], "backbone_sha256": manifest["backbone"]["sha256"],
                "crop": crop, "trunk_split": model.trunk_split}
    if 1 in versions(repo, contract.TRUNK_MODEL):
        source = repo / contract.TRUNK_MODEL / "1" / SOURCE_FILE
        recorded = json.loads(source.read_text()) if source.is_file() else {}
        if {key: recorded.get(key) for key in identity} != identity:
            raise RepositoryError(f"{repo / contract.TRUNK_MODEL} holds another trunk ({recorded.get('backbone')}, crop "
                                  f"{recorded.get('crop')}, split at block {recorded.get('trunk_split')}; this run: "
                                  f"{identity['backbone']}, crop {crop}, split at block {model.trunk_split}); "
                                  f"export into a new repository")
        check.report.reused.append(contract.TRUNK_MODEL)
        return dims, activations
    say(f"  exporting {contract.TRUNK_MODEL} (blocks before {model.trunk_split}, shared by every task) ...")
    graph = onnx_export.trunk_onnx(model.trunk_module(), crop)
    checks = [onnx_export.check_one_to_one(contract.TRUNK_MODEL, graph, trunk, (contract.IMAGES, contract.TRUNK), images,
                                           set_name, check.rtol, runtime)
              for set_name, images in check.image_sets for runtime in check.runtimes]
    onnx_export.require(checks)
    check.report.checks += checks
    pending.append((contract.TRUNK_MODEL, 1, graph, trunk_config(crop, dims, options),
                    {**identity, "run": str(run_dir.resolve())}))
    return dims, activations


def _require_same_adapter(repo: Path, name: str, task: str, adapter_sha: str, manifest: dict, run_dir: Path) -> None:
    source = repo / name / "1" / SOURCE_FILE
    recorded = json.loads(source.read_text()) if source.is_file() else {}
    if recorded.get("adapter_sha256") != adapter_sha or recorded.get("backbone_sha256") != manifest["backbone"]["sha256"]:
        raise RepositoryError(f"{repo / name} holds another adapter for task {task!r} "
                              f"(adapter {str(recorded.get('adapter_sha256', '?'))[:12]}... there, "
                              f"{adapter_sha[:12]}... in {run_dir}); export into a new repository")


def _classifier(model: Any, version: int, features: dict[str, list], check: _Check) -> bytes:
    """The unified classifier's graph, checked on the extractors' features of the check images."""
    from . import onnx_export

    classifier = model.classifier_module()
    graph = onnx_export.classifier_onnx(classifier, version, model.feature_dim)
    checks = [onnx_export.check_classifier(contract.classifier_model(version), graph, classifier,
                                           features[set_name], set_name, check.rtol, runtime)
              for set_name, _ in check.image_sets for runtime in check.runtimes]
    onnx_export.require(checks)
    check.report.checks += checks
    return graph


def _publish_version_models(repo: Path, model: Any, version: int, source: str, run_dir: Path, states: dict[str, str],
                            classifier_graph: bytes, options: TargetOptions, report: ExportReport) -> None:
    """The version's classifier, decode step and ensembles (in version_models' order: the ensembles last)."""
    manifest = model.manifest
    tasks, crop = list(manifest["tasks"]), int(manifest["crop"])
    served = served_manifest(manifest, version, source)
    source_file = {SOURCE_FILE: _version_source(source, tasks, run_dir)}
    contents = {
        contract.classifier_model(version): (classifier_config(version, len(tasks), model.feature_dim, options),
                                             {"model.onnx": classifier_graph}),
        contract.decode_model(version): (decode_config(version, crop, options), decode_files()),
        contract.ENSEMBLE_MODEL: (ensemble_config(version, tasks, crop, served, options,
                                                  shared_trunk=model.shared_trunk), {}),
        contract.BYTES_ENSEMBLE_MODEL: (ensemble_config(version, tasks, crop, served, options, from_bytes=True,
                                                        shared_trunk=model.shared_trunk), {}),
    }
    labels = {LABELS_FILE: _labels(manifest)}
    for name, model_version in version_models(version):
        if states[name] == "same":
            report.reused.append(name)
            continue
        config, files = contents[name]
        publish_version(repo, name, model_version, config, _writer({**files, **source_file}),
                        model_files=labels if name == contract.classifier_model(version) else None)
        report.written.append(name)


def _publish_fused(repo: Path, model: Any, version: int, source: str, run_dir: Path, check: _Check,
                   options: TargetOptions, say: Callable[..., None]) -> None:
    """The version as one graph, checked against the PyTorch modules it fuses (written after the ensembles: it
    is optional, and a version is served through its ensembles whether or not it has one)."""
    from . import onnx_export

    manifest = model.manifest
    crop = int(manifest["crop"])

    def fused_modules() -> onnx_export.FusedVersion:   # fresh copies: the export may adapt them to the crop
        trunk = model.trunk_module() if model.shared_trunk else None
        return onnx_export.FusedVersion(trunk, [model.merged_extractor(k) for k in range(model.num_tasks)],
                                        model.classifier_module())

    say(f"  exporting {contract.FUSED_MODEL} version {version} (the whole version as one graph) ...")
    reference = fused_modules().eval()
    graph = onnx_export.fused_onnx(fused_modules(), crop)
    checks = [onnx_export.check_fused(f"{contract.FUSED_MODEL}/{version}", graph, reference, images, set_name,
                                      check.rtol, runtime)
              for set_name, images in check.image_sets for runtime in check.runtimes]
    onnx_export.require(checks)
    check.report.checks += checks
    served = served_manifest(manifest, version, source)
    files = {"model.onnx": graph,
             LABELS_FILE: _labels(manifest),
             SOURCE_FILE: _version_source(source, list(manifest["tasks"]), run_dir)}
    publish_version(repo, contract.FUSED_MODEL, version, fused_config(version, len(manifest["tasks"]), crop, served,
                                                                       options), _writer(files))
    check.report.written.append(contract.FUSED_MODEL)


def _version_source(source: str, tasks: list[str], run_dir: Path) -> bytes:
    """source.json of a version's own models: the checkpoint, its tasks and run (what a re-export compares)."""
    return json.dumps({"source_sha256": source, "tasks": tasks, "run": str(run_dir.resolve())}, indent=2).encode()


def _labels(manifest: dict) -> bytes:
    """A label file: one class name per line, in PROBS' order (Triton's classification extension reads it)."""
    return "".join(f"{name}\n" for name in manifest["class_names"]).encode()


def decode_files() -> dict[str, bytes]:
    """The decode step's code, copied into its version: it keeps decoding as it did when it was exported."""
    from aigis import preprocess

    from . import decode_model

    return {"model.py": Path(decode_model.__file__).read_bytes(),
            decode_model.PREPROCESS_COPY: Path(preprocess.__file__).read_bytes()}


def _writer(files: dict[str, bytes]) -> Callable[[Path], None]:
    def write(folder: Path) -> None:
        for name, data in files.items():
            (folder / name).write_bytes(data)
    return write


