"""A protection job's checkpoints: after every outer iteration, the noise, triggers, every surrogate's weights
and optimiser state, the word code if any, and the RNG state (safetensors + raw int8 + JSON, no pickle), so a
killed job continues from the newest complete one and, on the CPU, ends byte-identical to an uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from .artefact import file_sha256
from .settings import settings_from_dict

CHECKPOINT_FORMAT = "aigis-mem-checkpoint-1"


def write_atomic(path: Path, data: bytes) -> None:
    """path holds data whole or not at all (written aside, fsynced, renamed)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _optimizer_tensors(optimizer, prefix: str = "optim") -> tuple[dict, list]:
    """AdamW state as flat tensors plus its param groups as JSON (no pickle)."""
    import torch

    state = optimizer.state_dict()
    tensors = {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            tensors[f"{prefix}.{index}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    return tensors, state["param_groups"]


def _restore_optimizer(optimizer, tensors: dict, groups: list, prefix: str = "optim") -> None:
    state: dict = {}
    for name, value in tensors.items():
        if name.startswith(prefix + "."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _surrogate_prefixes(i: int) -> tuple[str, str]:
    """Checkpoint key prefixes of surrogate i: the primary's are "model"/"optim" (as before ensembles)."""
    return ("model", "optim") if i == 0 else (f"model{i}", f"optim{i}")


def checkpoints(work: Path) -> list[tuple[int, Path]]:
    found = []
    for path in work.glob("ckpt-*"):
        if path.is_dir() and path.name[5:].isdigit() and (path / "state.json").is_file():
            found.append((int(path.name[5:]), path))
    return sorted(found)


def save_checkpoint(work: Path, state, fingerprint: dict, autocast: bool = False, world_size: int = 1) -> Path:
    """work/ckpt-<iteration>/: noise.int8 (raw), state.safetensors, state.json written last; older ones removed.

    autocast: whether the job runs bfloat16 autocast, which a resume must keep to end where an uninterrupted
    run would. world_size: the processes the job ran on (torchrun), recorded; a job may resume on another."""
    import torch
    from safetensors.torch import save_file

    final = work / f"ckpt-{state.iteration}"
    tmp = work / f".tmp-ckpt-{state.iteration}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if isinstance(state.noise, np.memmap):
        state.noise.flush()
    noise = np.ascontiguousarray(state.noise)
    write_atomic(tmp / "noise.int8", noise.tobytes())
    tensors = {}
    groups = []
    for i, (model, optimizer) in enumerate(state.surrogates):
        model_prefix, optim_prefix = _surrogate_prefixes(i)
        tensors.update({f"{model_prefix}.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()})
        optim, param_groups = _optimizer_tensors(optimizer, optim_prefix)
        tensors.update(optim)
        groups.append(param_groups)
    tensors["triggers"] = torch.from_numpy(np.ascontiguousarray(state.triggers))
    tensors["generator"] = state.generator.get_state()
    if state.textures is not None:  # word-wise noise: the shared textures, their words, each image's words
        tensors["word_textures"] = state.textures.contiguous()
        tensors["texture_words"] = state.texture_words.contiguous()
        tensors["word_sets"] = torch.from_numpy(np.ascontiguousarray(state.word_sets))
    save_file(tensors, str(tmp / "state.safetensors"))
    meta = {
        "format": CHECKPOINT_FORMAT,
        "iteration": state.iteration,
        "fingerprint": fingerprint,
        "noise_shape": list(noise.shape),
        "noise_sha256": file_sha256(tmp / "noise.int8"),
        "state_sha256": file_sha256(tmp / "state.safetensors"),
        "param_groups": groups[0],
        "extra_param_groups": groups[1:],
        "history": state.history,
        "autocast": bool(autocast),
        "world_size": int(world_size),
    }
    write_atomic(tmp / "state.json", json.dumps(meta, indent=1).encode())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for iteration, path in checkpoints(work):
        if iteration != state.iteration:
            shutil.rmtree(path, ignore_errors=True)
    return final


def load_checkpoint(work: Path, state, fingerprint: dict, noise: bool = True) -> dict | None:
    """Restore the newest complete checkpoint into state and return its state.json; None if there is none.
    A checkpoint of a different job (other data or settings) is an error, not silently reused.

    noise=False restores everything but the noise (under torchrun, ranks other than 0 share rank 0's noise
    file, which rank 0 restores)."""
    from safetensors.torch import load_file

    found = checkpoints(work)
    if not found:
        return None
    _, path = found[-1]
    meta = json.loads((path / "state.json").read_text())
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not an {CHECKPOINT_FORMAT} checkpoint")
    stored = dict(meta["fingerprint"])
    if isinstance(stored.get("settings"), dict):
        # A setting added since the checkpoint was written counts as what the job did without it.
        stored["settings"] = settings_from_dict(stored["settings"]).to_dict()
    if stored != fingerprint:
        changed = sorted(k for k in set(stored) | set(fingerprint) if stored.get(k) != fingerprint.get(k))
        raise ValueError(f"{path} belongs to a different job (changed: {', '.join(changed)}); "
                         f"rerun with --no-resume to start over")
    for name, key in (("noise.int8", "noise_sha256"), ("state.safetensors", "state_sha256")):
        if name == "noise.int8" and not noise:
            continue  # read (and checked) by whoever restores it
        if file_sha256(path / name) != meta[key]:
            raise ValueError(f"{path / name}: sha256 mismatch (corrupt checkpoint); rerun with --no-resume")
    tensors = load_file(str(path / "state.safetensors"))
    all_groups = [meta["param_groups"], *meta.get("extra_param_groups", [])]
    if len(all_groups) != len(state.surrogates):
        raise ValueError(f"{path}: holds {len(all_groups)} surrogates, the job has {len(state.surrogates)}")
    for i, ((model, optimizer), groups) in enumerate(zip(state.surrogates, all_groups)):
        model_prefix, optim_prefix = _surrogate_prefixes(i)
        start = len(model_prefix) + 1
        model.load_state_dict({k[start:]: v for k, v in tensors.items() if k.startswith(model_prefix + ".")},
                              strict=True)
        _restore_optimizer(optimizer, tensors, groups, optim_prefix)
    state.generator.set_state(tensors["generator"])
    state.triggers[...] = tensors["triggers"].numpy()
    if "word_textures" in tensors:
        state.textures = tensors["word_textures"]
        state.texture_words = tensors["texture_words"]
        state.word_sets = tensors["word_sets"].numpy()
    if noise:
        state.noise[...] = np.fromfile(path / "noise.int8", dtype=np.int8).reshape(meta["noise_shape"])
    state.iteration = int(meta["iteration"])
    state.history = list(meta.get("history", []))
    if "autocast" not in meta:
        meta["autocast"] = autocast_before_it_was_recorded(stored["settings"], stored.get("device_type"))
    return meta


def autocast_before_it_was_recorded(settings: dict, device_type: str | None) -> bool:
    """What a job whose checkpoints do not record it ran: before the choice was recorded, "auto" was autocast
    on CUDA only."""
    amp = settings_from_dict(settings).amp
    return amp == "on" or (amp == "auto" and device_type == "cuda")
