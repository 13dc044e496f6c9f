"""LoRAX training: adapters (merged == unmerged, old ones untouched), herding, resume, the CLI, load_run.

Everything runs for real on a tiny synthetic CDDB tree (aigis.data.synth) with the random-init
`vit_micro` backbone: a few images, one or two epochs, so the whole file stays within ~90 s on 2 cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from aigis.cli import main as aigis_main
from aigis.contract import class_names
from aigis.data.cddb import CDDB
from aigis.data.synth import SynthConfig, generate
from aigis.models import build_backbone
from aigis.training import ContinualRun, load_run
from aigis.training.checkpoint import RunError
from aigis.training.config import LoraSettings, TrainConfig
from aigis.training.learner import TaskTrainer
from aigis.training.loading import Batches, load_tasks
from aigis.training.memory import ExemplarMemory, herding_order
from aigis.training.model import LoRAXModel

TASKS = ["tconv", "nearest", "bilinear"]
# A tiny but complete config: every setting that matters for learning is stated here.
TINY = dict(backbone="vit_micro", weights="default", crop=32, epochs=2, batch_size=8, lr_first=0.5, lr_later=0.5,
            memory_size=6, seed=3, lora={"r": 4, "alpha": 8, "dropout": 0.1})
SET_ARGS = ["--set", "backbone=vit_micro", "--set", "crop=32", "--set", "epochs=1", "--set", "batch_size=8",
            "--set", "memory_size=6", "--set", "lora.r=4", "--set", "lora.alpha=8", "--set", "lr_first=0.5"]


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "data"
    generate(root, SynthConfig(tasks=3, train_per_class=5, val_per_class=3, size=36, seed=1), progress=False)
    return root


def tiny_config(**changes) -> TrainConfig:
    return TrainConfig.from_dict({**TINY, **changes})


def randomise_adapter(model: LoRAXModel, task: int, scale: float = 0.2) -> None:
    """LoRA B starts at zero (merging would then be trivially exact): give every adapter weight a value."""
    generator = torch.Generator().manual_seed(100 + task)
    with torch.no_grad():
        for parameter in model.adapter_parameters(task).values():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)


def images(n: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# ---- the model ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("backbone", ["vit_micro", "convit_micro", "efficientnet_lite0"])
def test_merged_extractor_matches_unmerged_adapter(backbone):
    model = LoRAXModel(build_backbone(backbone), LoraSettings(r=4, alpha=8, dropout=0.1))
    # EfficientNet's ReLU6 saturates under large random adapters, which then only amplify float32 noise.
    scale = 0.05 if backbone.startswith("efficientnet") else 0.2
    for task in range(2):
        model.add_task()
        randomise_adapter(model, task, scale)
    model.freeze()
    model.eval()
    batch = images()
    with torch.no_grad():
        trunk = model.trunk_features(model.image_input(batch))
        unmerged = [model.task_features(trunk, k) for k in range(2)]
        merged = [model.merged_extractor(k)(batch) for k in range(2)]
        logits = model(batch)
        logits_from_parts = model.classifier_module()(*merged)
    scale = unmerged[0].abs().max().item()
    assert (unmerged[0] - unmerged[1]).abs().max().item() > 0.05 * scale   # the adapters really differ
    for k in range(2):
        assert merged[k].dtype == torch.float32 and merged[k].shape == (4, model.feature_dim)
        assert (merged[k] - unmerged[k]).abs().max().item() < 1e-4 * max(1.0, scale), f"adapter {k}"
    assert (logits - logits_from_parts).abs().max().item() < 1e-4 * max(1.0, logits.abs().max().item())
    # Merging works on a copy: the model still holds both adapters, unmerged.
    assert len(model.adapter_parameters(0)) > 0 and len(model.adapter_parameters(1)) > 0


@pytest.mark.parametrize("backbone,last_blocks", [("vit_micro", 1), ("convit_micro", 1), ("convit_micro", 3),
                                                  ("efficientnet_lite0", 3)])
def test_shared_trunk_runs_once_and_its_parts_compute_the_model(backbone, last_blocks):
    """LoRA on the last blocks only: no adapter in the trunk, the trunk + merged tails + classifier compute the
    unmerged model, and the tails differ per task."""
    model = LoRAXModel(build_backbone(backbone), LoraSettings(r=4, alpha=8, dropout=0.0, last_blocks=last_blocks))
    bb = model.backbone_module()
    split = bb.num_blocks - last_blocks
    assert model.trunk_split == split and model.shared_trunk
    scale = 0.05 if backbone.startswith("efficientnet") else 0.2
    for task in range(2):
        model.add_task()
        randomise_adapter(model, task, scale)
        adapted = {key.rsplit(".lora_", 1)[0] for key in model.adapter_parameters(task)}
        assert adapted and all(bb.in_tail(name, split) for name in adapted), sorted(adapted)
        assert any(f"{bb.blocks_attribute}.{split}." in name for name in adapted)   # the first tail block is adapted
    model.freeze()
    model.eval()
    batch = images(size=64 if backbone.startswith("efficientnet") else 32)
    with torch.no_grad():
        logits = model(batch)
        trunk = model.trunk_module()(batch)
        tails = [model.merged_extractor(k)(trunk) for k in range(2)]
        from_parts = model.classifier_module()(*tails)
    assert trunk.shape[0] == len(batch) and tails[0].shape == (len(batch), model.feature_dim)
    feature_scale = tails[0].abs().max().item()
    assert (tails[0] - tails[1]).abs().max().item() > 0.05 * feature_scale   # each task has its own tail
    assert (logits - from_parts).abs().max().item() < 1e-4 * max(1.0, logits.abs().max().item())


def test_last_blocks_that_reach_no_lora_target_is_refused():
    with pytest.raises(ValueError, match="last_blocks = 0.*no LoRA target"):
        LoRAXModel(build_backbone("vit_micro"), LoraSettings(r=4, alpha=8, last_blocks=0))
    with pytest.raises(ValueError, match="has 4 blocks, got 9"):
        LoRAXModel(build_backbone("vit_micro"), LoraSettings(r=4, alpha=8, last_blocks=9))
    with pytest.raises(ValueError, match="last_blocks"):
        tiny_config(lora={"r": 4, "alpha": 8, "last_blocks": -1})
    with pytest.raises(ValueError, match="last_blocks.*'every'"):
        tiny_config(lora={"r": 4, "alpha": 8, "last_blocks": "every"})
    # "all" undoes a config's shared trunk (--set lora.last_blocks=all): every block, as when unset
    assert tiny_config(lora={"r": 4, "alpha": 8, "last_blocks": "all"}).lora.last_blocks is None


def test_balancing_pulls_a_classifier_biased_to_the_new_classes_back_to_every_class():
    """The classifier after a task favours the newest classes; fine-tuning it alone on equal numbers of every
    class (the memory) restores the old classes without touching the features."""
    from aigis.training.learner import balance_classifier
    from aigis.training.model import UnifiedClassifier

    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(4).repeat_interleave(10)
    features = [torch.nn.functional.one_hot(labels, 4).float() * 3 + 0.3 * torch.randn(40, 4, generator=generator)]
    classifier = UnifiedClassifier(4, 1, 4)
    with torch.no_grad():
        classifier.linear.weight.copy_(torch.eye(4))
        classifier.linear.bias.copy_(torch.tensor([0.0, 0.0, 6.0, 6.0]))    # every image looks like class 2 or 3
    before = (classifier(*features).argmax(1) == labels).float().mean().item()
    loss = balance_classifier(classifier, [f.clone() for f in features], labels.numpy(), epochs=40, lr=0.05,
                              batch_size=8, seed=1)
    after = (classifier(*features).argmax(1) == labels).float().mean().item()
    assert before <= 0.5 and after >= 0.95 and loss < 0.5
    assert not any(p.requires_grad for p in classifier.parameters())       # frozen again for the export


def test_a_run_balances_its_classifier_after_each_later_task_and_nothing_else(synth_root, tmp_path):
    """balance_epochs wired into a run: the same two tasks with and without it train the same adapters (same
    seed), the balanced run records its balancing loss from the second task on, and only its classifier differs."""
    data = CDDB(synth_root, TASKS[:2], progress=False)
    models, entries = {}, {}
    for epochs in (0, 2):
        config = tiny_config(lora={"r": 4, "alpha": 8, "dropout": 0.1, "last_blocks": 1}, epochs=1,
                             balance_epochs=epochs)
        ContinualRun(config, data, tmp_path / f"run{epochs}", progress=False).run()
        entries[epochs] = json.loads((tmp_path / f"run{epochs}" / "manifest.json").read_text())["task_entries"]
        models[epochs] = load_run(tmp_path / f"run{epochs}")
    assert [e["balance_loss"] for e in entries[0]] == [None, None]
    assert entries[2][0]["balance_loss"] is None and entries[2][1]["balance_loss"] > 0
    for task in range(2):
        plain, balanced = models[0].adapter_parameters(task), models[2].adapter_parameters(task)
        assert plain.keys() == balanced.keys() and plain
        assert all(torch.equal(plain[k], balanced[k]) for k in plain), f"task {task}'s adapter changed"
    weights = [m.classifier.linear.weight for m in (models[0], models[2])]
    assert (weights[0] - weights[1]).abs().max().item() > 1e-3 * weights[0].abs().max().item()


def test_a_run_warns_when_its_crop_uses_a_small_part_of_the_images(synth_root, tmp_path, caplog):
    import logging

    data = CDDB(synth_root, TASKS[:1], progress=False)
    for crop, warned in ((32, False), (16, True)):     # of 36-px images: 79 % and 20 %
        run = ContinualRun(tiny_config(crop=crop), data, tmp_path / f"run{crop}", progress=False)
        run.tasks = load_tasks(data)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            run._warn_about_crop()
        assert ("crop 16 keeps 20% of a median tconv image (36x36)" in caplog.text) is warned, caplog.text


def test_training_a_new_task_leaves_old_adapters_bit_identical(synth_root):
    config = tiny_config(epochs=2)
    data = CDDB(synth_root, TASKS[:2], progress=False)
    tasks = load_tasks(data)
    model = LoRAXModel(build_backbone("vit_micro"), config.lora)
    model.add_task()
    randomise_adapter(model, 0)
    model.freeze()
    old_adapter = {k: v.detach().clone() for k, v in model.adapter_parameters(0).items()}
    base = {k: v.detach().clone() for k, v in model.extractors.named_parameters() if "lora_" not in k}

    model.add_task()
    before_new = {k: v.detach().clone() for k, v in model.adapter_parameters(1).items()}
    batches = Batches(data, tasks[1].train, config.crop, config.batch_size, train=True, seed=0)
    TaskTrainer(config, "cpu", progress=False).fit(model, batches, task_index=1, old_classes=2, description="t1")

    for key, value in model.adapter_parameters(0).items():
        assert torch.equal(value, old_adapter[key]), f"old adapter changed: {key}"
    for key, value in model.extractors.named_parameters():
        if "lora_" not in key:
            assert torch.equal(value, base[key]), f"frozen backbone weight changed: {key}"
    changed = [k for k, v in model.adapter_parameters(1).items() if not torch.equal(v, before_new[k])]
    assert changed, "the new adapter did not learn at all"


# ---- exemplar memory ---------------------------------------------------------------------------------

def test_herding_picks_the_stated_number_and_follows_the_mean():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(40, 6))
    order = herding_order(features, 7)
    assert len(order) == 7 and len(set(order.tolist())) == 7
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    first_gaps = np.linalg.norm(unit - unit.mean(axis=0), axis=1)
    assert order[0] == int(np.argmin(first_gaps))        # the first pick is the one closest to the mean
    assert len(herding_order(features[:3], 7)) == 3       # never more than there are
    # The herded mean approximates the class mean better than a random subset of the same size.
    herded_gap = np.linalg.norm(unit[order].mean(0) - unit.mean(0))
    random_gap = np.mean([np.linalg.norm(unit[rng.choice(40, 7, replace=False)].mean(0) - unit.mean(0))
                          for _ in range(50)])
    assert herded_gap < random_gap


def test_memory_quota_splits_the_budget_across_classes():
    rng = np.random.default_rng(1)
    memory = ExemplarMemory(20)
    labels = np.repeat([0, 1], 15)
    memory.update([f"a/{i}" for i in range(30)], labels, rng.normal(size=(30, 4)), classes_seen=2)
    assert {c: len(v) for c, v in memory.by_class.items()} == {0: 10, 1: 10}
    first_ranking = [e.path for e in memory.by_class[0]]
    labels = np.repeat([2, 3], 15)
    memory.update([f"b/{i}" for i in range(30)], labels, rng.normal(size=(30, 4)), classes_seen=4)
    assert {c: len(v) for c, v in memory.by_class.items()} == {0: 5, 1: 5, 2: 5, 3: 5}
    assert len(memory) == 20
    assert [e.path for e in memory.by_class[0]] == first_ranking[:5]   # shrinking keeps the best-ranked
    memory = ExemplarMemory(10)
    memory.update([f"c/{i}" for i in range(9)], np.array([0] * 6 + [1] * 3), rng.normal(size=(9, 4)), 3)
    assert {c: len(v) for c, v in memory.by_class.items()} == {0: 3, 1: 3}   # quota 10 // 3


# ---- whole runs --------------------------------------------------------------------------------------

def test_resume_after_a_task_reproduces_an_uninterrupted_run(synth_root, tmp_path):
    config = tiny_config()
    whole = tmp_path / "whole"
    ContinualRun(config, CDDB(synth_root, TASKS[:2], progress=False), whole, progress=False).run()

    split = tmp_path / "split"
    ContinualRun(config, CDDB(synth_root, TASKS[:1], progress=False), split, progress=False).run()
    first = load_file(str(split / "tasks/0_tconv/adapter.safetensors"))
    summary = ContinualRun(config, CDDB(synth_root, TASKS[:2], progress=False), split, resume=True,
                           progress=False).run()
    assert summary["tasks"] == TASKS[:2]

    for name in ("tasks/0_tconv/adapter.safetensors", "tasks/1_nearest/adapter.safetensors",
                 "tasks/1_nearest/heads.safetensors"):
        a, b = load_file(str(whole / name)), load_file(str(split / name))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}: {key} differs after resume"
    resumed_first = load_file(str(split / "tasks/0_tconv/adapter.safetensors"))
    assert all(torch.equal(first[k], resumed_first[k]) for k in first)   # never rewritten
    assert json.loads((whole / "metrics.json").read_text())["accuracy_matrix"] == \
        json.loads((split / "metrics.json").read_text())["accuracy_matrix"]


def test_cli_trains_loads_and_refuses_a_mismatched_resume(synth_root, tmp_path, capsys):
    out = tmp_path / "run"
    code = aigis_main(["train", "--data", str(synth_root), "--out", str(out), "--tasks", ",".join(TASKS),
                       *SET_ARGS, "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "average accuracy" in printed and "forgetting" in printed and "binary accuracy" in printed

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tasks"] == TASKS and manifest["class_names"] == class_names(TASKS)
    assert manifest["backbone"]["name"] == "vit_micro" and len(manifest["backbone"]["sha256"]) == 64
    assert manifest["lora"]["r"] == 4 and manifest["lora"]["alpha"] == 8 and manifest["crop"] == 32
    assert [e["dir"] for e in manifest["task_entries"]] == ["tasks/0_tconv", "tasks/1_nearest", "tasks/2_bilinear"]
    for entry in manifest["task_entries"]:
        assert (out / entry["files"]["adapter.safetensors"]).is_file()
        assert (out / entry["files"]["heads.safetensors"]).is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["accuracy_matrix"]) == 3 and metrics["accuracy_matrix"][0][2] is not None
    assert (out / "accuracy_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    model = load_run(out)
    two = load_run(out, num_tasks=2)
    assert two.manifest["tasks"] == TASKS[:2] and two.manifest["class_names"] == class_names(TASKS[:2])
    assert len(two.manifest["task_entries"]) == 2
    batch = torch.from_numpy(np.stack([b for b, _ in [(x, 0) for x in images(3, 32).numpy()]]))
    with torch.no_grad():
        assert model(batch).shape == (3, 6) and two(batch).shape == (3, 4)
        # The classifier of the full run, fed by merged extractors, gives the unmerged logits.
        merged = [model.merged_extractor(k)(batch) for k in range(3)]
        assert (model.classifier_module()(*merged) - model(batch)).abs().max().item() < 1e-4

    # Same out without --resume: refused. With --resume but another learning setting: refused, naming it.
    assert aigis_main(["train", "--data", str(synth_root), "--out", str(out), *SET_ARGS, "--quiet"]) == 2
    assert "--resume" in capsys.readouterr().err
    code = aigis_main(["train", "--data", str(synth_root), "--out", str(out), "--tasks", ",".join(TASKS),
                       *SET_ARGS, "--set", "epochs=2", "--resume", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot resume" in err and "epochs: 1 -> 2" in err
    # A runtime-only setting may differ: the finished run resumes with nothing left to train.
    assert aigis_main(["train", "--data", str(synth_root), "--out", str(out), "--tasks", ",".join(TASKS),
                       *SET_ARGS, "--on-bad", "skip", "--resume", "--quiet"]) == 0


@pytest.mark.parametrize("method", ["finetune", "joint"])
def test_baselines_run_in_the_same_harness(synth_root, tmp_path, method):
    out = tmp_path / method
    summary = ContinualRun(tiny_config(method=method, epochs=1), CDDB(synth_root, TASKS[:2], progress=False), out,
                           progress=False).run()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == method and manifest["tasks"] == TASKS[:2]
    stages = 1 if method == "joint" else 2
    assert len(manifest["task_entries"]) == stages
    assert (out / manifest["task_entries"][-1]["files"]["model.safetensors"]).is_file()
    assert 0.0 <= summary["average_accuracy"] <= 1.0
    assert (summary["bwt"] is None) == (method == "joint")
    with pytest.raises(RunError, match="only lorax runs"):
        load_run(out)


def test_bad_config_and_bad_run_directory_give_clear_errors(tmp_path):
    from aigis.training.config import ConfigError

    with pytest.raises(ConfigError, match="lora.rank"):
        TrainConfig.from_dict({"lora": {"rank": 4}})
    with pytest.raises(ConfigError, match="method"):
        tiny_config(method="ewc")
    with pytest.raises(RunError, match="no manifest.json"):
        load_run(tmp_path)


def test_baselines_scale_their_learning_rates_and_lorax_ignores_the_factor():
    lorax = tiny_config(full_network_lr_scale=0.1)
    finetune = tiny_config(method="finetune", full_network_lr_scale=0.1)
    assert finetune.learning_rate(0) == pytest.approx(0.1 * lorax.learning_rate(0))
    assert finetune.learning_rate(3) == pytest.approx(0.1 * lorax.learning_rate(3))
    assert "full_network_lr_scale" not in lorax.learning_identity()    # a LoRAX run resumes across it
    assert finetune.learning_identity()["full_network_lr_scale"] == 0.1
    from aigis.training.config import ConfigError

    with pytest.raises(ConfigError, match="full_network_lr_scale"):
        tiny_config(full_network_lr_scale=0)


def test_jobs_take_the_threads_the_machine_can_give():
    from aigis.cpu import choose_threads

    assert choose_threads({"OMP_NUM_THREADS": "3"}, cpus=2, load=0.0).threads == 3      # the user's word wins
    assert choose_threads({}, cpus=2, load=0.1).threads == 2                             # idle: every CPU
    assert choose_threads({}, cpus=2, load=1.2).threads == 1                             # one kept busy by others
    assert choose_threads({}, cpus=8, load=30.0).threads == 1                            # never fewer than one
    assert choose_threads({}, cpus=8, load=2.6).threads == 5
    assert "load 2.6" in choose_threads({}, cpus=8, load=2.6).why
    with pytest.raises(ValueError, match="OMP_NUM_THREADS='lots'"):
        choose_threads({"OMP_NUM_THREADS": "lots"})
