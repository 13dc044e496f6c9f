"""A whole continual run: tasks in order, a checkpoint and metrics after each, resumable.

    data = CDDB(root, ["gaugan", "biggan"], on_bad=config.on_bad)
    summary = ContinualRun(config, data, out_dir, resume=False).run()
    model = load_run(out_dir)              # eval-mode LoRAXModel of every finished task

LoRAX and the two baselines share this harness, so their numbers are comparable: same data, same
seeds, same epochs, same evaluation.

Under torchrun (aigis.distributed) every rank runs this loop: training is data-parallel (learner.TaskTrainer),
the features for herding and evaluation are extracted by every rank for its block of the images and gathered,
herding and scoring run once on rank 0 and are shared, and rank 0 alone reads and writes the run directory
(the manifest records the world size). Other ranks never touch it, so it need not be on a shared filesystem.
"""

from __future__ import annotations

import datetime
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import aigis
from aigis import distributed
from aigis.data.cddb import CDDB
from aigis.contract import class_names
from aigis.training import checkpoint as ckpt
from aigis.training.config import TrainConfig, differences
from aigis.training.learner import TaskTrainer, balance_classifier, extract_features, seed_task, task_seed
from aigis.training.loading import Batches, TaskData, load_tasks, make_cache
from aigis.training.memory import ExemplarMemory
from aigis.training.metrics import (AccuracyMatrix, binary_correct, format_percent, multi_real_correct,
                                    plot_accuracy_matrix, summarize)

log = logging.getLogger(__name__)

class ContinualRun:
    """Trains `config.method` over the tasks of `data`, writing <out_dir> as described in aigis.training.checkpoint."""

    def __init__(self, config: TrainConfig, data: CDDB, out_dir: str | Path, resume: bool = False,
                 progress: bool = True, data_spec: str | None = None) -> None:
        self.config = config
        self.data = data
        self.data_root = Path(data.root)
        self.out_dir = Path(out_dir)
        self.resume = resume
        self.progress = progress and distributed.is_main()
        self.data_spec = data_spec
        self.device = distributed.local_device(config.resolved_device())
        self.world_size = distributed.world_size()
        self.amp = config.use_amp(self.device)
        self.trainer = TaskTrainer(config, self.device, progress=self.progress)
        self.log = log.info if self.progress else (lambda *a, **k: None)
        self.tasks: list[TaskData] = []
        self.cache = None
        # Features of frozen extractors on validation sets never change: (extractor, task) -> [N, D].
        self._val_features: dict[tuple[int, int], torch.Tensor] = {}
        self._val_batches: dict[int, Batches] = {}

    # ---- the loop -----------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Train the tasks not finished yet; return the summary (also in metrics.json)."""
        from aigis.models import build_backbone, state_dict_sha256

        config = self.config
        torch.manual_seed(config.seed)
        backbone = build_backbone(config.backbone, config.weights)
        self.backbone_sha256 = state_dict_sha256(backbone)
        manifest = distributed.on_main(lambda: self._start(backbone))
        self.tasks = load_tasks(self.data)
        self._warn_about_crop()
        self.cache = make_cache(config.cache_images, self.tasks)
        model = self._build_model(backbone)
        finished = len(manifest["task_entries"])
        stages = 1 if config.method == "joint" else len(self.tasks)
        accuracy = AccuracyMatrix(len(self.tasks), stages)
        binary = AccuracyMatrix(len(self.tasks), stages)
        memory = ExemplarMemory(config.memory_size if config.method == "lorax" else 0)
        if finished:
            self._restore(model, manifest, accuracy, binary, memory)
            self.log(f"resuming {self.out_dir} after {finished} finished task(s)")
        for stage in range(finished, stages):
            entry = self._train_stage(model, stage, memory, accuracy, binary)
            manifest = distributed.on_main(
                lambda: self._write_stage(model, manifest, stage, entry, memory, accuracy, binary))
        if finished >= stages:
            self.log(f"{self.out_dir}: all {stages} stage(s) already finished; nothing to train")
        summary = distributed.on_main(lambda: json.loads((self.out_dir / ckpt.METRICS).read_text()))
        summary["skipped_images"] = dict(self.data.bad.skipped)
        return summary

    def _train_stage(self, model, stage: int, memory: ExemplarMemory, accuracy: AccuracyMatrix,
                     binary: AccuracyMatrix) -> dict[str, Any]:
        config = self.config
        joint = config.method == "joint"
        stages = 1 if joint else len(self.tasks)
        seed = task_seed(config.seed, stage)
        seed_task(config.seed, stage)
        trained_tasks = self.tasks if joint else [self.tasks[stage]]
        old_classes = 0 if joint else 2 * stage
        model.add_task(new_classes=2 * len(trained_tasks))
        model.to(self.device)
        if self.world_size > 1:
            # The new weights came from the task's seed, the same on every rank; what is drawn while training
            # (LoRA dropout) comes from a stream of each rank's own.
            torch.manual_seed(distributed.seed_for_rank(seed, distributed.rank()))
        replay = self.data.exemplar_samples(memory.exemplars())
        samples = [s for t in trained_tasks for s in t.train] + replay
        name = "joint" if joint else self.tasks[stage].name
        batches = Batches(self.data, samples, config.crop, config.batch_size, train=True, seed=seed,
                          cache=self.cache, num_workers=config.num_workers)
        trainable = sum(p.numel() for p in model.trainable_parameters())
        adapter = (sum(p.numel() for p in model.adapter_parameters(stage).values())
                   if config.method == "lorax" else 0)
        self.log(f"[{stage + 1}/{stages}] {config.method} {name}: {len(samples)} training images "
                 f"({len(replay)} exemplars), {trainable:,} trainable parameters")
        stats = self.trainer.fit(model, batches, stage, old_classes, description=f"{config.method} {name}")
        balance_loss = None
        if config.method == "lorax":
            self._update_memory(model, memory, self.tasks[stage], classes_seen=2 * (stage + 1))
            if stage > 0 and config.balance_epochs > 0 and len(memory):
                balance_loss = self._balance_classifier(model, memory, seed)
        seen = range(len(self.tasks)) if joint else range(stage + 1)
        eval_start = time.perf_counter()
        for i in seen:
            multi, binary_acc = self._evaluate(model, i, stage)
            accuracy.set(i, stage, multi)
            binary.set(i, stage, binary_acc)
        eval_seconds = time.perf_counter() - eval_start
        column = accuracy.values[list(seen), stage]
        self.log(f"    {stats.images} images in {stats.seconds:.1f}s ({stats.images_per_second:.1f} img/s), "
                 f"loss {stats.final_loss:.3f}, eval {eval_seconds:.1f}s; accuracy so far: mean "
                 f"{format_percent(float(np.mean(column)))} [" +
                 " ".join(f"{self.tasks[i].name} {format_percent(accuracy.values[i, stage])}" for i in seen) + "]")
        return {
            "index": stage,
            "name": name,
            "tasks_trained": [t.name for t in trained_tasks],
            "classes": class_names([t.name for t in trained_tasks]),
            "train_images": len(samples) - len(replay),
            "exemplars_replayed": len(replay),
            "epochs": config.epochs,
            "learning_rate": config.learning_rate(stage),
            "trainable_parameters": trainable,
            "adapter_parameters": adapter,
            "train_seconds": round(stats.seconds, 3),
            "train_images_per_second": round(stats.images_per_second, 2),
            "eval_seconds": round(eval_seconds, 3),
            "final_loss": stats.final_loss,
            "balance_loss": balance_loss,
            "world_size": self.world_size,
        }

    # ---- pieces -------------------------------------------------------------------------------------
    def _warn_about_crop(self) -> None:
        """The warning `aigis data check` gives when the crop keeps under half of each image (headers of up to 200
        images per task are read)."""
        from aigis.data.sizes import task_sizes

        for sizes in task_sizes(self.data, [t.name for t in self.tasks], limit=200):
            warning = sizes.crop_warning(self.config.crop)
            if warning:
                log.warning(f"warning: {warning}")

    def _build_model(self, backbone):
        if self.config.method == "lorax":
            from aigis.training.model import LoRAXModel

            return LoRAXModel(backbone, self.config.lora).to(self.device)
        from aigis.training.baselines import FullModel

        return FullModel(backbone).to(self.device)

    def _eval_batches(self, samples) -> Batches:
        return Batches(self.data, samples, self.config.crop, self.config.batch_size * 2, train=False,
                       cache=self.cache, num_workers=self.config.num_workers)

    @torch.no_grad()
    def _evaluate(self, model, task: int, stage: int) -> tuple[float, float]:
        """Multi-real and binary accuracy on task `task`'s val set; LoRAX reuses frozen extractors' features."""
        if task not in self._val_batches:
            self._val_batches[task] = self._eval_batches(self.tasks[task].val)
        batches = self._val_batches[task]
        cacheable = self.config.method == "lorax"
        wanted = list(range(model.num_tasks)) if cacheable else [0]
        missing = [k for k in wanted if not cacheable or (k, task) not in self._val_features]
        computed = self._features(model, batches, missing, description=f"eval {self.tasks[task].name}")
        features = dict(zip(missing, computed))
        if cacheable:
            self._val_features.update({(k, task): f for k, f in features.items()})
            features = {k: self._val_features[(k, task)] for k in wanted}

        def score() -> tuple[float, float]:
            logits = model.classifier(*[features[k].to(self.device) for k in wanted])
            predicted, target = logits.argmax(dim=1).cpu().numpy(), batches.labels()
            return (float(multi_real_correct(predicted, target).mean()),
                    float(binary_correct(predicted, target).mean()))

        return distributed.on_main(score)

    def _features(self, model, batches: Batches, extractors: list[int], description: str) -> list[torch.Tensor]:
        """extract_features of every image of `batches`; under torchrun each rank extracts its block and every
        rank gets the whole set."""
        if not distributed.active():
            return extract_features(model, batches, extractors, self.device, self.amp, progress=self.progress,
                                    description=description)
        n = batches.num_samples
        mine = batches.subset(distributed.shard(n))
        computed = extract_features(model, mine, extractors, self.device, self.amp, progress=self.progress,
                                    description=description)
        return [distributed.gather_rows(part, n) for part in computed]

    def _balance_classifier(self, model, memory: ExemplarMemory, seed: int) -> float:
        """The classifier alone, fine-tuned on every extractor's features of the (class-balanced) memory."""
        config = self.config
        batches = self._eval_batches(self.data.exemplar_samples(memory.exemplars()))
        features = self._features(model, batches, list(range(model.num_tasks)), description="balancing features")
        # The same features, seed and steps on every rank under torchrun: every rank ends with the same classifier.
        loss = balance_classifier(model.classifier, features, batches.labels(), config.balance_epochs,
                                  config.balance_lr, config.batch_size, seed)
        self.log(f"    classifier balanced on {len(memory)} exemplars: {config.balance_epochs} epochs, loss {loss:.3f}")
        return loss

    def _update_memory(self, model, memory: ExemplarMemory, task: TaskData, classes_seen: int) -> None:
        """Herd this task's exemplars on the concatenated features of every extractor (eval view)."""
        batches = self._eval_batches(task.train)
        features = self._features(model, batches, list(range(model.num_tasks)), description="herding features")
        kept = batches.samples

        def herd() -> dict:
            memory.update([s.relpath for s in kept], batches.labels(), torch.cat(features, dim=1).numpy(),
                          classes_seen)
            return memory.by_class

        memory.by_class = distributed.on_main(herd)  # herded once, on rank 0; every rank replays the same

    # ---- checkpoints and manifest -------------------------------------------------------------------
    def _start(self, backbone) -> dict[str, Any]:
        """A fresh manifest, or the existing one after checking that this run may continue it."""
        manifest_path = self.out_dir / ckpt.MANIFEST
        if manifest_path.exists() and not self.resume:
            raise ckpt.RunError(f"{self.out_dir} already holds a run; pass --resume to continue it, or choose "
                                f"another --out")
        lora = self.config.lora
        from aigis.training.model import configured_targets

        targets = configured_targets(lora, backbone)
        fresh = {
            "format": ckpt.FORMAT,
            "format_version": ckpt.FORMAT_VERSION,
            "aigis_version": aigis.__version__,
            "method": self.config.method,
            "backbone": {"name": backbone.name, "weights": _weights_identity(self.config.weights),
                         "sha256": self.backbone_sha256, "feature_dim": backbone.feature_dim,
                         "mean": list(backbone.mean), "std": list(backbone.std)},
            "lora": ({"r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout, "targets": targets,
                      "last_blocks": lora.last_blocks} if self.config.method == "lorax" else None),
            "crop": self.config.crop,
            "tasks": [],
            "planned_tasks": list(self.data.tasks),
            "class_names": [],
            "data": {"root": str(self.data_root), "spec": self.data_spec},
            "config": self.config.to_dict(),
            "task_entries": [],
            "metrics": None,
            "created": _now(),
            "world_size": self.world_size,
        }
        if not manifest_path.exists():
            self.out_dir.mkdir(parents=True, exist_ok=True)
            ckpt.clear_stale_task_dirs(self.out_dir, 0)
            return fresh
        manifest = ckpt.read_manifest(self.out_dir)
        problems = []
        if manifest["method"] != self.config.method:
            problems.append(f"method: {manifest['method']!r} -> {self.config.method!r}")
        old_identity = TrainConfig.from_dict(manifest["config"]).learning_identity()
        problems += differences(old_identity, self.config.learning_identity())
        if manifest["backbone"]["sha256"] != self.backbone_sha256:
            problems.append(f"backbone weights sha256: {manifest['backbone']['sha256'][:12]}... -> "
                            f"{self.backbone_sha256[:12]}...")
        done = manifest["tasks"]
        planned = list(self.data.tasks)
        if self.config.method == "joint":
            if done and done != planned:
                problems.append(f"tasks: the joint run was trained on {done}, now asked for {planned}")
        elif planned[: len(done)] != done:
            problems.append(f"tasks: the run finished {done}, which is not how {planned} begins")
        if problems:
            raise ckpt.RunError(f"cannot resume {self.out_dir}: it was trained with different settings:\n  "
                                + "\n  ".join(problems))
        ckpt.clear_stale_task_dirs(self.out_dir, len(manifest["task_entries"]))
        manifest["planned_tasks"] = planned
        manifest["config"] = self.config.to_dict()
        manifest["world_size"] = self.world_size
        return manifest

    def _restore(self, model, manifest, accuracy: AccuracyMatrix, binary: AccuracyMatrix,
                 memory: ExemplarMemory) -> None:
        """Load the finished tasks' weights, metrics and exemplar memory from disk (rank 0 reads them and sends
        them to the other ranks)."""
        entries = manifest["task_entries"]
        distributed.on_main(lambda: restore_model(model, self.out_dir, entries, self.device))
        if distributed.active():
            if not distributed.is_main():
                _grow_like(model, entries, self.device)
            distributed.broadcast_module(model)
        saved = manifest["metrics"]
        for target, key in ((accuracy, "accuracy_matrix"), (binary, "binary_accuracy_matrix")):
            for i, row in enumerate(saved[key]):
                for j, value in enumerate(row):
                    if value is not None and i < target.values.shape[0] and j < target.values.shape[1]:
                        target.set(i, j, value)
        if self.config.method == "lorax":
            def read_memory() -> dict:
                exemplars = json.loads((ckpt.checked_subpath(self.out_dir, entries[-1]["dir"]) / ckpt.EXEMPLARS_FILE)
                                       .read_text())
                return ExemplarMemory.from_json(exemplars).by_class

            memory.by_class = distributed.on_main(read_memory)

    def _write_stage(self, model, manifest, stage: int, entry: dict, memory: ExemplarMemory,
                     accuracy: AccuracyMatrix, binary: AccuracyMatrix) -> dict[str, Any]:
        name = entry["name"]
        files = {ckpt.HEADS_FILE: lambda p: ckpt.save_tensors(p, model.heads_state_dict())}
        if self.config.method == "lorax":
            files[ckpt.ADAPTER_FILE] = lambda p: ckpt.save_tensors(
                p, model.adapter_state_dict(stage), metadata={"task": name, "index": str(stage)})
            files[ckpt.EXEMPLARS_FILE] = lambda p: ckpt.write_json_atomic(
                p, {**memory.to_json(), "data_root": str(self.data_root)})
        else:
            files[ckpt.MODEL_FILE] = lambda p: ckpt.save_tensors(p, model.model_state_dict())
        task_dir = ckpt.write_task_dir(self.out_dir, stage, name, files)
        rel = task_dir.relative_to(self.out_dir).as_posix()
        entry["dir"] = rel
        entry["files"] = {k: f"{rel}/{k}" for k in files}
        stage_count = stage + 1
        metrics = self._metrics(accuracy, binary, stage_count)
        entry["metrics"] = metrics
        manifest = dict(manifest)
        manifest["task_entries"] = manifest["task_entries"] + [entry]
        trained = ([t.name for t in self.tasks] if self.config.method == "joint"
                   else [e["name"] for e in manifest["task_entries"]])
        manifest["tasks"] = trained
        manifest["class_names"] = class_names(trained)
        manifest["metrics"] = metrics
        manifest["updated"] = _now()
        # The task directory is complete; the manifest now names it (atomically), then the reports follow.
        ckpt.write_json_atomic(self.out_dir / ckpt.MANIFEST, manifest)
        ckpt.write_json_atomic(self.out_dir / ckpt.METRICS, {"method": self.config.method, **metrics,
                                                              "task_entries": _entry_summaries(manifest)})
        shown = metrics["accuracy_matrix"]
        ckpt.write_file_atomic(self.out_dir / ckpt.MATRIX_PNG, lambda p: plot_accuracy_matrix(
            _as_array(shown), metrics["tasks"], p,
            title=f"{self.config.method}: multi-real accuracy (%), AA {format_percent(metrics['average_accuracy'])}"))
        return manifest

    def _metrics(self, accuracy: AccuracyMatrix, binary: AccuracyMatrix, stage_count: int) -> dict[str, Any]:
        """Scores after `stage_count` stages, on the tasks trained so far."""
        if self.config.method == "joint":
            rows, R, B = len(self.tasks), accuracy.values, binary.values
        else:
            rows = stage_count
            R, B = accuracy.values[:rows, :rows], binary.values[:rows, :rows]
        scores = summarize(R)
        return {
            "tasks": [t.name for t in self.tasks[:rows]],
            **scores,
            "binary_accuracy": float(np.mean(B[:, -1])),
            "accuracy_matrix": AccuracyMatrix.from_list(R.tolist()).to_list(),
            "binary_accuracy_matrix": AccuracyMatrix.from_list(B.tolist()).to_list(),
        }


def restore_model(model, run_dir: Path, entries: list[dict], device: str) -> None:
    """Rebuild a model's finished tasks from their checkpoint files (adapters in order, last heads)."""
    for k, entry in enumerate(entries):
        model.add_task(new_classes=len(entry["classes"]))
        task_dir = ckpt.checked_subpath(run_dir, entry["dir"])
        if hasattr(model, "load_adapter_state_dict"):
            model.load_adapter_state_dict(k, ckpt.load_tensors(task_dir / ckpt.ADAPTER_FILE))
        model.freeze()
    last = ckpt.checked_subpath(run_dir, entries[-1]["dir"])
    if not hasattr(model, "load_adapter_state_dict"):
        model.load_model_state_dict(ckpt.load_tensors(last / ckpt.MODEL_FILE))
    model.load_heads_state_dict(ckpt.load_tensors(last / ckpt.HEADS_FILE))
    model.to(device)
    model.freeze()
    model.eval()


def _grow_like(model, entries: list[dict], device: str) -> None:
    """The shape restore_model gives a model (its finished tasks, frozen), without reading any file: what the
    ranks other than 0 build before rank 0's weights are broadcast into it."""
    for entry in entries:
        model.add_task(new_classes=len(entry["classes"]))
        model.freeze()
    model.to(device)
    model.freeze()
    model.eval()


def _weights_identity(weights: str | None) -> str | None:
    """"default", None, or the absolute path of a weights file (so load_run finds it from anywhere)."""
    if weights is None or weights == "default":
        return weights
    return str(Path(weights).expanduser().resolve())


def _entry_summaries(manifest: dict) -> list[dict]:
    keys = ("index", "name", "train_images", "exemplars_replayed", "trainable_parameters", "adapter_parameters",
            "train_seconds", "train_images_per_second")
    return [{k: e.get(k) for k in keys} for e in manifest["task_entries"]]


def _as_array(rows: list[list[float | None]]) -> np.ndarray:
    return AccuracyMatrix.from_list(rows).values


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def load_run(run_dir: str | Path, num_tasks: int | None = None):
    """The LoRAX model of a finished run's first `num_tasks` tasks (all when None), in eval mode on the CPU.

    The backbone is rebuilt from the manifest's name and weights and must hash to the recorded sha256,
    so adapters are never applied to weights they were not trained on. `.manifest` is the run's manifest
    restricted to those tasks (tasks, class_names, task_entries, metrics), as export expects.
    """
    from aigis.models import build_backbone, state_dict_sha256
    from aigis.training.config import LoraSettings
    from aigis.training.model import LoRAXModel

    run_dir = Path(run_dir)
    manifest = ckpt.read_manifest(run_dir)
    if manifest.get("method") != "lorax":
        raise ckpt.RunError(f"{run_dir}: method {manifest.get('method')!r} is a baseline; only lorax runs "
                            f"load as a LoRAXModel")
    finished = len(manifest["task_entries"])
    count = finished if num_tasks is None else int(num_tasks)
    if not 1 <= count <= finished:
        raise ckpt.RunError(f"{run_dir}: asked for {num_tasks} task(s), the run has {finished} finished")
    entries = manifest["task_entries"][:count]
    for entry in entries:
        ckpt.checked_subpath(run_dir, entry["dir"])
    info = manifest["backbone"]
    backbone = build_backbone(info["name"], info["weights"])
    sha = state_dict_sha256(backbone)
    if sha != info["sha256"]:
        raise ckpt.RunError(f"{run_dir}: backbone {info['name']} weights {info['weights']!r} hash to {sha[:12]}..., "
                            f"but the run was trained on {info['sha256'][:12]}...; give it the same weights")
    lora = manifest["lora"]
    model = LoRAXModel(backbone, LoraSettings(r=lora["r"], alpha=lora["alpha"], dropout=lora["dropout"],
                                              targets=list(lora["targets"]), last_blocks=lora.get("last_blocks")))
    restore_model(model, run_dir, entries, "cpu")
    restricted = dict(manifest)
    restricted["tasks"] = manifest["tasks"][:count]
    restricted["class_names"] = class_names(restricted["tasks"])
    restricted["task_entries"] = entries
    restricted["metrics"] = entries[-1]["metrics"]
    model.manifest = restricted
    return model
