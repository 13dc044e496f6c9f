"""Jobs under torchrun: `aigis train` and `aigis protect` in 2 processes on the CPU (gloo), against 1 process.

The process-group facts (aigis.distributed) and the batch split are checked in-process; the jobs run for real
under `python -m torch.distributed.run --nproc-per-node 2` on tiny data (a 3-task synthetic CDDB at 32 px with
`vit_micro`; 12 captioned scenes with `rn_tiny` / `vit_tiny`), one thread per process.

Tolerances, 1 vs 2 processes. Training: with LoRA dropout 0 a data-parallel step IS one process's step (each rank
takes its part of the same batch, its loss weighted by the part's share, and DDP averages the gradients), so
weights agree to float rounding (relative 1e-4 allowed, ~1e-5 seen after 4 steps at lr 0.5) and the accuracy
matrices to within one validation image; with dropout the ranks draw their own masks and the runs differ as two
seeds do. Protection: the surrogate's loss is taken over the gathered batch, so with a BatchNorm-free surrogate
(vit_tiny) and the word code 2 processes publish the same pixels as 1; per-image MEM deals its batches out to
the ranks, each drawing its own caption shuffles, so only the format and the outputs' validity are compared,
and a 2-process job is reproduced exactly by a 2-process rerun and by a kill + resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from aigis import distributed
from aigis.data.cddb import CDDB
from aigis.data.synth import SynthConfig, generate
from aigis.protection.captions import load_images, read_pairs, synth_captioned
from aigis.protection.job import KILL_ENV, KILL_RANK_ENV
from aigis.training import ContinualRun
from aigis.training.config import TrainConfig
from aigis.training.loading import Batches, load_tasks

pytestmark = pytest.mark.slow

TASKS = ["tconv", "nearest"]
TINY = dict(backbone="vit_micro", weights="default", crop=32, epochs=2, batch_size=8, lr_first=0.5, lr_later=0.5,
            memory_size=6, seed=3, lora={"r": 4, "alpha": 8, "dropout": 0.0})
TRAIN_ARGS = ["--set", "backbone=vit_micro", "--set", "crop=32", "--set", "epochs=2",
              "--set", "batch_size=8", "--set", "memory_size=6", "--set", "lora.r=4", "--set", "lora.alpha=8",
              "--set", "lora.dropout=0.0", "--set", "lr_first=0.5", "--set", "lr_later=0.5", "--set", "seed=3",
              "--quiet"]
PROTECT_ARGS = ["--manifest", "train.jsonl", "--outer", "2", "--surrogate-steps", "1", "--pgd-steps", "1", "--batch",
                "6", "--clip", "rn_tiny", "--size", "32", "--device", "cpu", "--quiet", "--trigger-iterations", "1",
                "--candidates", "3"]
WORD_CODE_ARGS = ["--manifest", "train.jsonl", "--outer", "3", "--surrogate-steps", "2", "--pgd-steps", "2", "--batch",
                  "6", "--clip", "vit_tiny", "--size", "32", "--device", "cpu", "--quiet", "--preset", "word-code",
                  "--word-textures", "12", "--trigger-length", "5", "--texture-tile", "4", "--no-foreign-triggers"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _aigis() -> list[str]:
    """The installed `aigis` script (what `torchrun ... $(which aigis)` runs), else the module."""
    script = Path(sys.executable).with_name("aigis")
    return [str(script)] if script.is_file() else ["-m", "aigis.cli"]


def _env(extra: dict | None = None) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", **(extra or {})}


def torchrun(*args: str, nproc: int = 2, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-port", str(_free_port()), *_aigis(), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=_env(env))


def torchrun_on_machines(*args: str, machines: int = 2) -> list[subprocess.CompletedProcess]:
    """What `torchrun --nnodes M --node-rank i ...` on M machines of one process each does, on this one host."""
    port = _free_port()
    launches = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", str(machines),
                                  "--node-rank", str(i), "--nproc-per-node", "1", "--master-addr", "127.0.0.1",
                                  "--master-port", str(port), *_aigis(), *args],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
                for i in range(machines)]
    results = []
    for launch in launches:
        try:
            out, err = launch.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for other in launches:
                other.kill()
            raise
        results.append(subprocess.CompletedProcess(launch.args, launch.returncode, out, err))
    return results


def plain(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aigis.cli", *args], capture_output=True, text=True, timeout=300,
                          env=_env())


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _published(folder: Path) -> dict[str, str]:
    return {k: hashlib.sha256((folder / k).read_bytes()).hexdigest() for k in _files(folder)
            if not k.startswith("work/")}


def _max_relative(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max() / max(float(a[k].float().abs().max()), 1e-12))
               for k in a)


# ---- the process-group facts, in-process -----------------------------------------------------------------------

def test_launch_facts_come_from_torchruns_environment():
    assert distributed.launch_from_env({}) is None  # not under torchrun: nothing to join
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "node0",
           "MASTER_PORT": "29500"}
    launch = distributed.launch_from_env(env)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.local_world_size) == (3, 4, 1, 2)
    assert launch.spans_machines and launch.master == "node0:29500"
    with pytest.raises(ValueError, match="inconsistent"):
        distributed.launch_from_env({**env, "RANK": "4"})
    # Each process takes the GPU of its LOCAL_RANK; an explicit index would put every process on one GPU.
    assert distributed.local_device("cuda", launch) == "cuda:1"
    assert distributed.local_device("cpu", launch) == "cpu"
    assert distributed.local_device("cuda", None) == "cuda"
    with pytest.raises(ValueError, match="LOCAL_RANK"):
        distributed.local_device("cuda:0", launch)
    assert distributed.backend_for("cuda:1") == "nccl" and distributed.backend_for("cpu") == "gloo"
    assert distributed.timeout_s({}) == distributed.DEFAULT_TIMEOUT_S
    assert distributed.timeout_s({distributed.TIMEOUT_ENV: "90"}) == 90.0
    with pytest.raises(ValueError, match=distributed.TIMEOUT_ENV):
        distributed.timeout_s({distributed.TIMEOUT_ENV: "0"})


def test_without_a_group_every_collective_is_the_one_process_answer():
    assert not distributed.active() and distributed.world_size() == 1 and distributed.is_main()
    distributed.barrier()
    assert distributed.on_main(lambda: 7) == 7 and distributed.broadcast_object("x") == "x"
    rows = torch.arange(6.0).reshape(3, 2)
    assert distributed.gather_rows(rows, 3) is rows and distributed.all_gather_object(1) == [1]
    assert distributed.shard(5).tolist() == [0, 1, 2, 3, 4]
    for n, world in ((10, 3), (2, 4), (0, 2), (7, 7)):
        blocks = [distributed.shard(n, r, world) for r in range(world)]
        assert [b.tolist() for b in blocks] == [a.tolist() for a in np.array_split(np.arange(n), world)]


def test_a_batch_split_over_ranks_is_the_batch_and_its_weights_give_the_batch_mean(tmp_path):
    root = tmp_path / "data"
    generate(root, SynthConfig(tasks=1, train_per_class=5, val_per_class=2, size=36, seed=1), progress=False)
    data = CDDB(root, ["tconv"], progress=False)
    batches = Batches(data, load_tasks(data)[0].train, 32, 4, train=True, seed=2)  # 10 images: 4, 4, 2
    whole = list(batches.epoch(1))
    for world in (2, 3):
        parts = [list(batches.epoch_parts(1, r, world)) for r in range(world)]
        for step, (images, labels) in enumerate(whole):
            got = [parts[r][step] for r in range(world)]
            assert all(size == len(labels) for _, _, _, size in got)
            real = [(i, lab) for i, lab, w, _ in got if w > 0]
            assert torch.equal(torch.cat([i for i, _ in real]), images)      # the ranks' parts are the batch
            assert torch.equal(torch.cat([lab for _, lab in real]), labels)
            # mean over ranks of (part mean x weight) = the batch mean
            values = labels.double()
            split = [(lab.double().mean() * w) for _, lab, w, _ in got]
            assert float(sum(split) / world) == pytest.approx(float(values.mean()))
    # A last batch of 2 over 3 ranks: the third rank gets one item at weight 0 and still takes a step.
    last = list(batches.epoch_parts(1, 2, 3))[-1]
    assert last[2] == 0.0 and len(last[1]) == 1
    assert [w for _, _, w, _ in batches.epoch_parts(1, 0, 1)] == [None] * 3   # one process: nothing rescaled


def test_a_protection_batch_too_small_to_give_every_process_a_row_is_refused():
    from aigis.protection.job import _check_batches_cover_ranks

    _check_batches_cover_ranks(12, 6, 2)
    _check_batches_cover_ranks(3, 2, 1)  # one process: anything goes
    _check_batches_cover_ranks(5, 4, 2)  # passes of 3 + 2 images, surrogate batches of 4: a row for each
    with pytest.raises(ValueError, match="batches of 2 image"):
        _check_batches_cover_ranks(5, 4, 3)  # the pass's batch of 2 leaves one of 3 processes nothing
    with pytest.raises(ValueError, match="fewer than the 4 processes"):
        _check_batches_cover_ranks(12, 3, 4)


# ---- aigis train under torchrun --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dist-synth") / "data"
    generate(root, SynthConfig(tasks=2, train_per_class=5, val_per_class=3, size=36, seed=1), progress=False)
    return root


@pytest.fixture(scope="module")
def two_process_run(synth, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist-train") / "run"
    result = torchrun("train", "--data", str(synth), "--out", str(out), "--tasks", ",".join(TASKS), *TRAIN_ARGS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("average accuracy") == 1, result.stdout  # rank 0 alone reports
    return out


def test_training_under_torchrun_matches_one_process_within_tolerance(synth, two_process_run, tmp_path):
    one = tmp_path / "one"
    ContinualRun(TrainConfig.from_dict(TINY), CDDB(synth, TASKS, progress=False), one, progress=False).run()
    two = two_process_run
    assert _files(two) == _files(one)  # one set of outputs: no per-rank files, no leftovers
    manifest = json.loads((two / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and [e["world_size"] for e in manifest["task_entries"]] == [2, 2]
    assert json.loads((one / "manifest.json").read_text())["world_size"] == 1
    assert manifest["tasks"] == TASKS
    for name in ("tasks/0_tconv/adapter.safetensors", "tasks/1_nearest/adapter.safetensors",
                 "tasks/1_nearest/heads.safetensors"):
        assert _max_relative(load_file(str(one / name)), load_file(str(two / name))) < 1e-4, name
    a, b = (json.loads((run / "metrics.json").read_text()) for run in (one, two))
    one_image = 1 / 6  # 3 validation images per class, 2 classes per task
    for key in ("accuracy_matrix", "binary_accuracy_matrix"):
        for row_a, row_b in zip(a[key], b[key]):
            for x, y in zip(row_a, row_b):
                assert (x is None) == (y is None) and (x is None or abs(x - y) <= one_image + 1e-9), key
    losses = [[e["final_loss"] for e in json.loads((run / "manifest.json").read_text())["task_entries"]]
              for run in (one, two)]
    assert np.allclose(losses[0], losses[1], rtol=1e-4)
    assert json.loads((two / "tasks/1_nearest/exemplars.json").read_text())["exemplars"] == \
        json.loads((one / "tasks/1_nearest/exemplars.json").read_text())["exemplars"]  # herded once, the same


def test_training_resumes_under_torchrun_to_the_uninterrupted_run(synth, two_process_run, tmp_path):
    out = tmp_path / "split"
    first = torchrun("train", "--data", str(synth), "--out", str(out), "--tasks", TASKS[0], *TRAIN_ARGS)
    assert first.returncode == 0, first.stderr[-3000:]
    again = torchrun("train", "--data", str(synth), "--out", str(out), "--tasks", ",".join(TASKS), *TRAIN_ARGS,
                     "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    for name in ("tasks/0_tconv/adapter.safetensors", "tasks/1_nearest/adapter.safetensors",
                 "tasks/1_nearest/heads.safetensors"):
        a, b = load_file(str(two_process_run / name)), load_file(str(out / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert json.loads((out / "metrics.json").read_text())["accuracy_matrix"] == \
        json.loads((two_process_run / "metrics.json").read_text())["accuracy_matrix"]
    # A refused resume is refused on every rank with rank 0's message, printed once.
    refused = torchrun("train", "--data", str(synth), "--out", str(out), "--tasks", ",".join(TASKS), *TRAIN_ARGS,
                       "--set", "epochs=3", "--resume")
    assert refused.returncode != 0 and refused.stderr.count("cannot resume") == 1, refused.stderr[-3000:]


def test_a_baseline_trains_data_parallel_too(synth, tmp_path):
    out = tmp_path / "finetune"
    result = torchrun("train", "--data", str(synth), "--out", str(out), "--tasks", ",".join(TASKS), *TRAIN_ARGS,
                      "--method", "finetune",
                      "--set", "full_network_lr_scale=0.1")
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "finetune" and manifest["world_size"] == 2 and manifest["tasks"] == TASKS
    assert (out / manifest["task_entries"][-1]["files"]["model.safetensors"]).is_file()


# ---- aigis protect under torchrun ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    return synth_captioned(tmp_path_factory.mktemp("dist-scenes"), 12, 0, size=32, seed=3)


@pytest.fixture(scope="module")
def protected_two(scenes, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist-protect") / "two"
    result = torchrun("protect", "--data", str(scenes), "--out", str(out), *PROTECT_ARGS)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)  # rank 0 alone prints it
    assert summary["outer_iterations_run"] == 2 and summary["resumed"] is False
    return out


def test_protection_under_torchrun_writes_what_one_process_writes(scenes, protected_two, tmp_path):
    one = tmp_path / "one"
    result = plain("protect", "--data", str(scenes), "--out", str(one), *PROTECT_ARGS)
    assert result.returncode == 0, result.stderr
    two = protected_two
    assert _files(two) == _files(one)  # the same files, work/ included: one noise file, rank 0's checkpoint
    report, report_one = (json.loads((run / "protection.json").read_text()) for run in (two, one))
    assert report["world_size"] == 2 and report_one["world_size"] == 1
    assert report.keys() == report_one.keys()
    assert {k: v for k, v in report.items() if k not in ("world_size", "images", "surrogate")} == \
        {k: v for k, v in report_one.items() if k not in ("world_size", "images", "surrogate")}
    originals = load_images(read_pairs(scenes, "train.jsonl"), 32, progress=False).astype(int)
    lines = [json.loads(line) for line in (two / "manifest.jsonl").read_text().splitlines()]
    published = np.stack([np.asarray(Image.open(two / e["image"]).convert("RGB")) for e in lines]).astype(int)
    delta = published - originals
    assert np.abs(delta).max() <= 8 and np.count_nonzero(delta) > delta.size // 4  # every rank's rows moved
    for entry, original in zip(lines, read_pairs(scenes, "train.jsonl")):
        assert entry["caption"].split(" ", 3)[3] == original.caption  # a 3-word trigger in front of each
    for entry in report["images"]:
        assert hashlib.sha256((two / entry["image"]).read_bytes()).hexdigest() == entry["sha256"]
    state = json.loads((two / "work/ckpt-2/state.json").read_text())
    assert state["world_size"] == 2


def test_a_killed_rank_stops_the_job_and_a_resume_under_torchrun_ends_where_the_whole_job_did(
        scenes, protected_two, tmp_path):
    out = tmp_path / "killed"
    # Rank 1 is SIGKILLed after the first checkpoint: torchrun stops rank 0 (no one waits forever) and fails.
    killed = torchrun("protect", "--data", str(scenes), "--out", str(out), *PROTECT_ARGS,
                      env={KILL_ENV: "1", KILL_RANK_ENV: "1"})
    assert killed.returncode != 0 and "SIGKILL" in killed.stderr, killed.stderr[-3000:]
    assert (out / "work/ckpt-1/state.json").is_file() and not (out / "protection.json").exists()
    resumed = torchrun("protect", "--data", str(scenes), "--out", str(out), *PROTECT_ARGS)
    assert resumed.returncode == 0 and json.loads(resumed.stdout)["resumed"] is True, resumed.stderr[-3000:]
    assert _published(out) == _published(protected_two)  # the same bytes as the uninterrupted 2-process job


def test_the_word_code_under_torchrun_publishes_the_pixels_one_process_does(scenes, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    result = plain("protect", "--data", str(scenes), "--out", str(one), *WORD_CODE_ARGS)
    assert result.returncode == 0, result.stderr
    result = torchrun("protect", "--data", str(scenes), "--out", str(two), *WORD_CODE_ARGS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _files(two) == _files(one)
    assert (two / "manifest.jsonl").read_text() == (one / "manifest.jsonl").read_text()  # the same drawn triggers
    # The textures move by the sign of the same gradient: the same pixels, but for a sign that float rounding
    # flips (none seen here; at most 1% of the sub-pixels allowed).
    pixels = [np.stack([np.asarray(Image.open(run / name)) for name in _files(run) if name.startswith("images/")])
              for run in (one, two)]
    assert np.mean(pixels[0] != pixels[1]) <= 0.01
    losses = [json.loads((run / "work/ckpt-3/state.json").read_text())["history"][-1]["pass_loss"]
              for run in (one, two)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


def test_a_job_spanning_machines_sends_the_noise_rows_and_publishes_what_one_machine_does(scenes, protected_two,
                                                                                         tmp_path):
    out = tmp_path / "machines"
    first, second = torchrun_on_machines("protect", "--data", str(scenes), "--out", str(out), *PROTECT_ARGS)
    assert first.returncode == 0 and second.returncode == 0, (first.stderr[-2000:], second.stderr[-2000:])
    assert json.loads(first.stdout)["outer_iterations_run"] == 2 and second.stdout == ""
    assert _published(out) == _published(protected_two)  # the same ranks and draws: the same bytes
    # Each machine kept its own copy of the noise, whole: the second machine's equals the first's.
    assert np.array_equal(np.load(out / "work/noise.npy"), np.load(out / "work/noise-machine1.npy"))
