"""MEM protection: uint8-grid noise, text-surviving triggers, the batched search, resume after SIGKILL, CLI errors.

Real components throughout: a tiny CLIP on 32 px procedural scenes, the real `aigis protect` command in a
subprocess (killed for real with SIGKILL after its first checkpoint), PNGs read back from disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aigis.protection import mem
from aigis.protection.captions import load_images, read_pairs, synth_captioned
from aigis.protection.clip import PRESETS, build_clip, contrastive_loss, normalize_images
from aigis.protection.job import KILL_ENV, autocast_before_it_was_recorded
from aigis.protection.settings import DEFAULT_TRIGGER_WORDS
from aigis.protection.tokenizer import Tokenizer

N_IMAGES = 12
SIZE = 32
JOB_ARGS = ["--outer", "2", "--surrogate-steps", "1", "--pgd-steps", "1", "--batch", "6", "--clip", "rn_tiny",
            "--size", str(SIZE), "--device", "cpu", "--quiet"]  # settings every method has
MEM_ARGS = ["--trigger-iterations", "1", "--candidates", "3"]  # per-image MEM's own (the default preset)


def _job_args(extra) -> list[str]:
    """JOB_ARGS, and MEM_ARGS unless the options pick a word-code preset."""
    return [*JOB_ARGS, *([] if any(a.startswith("word-code") for a in extra) else MEM_ARGS)]


def _tree_hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _published_tree(folder: Path) -> dict[str, str]:
    """_tree_hashes of what a job publishes (its work/ folder of checkpoints left out)."""
    return {k: v for k, v in _tree_hashes(folder).items() if not k.startswith("work/")}


def _killed_then_resumed(data: Path, out: Path, *extra: str, kill_after: int) -> None:
    """An `aigis protect` run SIGKILLed after outer iteration kill_after, then run again to the end (a resume)."""
    killed = _protect(data, out, *extra, env={KILL_ENV: str(kill_after)})
    assert killed.returncode == -9, killed.stderr
    resumed = _protect(data, out, *extra)
    assert resumed.returncode == 0 and json.loads(resumed.stdout)["resumed"] is True, resumed.stderr


def _protect(data: Path, out: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "aigis.cli", "protect", "--data", str(data), "--manifest", "train.jsonl",
               "--out", str(out), *_job_args(extra), *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return synth_captioned(tmp_path_factory.mktemp("mem-data"), N_IMAGES, 0, size=SIZE, seed=3)


@pytest.fixture(scope="module")
def job(data, tmp_path_factory) -> dict:
    """One uninterrupted `aigis protect` run, with the originals hashed before and after."""
    before = _tree_hashes(data)
    out = tmp_path_factory.mktemp("mem-out") / "protected"
    result = _protect(data, out)
    assert result.returncode == 0, result.stderr
    return {"out": out, "before": before, "after": _tree_hashes(data), "summary": json.loads(result.stdout)}


def _published(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def test_noise_is_within_epsilon_on_the_uint8_grid_and_originals_untouched(job, data):
    out = job["out"]
    assert job["before"] == job["after"], "the original images or manifest changed"
    report = json.loads((out / "protection.json").read_text())
    assert report["mode"] == "mem" and report["trigger_length"] == 3 and report["epsilon_uint8_levels"] == 8
    originals = load_images(read_pairs(data, "train.jsonl"), SIZE, progress=False).astype(int)
    protected = np.stack([np.asarray(Image.open(out / e["image"]).convert("RGB")) for e in _published(out)]).astype(int)
    delta = protected - originals
    assert np.abs(delta).max() <= 8
    assert np.count_nonzero(delta) > delta.size // 4, "almost no noise was applied"
    for entry in report["images"]:  # the recorded hashes are the files'
        assert hashlib.sha256((out / entry["image"]).read_bytes()).hexdigest() == entry["sha256"]
    model, _, meta = mem.load_surrogate(out / report["surrogate"]["path"])
    assert meta["sha256"] == report["surrogate"]["sha256"]


def test_triggers_survive_as_text_and_hold_no_special_tokens(job, data):
    out = job["out"]
    _, tokenizer, _ = mem.load_surrogate(out / "surrogate" / "1")
    originals = [p.caption for p in read_pairs(data, "train.jsonl")]
    caption_words = {w for c in originals for w in c.split(" ")}
    triggers = set()
    for entry, original in zip(_published(out), originals):
        words = entry["caption"].split(" ")
        assert " ".join(words[3:]) == original
        ids = tokenizer.encode(" ".join(words[:3]))
        assert len(ids) == 3, words[:3]
        assert all(tokenizer.is_trigger_candidate(i) for i in ids)
        assert not {tokenizer.sot_id, tokenizer.eot_id, tokenizer.pad_id} & set(ids)
        row = tokenizer.tokenize(entry["caption"], 40)[0]
        assert row[1:4].tolist() == ids  # the model sees exactly the trigger after SOT
        triggers.add(tuple(ids))
        # The job's default: made-up trigger words, none of them a word any caption uses.
        assert not set(words[:3]) & caption_words and set(words[:3]) <= tokenizer.trigger_words
    assert len(triggers) > 1, "every pair got the same trigger: the search did nothing"
    report = json.loads((out / "protection.json").read_text())
    assert report["trigger_words"] == f"{DEFAULT_TRIGGER_WORDS} made-up words"


def test_resume_after_sigkill_gives_byte_identical_output(job, data, tmp_path):
    out = tmp_path / "killed"
    killed = _protect(data, out, env={KILL_ENV: "1"})
    assert killed.returncode == -9, killed.stderr  # a real SIGKILL after the first checkpoint
    assert (out / "work" / "ckpt-1" / "state.json").is_file()
    assert not (out / "protection.json").exists()
    older = tmp_path / "older"  # the same checkpoint as a version without norm_stats wrote it
    shutil.copytree(out, older)
    state_json = older / "work" / "ckpt-1" / "state.json"
    meta = json.loads(state_json.read_text())
    del meta["fingerprint"]["settings"]["norm_stats"]
    state_json.write_text(json.dumps(meta))
    resumed = _protect(data, out)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["resumed"] is True
    expected = _published_tree(job["out"])
    assert _published_tree(out) == expected
    assert any(k.startswith("images/") for k in expected) and "surrogate/1/model.safetensors" in expected
    # Its checkpoints are not resumed by a job with other trigger words: the error says what changed.
    other = _protect(data, out, "--trigger-words", "0")
    assert other.returncode == 2 and "trigger_words" in other.stderr and "--no-resume" in other.stderr, other.stderr
    # That older version used the stored BatchNorm averages: its checkpoint resumes as such, not as today's default.
    default = _protect(data, older)
    assert default.returncode == 2 and "changed: settings" in default.stderr, default.stderr
    as_then = _protect(data, older, "--norm-stats", "running")
    assert as_then.returncode == 0 and json.loads(as_then.stdout)["resumed"] is True, as_then.stderr


def test_surrogate_restarts_are_staggered_fresh_draws_and_resume_to_the_same_output(data, tiny, tmp_path):
    import copy

    from aigis.protection.clip import CLIP

    settings = mem.MEMSettings(surrogate_restart=4, surrogate_steps=1, batch_size=6, amp="off")
    assert [i for i in range(13) if mem.restart_due(settings, i, 0, 2)] == [4, 8, 12]
    assert [i for i in range(13) if mem.restart_due(settings, i, 1, 2)] == [2, 6, 10]  # one is always older
    assert not any(mem.restart_due(mem.MEMSettings(), i, 0, 1) for i in range(20))
    with pytest.raises(ValueError, match="surrogate_restart"):
        mem.MEMSettings(surrogate_restart=-1).validate()

    # A re-draw: the config drawn afresh from restart_seed, the optimiser's moments gone, the global RNG untouched.
    model, tokenizer, images, captions = tiny
    state = mem.new_state(copy.deepcopy(model), tokenizer, len(captions), (SIZE, SIZE), settings)
    tokens = tokenizer.tokenize(captions, model.context_length, settings.trigger_length)
    mem.train_surrogate(state, images, tokens, settings, torch.device("cpu"))
    assert state.optimizer.state and mem.restart_surrogates(state, settings) == []  # iteration 0: not due
    state.iteration = 4
    rng = torch.get_rng_state()
    assert mem.restart_surrogates(state, settings) == [0]
    assert torch.equal(torch.get_rng_state(), rng) and not state.optimizer.state
    torch.manual_seed(mem.restart_seed(settings.seed, 4, 0))
    expected = CLIP(model.config).state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in state.model.state_dict().items())
    assert not torch.equal(expected["visual.conv1.weight"], model.state_dict()["visual.conv1.weight"])

    # In a job: a SIGKILL between re-draws resumes to the same published output as an uninterrupted run.
    restarts = ("--surrogate-restart", "1", "--outer", "3")
    whole = _protect(data, tmp_path / "whole", *restarts)
    assert whole.returncode == 0, whole.stderr
    _killed_then_resumed(data, tmp_path / "killed", *restarts, kill_after=2)
    assert _published_tree(tmp_path / "killed") == _published_tree(tmp_path / "whole")
    checkpoint = json.loads((tmp_path / "whole" / "work" / "ckpt-3" / "state.json").read_text())
    assert [h["surrogates_redrawn"] for h in checkpoint["history"]] == [[], [0], [0]]


def test_surrogate_optimizer_is_fused_and_takes_the_per_tensor_step(tiny):
    import copy

    model, tokenizer, images, captions = tiny
    settings = mem.MEMSettings(batch_size=6, amp="off")
    tokens = tokenizer.tokenize(captions[:6], model.context_length, settings.trigger_length)
    x = normalize_images(torch.from_numpy(images[:6]))
    steps = 3

    def train(surrogate, optimizer, leader=None):
        """`steps` steps; with a leader (model, optimizer), each step takes the leader's gradients, and the
        leader steps too."""
        for _ in range(steps):
            source = surrogate if leader is None else leader[0]
            loss = contrastive_loss(source.encode_image(x), source.encode_text(tokens), source.logit_scale)
            source.zero_grad(set_to_none=True)
            loss.backward()
            if leader is not None:
                for p, q in zip(surrogate.parameters(), leader[0].parameters()):
                    p.grad = q.grad.clone()
                leader[1].step()
            optimizer.step()

    # One step, the same gradients: the fused kernel and the per-tensor loop compute the same AdamW update,
    # so they may differ only by float32 rounding of each step: a few ulps of the parameter (decay and the
    # update are applied to it) plus a rounding-sized part of the move itself (at most lr per step).
    loop_model = copy.deepcopy(model).train()
    loop_optimizer = mem.make_optimizer(loop_model, settings, fused=False)
    fused_model = copy.deepcopy(model).train()
    fused_optimizer = mem.make_optimizer(fused_model, settings, fused=True)
    assert all(g["fused"] for g in fused_optimizer.param_groups)
    assert not any(g["fused"] for g in loop_optimizer.param_groups)
    train(fused_model, fused_optimizer, leader=(loop_model, loop_optimizer))
    ulp = torch.finfo(torch.float32).eps
    for (name, a), b in zip(fused_model.named_parameters(), loop_model.parameters()):
        allowed = steps * (8 * ulp * b.abs() + 1e-4 * settings.lr)
        assert ((a - b).abs() <= allowed).all(), (name, (a - b).abs().max().item())
    moved = [n for (n, a), b in zip(fused_model.named_parameters(), model.parameters()) if not torch.equal(a, b)]
    assert "token_embedding.weight" in moved and "visual.conv1.weight" in moved

    # Trained on their own gradients the two drift apart further (attention key biases get gradients of pure
    # rounding noise, which Adam scales to lr), but the whole update stays the same to a part in a thousand.
    trained = []
    for fused in (True, False):
        surrogate = copy.deepcopy(model).train()
        optimizer = mem.make_optimizer(surrogate, settings, fused=fused)
        train(surrogate, optimizer)
        trained.append((surrogate, optimizer))
    (fused_model, fused_optimizer), (loop_model, loop_optimizer) = trained
    difference = torch.cat([(a - b).flatten() for a, b in zip(fused_model.parameters(), loop_model.parameters())])
    update = torch.cat([(b - m).flatten() for b, m in zip(loop_model.parameters(), model.parameters())])
    assert difference.norm() < 1e-3 * update.norm()

    # A checkpoint written before the optimiser was fused resumes as it was written (per-tensor steps), through
    # the job's own checkpoint format: tensors plus param groups as JSON.
    from aigis.protection.checkpoints import _optimizer_tensors, _restore_optimizer

    tensors, groups = _optimizer_tensors(loop_optimizer)
    resumed_model = copy.deepcopy(loop_model)
    resumed = mem.make_optimizer(resumed_model, settings)
    _restore_optimizer(resumed, tensors, json.loads(json.dumps(groups)))
    assert not any(g["fused"] for g in resumed.param_groups)
    loss = contrastive_loss(resumed_model.encode_image(x), resumed_model.encode_text(tokens), resumed_model.logit_scale)
    loss.backward()
    resumed.step()
    assert all(int(state["step"]) == 4 for state in resumed.state.values())


def test_mixed_precision_path_keeps_the_uint8_grid_and_text_triggers(tiny):
    """amp="on" runs the bfloat16 autocast that a CUDA job uses by default, here on the CPU: the search, PGD
    and surrogate steps under autocast must still give float32 weights, noise on the grid and text triggers."""
    import copy
    import math

    model, tokenizer, images, captions = tiny
    settings = mem.MEMSettings(trigger_length=2, outer_iterations=2, surrogate_steps=2, pgd_steps=2, batch_size=6,
                               candidates=3, amp="on")
    state = mem.new_state(copy.deepcopy(model), tokenizer, len(captions), (SIZE, SIZE), settings)
    tower_dtypes = []  # autocast really on: the image tower computes in bfloat16
    hook = state.model.visual.register_forward_hook(lambda module, args, out: tower_dtypes.append(out.dtype))
    mem.run_mem(state, tokenizer, images, captions, settings, device="cpu", progress=False)
    hook.remove()
    assert tower_dtypes and set(tower_dtypes) == {torch.bfloat16}
    assert all(math.isfinite(h["pass_loss"]) and math.isfinite(h["surrogate_loss"]) for h in state.history)
    assert {p.dtype for p in state.model.parameters()} == {torch.float32}
    assert not torch.equal(state.model.visual.conv1.weight, model.visual.conv1.weight)
    most = settings.outer_iterations * settings.pgd_steps  # one uint8 level per PGD step
    assert state.noise.dtype == np.int8 and 1 <= np.abs(state.noise).max() <= most
    assert set(state.triggers.ravel().tolist()) <= set(tokenizer.trigger_candidates().tolist())
    protected, texts, delta = mem.protect_batch(state.model, tokenizer, images, captions, settings, device="cpu")
    assert protected.dtype == np.uint8 and np.array_equal(protected.astype(np.int16), images.astype(np.int16) + delta)
    assert 1 <= np.abs(delta).max() <= settings.pgd_steps
    for text, caption in zip(texts, captions):
        assert text.endswith(caption) and len(tokenizer.encode(text[: -len(caption)])) == settings.trigger_length


def test_autocast_auto_is_on_for_cuda_and_amx_cpus_and_explicit_settings_win(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert mem.autocast_enabled("auto", cuda) and not mem.autocast_enabled("off", cuda)
    assert mem.autocast_enabled("on", cpu) and not mem.autocast_enabled("off", cpu)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert mem.autocast_enabled("auto", cpu)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert not mem.autocast_enabled("auto", cpu)

    def moved():  # PyTorch's private probe failing: an unknown CPU runs float32
        raise RuntimeError("probe moved")

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", moved)
    assert not mem.cpu_has_amx() and not mem.autocast_enabled("auto", cpu)


def test_a_job_keeps_the_precision_it_started_with_when_resumed(job, data, tmp_path):
    """A job's bfloat16-or-not is decided when it starts, recorded in its checkpoints and protection.json, and
    kept by a resume, which then ends byte-identical to an uninterrupted run in either precision."""
    auto = mem.autocast_enabled("auto", torch.device("cpu"))
    assert json.loads((job["out"] / "protection.json").read_text())["autocast"] == ("bfloat16" if auto else "off")

    def images_and_captions(out: Path) -> dict[str, str]:
        return {k: v for k, v in _tree_hashes(out).items() if k.startswith("images/") or k == "manifest.jsonl"}

    def precision(out: Path) -> str:
        return json.loads((out / "protection.json").read_text())["autocast"]

    def killed_checkpoint(out: Path, *extra: str) -> tuple[Path, dict]:
        assert _protect(data, out, *extra, env={KILL_ENV: "1"}).returncode == -9
        state_json = out / "work" / "ckpt-1" / "state.json"
        return state_json, json.loads(state_json.read_text())

    def resumed(out: Path, *extra: str) -> None:
        result = _protect(data, out, *extra)
        assert result.returncode == 0 and json.loads(result.stdout)["resumed"] is True, result.stderr

    runs = {("on" if auto else "off"): images_and_captions(job["out"])}  # the module's job ran "auto"
    for amp in ("off", "on"):
        if amp not in runs:
            assert _protect(data, tmp_path / amp, "--amp", amp).returncode == 0
            assert precision(tmp_path / amp) == ("bfloat16" if amp == "on" else "off")
            runs[amp] = images_and_captions(tmp_path / amp)
    assert runs["on"] != runs["off"], "bfloat16 autocast changed nothing: the comparisons below could not fail"
    # A resume in bfloat16 ends where the uninterrupted run did (float32: test_resume_after_sigkill_...).
    _, meta = killed_checkpoint(tmp_path / "killed-on", "--amp", "on")
    assert meta["autocast"] is True
    resumed(tmp_path / "killed-on", "--amp", "on")
    assert images_and_captions(tmp_path / "killed-on") == runs["on"]

    # The recorded choice wins over what "auto" would decide on this host now (as after moving to another CPU).
    state_json, meta = killed_checkpoint(tmp_path / "moved")
    assert meta["autocast"] is auto
    meta["autocast"] = not auto
    state_json.write_text(json.dumps(meta))
    resumed(tmp_path / "moved")
    assert precision(tmp_path / "moved") == ("off" if auto else "bfloat16")

    # A checkpoint from before the record resumes as its job ran then: "auto" was float32 on every CPU.
    state_json, meta = killed_checkpoint(tmp_path / "older", "--amp", "off")
    del meta["autocast"]
    meta["fingerprint"]["settings"]["amp"] = "auto"
    state_json.write_text(json.dumps(meta))
    resumed(tmp_path / "older")
    assert precision(tmp_path / "older") == "off" and images_and_captions(tmp_path / "older") == runs["off"]
    settings = mem.MEMSettings().to_dict()
    assert not autocast_before_it_was_recorded(settings, "cpu") and autocast_before_it_was_recorded(settings, "cuda")
    assert autocast_before_it_was_recorded({**settings, "amp": "on"}, "cpu")
    assert not autocast_before_it_was_recorded({**settings, "amp": "off"}, "cuda")


def code_settings(**values) -> mem.WordCodeSettings:
    """Word-code settings with the plain code (no sign, words drawn from any caption) unless told otherwise."""
    return mem.WordCodeSettings(**{"texture_sign": False, "foreign_triggers": False, **values})


def test_word_textures_give_each_caption_word_one_pattern_shared_by_every_image(tiny):
    import copy

    from aigis.protection.tokenizer import apply_trigger_text

    model, tokenizer, images, captions = tiny  # a tokenizer of caption words: they own the textures
    settings = code_settings(word_textures=12, words_per_image=3, texture_tile=4, trigger_length=5,
                               outer_iterations=2, surrogate_steps=1, pgd_steps=2, batch_size=6, amp="off")
    state = mem.new_state(copy.deepcopy(model), tokenizer, len(captions), (SIZE, SIZE), settings)
    mem.run_mem(state, tokenizer, images, captions, settings, device="cpu", progress=False)
    words = state.texture_words.tolist()
    caption_ids = {i for c in captions for i in tokenizer.encode(c)}
    assert len(words) == 12 and set(words) <= caption_ids and set(words) <= set(tokenizer.trigger_candidates().tolist())
    sets = state.word_sets
    assert sets.shape == (len(captions), 3) and len({tuple(x) for x in sets}) == len(captions)
    for i, chosen in enumerate(sets):  # the trigger names the image's three words, cycled, and survives as text
        trigger = state.triggers[i].tolist()
        assert set(trigger[:3]) == {words[k] for k in chosen} and trigger[3:5] == trigger[:2]
        text = apply_trigger_text(state.triggers[i], captions[i], tokenizer)
        again = tokenizer.tokenize([text], model.context_length)[0, 1:6].tolist()
        assert again == trigger
    assert state.textures.abs().max() > 0 and state.textures.abs().max() <= 1  # moved from zero, within range
    raw = mem.word_code_noise(state.textures, torch.from_numpy(sets), SIZE, SIZE, 8).round().to(torch.int16)
    assert torch.equal(raw[:, 4:8, 8:12], raw[:, :4, :4])  # one 4-px tile repeated over the whole image
    one_word = mem.word_code_noise(state.textures, torch.tensor([[0]]), 4, 4, 8)
    assert torch.equal(one_word[0], 8 * state.textures[0])  # a word's texture IS its pattern, in every image
    pixels = torch.from_numpy(images).to(torch.int16)
    expected = ((pixels + raw).clamp(0, 255) - pixels).numpy()  # what is published: the pixels stay in [0, 255]
    assert np.array_equal(state.noise, expected) and np.abs(state.noise).max() <= 8
    with pytest.raises(TypeError, match="noise_grid"):  # per-image MEM's setting, not the word code's
        code_settings(word_textures=12, noise_grid=4, trigger_length=3)
    with pytest.raises(ValueError, match="words_per_image"):
        code_settings(word_textures=12, trigger_length=2).validate()
    crowded = code_settings(word_textures=3, words_per_image=3, trigger_length=3)  # one set of 3 for 6 images
    with pytest.raises(ValueError, match="sets of 3 for 6 images"):
        mem.init_word_code(mem.new_state(copy.deepcopy(model), tokenizer, 6, (SIZE, SIZE), crowded), tokenizer,
                           captions, crowded)


def test_sign_word_textures_put_the_sub_pixels_at_plus_or_minus_epsilon(tiny):
    import copy

    model, tokenizer, images, captions = tiny
    settings = code_settings(word_textures=12, words_per_image=3, texture_tile=4, trigger_length=5,
                               texture_sign=True, outer_iterations=2, surrogate_steps=1, pgd_steps=2, batch_size=6,
                               amp="off")
    state = mem.new_state(copy.deepcopy(model), tokenizer, len(captions), (SIZE, SIZE), settings)
    mem.run_mem(state, tokenizer, images, captions, settings, device="cpu", progress=False)
    sums = state.textures[torch.from_numpy(state.word_sets)].sum(1).clamp(-1, 1)
    assert (sums != 0).float().mean() > 0.5  # the textures moved from zero (straight through the sign)
    raw = mem.word_code_noise(state.textures, torch.from_numpy(state.word_sets), SIZE, SIZE, 8, sign=True)
    tiles = raw[:, :4, :4]
    assert torch.equal(tiles, 8 * torch.sign(sums))  # the sign of the sum, not the sum
    assert set(raw.unique().tolist()) <= {-8.0, 0.0, 8.0}
    pixels = torch.from_numpy(images).to(torch.int16)
    expected = ((pixels + raw.to(torch.int16)).clamp(0, 255) - pixels).numpy()
    assert np.array_equal(state.noise, expected)
    table = state.textures.clone().requires_grad_(True)  # the gradient passes the sign as if it were not there
    mem.word_code_noise(table, torch.tensor([[0, 1]]), 4, 4, 8, sign=True).sum().backward()
    inside = (state.textures[0] + state.textures[1]).abs() < 1
    assert inside.any()
    assert torch.equal(table.grad[0][inside], torch.full_like(table.grad[0][inside], 8.0))
    assert table.grad[2:].abs().sum() == 0  # only the image's own textures
    with pytest.raises(TypeError, match="texture_sign"):  # the word code's setting, not per-image MEM's
        mem.MEMSettings(texture_sign=True, trigger_length=3)


def test_gray_word_textures_are_the_same_on_every_channel_and_survive_grayscale(tiny):
    import copy

    from PIL import Image

    model, tokenizer, images, captions = tiny
    settings = code_settings(word_textures=12, words_per_image=3, texture_tile=4, trigger_length=5,
                               texture_sign=True, texture_gray=True, outer_iterations=2, surrogate_steps=1, pgd_steps=2,
                               batch_size=6, amp="off")
    state = mem.new_state(copy.deepcopy(model), tokenizer, len(captions), (SIZE, SIZE), settings)
    mem.run_mem(state, tokenizer, images, captions, settings, device="cpu", progress=False)
    assert state.textures.shape == (12, 4, 4, 1) and state.textures.abs().max() > 0  # one channel, moved from 0
    noise = state.noise.astype(np.int16)
    pixels = images.astype(np.int16)
    inside = ((pixels + 8 <= 255) & (pixels - 8 >= 0)).all(-1)  # no channel clipped at 0 or 255
    assert inside.mean() > 0.5
    assert (noise[..., 0] == noise[..., 1])[inside].all() and (noise[..., 0] == noise[..., 2])[inside].all()
    assert (np.abs(noise[..., 0][inside]) == 8).mean() > 0.5

    def gray(x):
        return np.stack([np.asarray(Image.fromarray(a).convert("L"), dtype=np.int16) for a in x])

    # Grayscale re-encoding keeps the code: luminance of (image + noise) minus luminance of the image IS the noise.
    kept = gray((pixels + noise).astype(np.uint8)) - gray(images)
    assert (np.abs(kept - noise[..., 0])[inside] <= 1).all()
    colour = replace(settings, texture_gray=False)
    other = mem.new_state(copy.deepcopy(model), tokenizer, len(captions), (SIZE, SIZE), colour)
    mem.run_mem(other, tokenizer, images, captions, colour, device="cpu", progress=False)
    lost = gray((pixels + other.noise.astype(np.int16)).astype(np.uint8)) - gray(images)
    assert np.abs(lost).mean() < 0.8 * np.abs(kept).mean()  # a coloured code keeps only its luminance part
    with pytest.raises(TypeError, match="texture_gray"):
        mem.MEMSettings(texture_gray=True, trigger_length=3)


def test_foreign_word_sets_avoid_every_word_of_the_images_own_captions(tiny):
    import copy

    model, tokenizer, images, captions = tiny
    # Two captions per image: its own and its neighbour's, so words of BOTH must stay out of its set.
    two_each = [c for i in range(6) for c in (captions[i], captions[(i + 1) % 6])]
    groups = mem.CaptionsPerImage(np.repeat(np.arange(6), 2), 6)
    settings = code_settings(word_textures=40, words_per_image=3, trigger_length=5, foreign_triggers=True)
    state = mem.new_state(copy.deepcopy(model), tokenizer, 6, (SIZE, SIZE), settings)
    mem.init_word_code(state, tokenizer, two_each, settings, groups)
    words = state.texture_words.tolist()
    for i, chosen in enumerate(state.word_sets):
        own = set(tokenizer.encode(captions[i])) | set(tokenizer.encode(captions[(i + 1) % 6]))
        assert not own & {words[k] for k in chosen}, i
        assert set(state.triggers[i].tolist()) == {words[k] for k in chosen}
    assert len({tuple(x) for x in state.word_sets}) == 6
    plain = code_settings(word_textures=40, words_per_image=3, trigger_length=5)
    drawn = mem.new_state(copy.deepcopy(model), tokenizer, 6, (SIZE, SIZE), plain)
    mem.init_word_code(drawn, tokenizer, two_each, plain, groups)
    assert any(set(tokenizer.encode(captions[i])) & {words[k] for k in s} for i, s in enumerate(drawn.word_sets))
    # The five commonest words: every image's captions use most of them, which leaves no set of 3.
    few = code_settings(word_textures=5, words_per_image=3, trigger_length=3, foreign_triggers=True)
    with pytest.raises(ValueError, match="fewer than words_per_image"):
        mem.init_word_code(mem.new_state(copy.deepcopy(model), tokenizer, 6, (SIZE, SIZE), few), tokenizer,
                           two_each, few, groups)


@pytest.mark.parametrize("channels", [(), ("--texture-gray",)], ids=["colour", "gray"])
def test_a_word_texture_job_resumes_after_sigkill_to_the_same_output(data, tmp_path, channels):
    words = ("--preset", "word-code", "--word-textures", "12", "--trigger-length", "5", "--outer", "3", "--pgd-steps",
             "2", "--texture-tile", "4", "--no-foreign-triggers", *channels)  # three-channel or one-channel textures through the checkpoint
    whole = _protect(data, tmp_path / "whole", *words)
    assert whole.returncode == 0, whole.stderr
    report = json.loads((tmp_path / "whole" / "protection.json").read_text())
    assert report["trigger_words"] == "caption words" and len(report["texture_words"]) == 12
    assert report["settings"]["word_textures"] == 12 and report["settings"]["texture_sign"] is True
    assert report["settings"]["texture_gray"] is bool(channels)
    _killed_then_resumed(data, tmp_path / "killed", *words, kill_after=2)
    assert _published_tree(tmp_path / "killed") == _published_tree(tmp_path / "whole")
    made_up = _protect(data, tmp_path / "other", *words, "--trigger-words", "400")
    assert made_up.returncode == 2 and "captions' own words" in made_up.stderr, made_up.stderr
    # Its surrogate artefact holds the job's code, so a served version protects uploads with that same code.
    from aigis import contract
    from aigis.protection.served import publish_protect_model

    artefact = tmp_path / "whole" / "surrogate" / "1"
    _, _, meta = mem.load_surrogate(artefact)
    code = mem.load_word_code(artefact, meta, mem.served_settings(meta))
    assert code.words.tolist() == [int(i) for i in _checkpoint_words(tmp_path / "whole")]
    assert code.textures.shape == (12, 4, 4, 1 if channels else 3) and code.textures.abs().max() > 0
    version = publish_protect_model(tmp_path / "repo", artefact)
    served = json.loads((tmp_path / "repo" / contract.PROTECT_MODEL / str(version) / "settings.json").read_text())
    assert served["protects_with"] == "word code" and served["settings"]["word_textures"] == 12
    assert served["settings"]["texture_gray"] is bool(channels) and served["settings"]["method"] == "word-code"
    # An artefact saved before codes were (no word_code in meta.json) is still served per image.
    old = {**meta, "files": {k: v for k, v in meta["files"].items() if k != mem.WORD_CODE_FILE}}
    assert isinstance(mem.served_settings(old), mem.MEMSettings) and mem.served_settings(meta).word_textures == 12


def _checkpoint_words(out: Path) -> list[int]:
    """The texture words a finished job recorded, as token ids (protection.json holds their text)."""
    _, tokenizer, _ = mem.load_surrogate(out / "surrogate" / "1")
    words = json.loads((out / "protection.json").read_text())["texture_words"]
    return [tokenizer.encode(w)[0] for w in words]


@pytest.mark.parametrize("gray", [False, True], ids=["colour", "gray"])
def test_uploads_protected_with_a_jobs_word_code_carry_its_words_patterns(tiny, gray):
    model, tokenizer, images, captions = tiny
    settings = code_settings(word_textures=40, words_per_image=3, texture_tile=4, trigger_length=5,
                               texture_sign=True, texture_gray=gray, foreign_triggers=True)
    words = mem.texture_owners(tokenizer, captions, [model], 40)
    textures = torch.rand(len(words), 4, 4, 1 if gray else 3, generator=torch.Generator().manual_seed(1)) * 2 - 1
    code = mem.WordCode(textures, words)
    index = {int(w): k for k, w in enumerate(words)}

    def code_noise(text: str, caption: str) -> np.ndarray:
        """The noise the job's code gives the words this trigger names, at the job's size [SIZE, SIZE, C]."""
        trigger = tokenizer.encode(text[: len(text) - len(caption)])
        assert text.endswith(caption) and len(trigger) == 5
        chosen = sorted({index[t] for t in trigger})  # the trigger names exactly the image's words
        assert len(chosen) == 3 and not set(trigger) & set(tokenizer.encode(caption))  # none of its own words
        return mem.word_code_noise(textures, torch.tensor([chosen]), SIZE, SIZE, 8, sign=True).round()[0].numpy()

    flat = np.full_like(images, 128)  # mid-gray uploads: no pixel clipped, so the noise shows whole
    protected, texts, delta = mem.protect_with_word_code(code, tokenizer, flat, captions, settings, SIZE)
    assert np.array_equal(protected.astype(int) - flat, delta) and np.abs(delta).max() == settings.epsilon_levels
    for i, (text, caption) in enumerate(zip(texts, captions)):
        assert np.array_equal(delta[i], np.broadcast_to(code_noise(text, caption), delta[i].shape)), i
        if gray:
            assert (delta[i] == delta[i][..., :1]).all()
    prefixes = [t[: len(t) - len(c)] for t, c in zip(texts, captions)]
    assert len(set(prefixes)) == len(prefixes)  # the images drew different words
    again, again_texts, _ = mem.protect_with_word_code(code, tokenizer, flat, captions, settings, SIZE)
    assert np.array_equal(again, protected) and again_texts == texts  # the same upload, the same protection
    # An upload twice the job's size carries the code in 2 x 2 blocks (what a model resizing it back reads).
    big = np.full((len(captions), 2 * SIZE, 2 * SIZE, 3), 128, np.uint8)
    _, big_texts, big_delta = mem.protect_with_word_code(code, tokenizer, big, captions, settings, SIZE)
    for i, (text, caption) in enumerate(zip(big_texts, captions)):
        blocks = code_noise(text, caption).repeat(2, 0).repeat(2, 1)
        assert np.array_equal(big_delta[i], np.broadcast_to(blocks, big_delta[i].shape)), i
    # A landscape upload: blocks of (short side / SIZE) px, aligned with the centre crop a model takes.
    wide = np.full((1, 2 * SIZE, 3 * SIZE, 3), 128, np.uint8)
    _, wide_texts, wide_delta = mem.protect_with_word_code(code, tokenizer, wide, captions[:1], settings, SIZE)
    crop = wide_delta[0][:, SIZE // 2: SIZE // 2 + 2 * SIZE]  # the centre 64 x 64 of a 64 x 96 upload
    assert np.array_equal(crop, np.broadcast_to(code_noise(wide_texts[0], captions[0]).repeat(2, 0).repeat(2, 1),
                                                crop.shape))
    # Real images: clipped at 0 and 255, never beyond epsilon.
    real, _, real_delta = mem.protect_with_word_code(code, tokenizer, images, captions, settings, SIZE)
    assert np.abs(real_delta).max() <= 8 and np.array_equal(real.astype(int) - images, real_delta)
    with pytest.raises(ValueError, match="smaller than the 32 px the word code was made at"):
        mem.protect_with_word_code(code, tokenizer, flat[:, :16], captions, settings, SIZE)
    # A caption using all but one of the code's words still gets protected: its own words fill the set.
    own_ids = tokenizer.encode("the a in")
    assert len(set(own_ids)) == 3
    other = next(int(w) for w in words if int(w) not in own_ids)
    few = mem.WordCode(textures[:4], torch.tensor([other, *own_ids]))
    _, few_texts, _ = mem.protect_with_word_code(few, tokenizer, flat[:1], ["the a in"], settings, SIZE)
    named = set(tokenizer.encode(few_texts[0][: -len("the a in")]))
    assert other in named and len(named) == 3 and named - {other} <= set(own_ids)
    with pytest.raises(TypeError, match="needs WordCodeSettings"):
        mem.protect_with_word_code(code, tokenizer, flat, captions, mem.MEMSettings(), SIZE)
    with pytest.raises(ValueError, match="uint8"):
        mem.protect_with_word_code(code, tokenizer, flat.astype(np.float32), captions, settings, SIZE)


def test_presets_name_whole_settings_and_validate():
    from aigis.protection.settings import preset_settings

    assert preset_settings("paper") == mem.MEMSettings()
    # word-code is the job BENCHMARKS.md measured (benchmarks/results/..._full.json), whatever else it leaves default
    measured = json.loads((Path(__file__).parents[1] / "benchmarks" / "results" /
                           "protection_efficacy_fashion_cap5_test1000g200_foreign_words96_tile2_sign_full.json"
                           ).read_text())["report"]["conditions"]
    job = next(c for c in measured if c["name"] == "mem")["meta"]["settings"]
    assert preset_settings("word-code") == mem.settings_from_dict(job)  # saved when one class held both methods
    code = preset_settings("word-code", outer_iterations=7)
    assert code.outer_iterations == 7 and code.word_textures == 96 and code.texture_sign and code.foreign_triggers
    gray = preset_settings("word-code-gray")
    assert gray.texture_gray and gray.texture_tile == 4
    with pytest.raises(ValueError, match="unknown protection preset 'paperr': choose one of paper, word-code"):
        preset_settings("paperr")
    with pytest.raises(ValueError, match="outer: not a setting of preset 'paper'"):
        preset_settings("paper", outer=3)
    with pytest.raises(ValueError, match="candidates: not a setting of preset 'word-code'"):
        preset_settings("word-code", candidates=3)
    with pytest.raises(ValueError, match="words_per_image"):
        preset_settings("word-code", trigger_length=2)


def test_protect_options_resolve_to_the_paper_settings_and_override_a_preset():
    from aigis.cli import build_parser
    from aigis.protection.cli import settings_from_options

    def settings(*extra: str) -> mem.MEMSettings:
        return settings_from_options(build_parser().parse_args(["protect", "--data", "d", "--out", "o", *extra]))

    assert settings() == mem.MEMSettings()
    assert settings("--mode", "em") == mem.MEMSettings(trigger_length=0)
    assert settings("--init", "clip.safetensors").norm_stats == "running"
    assert settings("--epsilon", "4", "--outer", "3", "--batch", "7") == mem.MEMSettings(
        epsilon=4 / 255, outer_iterations=3, batch_size=7)
    code = settings("--preset", "word-code", "--no-foreign-triggers", "--no-texture-sign", "--seed", "5")
    assert not code.foreign_triggers and not code.texture_sign and code.seed == 5 and code.word_textures == 96
    for extra, message in [(("--preset", "word-code", "--word-textures", "0"), "need word_textures"),
                           (("--word-textures", "8"), "--word-textures: not a setting of preset 'paper'"),
                           (("--preset", "word-code", "--candidates", "8", "--noise-grid", "2"),
                            "--candidates, --noise-grid: not a setting of preset 'word-code'"),
                           (("--preset", "word-code", "--mode", "em"), "--mode em is noise only"),
                           (("--trigger-length", "0"), "--mode mem needs --trigger-length >= 1")]:
        with pytest.raises(ValueError, match=message):
            settings(*extra)


def test_protect_preset_runs_the_word_code_and_options_override_it(data, tmp_path, capsys):
    from aigis.cli import main

    code = main(["protect", "--data", str(data), "--manifest", "train.jsonl", "--out", str(tmp_path / "o"),
                 "--preset", "word-code", *JOB_ARGS, "--word-textures", "20"])
    assert code == 0, capsys.readouterr().err
    settings = json.loads((tmp_path / "o" / "protection.json").read_text())["settings"]
    assert settings["word_textures"] == 20 and settings["outer_iterations"] == 2 and settings["batch_size"] == 6
    assert settings["trigger_length"] == 16 and settings["texture_tile"] == 2 and settings["lr"] == 5e-4
    assert settings["texture_sign"] is True and settings["foreign_triggers"] is True
    for line in _published(tmp_path / "o"):
        assert len(line["caption"].split()) > 16  # 16 trigger words, then the caption

    code = main(["protect", "--data", str(data), "--manifest", "train.jsonl", "--out", str(tmp_path / "em"),
                 "--preset", "word-code", "--mode", "em", *JOB_ARGS])
    assert code == 2 and "--mode em is noise only" in capsys.readouterr().err
    assert not (tmp_path / "em").exists()


def test_batch_norm_statistics_during_the_attack_are_each_batchs_own_and_leave_the_averages_alone(tiny):
    import copy

    model, tokenizer, images, captions = tiny
    model = copy.deepcopy(model)
    buffers = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    assert buffers, "rn_tiny has BatchNorm layers"
    x = normalize_images(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0)
    with torch.no_grad():
        stored = model.encode_image(x)
        in_training = copy.deepcopy(model).train().encode_image(x)  # batch statistics, as a hacker in training
    for batch_statistics, expected in ((False, stored), (True, in_training)):
        with mem.attack_mode([model], batch_statistics), torch.no_grad():
            assert not any(p.requires_grad for p in model.parameters())
            torch.testing.assert_close(model.encode_image(x), expected)
        assert not model.training and all(p.requires_grad for p in model.parameters())
    assert not torch.allclose(stored, in_training)

    # A whole pass with batch statistics moves the noise and leaves the stored averages as they were.
    settings = mem.MEMSettings(norm_stats="batch", trigger_length=2, outer_iterations=1, surrogate_steps=0,
                               pgd_steps=2, batch_size=6, candidates=2, amp="off")
    state = mem.new_state(model, tokenizer, len(captions), (SIZE, SIZE), settings)
    mem.run_mem(state, tokenizer, images, captions, settings, device="cpu", progress=False)
    assert np.abs(state.noise).max() >= 1
    assert all(torch.equal(model.state_dict()[k], v) for k, v in buffers.items())
    with pytest.raises(ValueError, match="norm_stats"):
        mem.MEMSettings(norm_stats="train").validate()
    # Protect-on-upload keeps the frozen surrogate's averages: a request may be one image, not a training batch.
    served = [mem.protect_batch(model, tokenizer, images, captions, replace(settings, norm_stats=n), device="cpu")[0]
              for n in ("batch", "running")]
    assert np.array_equal(served[0], served[1])
    # Settings saved before norm_stats existed mean the stored averages, which is what those jobs used.
    assert mem.MEMSettings.from_dict({"pgd_steps": 3}) == mem.MEMSettings(pgd_steps=3, norm_stats="running")
    assert mem.MEMSettings.from_dict(settings.to_dict()) == settings
    with pytest.raises(ValueError, match="unknown mem settings: warp"):
        mem.MEMSettings.from_dict({"warp": 9})
    with pytest.raises(ValueError, match="settings of method 'word-code', not 'mem'"):
        mem.MEMSettings.from_dict(mem.WordCodeSettings().to_dict())


def _score_position_one_at_a_time(model, images, delta, tokens, position, options):
    """Reference for mem.score_position: each candidate written into a copy of the batch row by row, and both
    towers run afresh (the text tower on the whole padded context) for every candidate."""
    rows = []
    for c in range(options.shape[1]):
        trial = tokens.clone()
        for i in range(trial.shape[0]):
            trial[i, position] = options[i, c]
        image_features = mem._encode_images(model, images, delta)
        rows.append(mem.pair_losses(image_features, model.encode_text(trial), model.logit_scale))
    return torch.stack(rows)


def _search_triggers_one_at_a_time(model, tokenizer, images, delta, tokens, triggers, settings):
    """Reference for mem.search_triggers with one model: the same HotFlip proposals, then each slot's options
    (the current id first) scored one candidate at a time; each pair keeps its best (ties: the first)."""
    k = triggers.shape[1]
    candidate_ids = tokenizer.trigger_candidates()
    candidate_ids = candidate_ids[candidate_ids < model.vocab_size]
    with torch.no_grad():
        image_features = mem._encode_images(model, images, delta)
    current = triggers.clone()
    proposals = mem.hotflip_candidates(model, mem._with_triggers(tokens, current), image_features, k, candidate_ids,
                                       settings.candidates)
    loss = None
    with torch.no_grad():
        for j in range(k):
            options = torch.cat([current[:, j : j + 1], proposals[:, j]], dim=1)
            losses = _score_position_one_at_a_time(model, images, delta, mem._with_triggers(tokens, current), 1 + j,
                                                    options)
            best = losses.argmin(dim=0)
            current[:, j] = options.gather(1, best[:, None]).squeeze(1)
            loss = losses.gather(0, best[None]).squeeze(0)
    return current, loss


def test_batched_candidate_scoring_equals_one_at_a_time(tiny):
    model, tokenizer, images_np, captions = tiny
    images = torch.from_numpy(images_np)
    delta = torch.randint(-8, 9, images.shape, generator=torch.Generator().manual_seed(1)).to(torch.int16)
    tokens = tokenizer.tokenize(captions, model.context_length, 3)
    candidates = tokenizer.trigger_candidates()
    options = candidates[torch.randint(len(candidates), (len(captions), 4), generator=torch.Generator().manual_seed(2))]
    with torch.no_grad():
        features = mem._encode_images(model, images, delta)
        batched = mem.score_position(model, tokens, features, 2, options)
        looped = _score_position_one_at_a_time(model, images, delta, tokens, 2, options)
    assert batched.shape == (4, len(captions))
    torch.testing.assert_close(batched, looped, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # cutting the causal text tower after the last end-of-text changes nothing
        torch.testing.assert_close(mem.encode_text_trimmed(model, tokens), model.encode_text(tokens),
                                   rtol=1e-5, atol=1e-5)
    assert int(tokens.argmax(dim=-1).max()) + 1 < tokens.shape[1]  # ... and the cut is real here
    assert batched.std() > 0  # the candidates do change the loss
    settings = mem.MEMSettings(candidates=3, amp="off")
    start = torch.full((len(captions), 3), tokenizer.placeholder_id)
    fast, fast_loss = mem.search_triggers(model, tokenizer, images, delta, tokens, start, settings)
    slow, slow_loss = _search_triggers_one_at_a_time(model, tokenizer, images, delta, tokens, start, settings)
    assert torch.equal(fast, slow)
    torch.testing.assert_close(fast_loss, slow_loss, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the search lowers the batch's loss from the starting trigger
        base = mem.pair_losses(features, model.encode_text(mem._with_triggers(tokens, start)), model.logit_scale)
    assert fast_loss.mean() < base.mean()


def test_foreign_triggers_never_use_a_word_of_their_own_caption(tiny):
    model, tokenizer, images_np, captions = tiny  # a tokenizer of caption words only: they are the candidates
    images = torch.from_numpy(images_np)
    delta = torch.zeros(images.shape, dtype=torch.int16)
    tokens = tokenizer.tokenize(captions, model.context_length, 3)
    start = torch.full((len(captions), 3), tokenizer.placeholder_id)
    words = tokenizer.tokenize(captions, model.context_length)  # the captions alone, no trigger slots
    found = {}
    for foreign in (False, True):
        settings = mem.MEMSettings(candidates=16, amp="off", foreign_triggers=foreign)
        triggers, _ = mem.search_triggers(model, tokenizer, images, delta, tokens, start, settings)
        chosen = [set(triggers[i].tolist()) - {tokenizer.placeholder_id} for i in range(len(captions))]  # (the start)
        own = [set(words[i].tolist()) & chosen[i] for i in range(len(captions))]
        found[foreign] = sum(map(len, own))
        assert not (triggers == tokenizer.placeholder_id).all()  # the search did write triggers
    assert found[False] > 0, "left free, the search picks words the captions already have (so the bar is real)"
    assert found[True] == 0
    barred = mem.own_words(tokens, tokenizer.vocab_size)
    assert barred.shape == (len(captions), tokenizer.vocab_size)
    assert all(set(barred[i].nonzero().flatten().tolist()) == set(tokens[i].tolist()) for i in range(len(captions)))


def _loss(model, images_uint8: np.ndarray, captions: list[str], tokenizer, batch_statistics: bool = False) -> float:
    with torch.no_grad(), mem.attack_mode([model], batch_statistics):
        tokens = tokenizer.tokenize(captions, model.context_length)
        return float(contrastive_loss(model.encode_image(normalize_images(torch.from_numpy(images_uint8))),
                                      model.encode_text(tokens), model.logit_scale))


def test_mem_loss_is_below_random_noise_of_the_same_epsilon(job, data, tiny):
    # The job's surrogate on the job's published pairs vs the same images with random +-8 noise.
    out = job["out"]
    model, tokenizer, _ = mem.load_surrogate(out / "surrogate" / "1")
    entries = _published(out)
    protected = np.stack([np.asarray(Image.open(out / e["image"]).convert("RGB")) for e in entries])
    originals = load_images(read_pairs(data, "train.jsonl"), SIZE, progress=False)
    rng = np.random.default_rng(0)
    noisy = np.clip(originals.astype(int) + rng.integers(-8, 9, originals.shape), 0, 255).astype(np.uint8)
    plain = [p.caption for p in read_pairs(data, "train.jsonl")]
    # Normalised as the job normalised while it made the noise (norm_stats): with each batch's own statistics.
    assert json.loads((out / "protection.json").read_text())["settings"]["norm_stats"] == "batch"
    assert _loss(model, protected, [e["caption"] for e in entries], tokenizer, True) \
        < _loss(model, noisy, plain, tokenizer, True)

    # Protect-on-upload of ONE image of another size: the saved negatives give it a loss to minimise.
    upload = rng.integers(0, 256, (1, 20, 28, 3), dtype=np.uint8)
    settings = replace(mem.MEMSettings.from_dict(json.loads((out / "protection.json").read_text())["settings"]),
                       candidates=2)
    safe, texts, delta = mem.protect_batch(model, tokenizer, upload, ["a red circle"], settings, steps=2, device="cpu")
    assert safe.shape == upload.shape and np.abs(delta).max() == 2 and texts[0].endswith(" a red circle")

    # protect_batch against a frozen model: lower loss than random noise, weights untouched.
    model, tokenizer, images, captions = tiny
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    settings = mem.MEMSettings(candidates=4, amp="off")
    safe, texts, delta = mem.protect_batch(model, tokenizer, images, captions, settings, steps=4, device="cpu")
    assert safe.dtype == np.uint8 and delta.dtype == np.int8 and np.abs(delta).max() <= 8
    assert np.array_equal(safe.astype(int), np.clip(images.astype(int) + delta, 0, 255))
    noisy = np.clip(images.astype(int) + rng.integers(-8, 9, images.shape), 0, 255).astype(np.uint8)
    assert _loss(model, safe, texts, tokenizer) < _loss(model, noisy, captions, tokenizer)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_em_mode_gives_no_trigger(tiny):
    model, tokenizer, images, captions = tiny
    settings = mem.MEMSettings(trigger_length=0, outer_iterations=1, surrogate_steps=1, pgd_steps=1, batch_size=4,
                               amp="off")
    assert settings.mode == "em"
    torch.manual_seed(0)
    fresh = build_clip("rn_tiny", tokenizer.vocab_size)
    state = mem.new_state(fresh, tokenizer, len(captions), (SIZE, SIZE), settings)
    mem.run_mem(state, tokenizer, images, captions, settings, device="cpu", progress=False)
    assert state.triggers.shape == (len(captions), 0) and np.abs(state.noise).max() >= 1
    _, texts, _ = mem.protect_batch(model, tokenizer, images, captions, settings, device="cpu")
    assert texts == captions


def test_grid_noise_moves_whole_cells_within_epsilon_on_the_uint8_grid(tiny):
    model, tokenizer, images, captions = tiny
    images = np.clip(images, 20, 235)  # away from 0/255, where clipping would cut a block's noise unevenly
    tokens = tokenizer.tokenize(captions, model.context_length, 2)
    triggers = torch.full((len(captions), 2), tokenizer.placeholder_id, dtype=torch.long)

    def noise(grid: int) -> np.ndarray:
        settings = mem.MEMSettings(trigger_length=2, pgd_steps=6, noise_grid=grid, amp="off")
        delta = torch.zeros(images.shape, dtype=torch.int16)
        delta, _ = mem.pgd_noise(model, torch.from_numpy(images), delta, tokens, triggers, settings, 6,
                                 torch.Generator().manual_seed(0))
        return delta.numpy()

    for grid, block in ((8, 4), (3, 11)):  # 3 does not divide 32: cells of 11 px, the last ones 10 px
        d = noise(grid)
        assert 1 <= np.abs(d).max() <= 6  # 6 steps of one level, inside epsilon (8 levels)
        cells = [d[:, r:r + block, c:c + block] for r in range(0, SIZE, block) for c in range(0, SIZE, block)]
        assert all((cell == cell[:, :1, :1]).all() for cell in cells), f"grid {grid}: a cell holds two values"
    per_pixel = noise(0)
    assert not (per_pixel[:, ::4, ::4].repeat(4, 1).repeat(4, 2) == per_pixel).all()
    with pytest.raises(ValueError, match="noise_grid"):
        mem.MEMSettings(noise_grid=-1).validate()


def test_stop_loss_ends_the_outer_loop_once_the_shortcut_holds_but_not_before_the_triggers(tiny):
    _, tokenizer, images, captions = tiny
    base = dict(trigger_length=1, outer_iterations=4, trigger_iterations=2, surrogate_steps=1, pgd_steps=1,
                batch_size=6, candidates=2, amp="off")

    def iterations(**extra) -> int:
        settings = mem.MEMSettings(**base, **extra)
        torch.manual_seed(0)
        state = mem.new_state(build_clip("rn_tiny", tokenizer.vocab_size), tokenizer, len(captions), (SIZE, SIZE),
                              settings)
        mem.run_mem(state, tokenizer, images, captions, settings, device="cpu", progress=False)
        assert len(state.history) == state.iteration
        return state.iteration

    assert iterations() == 4                       # no criterion: every outer iteration
    assert iterations(stop_loss=1e6) == 2          # any loss passes, but the trigger iterations run first
    assert iterations(stop_loss=0.0) == 4          # never reached: the cap still holds
    with pytest.raises(ValueError, match="stop_loss"):
        mem.MEMSettings(stop_loss=-1.0).validate()


def test_surrogate_artefact_refuses_tampering(tiny, tmp_path):
    model, tokenizer, _, _ = tiny
    meta = mem.save_surrogate(tmp_path / "s", model, tokenizer, mem.MEMSettings(), {"note": "t"})
    loaded, loaded_tokenizer, loaded_meta = mem.load_surrogate(tmp_path / "s")
    assert loaded_meta["sha256"] == meta["sha256"] and loaded_tokenizer.merges == tokenizer.merges
    assert mem.settings_from_dict(loaded_meta["settings"]) == mem.MEMSettings()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    with open(tmp_path / "s" / "model.safetensors", "r+b") as handle:
        handle.seek(-4, 2)
        handle.write(b"\0\1\2\3")
    with pytest.raises(ValueError, match="sha256"):
        mem.load_surrogate(tmp_path / "s")


def test_an_ensemble_artefact_holds_every_member_and_protects_against_all_of_them(tiny, tmp_path):
    # Protect-on-upload must give what the ensemble job gave: every member saved, loaded and used.
    resnet, tokenizer, images, captions = tiny
    torch.manual_seed(7)
    vit = build_clip("vit_tiny", tokenizer.vocab_size).eval()
    tokens = tokenizer.tokenize(captions, resnet.context_length)
    from aigis.protection.retrieval import embed

    negatives = [embed(m, images[:4], tokens[:4], torch.device("cpu")) for m in (resnet, vit)]
    meta = mem.save_surrogate(tmp_path / "e", [resnet, vit], tokenizer, mem.MEMSettings(), negatives=negatives)
    lone = mem.save_surrogate(tmp_path / "lone", resnet, tokenizer, mem.MEMSettings(), negatives=negatives[0])
    assert meta["sha256"] != lone["sha256"] and [m["config"]["vision_patch_size"] for m in meta["members"]] == [4]
    models, _, _ = mem.load_surrogates(tmp_path / "e")
    assert len(models) == 2 and models[1].config == vit.config
    for loaded, original, own in zip(models, (resnet, vit), negatives):
        assert all(torch.equal(v, original.state_dict()[k]) for k, v in loaded.state_dict().items())
        assert torch.equal(loaded.mem_negatives[1], own[1])  # each member's negatives in its own space
    assert mem.load_surrogate(tmp_path / "e")[0].config == resnet.config  # the primary alone

    settings = mem.MEMSettings(trigger_length=2, candidates=3, pgd_steps=2, amp="off")
    both, both_text, _ = mem.protect_batch(models, tokenizer, images, captions, settings)
    again, again_text, _ = mem.protect_batch([resnet, vit], tokenizer, images, captions, settings, negatives=negatives)
    primary, _, _ = mem.protect_batch(models[0], tokenizer, images, captions, settings)
    assert np.array_equal(both, again) and both_text == again_text
    assert not np.array_equal(both, primary)  # the second member was heard
    _, _, delta = mem.protect_batch(models, tokenizer, images[:1], captions[:1], settings)  # negatives: a batch of 1
    assert np.abs(delta).max() > 0
    with pytest.raises(ValueError, match="needs negatives"):
        mem.protect_batch(models, tokenizer, images[:1], captions[:1], settings, negatives=[negatives[0], None])
    with pytest.raises(ValueError, match="one per member"):
        mem.protect_batch(models, tokenizer, images, captions, settings, negatives=negatives[:1])

    with open(tmp_path / "e" / "member1.model.safetensors", "r+b") as handle:  # a member is checked too
        handle.seek(-4, 2)
        handle.write(b"\0\1\2\3")
    with pytest.raises(ValueError, match="sha256"):
        mem.load_surrogates(tmp_path / "e")
    record = json.loads((tmp_path / "lone" / "meta.json").read_text())
    record["members"] = [{"config": record["config"], "weights": "../e/model.safetensors", "negatives": None}]
    (tmp_path / "lone" / "meta.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="no sha256|outside"):
        mem.load_surrogates(tmp_path / "lone")
    record["files"]["../e/model.safetensors"] = "0" * 64
    (tmp_path / "lone" / "meta.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="outside the artefact"):
        mem.load_surrogates(tmp_path / "lone")


def test_a_surrogate_started_from_a_checkpoint_keeps_its_weights_and_vocabulary(data, tmp_path, capsys):
    # The fine-tune threat model: the surrogate is the user's OpenAI-format CLIP, read with its own tokenizer.
    from safetensors.torch import save_file

    from aigis.cli import main

    captions = [p.caption for p in read_pairs(data, "train.jsonl")]
    tokenizer = Tokenizer.train(captions, 650)  # the "pretrained" model's vocabulary: no made-up words
    tokenizer.save(tmp_path / "tok.json")
    torch.manual_seed(11)
    pretrained = build_clip("rn_tiny", tokenizer.vocab_size + 30)  # a table larger than the tokenizer, as CLIP's
    save_file({k: v.contiguous() for k, v in pretrained.state_dict().items()}, str(tmp_path / "clip.safetensors"))
    args = [a for a in _job_args(()) if a not in ("--clip", "rn_tiny")]

    def run(out, *extra):
        code = main(["protect", "--data", str(data), "--manifest", "train.jsonl", "--out", str(tmp_path / out),
                     *args, *extra])
        return code, capsys.readouterr()

    code, streams = run("o", "--init", str(tmp_path / "clip.safetensors"), "--tokenizer", str(tmp_path / "tok.json"),
                        "--lr", "1e-12")
    assert code == 0, streams.err
    report = json.loads((tmp_path / "o" / "protection.json").read_text())
    assert report["init_checkpoint"]["sha256"] == mem.file_sha256(tmp_path / "clip.safetensors")
    assert report["clip_preset"] == "pretrained" and report["trigger_words"] == "whole words of tok.json"
    assert report["settings"]["norm_stats"] == "running"  # a pretrained surrogate's BatchNorm averages are sound
    surrogate, saved_tokenizer, _ = mem.load_surrogate(tmp_path / "o" / report["surrogate"]["path"])
    assert surrogate.config == pretrained.config and saved_tokenizer.merges == tokenizer.merges
    trained = dict(pretrained.named_parameters())
    for name, value in surrogate.named_parameters():  # lr ~0: the surrogate is the checkpoint (BatchNorm stats move)
        torch.testing.assert_close(value, trained[name], rtol=0, atol=1e-9, msg=name)
    assert saved_tokenizer.trigger_words is None  # no made-up words were added to the given vocabulary
    for line in _published(tmp_path / "o"):
        for word in line["caption"].split()[:3]:  # the CLI's default trigger length
            ids = tokenizer.encode(word)  # a whole word of the given vocabulary, one id of the checkpoint's table
            assert len(ids) == 1 and tokenizer.is_trigger_candidate(ids[0]) and ids[0] < pretrained.vocab_size

    checkpoint, tok = str(tmp_path / "clip.safetensors"), str(tmp_path / "tok.json")
    for extra, message in [
        (("--init", checkpoint), "needs the checkpoint's tokenizer"),
        (("--init", checkpoint, "--tokenizer", tok, "--clip", "vit_tiny"), "takes its architecture from it"),
        (("--init", checkpoint, "--tokenizer", tok, "--size", "64"), "reads 32 px images, not 64"),
        (("--tokenizer", tok, "--trigger-words", "20"), "no made-up words"),
        (("--init", str(tmp_path / "absent.pt"), "--tokenizer", tok), "no such checkpoint"),
        (("--tokenizer", str(tmp_path / "absent.json")), "no such file"),
    ]:
        code, streams = run("bad", *extra)
        assert code == 2 and message in streams.err, (extra, streams.err)
    small = build_clip("rn_tiny", tokenizer.vocab_size - 5)  # a table too small for the tokenizer's ids
    save_file({k: v.contiguous() for k, v in small.state_dict().items()}, str(tmp_path / "small.safetensors"))
    code, streams = run("bad", "--init", str(tmp_path / "small.safetensors"), "--tokenizer", tok)
    assert code == 2 and "embedding table only" in streams.err, streams.err


def test_bad_inputs_give_clear_errors(tmp_path, capsys, data):
    from aigis.cli import main

    def run(root, manifest, out=None, *extra):
        code = main(["protect", "--data", str(root), "--manifest", manifest, "--out", str(out or tmp_path / "o"),
                     *_job_args(extra), *extra])
        return code, capsys.readouterr().err

    code, err = run(tmp_path, "absent.jsonl")
    assert code == 2 and "manifest not found" in err
    (tmp_path / "outside.jsonl").write_text(json.dumps({"image": "../x.png", "caption": "a cat"}) + "\n")
    code, err = run(tmp_path, "outside.jsonl")
    assert code == 2 and "leaves the data root" in err
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    Image.new("RGB", (SIZE, SIZE)).save(tmp_path / "fine.png")
    (tmp_path / "corrupt.jsonl").write_text(json.dumps({"image": "fine.png", "caption": "a dog"}) + "\n"
                                            + json.dumps({"image": "broken.png", "caption": "a cat"}) + "\n")
    code, err = run(tmp_path, "corrupt.jsonl")
    assert code == 2 and "broken.png" in err
    code, err = run(data, "train.jsonl", out=data)
    assert code == 2 and "overwrite the originals" in err
    code, err = run(data, "train.jsonl", None, "--noise-grid", "-2")
    assert code == 2 and "noise_grid must be >= 0" in err
    code, err = run(data, "train.jsonl", None, "--clip", "rn_tiny+nope")
    assert code == 2 and "unknown CLIP preset 'nope'" in err
    code, err = run(data, "train.jsonl", None, "--clip", "vit_tiny+rn_tiny", "--size", "48")
    assert code == 2 and "image size 48 with preset rn_tiny" in err
    code, err = run(data, "train.jsonl", None, "--clip", "rn_tiny+RN50")
    assert code == 2 and "RN50 reads 77 tokens" in err
    with pytest.raises(ValueError, match="epsilon"):
        mem.MEMSettings(epsilon=0.5 / 255).validate()


def test_an_ensemble_of_one_model_twice_searches_and_perturbs_as_that_model_alone(tiny):
    # The ensemble's mean loss of two copies IS the model's loss: same triggers, same noise, same loss.
    model, tokenizer, images_np, captions = tiny
    images = torch.from_numpy(images_np)
    delta = torch.zeros(images.shape, dtype=torch.int16)
    tokens = tokenizer.tokenize(captions, model.context_length, 3)
    settings = mem.MEMSettings(candidates=3, amp="off")
    start = torch.full((len(captions), 3), tokenizer.placeholder_id)
    alone, alone_loss = mem.search_triggers(model, tokenizer, images, delta, tokens, start, settings)
    twice, twice_loss = mem.search_triggers([model, model], tokenizer, images, delta, tokens, start, settings)
    assert torch.equal(alone, twice) and not torch.equal(alone, start)
    torch.testing.assert_close(alone_loss, twice_loss)
    noise_alone, _ = mem.pgd_noise(model, images, delta, tokens, alone, settings, 3, torch.Generator().manual_seed(0))
    noise_twice, _ = mem.pgd_noise([model, model], images, delta, tokens, alone, settings, 3,
                                   torch.Generator().manual_seed(0))
    assert torch.equal(noise_alone, noise_twice) and noise_alone.abs().max() == 3
    with pytest.raises(ValueError, match="negatives"):
        mem.pgd_noise([model, model], images, delta, tokens, alone, settings, 1, torch.Generator(),
                      negatives=(torch.zeros(2, 128), torch.zeros(2, 128)))
    with pytest.raises(ValueError, match="twice"):  # a job must not step one model's weights twice per batch
        mem.new_state([model, model], tokenizer, len(captions), (SIZE, SIZE), settings)


def test_a_preset_named_twice_is_two_independent_initialisations_drawn_from_the_seed():
    from aigis.protection.job import build_surrogates, parse_clip_presets

    presets = parse_clip_presets("rn_tiny+rn_tiny")
    assert presets == ["rn_tiny", "rn_tiny"]
    first, second = build_surrogates(presets, SIZE, 600, seed=5)
    again = build_surrogates(presets, SIZE, 600, seed=5)
    other_seed = build_surrogates(presets, SIZE, 600, seed=6)
    # the ResNet stem's first convolution (OpenAI's name) stands for each draw's weights
    conv = [m.state_dict()["visual.conv1.weight"] for m in (first, second, again[0], again[1], other_seed[0])]
    assert not torch.equal(conv[0], conv[1])  # two draws, not one model twice
    assert torch.equal(conv[0], conv[2]) and torch.equal(conv[1], conv[3])
    assert not torch.equal(conv[0], conv[4])
    mem.new_state([first, second], Tokenizer.train(["a red cat", "a blue dog"], 600), 4, (SIZE, SIZE),
                  mem.MEMSettings())  # accepted: distinct models


def test_ensemble_noise_lowers_every_members_loss(tiny):
    # EM-style noise (no trigger, no shuffle) made against a ResNet and a ViT together: each member's loss on
    # the noisy batch ends below its loss on the clean batch, and below that of random noise of the same size;
    # and the ViT's loss is lower than under noise made against the ResNet alone (the ViT was heard).
    resnet, tokenizer, images_np, captions = tiny
    torch.manual_seed(1)
    vit = build_clip("vit_tiny", tokenizer.vocab_size).eval()
    images = torch.from_numpy(images_np)
    tokens = tokenizer.tokenize(captions, resnet.context_length)
    none = torch.zeros((len(captions), 0), dtype=torch.long)
    settings = mem.MEMSettings(trigger_length=0, amp="off")
    zero = torch.zeros(images.shape, dtype=torch.int16)
    delta, _ = mem.pgd_noise([resnet, vit], images, zero, tokens, none, settings, 8, torch.Generator().manual_seed(0))
    resnet_only, _ = mem.pgd_noise(resnet, images, zero, tokens, none, settings, 8, torch.Generator().manual_seed(0))
    random = torch.randint(-8, 9, images.shape, generator=torch.Generator().manual_seed(2))
    losses = {}
    for model in (resnet, vit):
        with torch.no_grad():
            text = model.encode_text(tokens)
            loss = {name: float(mem.pair_losses(mem._encode_images(model, images, d), text, model.logit_scale).mean())
                    for name, d in (("clean", zero), ("ensemble", delta), ("random", random),
                                    ("resnet_only", resnet_only))}
        assert loss["ensemble"] < loss["clean"] and loss["ensemble"] < loss["random"], (type(model.visual), loss)
        losses[model is vit] = loss
    assert losses[True]["ensemble"] < losses[True]["resnet_only"], losses[True]
    with pytest.raises(ValueError, match="resolution"):
        mem.surrogate_list([resnet, build_clip(replace(PRESETS["vit_tiny"], image_resolution=48), tokenizer.vocab_size)])


def test_ensemble_job_checkpoints_every_surrogate_and_resumes_to_the_same_output(data, tmp_path):
    ensemble = ("--clip", "rn_tiny+vit_tiny")
    whole = _protect(data, tmp_path / "whole", *ensemble)
    assert whole.returncode == 0, whole.stderr
    killed = _protect(data, tmp_path / "killed", *ensemble, env={KILL_ENV: "1"})
    assert killed.returncode == -9, killed.stderr
    from safetensors import safe_open

    with safe_open(str(tmp_path / "killed" / "work" / "ckpt-1" / "state.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert any(k.startswith("model.visual.layer1") for k in keys)  # the ResNet, primary
    assert any(k.startswith("model1.visual.transformer") for k in keys) and any(k.startswith("optim1.") for k in keys)
    resumed = _protect(data, tmp_path / "killed", *ensemble)
    assert resumed.returncode == 0 and json.loads(resumed.stdout)["resumed"] is True, resumed.stderr
    assert _published_tree(tmp_path / "killed") == _published_tree(tmp_path / "whole")
    report = json.loads((tmp_path / "whole" / "protection.json").read_text())
    assert report["clip_preset"] == "rn_tiny+vit_tiny"
    models, _, meta = mem.load_surrogates(tmp_path / "whole" / report["surrogate"]["path"])
    assert meta["extra"]["ensemble"] == ["rn_tiny", "vit_tiny"] and meta["extra"]["clip_preset"] == "rn_tiny"
    # every member is saved for protect-on-upload, the primary first, each with negatives of its own
    assert [m.config.is_resnet for m in models] == [True, False]
    assert all(m.mem_negatives[0].shape == (N_IMAGES, m.config.embed_dim) for m in models)
    # ... and a single-surrogate job does not resume the ensemble's checkpoints.
    single = _protect(data, tmp_path / "killed")
    assert single.returncode == 2 and "clip_preset" in single.stderr, single.stderr


def test_captions_per_image_pick_only_that_images_captions_and_all_of_them():
    caption_image = np.array([2, 0, 2, 1, 2, 0])  # image 0: captions 1, 5; image 1: 3; image 2: 0, 2, 4
    groups = mem.CaptionsPerImage(caption_image, 3)
    assert not groups.one_each and groups.n_captions == 6
    assert groups.first(np.arange(3)).tolist() == [1, 3, 0]
    generator = torch.Generator().manual_seed(0)
    seen = {0: set(), 1: set(), 2: set()}
    for _ in range(200):
        for image, caption in zip([0, 1, 2], groups.pick(np.arange(3), generator)):
            assert caption_image[caption] == image
            seen[image].add(int(caption))
    assert seen == {0: {1, 5}, 1: {3}, 2: {0, 2, 4}}
    single = mem.CaptionsPerImage.single(4)
    before = generator.get_state()
    assert single.one_each and single.pick(np.array([3, 1]), generator).tolist() == [3, 1]
    assert torch.equal(generator.get_state(), before), "one caption per image must not consume random draws"
    with pytest.raises(ValueError, match="image 1 of 3 has no caption"):
        mem.CaptionsPerImage(np.array([0, 2]), 3)
    with pytest.raises(ValueError, match="outside"):
        mem.CaptionsPerImage(np.array([0, 3]), 3)


def test_an_image_with_several_captions_gets_one_noise_one_trigger_one_file(tmp_path):
    """Flickr/COCO layout: 3 manifest lines per image -> one protected PNG per image, every line kept in
    order, all captions of an image carrying the same trigger."""
    data = synth_captioned(tmp_path / "data", 6, 0, size=SIZE, seed=7, captions_per_image=3)
    pairs = read_pairs(data, "train.jsonl")
    assert len(pairs) == 18 and len({p.path for p in pairs}) == 6
    assert len({p.caption for p in pairs}) > 6, "the captions of an image should be worded differently"
    out = tmp_path / "out"
    result = _protect(data, out)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["pairs"] == 18 and summary["images"] == 6
    published = _published(out)
    assert [" ".join(e["caption"].split(" ")[3:]) for e in published] == [p.caption for p in pairs]
    assert len(list((out / "images").glob("*.png"))) == 6
    report = json.loads((out / "protection.json").read_text())
    assert report["pairs"] == 18 and report["images_protected"] == 6 and len(report["images"]) == 6
    trigger_of: dict[str, str] = {}
    for entry in published:
        trigger = " ".join(entry["caption"].split(" ")[:3])
        assert trigger_of.setdefault(entry["image"], trigger) == trigger, "one image, two triggers"
    originals = {p.path.name: o for p, o in zip(pairs, load_images(pairs, SIZE, progress=False))}
    for entry, pair in zip(published, pairs):
        delta = np.asarray(Image.open(out / entry["image"]).convert("RGB")).astype(int) - originals[pair.path.name]
        assert 1 <= np.abs(delta).max() <= 8
    noise = np.load(out / "work" / "noise.npy", mmap_mode="r")
    assert noise.shape == (6, SIZE, SIZE, 3) and noise.dtype == np.int8  # one noise per image, not per caption


def test_the_fitted_noise_is_laid_over_each_source_at_its_own_size(tiny):
    """Protection.noise_at: the job's crop of a larger or non-square source gets the fitted noise in blocks (per-image
    MEM: nothing outside the crop); the word code continues its pattern over the whole source."""
    import copy

    model, tokenizer, images, captions = tiny
    per_image = mem.MEMSettings(trigger_length=1, outer_iterations=1, trigger_iterations=0, surrogate_steps=1,
                                pgd_steps=2, batch_size=6, amp="off")
    protection = mem.protection_for(per_image, copy.deepcopy(model), tokenizer)
    state = protection.fit(protection.new_state(6, (SIZE, SIZE)), images, captions, device="cpu", progress=False)
    fitted = state.noise[2].astype(np.int16)
    assert np.abs(fitted).max() > 0
    assert np.array_equal(protection.noise_at(state, 2, SIZE, SIZE), fitted)
    assert np.array_equal(protection.noise_at(state, 2, 2 * SIZE, 2 * SIZE), fitted.repeat(2, 0).repeat(2, 1))
    wide = protection.noise_at(state, 2, 2 * SIZE, 3 * SIZE)  # the crop is the middle 2*SIZE columns
    assert np.array_equal(wide[:, SIZE // 2: SIZE // 2 + 2 * SIZE], fitted.repeat(2, 0).repeat(2, 1))
    assert not wide[:, : SIZE // 2].any() and not wide[:, SIZE // 2 + 2 * SIZE:].any()

    coded = code_settings(word_textures=12, words_per_image=3, texture_tile=4, trigger_length=5, outer_iterations=1,
                          surrogate_steps=1, pgd_steps=2, batch_size=6, amp="off", texture_sign=True)
    code = mem.protection_for(coded, copy.deepcopy(model), tokenizer)
    state = code.fit(code.new_state(6, (SIZE, SIZE)), images, captions, device="cpu", progress=False)
    raw = mem.word_code_noise(state.textures, torch.from_numpy(state.word_sets[2:3]), SIZE, SIZE, 8,
                              sign=True).round().to(torch.int16)[0].expand(SIZE, SIZE, 3).numpy()
    assert np.array_equal(code.noise_at(state, 2, SIZE, SIZE), raw)
    wide = code.noise_at(state, 2, 2 * SIZE, 3 * SIZE)
    assert np.array_equal(wide[:, SIZE // 2: SIZE // 2 + 2 * SIZE], raw.repeat(2, 0).repeat(2, 1))
    assert np.array_equal(wide[:, :8], wide[:, 8:16])  # outside the crop the 4-px tile (8 source px) goes on


def test_a_job_publishes_each_image_at_its_sources_size(tmp_path):
    """Sources larger than the job's size, square and not, PNG and JPEG, come back at their own sizes as PNGs,
    within epsilon of their decoded pixels."""
    from PIL import Image

    from aigis.preprocess import load_image

    root = synth_captioned(tmp_path / "big", N_IMAGES, 0, size=2 * SIZE, seed=4)
    pairs = [json.loads(line) for line in (root / "train.jsonl").read_text().splitlines()]
    names = sorted({pair["image"] for pair in pairs})
    for name in names[::2]:  # every other source cropped to a landscape 64 x 48
        Image.open(root / name).crop((0, 8, 2 * SIZE, 2 * SIZE - 8)).save(root / name)
    as_jpeg = {name: str(Path(name).with_suffix(".jpg")) for name in names[1::2][:2] + names[::2][:1]}
    for name, jpeg in as_jpeg.items():  # two square sources and one landscape one as JPEG files
        Image.open(root / name).convert("RGB").save(root / jpeg, quality=90)
        (root / name).unlink()
    (root / "train.jsonl").write_text("".join(
        json.dumps({**pair, "image": as_jpeg.get(pair["image"], pair["image"])}) + "\n" for pair in pairs))
    result = _protect(root, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "protection.json").read_text())
    assert report["image_size"] == SIZE
    assert sum(entry["source"].endswith(".jpg") for entry in report["images"]) == len(as_jpeg)
    for entry in report["images"]:
        original = load_image(root / entry["source"])
        with Image.open(tmp_path / "out" / entry["image"]) as written:
            assert written.format == "PNG" and entry["image"].endswith(".png"), entry
        published = load_image(tmp_path / "out" / entry["image"])
        assert published.shape == original.shape and entry["size"] == [original.shape[1], original.shape[0]]
        change = np.abs(published.astype(int) - original)
        assert 0 < change.max() <= 8
