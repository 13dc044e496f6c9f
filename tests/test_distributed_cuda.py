"""Jobs under torchrun on CUDA: the same commands as on the CPU, joined over NCCL, one GPU per process (LOCAL_RANK).
Without a GPU every test here skips, saying so.

On a GPU host: `pytest tests/test_distributed_cuda.py`, or `bash benchmarks/gpu_checks.sh`, which runs it. It
launches min(GPUs, 2) processes: on a 1-GPU host a 1-process group (NCCL initialised, DistributedDataParallel and
every collective run), on a host of several GPUs a data-parallel job over two. The CPU suite
(tests/test_distributed.py) holds what the jobs compute; these hold that the GPU path runs it.
"""

from __future__ import annotations

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

from aigis.protection.captions import load_images, read_pairs, synth_captioned
from aigis.protection.job import KILL_ENV

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch sees none): jobs over NCCL"),
]

SIZE = 32


def _gpus() -> int:
    return min(torch.cuda.device_count(), 2)


def _torchrun(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(_gpus()), "--master-port",
               str(port), "-m", "aigis.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "2", **(env or {})})


def test_protection_under_torchrun_runs_on_the_gpus_over_nccl_and_resumes(tmp_path):
    data = synth_captioned(tmp_path / "data", 12, 0, size=SIZE, seed=3)
    args = ["protect", "--data", str(data), "--out", str(tmp_path / "protected"), "--outer", "2",
            "--trigger-iterations", "1", "--surrogate-steps", "2", "--pgd-steps", "2", "--batch", "6",
            "--candidates", "3", "--clip", "rn_tiny", "--size", str(SIZE)]  # no --device: CUDA, the rank's GPU
    killed = _torchrun(*args, env={KILL_ENV: "1"})
    assert killed.returncode != 0, killed.stderr[-3000:]
    assert f"process group: {_gpus()} process(es) over nccl" in killed.stderr, killed.stderr[-3000:]
    resumed = _torchrun(*args)
    assert resumed.returncode == 0 and json.loads(resumed.stdout)["resumed"] is True, resumed.stderr[-3000:]
    out = tmp_path / "protected"
    report = json.loads((out / "protection.json").read_text())
    assert report["world_size"] == _gpus() and report["autocast"] == "bfloat16"
    originals = load_images(read_pairs(data, "train.jsonl"), SIZE, progress=False).astype(int)
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    published = np.stack([np.asarray(Image.open(out / e["image"]).convert("RGB")) for e in lines]).astype(int)
    change = np.abs(published - originals)
    assert change.max() <= report["epsilon_uint8_levels"] and np.count_nonzero(change) > change.size // 4


def test_training_under_torchrun_runs_on_the_gpus_over_nccl(tmp_path):
    for module in ("peft", "skimage", "tqdm", "matplotlib"):
        pytest.importorskip(module, reason=f"training needs {module} (pip install 'aigis[train]')")
    from aigis.data.synth import SynthConfig, generate

    root = tmp_path / "data"
    generate(root, SynthConfig(tasks=2, train_per_class=6, val_per_class=4, size=36, seed=1), progress=False)
    out = tmp_path / "run"
    result = _torchrun("train", "--data", str(root), "--out", str(out), "--tasks", "tconv,nearest",
                       "--set", "backbone=vit_micro", "--set", "crop=32", "--set", "epochs=2", "--set", "batch_size=8",
                       "--set", "memory_size=6", "--set", "lora.r=4", "--set", "lora.alpha=8", "--set", "lr_first=0.5",
                       "--set", "lr_later=0.5")  # device auto: CUDA with float16 autocast
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"process group: {_gpus()} process(es) over nccl" in result.stderr, result.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["world_size"] == _gpus() and manifest["tasks"] == ["tconv", "nearest"]
    assert all(0.0 <= v <= 1.0 for row in manifest["metrics"]["accuracy_matrix"] for v in row if v is not None)
    assert Path(out / "tasks/1_nearest/adapter.safetensors").is_file()
