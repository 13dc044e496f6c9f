"""A MEM protection job over a folder of image-caption pairs, resumable after a kill.

    summary = protect_dataset("data", "train.jsonl", "protected", MEMSettings())

Output (the originals are only read):
    out/images/<stem>.png      protected images (clip(image + noise) on the uint8 grid: PNG is lossless),
                               ONE per source image however many manifest lines (captions) name it
    out/manifest.jsonl         a line per input line, in order:
                               {"image": "images/<stem>.png", "caption": "<trigger words> <caption>"}
                               (every caption of an image carries that image's trigger)
    out/protection.json        epsilon, trigger length, mode, surrogate identity and sha256, settings,
                               whether the job ran bfloat16 autocast, per-image sha256 of the protected PNGs
    out/surrogate/<n>/         the final surrogate (mem.save_surrogate; of an ensemble, every member), for
                               protect-on-upload
    out/work/                  the noise memmap, tokenizer and checkpoints (ckpt-<iteration>/)

A checkpoint after every outer iteration holds the noise, triggers, every surrogate's weights and optimiser
state and the RNG state (safetensors + raw int8 + JSON, no pickle); a restarted job continues from the
newest complete one, with the numeric precision it started with, and, on the CPU, ends with byte-identical
output to an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from .mem import MEMSettings
from .mem import file_sha256 as _sha256_file

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "aigis-mem-checkpoint-1"
PROTECTION_FORMAT = "aigis-protection-1"
# Test hook: after writing the checkpoint of this outer iteration the process SIGKILLs itself.
KILL_ENV = "AIGIS_PROTECT_KILL_AFTER"
# Made-up words the job's tokenizer adds for triggers to use, as CLIP's vocabulary offers words no caption
# uses: a trigger then reads as a tag and does not add content words that change what the published caption
# says. Protection measured the same as with caption words, within the hackers' spread (BENCHMARKS.md).
DEFAULT_TRIGGER_WORDS = 400


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Checkpoints


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


def parse_clip_presets(spec: str, image_size: int | None = None) -> list[str]:
    """"vit_tiny+rn_tiny" -> ["vit_tiny", "rn_tiny"]: an ensemble of surrogates, the first the primary.

    A preset may repeat ("rn_tiny+rn_tiny"): the members are drawn one after another from the job's
    seed, so each repeat is an independent initialisation of that architecture, which is what an
    outside hacker's model is. Checked before any image is read: every member must take image_size
    (default: the primary's resolution) and read captions of the primary's context length.
    """
    from .clip import PRESETS

    names = [name.strip() for name in str(spec).split("+")]
    unknown = [name for name in names if name not in PRESETS]
    if unknown:
        raise ValueError(f"unknown CLIP preset {unknown[0]!r} in {spec!r}; known: "
                         f"{', '.join(PRESETS)} (join several with '+' for an ensemble)")
    primary = PRESETS[names[0]]
    size = int(image_size or primary.image_resolution)
    for name in names:
        try:
            replace(PRESETS[name], image_resolution=size).validate()
        except ValueError as exc:
            raise ValueError(f"image size {size} with preset {name}: {exc}") from None
        if PRESETS[name].context_length != primary.context_length:
            raise ValueError(f"{spec}: {name} reads {PRESETS[name].context_length} tokens, {names[0]} "
                             f"{primary.context_length}; an ensemble's members must agree")
    return names


def build_surrogates(presets: list[str], image_size: int, vocab_size: int, seed: int) -> list:
    """Randomly initialised surrogates (the from-scratch threat model), drawn in turn from one seed:
    the same call gives the same weights, and a preset named twice gives two initialisations."""
    import torch

    from .clip import PRESETS, build_clip

    torch.manual_seed(seed)
    return [build_clip(replace(PRESETS[name], image_resolution=image_size), vocab_size) for name in presets]


def pretrained_surrogate(path: str | Path, tokenizer, image_size: int | None):
    """The fine-tune threat model's surrogate: a CLIP from a local OpenAI-format state dict (no pickle),
    checked against the tokenizer and image size the job will feed it."""
    from .clip import load_openai_state_dict

    model = load_openai_state_dict(path)
    if tokenizer.vocab_size > model.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but {Path(path).name}'s embedding table only "
                         f"{model.vocab_size}: pass the checkpoint's own tokenizer")
    if image_size is not None and int(image_size) != model.image_resolution:
        raise ValueError(f"{Path(path).name} reads {model.image_resolution} px images, not {image_size} "
                         f"(leave the size out to use the checkpoint's)")
    return model.train()


def _checkpoints(work: Path) -> list[tuple[int, Path]]:
    found = []
    for path in work.glob("ckpt-*"):
        if path.is_dir() and path.name[5:].isdigit() and (path / "state.json").is_file():
            found.append((int(path.name[5:]), path))
    return sorted(found)


def save_checkpoint(work: Path, state, fingerprint: dict, autocast: bool = False) -> Path:
    """work/ckpt-<iteration>/: noise.int8 (raw), state.safetensors, state.json written last; older ones removed.

    autocast: whether the job runs bfloat16 autocast, which a resume must keep to end where an uninterrupted
    run would."""
    import torch
    from safetensors.torch import save_file

    final = work / f"ckpt-{state.iteration}"
    tmp = work / f".tmp-ckpt-{state.iteration}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if isinstance(state.noise, np.memmap):
        state.noise.flush()
    noise = np.ascontiguousarray(state.noise)
    _write_atomic(tmp / "noise.int8", noise.tobytes())
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
        "noise_sha256": _sha256_file(tmp / "noise.int8"),
        "state_sha256": _sha256_file(tmp / "state.safetensors"),
        "param_groups": groups[0],
        "extra_param_groups": groups[1:],
        "history": state.history,
        "autocast": bool(autocast),
    }
    _write_atomic(tmp / "state.json", json.dumps(meta, indent=1).encode())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for iteration, path in _checkpoints(work):
        if iteration != state.iteration:
            shutil.rmtree(path, ignore_errors=True)
    return final


def load_checkpoint(work: Path, state, fingerprint: dict) -> dict | None:
    """Restore the newest complete checkpoint into state and return its state.json; None if there is none.
    A checkpoint of a different job (other data or settings) is an error, not silently reused."""
    from safetensors.torch import load_file

    found = _checkpoints(work)
    if not found:
        return None
    _, path = found[-1]
    meta = json.loads((path / "state.json").read_text())
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not an {CHECKPOINT_FORMAT} checkpoint")
    stored = dict(meta["fingerprint"])
    if isinstance(stored.get("settings"), dict):
        # A setting added since the checkpoint was written counts as what the job did without it.
        stored["settings"] = MEMSettings.from_dict(stored["settings"]).to_dict()
    if stored != fingerprint:
        changed = sorted(k for k in set(stored) | set(fingerprint) if stored.get(k) != fingerprint.get(k))
        raise ValueError(f"{path} belongs to a different job (changed: {', '.join(changed)}); "
                         f"rerun with --no-resume to start over")
    for name, key in (("noise.int8", "noise_sha256"), ("state.safetensors", "state_sha256")):
        if _sha256_file(path / name) != meta[key]:
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
    noise = np.fromfile(path / "noise.int8", dtype=np.int8).reshape(meta["noise_shape"])
    state.noise[...] = noise
    state.iteration = int(meta["iteration"])
    state.history = list(meta.get("history", []))
    if "autocast" not in meta:
        meta["autocast"] = autocast_before_it_was_recorded(stored["settings"], stored.get("device_type"))
    return meta


def autocast_before_it_was_recorded(settings: dict, device_type: str | None) -> bool:
    """What a job whose checkpoints do not record it ran: before the choice was recorded, "auto" was autocast
    on CUDA only."""
    amp = MEMSettings.from_dict(settings).amp
    return amp == "on" or (amp == "auto" and device_type == "cuda")


# ----------------------------------------------------------------------------------------------
# The job


def _output_names(pairs) -> list[str]:
    """images/<stem>.png per pair; a stem used twice gets -<index> appended."""
    stems = [p.path.stem for p in pairs]
    seen: dict[str, int] = {}
    for s in stems:
        seen[s] = seen.get(s, 0) + 1
    return [f"images/{s}.png" if seen[s] == 1 else f"images/{s}-{i}.png" for i, s in enumerate(stems)]


def _next_surrogate_version(root: Path, files: dict[str, str]) -> tuple[int, bool]:
    """(version, exists): the version already holding exactly these files (by sha256: the weights, tokenizer,
    negatives and word code), else the next free number. An artefact saved before a file existed (e.g. the word
    code) is not the same and gets a new version."""
    versions = sorted(int(p.name) for p in root.glob("*") if p.is_dir() and p.name.isdigit()) if root.is_dir() else []
    for v in versions:
        meta = root / str(v) / "meta.json"
        if meta.is_file() and json.loads(meta.read_text()).get("files") == files:
            return v, True
    return (versions[-1] + 1 if versions else 1), False


def protect_dataset(
    data_root: str | Path,
    manifest_name: str,
    out_dir: str | Path,
    settings: MEMSettings,
    *,
    clip_preset: str | None = None,
    image_size: int | None = None,
    device: str | None = None,
    resume: bool = True,
    progress: bool = True,
    vocab_size: int = 4096,
    trigger_words: int | None = None,
    negatives: int = 256,
    tokenizer_file: str | Path | None = None,
    init_checkpoint: str | Path | None = None,
) -> dict:
    """Run MEM over data_root/manifest_name and write the protected copy to out_dir; returns a summary.

    image_size defaults to the preset's resolution (images are resized short-side + centre-cropped to it,
    once). The tokenizer is trained on the captions (deterministic), plus `trigger_words` made-up words
    that the triggers are restricted to in MEM mode (None: DEFAULT_TRIGGER_WORDS; 0: triggers from the
    caption words). `negatives` pairs' embeddings are stored with the surrogate so protect-on-upload of
    a single image has a contrastive loss. clip_preset (default rn_tiny) "a+b" runs MEM against an
    ensemble of surrogates (mem.surrogate_list), all saved in the one surrogate artefact for protect-on-upload.

    tokenizer_file replaces the trained tokenizer with a fixed vocabulary (CLIP's merges file or an
    aigis-bpe JSON file); triggers then use its whole words (made-up words need a vocabulary trained
    here, so trigger_words must stay unset or 0). init_checkpoint is the fine-tune threat model: the
    surrogate starts from that OpenAI-format CLIP state dict (a local file) instead of a random draw,
    at its own architecture and resolution, and needs the checkpoint's tokenizer_file.
    """
    import torch

    from . import mem
    from .captions import load_images, read_pairs
    from .clip import PRESETS
    from .tokenizer import Tokenizer, apply_trigger_text

    settings.validate()
    fixed_tokenizer = None
    if init_checkpoint is not None:
        if clip_preset is not None:
            raise ValueError("a surrogate started from a checkpoint takes its architecture from it: give no preset "
                             f"(got {clip_preset!r})")
        if tokenizer_file is None:
            raise ValueError("a surrogate started from a checkpoint needs the checkpoint's tokenizer file "
                             "(CLIP's bpe_simple_vocab_16e6.txt.gz or an aigis-bpe JSON file)")
    if tokenizer_file is not None:
        if trigger_words:
            raise ValueError(f"trigger_words {trigger_words}: a fixed vocabulary has no made-up words; triggers use "
                             f"its whole words (leave trigger_words unset or 0)")
        fixed_tokenizer = Tokenizer.from_file(tokenizer_file)
        trigger_words = 0
    pretrained = None
    if init_checkpoint is not None:
        pretrained = pretrained_surrogate(init_checkpoint, fixed_tokenizer, image_size)
        presets = ["pretrained"]
        size = pretrained.image_resolution
    else:
        presets = parse_clip_presets(clip_preset or "rn_tiny", image_size)
        size = int(image_size or PRESETS[presets[0]].image_resolution)
    clip_preset = "+".join(presets)
    data_root = Path(data_root).resolve()
    out_dir = Path(out_dir).resolve()
    pairs = read_pairs(data_root, manifest_name)
    # Lines naming the same file are captions of ONE image: one noise, one trigger, one output file.
    groups = mem.CaptionsPerImage.by_key([p.path.resolve() for p in pairs])
    sources = [pairs[c] for c in groups.first(np.arange(groups.n_images))]  # one pair per image
    if len(sources) < 2:
        raise ValueError(f"{manifest_name}: MEM needs at least 2 distinct images, got {len(sources)}")
    names = _output_names(sources)
    source_paths = {p.path.resolve() for p in sources}
    clashes = [n for n in names if (out_dir / n).resolve() in source_paths]
    if (out_dir / "manifest.jsonl").resolve() == (data_root / manifest_name).resolve():
        clashes.append("manifest.jsonl")
    if clashes:
        raise ValueError(f"output {out_dir} would overwrite the originals ({clashes[0]}); choose another --out")
    device_t = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.monotonic()
    images = load_images(sources, size, progress=progress)
    captions = [p.caption for p in pairs]
    work = out_dir / "work"
    if not resume:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)

    if settings.word_textures:
        if trigger_words not in (None, 0):
            raise ValueError(f"trigger_words {trigger_words}: word textures are owned by the captions' own words; "
                             f"leave trigger_words unset or 0")
        trigger_words = 0
    if trigger_words is None:
        trigger_words = DEFAULT_TRIGGER_WORDS
    if trigger_words < 0:
        raise ValueError(f"trigger_words must be >= 0, got {trigger_words}")
    made_up = trigger_words if settings.trigger_length else 0  # EM has no trigger to draw words for
    tokenizer_path = work / "tokenizer.json"
    if fixed_tokenizer is not None:
        tokenizer = fixed_tokenizer
        tokenizer.save(tokenizer_path)  # the same file gives the same bytes: checkpoints still resume
    else:
        tokenizer = Tokenizer.load(tokenizer_path) if resume and tokenizer_path.is_file() and _checkpoints(work) else None
        if tokenizer is None or len(tokenizer.trigger_words or ()) != made_up:
            tokenizer = Tokenizer.train(captions, vocab_size, trigger_words=made_up)
            tokenizer.save(tokenizer_path)  # a new tokenizer changes the fingerprint: old checkpoints are not resumed
    if pretrained is not None:
        models = [pretrained]
    else:
        models = build_surrogates(presets, size, tokenizer.vocab_size, settings.seed)
    model = models[0]

    noise = np.lib.format.open_memmap(work / "noise.npy", mode="w+", dtype=np.int8, shape=images.shape)
    state = mem.new_state(models, tokenizer, len(sources), (size, size), settings, noise=noise)
    fingerprint = {
        "manifest_sha256": _sha256_file(data_root / manifest_name),
        "images_sha256": _sha256_bytes(images.tobytes()),
        "settings": settings.to_dict(),
        "clip_preset": clip_preset,
        "image_size": size,
        "tokenizer_sha256": _sha256_file(tokenizer_path),
        "trigger_words": made_up,
        "device_type": device_t.type,
    }
    init_record = None
    if init_checkpoint is not None:
        init_record = {"file": Path(init_checkpoint).name, "sha256": _sha256_file(Path(init_checkpoint))}
        fingerprint["init_checkpoint_sha256"] = init_record["sha256"]
    resumed = load_checkpoint(work, state, fingerprint) if resume else None
    # bfloat16 or not is decided once per job, by the hardware it starts on, and kept by a resume.
    autocast = bool(resumed["autocast"]) if resumed else mem.autocast_enabled(settings.amp, device_t)
    run_settings = replace(settings, amp="on" if autocast else "off")
    if progress:
        log.info(f"MEM on {len(sources)} images ({len(pairs)} pairs), {device_t}, "
                 f"{'bfloat16 autocast' if autocast else 'float32'}"
                 f"{f'; resuming after outer iteration {state.iteration}/{settings.outer_iterations}' if resumed else ''}")
    kill_after = int(os.environ.get(KILL_ENV, "0") or 0)

    def checkpoint(st, stats) -> None:
        save_checkpoint(work, st, fingerprint, autocast)
        if kill_after and st.iteration == kill_after:
            import signal

            os.kill(os.getpid(), signal.SIGKILL)

    mem.run_mem(state, tokenizer, images, captions, run_settings, device=device_t, groups=groups,
                callback=checkpoint, progress=progress)

    # Publish: protected PNGs, manifest, surrogate, protection.json (no timings: reruns compare equal).
    from PIL import Image

    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    protected = mem.protected_images(images, state.noise)
    image_hashes = []
    lines = []
    for i, (name, source) in enumerate(zip(names, sources)):
        path = out_dir / name
        tmp = path.with_name(f".{path.name}.tmp")
        Image.fromarray(protected[i]).save(tmp, format="PNG")
        os.replace(tmp, path)
        image_hashes.append({"image": name, "source": source.path.relative_to(data_root).as_posix(),
                             "sha256": _sha256_file(path)})
    for pair, i in zip(pairs, groups.image_of):
        lines.append(json.dumps({"image": names[i], "caption": apply_trigger_text(state.triggers[i], pair.caption,
                                                                                  tokenizer)}))
    _write_atomic(out_dir / "manifest.jsonl", "".join(line + "\n" for line in lines).encode())

    negatives_per_model = None
    if negatives:
        count = min(negatives, len(sources))
        chosen = np.linspace(0, len(sources) - 1, count).round().astype(int)  # images
        from .retrieval import embed

        tokens = mem._with_triggers(tokenizer.tokenize([captions[c] for c in groups.first(chosen)],
                                                       model.context_length, settings.trigger_length),
                                    torch.from_numpy(state.triggers[chosen]))
        negatives_per_model = [embed(m, protected[chosen], tokens, device_t) for m in models]  # each in its own space
    surrogate_root = out_dir / "surrogate"
    staging = surrogate_root / ".staging"
    shutil.rmtree(staging, ignore_errors=True)
    meta = mem.save_surrogate(staging, models, tokenizer, settings, extra={
        "clip_preset": presets[0], "image_size": size, "pairs": len(pairs), "images": len(sources),
        "outer_iterations": state.iteration, **({"ensemble": presets} if len(presets) > 1 else {}),
        **({"init_checkpoint": init_record} if init_record else {})},
        negatives=negatives_per_model,
        word_code=None if state.textures is None else mem.WordCode(state.textures, state.texture_words))
    version, exists = _next_surrogate_version(surrogate_root, meta["files"])
    if exists:
        shutil.rmtree(staging)
    else:
        os.replace(staging, surrogate_root / str(version))

    report = {
        "format": PROTECTION_FORMAT,
        "mode": settings.mode,
        "epsilon": settings.epsilon,
        "epsilon_uint8_levels": settings.epsilon_levels,
        "trigger_length": settings.trigger_length,
        "trigger_words": (None if not settings.trigger_length else
                          f"whole words of {Path(tokenizer_file).name}" if tokenizer_file is not None else
                          "caption words" if made_up == 0 else f"{made_up} made-up words"),
        **({"texture_words": [tokenizer.decode([int(i)]) for i in state.texture_words]}
           if state.texture_words is not None else {}),
        "pairs": len(pairs),
        "images_protected": len(sources),
        "image_size": size,
        "clip_preset": clip_preset,
        **({"init_checkpoint": init_record} if init_record else {}),
        "source_manifest": manifest_name,
        "source_manifest_sha256": fingerprint["manifest_sha256"],
        "surrogate": {"path": f"surrogate/{version}", "identity": meta["identity"], "sha256": meta["sha256"]},
        "settings": settings.to_dict(),
        "autocast": "bfloat16" if autocast else "off",
        "outer_iterations_run": state.iteration,
        "images": image_hashes,
    }
    _write_atomic(out_dir / "protection.json", json.dumps(report, indent=1).encode())
    elapsed = time.monotonic() - started
    if progress:
        log.info(f"protected {len(pairs)} pairs ({len(sources)} images) into {out_dir} in {elapsed:.1f}s "
                 f"({len(sources) * state.iteration / max(elapsed, 1e-9):.1f} image-iterations/s)")
    last = state.history[-1] if state.history else {}
    return {
        "out_dir": str(out_dir), "pairs": len(pairs), "images": len(sources), "mode": settings.mode, "resumed": bool(resumed),
        "surrogate_dir": str(surrogate_root / str(version)), "surrogate_sha256": meta["sha256"],
        "final_pass_loss": last.get("pass_loss"), "pairs_per_s": last.get("pairs_per_s"), "seconds": elapsed,
        "outer_iterations_run": state.iteration,
    }
