"""A protection job over a folder of image-caption pairs, resumable after a kill.

    summary = protect_dataset("data", "train.jsonl", "protected", preset_settings("word-code"))

Output (the originals are only read):
    out/images/<stem>.png      protected images at their sources' sizes (clip(image + noise) on the uint8 grid:
                               PNG is lossless), ONE per source image however many manifest lines name it
    out/manifest.jsonl         a line per input line, in order:
                               {"image": "images/<stem>.png", "caption": "<trigger words> <caption>"}
                               (every caption of an image carries that image's trigger)
    out/protection.json        epsilon, trigger length, mode, surrogate identity and sha256, settings,
                               whether the job ran bfloat16 autocast, per-image sha256 of the protected PNGs
    out/surrogate/<n>/         the fitted protection's artefact (Protection.save: every surrogate of an
                               ensemble, the word code if any), for protect-on-upload
    out/work/                  the noise memmap, tokenizer and checkpoints (ckpt-<iteration>/)

The job works through the Protection interface (method.py): any method the settings name. A checkpoint after
every outer iteration (checkpoints.py) lets a restarted job continue from the newest complete one, with the
numeric precision it started with, and, on the CPU, end with byte-identical output to an uninterrupted run.

Under torchrun (`torchrun --nproc-per-node N $(which aigis) protect ...`) every process runs the job over the
same --out: the outer loop is data-parallel (parallel.py), every rank writes its images' noise into the one
memory-mapped work/noise.npy and its block of the protected PNGs, and rank 0 alone writes the tokenizer, the
checkpoints, the manifest, the artefact and protection.json (which records the world size). The output folder
is the same as a one-process job's; a job spanning machines needs --out on a filesystem they all mount.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .artefact import file_sha256
from .checkpoints import (autocast_before_it_was_recorded, checkpoints, load_checkpoint,  # noqa: F401
                          save_checkpoint, write_atomic)
from .settings import DEFAULT_TRIGGER_WORDS, SurrogateSettings

log = logging.getLogger(__name__)

PROTECTION_FORMAT = "aigis-protection-1"
# Test hook: after writing the checkpoint of this outer iteration the process SIGKILLs itself (under torchrun,
# the process of rank KILL_RANK_ENV, default 0).
KILL_ENV = "AIGIS_PROTECT_KILL_AFTER"
KILL_RANK_ENV = "AIGIS_PROTECT_KILL_RANK"


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------------------------
# Surrogates


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


@dataclass
class _Surrogates:
    """Which surrogates a job attacks: presets drawn at random, or one pretrained checkpoint."""

    presets: list[str]
    size: int
    pretrained: Any = None  # a CLIP loaded from init_checkpoint
    fixed_tokenizer: Any = None  # the tokenizer_file's vocabulary
    init_record: dict | None = None

    @property
    def name(self) -> str:
        return "+".join(self.presets)


def _choose_surrogates(clip_preset: str | None, image_size: int | None, tokenizer_file: str | Path | None,
                       init_checkpoint: str | Path | None, trigger_words: int | None) -> _Surrogates:
    """Check the surrogate options together (before any image is read) and load what they name."""
    from .clip import PRESETS
    from .tokenizer import Tokenizer

    if init_checkpoint is not None:
        if clip_preset is not None:
            raise ValueError("a surrogate started from a checkpoint takes its architecture from it: give no preset "
                             f"(got {clip_preset!r})")
        if tokenizer_file is None:
            raise ValueError("a surrogate started from a checkpoint needs the checkpoint's tokenizer file "
                             "(CLIP's bpe_simple_vocab_16e6.txt.gz or an aigis-bpe JSON file)")
    fixed = None
    if tokenizer_file is not None:
        if trigger_words:
            raise ValueError(f"trigger_words {trigger_words}: a fixed vocabulary has no made-up words; triggers use "
                             f"its whole words (leave trigger_words unset or 0)")
        fixed = Tokenizer.from_file(tokenizer_file)
    if init_checkpoint is not None:
        model = pretrained_surrogate(init_checkpoint, fixed, image_size)
        record = {"file": Path(init_checkpoint).name, "sha256": file_sha256(Path(init_checkpoint))}
        return _Surrogates(["pretrained"], model.image_resolution, model, fixed, record)
    presets = parse_clip_presets(clip_preset or "rn_tiny", image_size)
    return _Surrogates(presets, int(image_size or PRESETS[presets[0]].image_resolution), fixed_tokenizer=fixed)


def _made_up_words(settings: SurrogateSettings, method_class: Any, trigger_words: int | None,
                   fixed_tokenizer: Any) -> int:
    """How many made-up words the job's tokenizer adds for triggers (0: triggers use the captions' words)."""
    if fixed_tokenizer is not None:
        return 0
    if method_class.triggers_from_caption_words:
        if trigger_words not in (None, 0):
            raise ValueError(f"trigger_words {trigger_words}: the {settings.method} method's triggers are the "
                             f"captions' own words; leave trigger_words unset or 0")
        return 0
    if trigger_words is None:
        trigger_words = DEFAULT_TRIGGER_WORDS
    if trigger_words < 0:
        raise ValueError(f"trigger_words must be >= 0, got {trigger_words}")
    return trigger_words if settings.trigger_length else 0  # EM has no trigger to draw words for


def _job_tokenizer(work: Path, captions: list[str], vocab_size: int, made_up: int, fixed: Any, resume: bool):
    """The fixed vocabulary, or one trained on the captions (kept in work/ so that a resume finds the same)."""
    from .tokenizer import Tokenizer

    path = work / "tokenizer.json"
    if fixed is not None:
        fixed.save(path)  # the same file gives the same bytes: checkpoints still resume
        return fixed
    tokenizer = Tokenizer.load(path) if resume and path.is_file() and checkpoints(work) else None
    if tokenizer is None or len(tokenizer.trigger_words or ()) != made_up:
        tokenizer = Tokenizer.train(captions, vocab_size, trigger_words=made_up)
        tokenizer.save(path)  # a new tokenizer changes the fingerprint: old checkpoints are not resumed
    return tokenizer


# ----------------------------------------------------------------------------------------------
# The data


def _output_names(pairs) -> list[str]:
    """images/<stem>.png per pair; a stem used twice gets -<index> appended."""
    stems = [p.path.stem for p in pairs]
    seen: dict[str, int] = {}
    for s in stems:
        seen[s] = seen.get(s, 0) + 1
    return [f"images/{s}.png" if seen[s] == 1 else f"images/{s}-{i}.png" for i, s in enumerate(stems)]


@dataclass
class _JobData:
    """The pairs of a job: lines naming the same file are captions of ONE image (one noise, one trigger, one
    output file)."""

    root: Path
    manifest: str
    pairs: list
    groups: Any  # state.CaptionsPerImage
    sources: list  # one pair per image
    names: list[str]  # each image's output file
    images: np.ndarray  # uint8 [N, size, size, 3]

    @property
    def captions(self) -> list[str]:
        return [p.caption for p in self.pairs]


def _read_data(data_root: Path, manifest_name: str, out_dir: Path, size: int, progress: bool) -> _JobData:
    from .captions import load_images, read_pairs
    from .state import CaptionsPerImage

    pairs = read_pairs(data_root, manifest_name)
    groups = CaptionsPerImage.by_key([p.path.resolve() for p in pairs])
    sources = [pairs[c] for c in groups.first(np.arange(groups.n_images))]
    if len(sources) < 2:
        raise ValueError(f"{manifest_name}: protection needs at least 2 distinct images, got {len(sources)}")
    names = _output_names(sources)
    source_paths = {p.path.resolve() for p in sources}
    clashes = [n for n in names if (out_dir / n).resolve() in source_paths]
    if (out_dir / "manifest.jsonl").resolve() == (data_root / manifest_name).resolve():
        clashes.append("manifest.jsonl")
    if clashes:
        raise ValueError(f"output {out_dir} would overwrite the originals ({clashes[0]}); choose another --out")
    images = load_images(sources, size, progress=progress)
    return _JobData(data_root, manifest_name, pairs, groups, sources, names, images)


# ----------------------------------------------------------------------------------------------
# The job


def protect_dataset(
    data_root: str | Path,
    manifest_name: str,
    out_dir: str | Path,
    settings: SurrogateSettings,
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
    """Protect data_root/manifest_name with the method the settings name; write the protected copy to out_dir
    and return a summary.

    image_size defaults to the preset's resolution (images are resized short-side + centre-cropped to it,
    once). The tokenizer is trained on the captions (deterministic), plus `trigger_words` made-up words
    that the triggers are restricted to (None: DEFAULT_TRIGGER_WORDS; 0: triggers from the caption words; the
    word code always uses the caption words). `negatives` pairs' embeddings are stored with the surrogate so
    protect-on-upload of a single image has a contrastive loss. clip_preset (default rn_tiny) "a+b" attacks an
    ensemble of surrogates, all saved in the one artefact for protect-on-upload.

    tokenizer_file replaces the trained tokenizer with a fixed vocabulary (CLIP's merges file or an
    aigis-bpe JSON file); triggers then use its whole words (made-up words need a vocabulary trained
    here, so trigger_words must stay unset or 0). init_checkpoint is the fine-tune threat model: the
    surrogate starts from that OpenAI-format CLIP state dict (a local file) instead of a random draw,
    at its own architecture and resolution, and needs the checkpoint's tokenizer_file.
    """
    import torch

    from aigis import distributed

    from .method import protection_class, protection_for

    settings.validate()
    method_class = protection_class(settings.method)
    chosen = _choose_surrogates(clip_preset, image_size, tokenizer_file, init_checkpoint, trigger_words)
    data_root, out_dir = Path(data_root).resolve(), Path(out_dir).resolve()
    device_t = torch.device(distributed.local_device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
    progress = progress and distributed.is_main()
    started = time.monotonic()
    data = _read_data(data_root, manifest_name, out_dir, chosen.size, progress)
    _check_batches_cover_ranks(len(data.sources), settings.batch_size, distributed.world_size())
    work = out_dir / "work"
    made_up = _made_up_words(settings, method_class, trigger_words, chosen.fixed_tokenizer)
    tokenizer, noise = _prepare_work(work, data, vocab_size, made_up, chosen.fixed_tokenizer, resume)
    models = ([chosen.pretrained] if chosen.pretrained is not None else
              build_surrogates(chosen.presets, chosen.size, tokenizer.vocab_size, settings.seed))
    protection = protection_for(settings, models, tokenizer)
    state = protection.new_state(len(data.sources), (chosen.size, chosen.size), noise=noise)
    distributed.barrier()  # every rank has zeroed the shared noise before rank 0 restores it
    fingerprint = {
        "manifest_sha256": file_sha256(data_root / manifest_name),
        "images_sha256": _sha256_bytes(data.images.tobytes()),
        "settings": settings.to_dict(),
        "clip_preset": chosen.name,
        "image_size": chosen.size,
        "tokenizer_sha256": file_sha256(work / "tokenizer.json"),
        "trigger_words": made_up,
        "device_type": device_t.type,
        **({"init_checkpoint_sha256": chosen.init_record["sha256"]} if chosen.init_record else {}),
    }
    restores_noise = _first_on_machine()  # the ranks of one machine share its page cache of the noise file
    resumed = load_checkpoint(work, state, fingerprint, noise=restores_noise) if resume else None
    from .parallel import share_noise

    share_noise(state.noise)
    protection, autocast = _fit(protection, state, data, work, fingerprint, device_t, resumed, progress)

    image_hashes = _publish_images(out_dir, data, state, protection)

    def finish() -> tuple[int, dict]:  # rank 0: what the job publishes besides the images
        _publish_manifest(out_dir, data, state, tokenizer)
        negatives_per_model = _negatives(models, tokenizer, data, state, device_t, negatives, settings)
        version, meta = _save_artefact(out_dir / "surrogate", protection, chosen, data, state, negatives_per_model)
        report = _report(protection, state, chosen, data, fingerprint, made_up, tokenizer_file, version, meta,
                         autocast, image_hashes)
        # no timings in it: reruns compare equal
        write_atomic(out_dir / "protection.json", json.dumps(report, indent=1).encode())
        return version, meta

    version, meta = distributed.on_main(finish)
    elapsed = time.monotonic() - started
    if progress:
        log.info(f"protected {len(data.pairs)} pairs ({len(data.sources)} images) into {out_dir} in {elapsed:.1f}s "
                 f"({len(data.sources) * state.iteration / max(elapsed, 1e-9):.1f} image-iterations/s)")
    last = state.history[-1] if state.history else {}
    return {
        "out_dir": str(out_dir), "pairs": len(data.pairs), "images": len(data.sources), "mode": settings.mode,
        "resumed": bool(resumed), "surrogate_dir": str(out_dir / "surrogate" / str(version)),
        "surrogate_sha256": meta["sha256"], "final_pass_loss": last.get("pass_loss"),
        "pairs_per_s": last.get("pairs_per_s"), "seconds": elapsed, "outer_iterations_run": state.iteration,
    }


def _report(protection, state, chosen: _Surrogates, data: _JobData, fingerprint: dict, made_up: int,
            tokenizer_file: str | Path | None, version: int, meta: dict, autocast: bool,
            image_hashes: list[dict]) -> dict:
    """protection.json: what was protected how, and each published image's sha256 (no timings: reruns compare
    equal)."""
    settings = protection.settings
    return {
        "format": PROTECTION_FORMAT,
        "mode": settings.mode,
        "epsilon": settings.epsilon,
        "epsilon_uint8_levels": settings.epsilon_levels,
        "trigger_length": settings.trigger_length,
        "trigger_words": (None if not settings.trigger_length else
                          f"whole words of {Path(tokenizer_file).name}" if tokenizer_file is not None else
                          "caption words" if made_up == 0 else f"{made_up} made-up words"),
        **protection.report(state),
        "pairs": len(data.pairs),
        "images_protected": len(data.sources),
        "image_size": chosen.size,
        "clip_preset": chosen.name,
        **({"init_checkpoint": chosen.init_record} if chosen.init_record else {}),
        "source_manifest": data.manifest,
        "source_manifest_sha256": fingerprint["manifest_sha256"],
        "surrogate": {"path": f"surrogate/{version}", "identity": meta["identity"], "sha256": meta["sha256"]},
        "settings": settings.to_dict(),
        "autocast": "bfloat16" if autocast else "off",
        "outer_iterations_run": state.iteration,
        "world_size": _world_size(),
        "images": image_hashes,
    }


def _fit(protection, state, data: _JobData, work: Path, fingerprint: dict, device, resumed: dict | None,
         progress: bool) -> tuple[Any, bool]:
    """Run the outer loop to its end, checkpointing after every iteration; returns the fitted protection (with
    the job's settings) and whether it ran bfloat16 autocast (decided once per job, by the hardware it starts
    on, and kept by a resume)."""
    from .attack import autocast_enabled

    settings = protection.settings
    autocast = bool(resumed["autocast"]) if resumed else autocast_enabled(settings.amp, device)
    if progress:
        log.info(f"{settings.method} on {len(data.sources)} images ({len(data.pairs)} pairs), {device}, "
                 f"{'bfloat16 autocast' if autocast else 'float32'}"
                 f"{f'; resuming after outer iteration {state.iteration}/{settings.outer_iterations}' if resumed else ''}")
    from aigis import distributed

    kill_after = int(os.environ.get(KILL_ENV, "0") or 0)
    kill_rank = int(os.environ.get(KILL_RANK_ENV, "0") or 0)
    if resumed and progress and resumed.get("world_size", 1) != distributed.world_size():
        log.info(f"the checkpoint was written by {resumed.get('world_size', 1)} process(es), this run has "
                 f"{distributed.world_size()}: the draws from here on are this world size's")

    def checkpoint(st, stats) -> None:
        distributed.on_main(lambda: save_checkpoint(work, st, fingerprint, autocast, distributed.world_size()))
        if kill_after and st.iteration == kill_after and distributed.rank() == kill_rank:
            import signal

            os.kill(os.getpid(), signal.SIGKILL)

    fitting = protection.with_settings(replace(settings, amp="on" if autocast else "off"))
    fitting.fit(state, data.images, data.captions, groups=data.groups, device=device, callback=checkpoint,
                progress=progress)
    return fitting.with_settings(settings), autocast


def _publish_images(out_dir: Path, data: _JobData, state, protection) -> list[dict]:
    """The protected PNGs, each at its source's size (under torchrun each rank writes its block of them); returns
    each image's name, source, size and sha256, in image order, on every rank.

    A source of the job's size gets the fitted noise as it is; a larger or non-square one gets it laid over the
    pixels the job's centre crop came from (Protection.noise_at), on the source's own pixels, so the published file
    replaces the original at its resolution. Always PNG: lossless, so the noise survives as fitted (a JPEG source
    comes back as a PNG of its decoded pixels)."""
    from PIL import Image

    from aigis import distributed
    from aigis.preprocess import load_image

    from .mem import protected_images

    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    start, stop = distributed.block_bounds(len(data.sources))[distributed.rank()]
    fitted = protected_images(data.images[start:stop], state.noise[start:stop])
    image_hashes = []
    for k, i in enumerate(range(start, stop)):
        name, source = data.names[i], data.sources[i]
        original = load_image(source.path)
        height, width = original.shape[:2]
        if (height, width) == fitted.shape[1:3]:
            published = fitted[k]
        else:
            noise = protection.noise_at(state, i, height, width)
            published = np.clip(original.astype(np.int16) + noise, 0, 255).astype(np.uint8)
        path = out_dir / name
        tmp = path.with_name(f".{path.name}.tmp")
        Image.fromarray(published).save(tmp, format="PNG")
        os.replace(tmp, path)
        image_hashes.append({"image": name, "source": source.path.relative_to(data.root).as_posix(),
                             "size": [width, height], "sha256": file_sha256(path)})
    return [entry for block in distributed.all_gather_object(image_hashes) for entry in block]


def _publish_manifest(out_dir: Path, data: _JobData, state, tokenizer) -> None:
    """The triggered manifest: every caption line in input order, carrying its image's trigger."""
    from .tokenizer import apply_trigger_text

    lines = [json.dumps({"image": data.names[i], "caption": apply_trigger_text(state.triggers[i], pair.caption,
                                                                               tokenizer)})
             for pair, i in zip(data.pairs, data.groups.image_of)]
    write_atomic(out_dir / "manifest.jsonl", "".join(line + "\n" for line in lines).encode())


def _prepare_work(work: Path, data: _JobData, vocab_size: int, made_up: int, fixed: Any, resume: bool):
    """(tokenizer, noise memmap) of the job's work folder: rank 0 clears it (no resume), writes the tokenizer and
    creates work/noise.npy; every other rank then opens what rank 0 wrote, which must be the same files (a job
    spanning machines needs --out on a filesystem they all mount). The processes of one machine share one noise
    file; on a job spanning machines each other machine has one of its own (work/noise-machine<k>.npy), written by
    its processes alone and kept whole by the rows sent after each pass (parallel.py)."""
    from aigis import distributed

    from .tokenizer import Tokenizer

    path = work / "tokenizer.json"
    launch = distributed.current_launch()
    machine = launch.machine if launch is not None else 0
    noise_path = work / ("noise.npy" if machine == 0 else f"noise-machine{machine}.npy")
    made: dict[str, Any] = {}

    def create_noise():
        return np.lib.format.open_memmap(noise_path, mode="w+", dtype=np.int8, shape=data.images.shape)

    def prepare() -> str:
        if not resume:
            shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True, exist_ok=True)
        made["tokenizer"] = _job_tokenizer(work, data.captions, vocab_size, made_up, fixed, resume)
        made["noise"] = create_noise()
        return file_sha256(path)

    tokenizer_sha256 = distributed.on_main(prepare)
    if not distributed.is_main() and (not path.is_file() or file_sha256(path) != tokenizer_sha256):
        raise ValueError(f"{work}: this process does not see the files rank 0 wrote there; under torchrun every "
                         f"process needs the same --out (a filesystem every machine of the job mounts)")
    if machine != 0 and launch.local_rank == 0:
        create_noise().flush()
    distributed.barrier()  # each machine's noise file exists before its other processes open it
    if distributed.is_main():
        return made["tokenizer"], made["noise"]
    noise = np.load(noise_path, mmap_mode="r+")
    if noise.shape != data.images.shape or noise.dtype != np.int8:
        raise ValueError(f"{noise_path}: int8 {list(data.images.shape)} expected, found {noise.dtype} "
                         f"{list(noise.shape)}")
    return (fixed if fixed is not None else Tokenizer.load(path)), noise


def _check_batches_cover_ranks(n: int, batch_size: int, world: int) -> None:
    """Under torchrun a batch is split over the processes (surrogate steps, word-code passes): each needs a row."""
    if world == 1:
        return
    smallest = min(min(batch_size, n), n // math.ceil(n / batch_size))  # a surrogate batch; a pass's smallest
    if smallest < world:
        raise ValueError(f"batch {batch_size} over {n} images gives batches of {smallest} image(s), fewer than the "
                         f"{world} processes sharing each batch: raise --batch or run fewer processes")


def _first_on_machine() -> bool:
    """Whether this process restores what its machine shares (rank 0's role on each machine)."""
    from aigis import distributed

    launch = distributed.current_launch()
    return launch is None or launch.local_rank == 0


def _world_size() -> int:
    from aigis import distributed

    return distributed.world_size()


def _negatives(models: list, tokenizer, data: _JobData, state, device, count: int,
               settings: SurrogateSettings) -> list | None:
    """Embeddings of `count` protected pairs spread over the set, in each surrogate's own space: the contrast a
    single uploaded image is protected against."""
    if not count:
        return None
    import torch

    from .attack import _with_triggers
    from .mem import protected_images
    from .retrieval import embed

    chosen = np.linspace(0, len(data.sources) - 1, min(count, len(data.sources))).round().astype(int)  # images
    protected = protected_images(data.images[chosen], state.noise[chosen])
    captions = [data.captions[c] for c in data.groups.first(chosen)]
    tokens = _with_triggers(tokenizer.tokenize(captions, models[0].context_length, settings.trigger_length),
                            torch.from_numpy(state.triggers[chosen]))
    return [embed(m, protected, tokens, device) for m in models]


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


def _save_artefact(root: Path, protection, chosen: _Surrogates, data: _JobData, state,
                   negatives: list | None) -> tuple[int, dict]:
    """The fitted protection as artefact root/<version>: written aside, renamed into place; an identical one
    already there is reused."""
    staging = root / ".staging"
    shutil.rmtree(staging, ignore_errors=True)
    meta = protection.save(staging, extra={
        "clip_preset": chosen.presets[0], "image_size": chosen.size, "pairs": len(data.pairs),
        "images": len(data.sources), "outer_iterations": state.iteration,
        **({"ensemble": chosen.presets} if len(chosen.presets) > 1 else {}),
        **({"init_checkpoint": chosen.init_record} if chosen.init_record else {})}, negatives=negatives)
    version, exists = _next_surrogate_version(root, meta["files"])
    if exists:
        shutil.rmtree(staging)
    else:
        os.replace(staging, root / str(version))
    return version, meta
