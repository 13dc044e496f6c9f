"""A tiny continual run on the synthetic benchmark, shared by the export, rollout and repository tests
(the test modules import this; tests/ is on sys.path)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from aigis.data.cddb import CDDB
from aigis.data.synth import SynthConfig, generate
from aigis.training.config import TrainConfig
from aigis.training.run import ContinualRun

TASKS = ["tconv", "nearest", "bilinear"]
TINY = dict(backbone="vit_micro", weights="default", crop=32, epochs=1, batch_size=8, lr_first=0.5, lr_later=0.5,
            memory_size=6, seed=3, lora={"r": 4, "alpha": 8, "dropout": 0.0})


# The served layout most tests roll out and fail over: a shared trunk (LoRA on the last block only) whose tails
# run after it, with the classifier balanced on the memory after each task. TINY keeps the paper's layout.
TINY_SHARED_TRUNK = {**TINY, "lora": {**TINY["lora"], "last_blocks": 1}, "balance_epochs": 2}


def synthetic_root(base: Path) -> Path:
    """Three synthetic tasks of 36-px images (5 train + 4 val per class)."""
    root = base / "data"
    generate(root, SynthConfig(tasks=3, train_per_class=5, val_per_class=4, size=36, seed=1), progress=False)
    return root


def train_tasks(root: Path, run: Path, count: int, config: TrainConfig | None = None) -> None:
    """Train (or continue) `run` over the first `count` tasks."""
    ContinualRun(config or TrainConfig.from_dict(TINY), CDDB(root, TASKS[:count], progress=False), run,
                 resume=run.exists(), progress=False).run()


def two_version_repo(base: Path) -> dict:
    """A repository holding versions 2 and 3 of one tiny shared-trunk run (4 and 6 classes), its held-out images,
    and the class each version's in-process model predicts for each image (what a served answer must say)."""
    import torch

    from aigis import contract, preprocess
    from aigis.export import export_run
    from aigis.training.run import load_run

    root = synthetic_root(base)
    run, repo = base / "run", base / "repo"
    data = CDDB(root, TASKS, progress=False)
    paths = [s.path for t in range(len(TASKS)) for s in data.samples(t, "val")]
    images = np.stack([preprocess.eval_view_from_file(p, 32) for p in paths])
    expected, before_version_3 = {}, {}
    for count in (2, 3):
        train_tasks(root, run, count, TrainConfig.from_dict(TINY_SHARED_TRUNK))
        if count == 3:
            before_version_3 = file_digests(repo)
        export_run(run, repo, data_root=root, progress=False)
        with torch.no_grad():
            predicted = load_run(run)(torch.from_numpy(images)).argmax(1).numpy()
        names = contract.class_names(TASKS[:count])
        expected[str(count)] = [names[k] for k in predicted]
    return {"repo": repo, "images": images, "expected": expected, "run": run, "before_version_3": before_version_3}


def file_digests(repo: Path) -> dict[str, tuple[str, int]]:
    """Every file under `repo`: its sha256 and modification time, by path relative to `repo`."""
    import hashlib

    return {str(p.relative_to(repo)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(repo.rglob("*")) if p.is_file()}


def two_version_copy(source: dict, base) -> dict:
    """A module's own copy of the two-version repository (the images and expected classes are shared)."""
    import shutil

    repo = base / "repo"
    shutil.copytree(source["repo"], repo, ignore=shutil.ignore_patterns(".*", "__pycache__"))
    return {**source, "repo": repo}
