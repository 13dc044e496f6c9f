"""MEM on a CUDA GPU: the device paths the CPU suite cannot reach. Without a GPU every test here skips, saying so.

On a GPU host: `pytest tests/test_mem_cuda.py`, or `bash benchmarks/gpu_checks.sh`, which runs these and
records the GPU speed figures. The CPU suite holds the method's properties; these hold that the CUDA paths
keep them: HotFlip scored on the device and agreeing with the CPU, the fused AdamW's step, bfloat16 autocast
by default, and a job on the GPU that checkpoints, resumes and publishes noise on the uint8 grid.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aigis.protection import mem
from aigis.protection.captions import load_images, read_pairs, synth_captioned
from aigis.protection.clip import normalize_images
from aigis.protection.job import KILL_ENV

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch sees none): MEM's CUDA paths"),
]

SIZE = 32
CUDA = torch.device("cuda")


# `tiny` (conftest.py): a tiny random CLIP, its tokenizer and 6 scenes at 32 px.


def test_hotflip_is_scored_on_the_gpu_and_agrees_with_the_cpu(tiny):
    model, tokenizer, images, captions = tiny
    k = 3
    scores = {}
    for device in (torch.device("cpu"), CUDA):
        surrogate = copy.deepcopy(model).to(device)
        tokens = tokenizer.tokenize(captions, surrogate.context_length, k).to(device)
        candidates = mem._candidate_table(tokenizer, surrogate, device)
        with torch.no_grad():
            features = surrogate.encode_image(normalize_images(torch.from_numpy(images).to(device)))
        scores[device.type] = mem.hotflip_scores(surrogate, tokens, features, k, candidates)
        top = mem.hotflip_candidates(surrogate, tokens, features, k, candidates, 4)
        assert scores[device.type].device.type == device.type and top.device.type == device.type
    gpu, cpu = scores["cuda"].cpu(), scores["cpu"]
    # cuDNN may run the image tower's convolutions in TF32: agreement to a percent of the scores' range.
    assert (gpu - cpu).abs().max() <= 1e-2 * cpu.abs().max()


def test_fused_adamw_on_the_gpu_takes_the_per_tensor_step(tiny):
    model = tiny[0]
    settings = mem.MEMSettings()
    stepped = []
    for fused in (True, False):
        surrogate = copy.deepcopy(model).to(CUDA)
        optimizer = mem.make_optimizer(surrogate, settings, fused=fused)
        assert all(bool(g["fused"]) is fused for g in optimizer.param_groups)
        generator = torch.Generator(device=CUDA).manual_seed(1)
        for _ in range(3):  # the same gradients for both: the optimisers alone are compared
            for p in surrogate.parameters():
                p.grad = torch.randn(p.shape, generator=generator, device=CUDA)
            optimizer.step()
        stepped.append(surrogate)
    for (name, a), b in zip(stepped[0].named_parameters(), stepped[1].parameters()):
        assert (a - b).abs().max() <= 1e-6 * max(1.0, float(a.abs().max())), name
    assert not torch.equal(stepped[0].visual.conv1.weight, model.visual.conv1.weight.to(CUDA))


def test_protect_batch_on_the_gpu_runs_bfloat16_and_keeps_the_grid_and_text_triggers(tiny):
    model, tokenizer, images, captions = tiny
    settings = mem.MEMSettings(pgd_steps=4, candidates=4)
    assert settings.amp == "auto" and mem.autocast_enabled(settings.amp, CUDA)
    surrogate = copy.deepcopy(model).to(CUDA)
    dtypes = []
    hook = surrogate.visual.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    protected, texts, delta = mem.protect_batch(surrogate, tokenizer, images, captions, settings, device="cuda")
    hook.remove()
    assert dtypes and set(dtypes) == {torch.bfloat16}
    assert protected.dtype == np.uint8 and np.array_equal(protected.astype(np.int16), images.astype(np.int16) + delta)
    assert 1 <= np.abs(delta).max() <= settings.pgd_steps
    for text, caption in zip(texts, captions):
        assert text.endswith(caption) and len(tokenizer.encode(text[: -len(caption)])) == settings.trigger_length


def test_a_gpu_job_runs_bfloat16_checkpoints_resumes_and_publishes_on_the_grid(tmp_path):
    data = synth_captioned(tmp_path / "data", 12, 0, size=SIZE, seed=3)
    args = ["--outer", "2", "--trigger-iterations", "1", "--surrogate-steps", "2", "--pgd-steps", "2", "--batch", "6",
            "--candidates", "3", "--clip", "rn_tiny", "--size", str(SIZE), "--device", "cuda", "--quiet"]

    def protect(out: Path, env: dict | None = None) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "aigis.cli", "protect", "--data", str(data), "--out", str(out), *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})

    out = tmp_path / "protected"
    killed = protect(out, {KILL_ENV: "1"})
    assert killed.returncode == -9, killed.stderr
    assert json.loads((out / "work" / "ckpt-1" / "state.json").read_text())["autocast"] is True
    resumed = protect(out)
    assert resumed.returncode == 0 and json.loads(resumed.stdout)["resumed"] is True, resumed.stderr
    report = json.loads((out / "protection.json").read_text())
    assert report["autocast"] == "bfloat16" and report["outer_iterations_run"] == 2
    originals = load_images(read_pairs(data, "train.jsonl"), SIZE, progress=False).astype(int)
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    published = np.stack([np.asarray(Image.open(out / e["image"]).convert("RGB")) for e in lines]).astype(int)
    change = np.abs(published - originals)
    assert change.max() <= report["epsilon_uint8_levels"] and np.count_nonzero(change) > change.size // 4
    model, tokenizer, _ = mem.load_surrogate(out / report["surrogate"]["path"])
    for line, pair in zip(lines, read_pairs(data, "train.jsonl")):
        trigger = line["caption"][: -len(pair.caption)]
        assert line["caption"].endswith(pair.caption) and len(tokenizer.encode(trigger)) == 3
