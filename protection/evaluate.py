"""Does the protection work? Train "hacker" CLIPs on each version of the data and compare retrieval.

The threat model of MEM: whoever scrapes the published pairs trains a CLIP on them (from scratch,
or by fine-tuning a pretrained one) and is then measured on CLEAN test pairs. Protection works when
the model trained on protected pairs retrieves about as well as random guessing, while the same
training on the clean pairs retrieves far above it. Every training condition here is read back from
image files -- the clean data, a random-noise control of the same epsilon (written here as PNG),
each protected set as published, and each protected set after JPEG-75 or grayscale re-encoding (the
cheap defences known to weaken unlearnable examples) -- and trained with the same seed, steps and
initialisation, so the only difference between rows is the data.

A hacker is a (family, seed): every condition is trained by every family given (CLIP presets such as
rn_tiny, vit_tiny and the plain-CNN cnn_words), each with `hackers` seeds. Hackers train as anyone would,
with a random resized crop and a horizontal flip drawn per image and step from the hacker's seed (the same
draws on every condition); the test images are never augmented. Each hacker's retention -- its text->image
R@1 on a condition over its own R@1 on the clean pairs -- is reported per hacker, and as the median and
range over hackers per family and over all of them, so that a protection cannot look good on one lucky
model. Retrieval ranks every test pair against the whole test split by default, within blocks of
`gallery` pairs, or by COCO's 5x1K protocol (5 folds of 1000, averaged).

Outputs in the output folder: report.json, report.md (the table), examples.png (original, noise
amplified around grey, protected, with captions) and sets/ (the random and re-encoded sets). The sets are
written by training_sets.py, the report by eval_report.py.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from .captions import Pair, PairsManifestError, load_images, read_pairs
from .eval_report import FINETUNE_FAMILY, example_sheet, json_default, markdown_table, retention, summary
from .training_sets import (PROTECTED_MANIFEST, PROTECTION_META, ROBUSTNESS_TRANSFORMS, EvaluationError,  # noqa: F401
                            TrainingSet, compare_to_clean, epsilon_levels, psnr, read_protected_set, write_random_set,
                            write_transformed_set)

if TYPE_CHECKING:
    import torch

    from .clip import CLIP

log = logging.getLogger(__name__)

DEFAULT_EPSILON = 8 / 255
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_RESERVED = {"clean", "random"}


# ----------------------------------------------------------------------------------------------
# Training the hackers

# The from-scratch hacker's defaults (benchmarks follow the same hacker from here).
HACKER_BATCH_SIZE = 50
HACKER_LR = 1e-3
HACKER_TOKENIZER_VOCAB = 1024
# Three families (a ResNet, a ViT, a plain CNN with a word transformer), one hacker each by default: a result
# resting on one architecture is no result, and three hackers give a median and a spread.
DEFAULT_CLIP = "rn_tiny,vit_tiny,cnn_words"

# The hackers' training augmentation: a crop keeping a fraction of the image's area in AUGMENT_SCALE at a
# width / height ratio in AUGMENT_RATIO, resized back to the training size, then a left-right flip half the time.
AUGMENT_SCALE = (0.5, 1.0)
AUGMENT_RATIO = (3 / 4, 4 / 3)
AUGMENTATION = "random resized crop (area 0.5-1, aspect 3/4-4/3) + horizontal flip"

# How retrieval is ranked: "whole" ranks each query against the whole test split (or within `gallery` blocks);
# "5x1k" is COCO's protocol, 5 folds of 1000 test pairs ranked on their own and averaged.
PROTOCOLS = ("whole", "5x1k")
FOLDS, FOLD_SIZE = 5, 1000


def hacker_families(spec: str | Sequence[str]) -> list[str]:
    """CLIP presets from "rn_tiny,vit_tiny" (or a list of names), in order; refuses an empty, repeated or
    unknown name."""
    from .clip import PRESETS

    names = [n.strip() for n in spec.split(",")] if isinstance(spec, str) else [str(n).strip() for n in spec]
    if not names or any(not n for n in names):
        raise EvaluationError(f"hacker CLIP presets {spec!r}: give one or more names separated by commas")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise EvaluationError(f"hacker CLIP presets {spec!r}: {', '.join(repeated)} given more than once")
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        raise EvaluationError(f"unknown CLIP preset {', '.join(map(repr, unknown))}; known: {', '.join(PRESETS)}")
    return names


def hacker_init_seed(seed: int) -> int:
    """The torch seed a hacker's weights are drawn with. Never the plain seed: a protection job seeds its
    surrogate with torch.manual_seed(settings.seed), so a hacker seeded with the same small integer
    would start from the surrogate's very initial image tower (119 of its 123 tensors at seed 0) and
    learn the noise far more easily than anyone else (measured: 7.5x chance against 14-18x for
    independently drawn hackers)."""
    return int(np.random.SeedSequence([seed, 0x4AC6E5]).generate_state(1)[0])


def new_hacker(clip_preset: str, image_size: int, vocab_size: int, seed: int, context_length: int = 0):
    """A from-scratch hacker CLIP: the preset at image_size px, weights drawn with hacker_init_seed(seed)
    (the same for every condition given the seed, never a surrogate's). context_length, when longer than
    the preset's, widens the text context so that no training caption is cut."""
    import torch

    from .clip import PRESETS, build_clip

    preset = PRESETS[clip_preset]
    config = replace(preset, image_resolution=image_size, context_length=max(preset.context_length, context_length))
    torch.manual_seed(hacker_init_seed(seed))
    return build_clip(config, vocab_size=vocab_size)


def augmentation_seed(seed: int) -> int:
    """The seed of a hacker's crops and flips: drawn from its seed, apart from its weights' (hacker_init_seed)."""
    return int(np.random.SeedSequence([seed, 0xA06E17]).generate_state(1)[0])


def random_resized_crop_and_flip(images: "torch.Tensor", generator: "torch.Generator") -> "torch.Tensor":
    """Float images [N, C, H, W] -> the same shape, each image its own random resized crop (AUGMENT_SCALE of its
    area at an AUGMENT_RATIO aspect; a side that would exceed the image is cut to it), resized back bilinearly,
    and mirrored left-right with probability 1/2. The draws come from `generator` (on the CPU), so a seed
    gives the same crops on any device."""
    import torch
    import torch.nn.functional as F

    n = images.shape[0]
    area = torch.empty(n).uniform_(*AUGMENT_SCALE, generator=generator)
    aspect = torch.empty(n).uniform_(math.log(AUGMENT_RATIO[0]), math.log(AUGMENT_RATIO[1]), generator=generator).exp()
    width = (area * aspect).sqrt().clamp(max=1.0)  # as fractions of the image's width and height
    height = (area / aspect).sqrt().clamp(max=1.0)
    left = torch.rand(n, generator=generator) * (1 - width)
    top = torch.rand(n, generator=generator) * (1 - height)
    flip = torch.rand(n, generator=generator) < 0.5
    # affine_grid maps each output position in [-1, 1] to an input position: the crop's half-size times it,
    # plus the crop's centre (2 * left + width - 1 in the same units); a negative x scale mirrors the crop.
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = torch.where(flip, -width, width)
    theta[:, 0, 2] = 2 * left + width - 1
    theta[:, 1, 1] = height
    theta[:, 1, 2] = 2 * top + height - 1
    grid = F.affine_grid(theta.to(images.device, images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def augment_while_training(model: "CLIP", seed: int):
    """Make `model` augment every batch its image tower sees while in training mode; returns the hook's handle
    (handle.remove() ends it).

    train_clip normalises each batch and hands it to the image tower, so a pre-hook there sees exactly the
    training batches, one new draw per image and step. Retrieval runs the model in eval mode: test images are
    never augmented. Cropping normalised images equals cropping then normalising (both are per-pixel affine)."""
    import torch

    generator = torch.Generator().manual_seed(augmentation_seed(seed))

    def augment(visual, inputs):
        if not visual.training:
            return None  # the inputs unchanged
        (images, *rest) = inputs
        return (random_resized_crop_and_flip(images, generator), *rest)

    return model.visual.register_forward_pre_hook(augment)


def _load_tokenizer(path: str | Path):
    from .tokenizer import Tokenizer

    try:
        return Tokenizer.from_file(path)
    except FileNotFoundError as exc:
        raise EvaluationError(str(exc)) from None


@dataclass
class Hacker:
    """How the hackers of one family train: from scratch as clip_preset (finetune None) or from a checkpoint."""

    clip_preset: str
    image_size: int
    epochs: int
    batch_size: int
    lr: float
    seed: int  # the first hacker's; the others take seed + 1, ...
    hackers: int
    device: str | None
    tokenizer: Any  # imposed on every hacker, or None: each learns one from the captions it scraped
    tokenizer_vocab: int
    finetune: dict | None
    gallery: int | None
    progress: bool
    augment: bool = True  # random resized crop + flip while training (augment_while_training)

    @property
    def family(self) -> str:
        """What the report calls these hackers: the preset, or FINETUNE_FAMILY for the fine-tuned ones."""
        return FINETUNE_FAMILY if self.finetune is not None else self.clip_preset


def _train_and_measure(train_set: TrainingSet, test_images: dict[int, np.ndarray], test_captions: list[str],
                       hacker: Hacker, seed: int) -> dict:
    """Train one hacker on `train_set` and measure retrieval on the clean test split."""
    from .clip import CLIP
    from .retrieval import evaluate_retrieval, train_clip
    from .tokenizer import Tokenizer

    captions = [p.caption for p in train_set.pairs]
    # The hacker's tokenizer is learned from the captions it scraped, unless one is imposed
    # (fine-tuning must use the checkpoint's own vocabulary).
    tok = hacker.tokenizer if hacker.tokenizer is not None else Tokenizer.train(captions, hacker.tokenizer_vocab)
    if hacker.finetune is not None:
        model = CLIP(hacker.finetune["config"])
        model.load_state_dict(hacker.finetune["state"])
    else:
        # A real hacker's CLIP (77 tokens) fits a caption and its trigger whole; a small preset's context
        # must not cut the protected captions' ends, or the trigger would take content away from the hacker.
        longest = max(len(tok.encode(c)) for c in captions) + 2  # + start and end of text
        model = new_hacker(hacker.clip_preset, hacker.image_size, tok.vocab_size, seed, context_length=longest)
    resolution = model.image_resolution
    images = load_images(train_set.pairs, resolution, progress=False)
    if resolution not in test_images:
        raise EvaluationError(f"no test images at {resolution} px")  # prepared by the caller
    augmenting = augment_while_training(model, seed) if hacker.augment else None
    start, cpu = time.monotonic(), time.process_time()
    try:
        train_clip(model, images, captions, tok, epochs=hacker.epochs, batch_size=hacker.batch_size, lr=hacker.lr,
                   device=hacker.device, seed=seed, progress=hacker.progress)
    finally:
        if augmenting is not None:
            augmenting.remove()
    seconds, cpu_seconds = time.monotonic() - start, time.process_time() - cpu
    retrieval = evaluate_retrieval(model, test_images[resolution], test_captions, tok, device=hacker.device,
                                   gallery=hacker.gallery)
    return {"retrieval": retrieval, "train_seconds": seconds, "train_cpu_seconds": cpu_seconds,
            "tokenizer_vocab": tok.vocab_size, "image_size": resolution, "context_length": model.context_length}


def _x_chance(retrieval: dict) -> dict:
    chance = retrieval["chance_r1"]
    return {
        "i2t_r1_x_chance": retrieval["i2t_r1"] / chance,
        "t2i_r1_x_chance": retrieval["t2i_r1"] / chance,
        "r1_x_chance": retrieval["mean_r1"] / chance,
    }


def _check_name(name: str) -> None:
    if not _NAME_RE.fullmatch(name) or name in _RESERVED or "+" in name:
        raise EvaluationError(
            f"protected set name {name!r}: use letters, digits, '.', '_' or '-', and not 'clean' or 'random'"
        )


def evaluate_protection(
    clean_root: str | Path,
    train_manifest: str,
    test_manifest: str,
    protected: dict[str, str | Path] | None = None,
    *,
    out_dir: str | Path,
    conditions: Sequence[str] | None = None,
    robustness: Sequence[str] = ROBUSTNESS_TRANSFORMS,
    clip_preset: str | Sequence[str] = DEFAULT_CLIP,
    image_size: int = 32,
    epochs: int = 10,
    batch_size: int = HACKER_BATCH_SIZE,
    lr: float = HACKER_LR,
    seed: int = 0,
    hackers: int = 1,
    device: str | None = None,
    epsilon: float | None = None,
    tokenizer: str | Path | None = None,
    tokenizer_vocab: int = HACKER_TOKENIZER_VOCAB,
    finetune_checkpoint: str | Path | None = None,
    finetune_lr: float = 1e-5,
    finetune_epochs: int | None = None,
    scratch: bool = True,
    examples: int = 3,
    progress: bool = True,
    gallery: int | None = None,
    augment: bool = True,
    protocol: str = "whole",
) -> dict:
    """Train from-scratch hacker CLIPs on each condition and report clean-test retrieval and retention.

    conditions: which of "clean", "random" and the protected names to train on (default: all);
    robustness: transforms applied to each selected protected set, each its own extra condition.
    clip_preset: the hacker families, "rn_tiny,vit_tiny,cnn_words" or a list of preset names; every condition is
    trained by each, one row per (condition, family), the rows named "<condition> (<family>)" when there
    are several.
    With finetune_checkpoint (an OpenAI-format CLIP state dict) every condition is also fine-tuned
    from it, at finetune_lr for finetune_epochs (default: epochs), which needs `tokenizer` (the
    checkpoint's vocabulary: CLIP's bpe_simple_vocab_16e6.txt.gz or an aigis-bpe JSON file); the
    checkpoint's own retrieval, before any fine-tuning, is reported beside them (what the hacker starts
    from), and scratch=False trains the fine-tuned hackers only.
    hackers > 1 trains that many hackers per condition and family (seeds seed, seed + 1, ...): one hacker's
    R@1 on a small test split moves by a few hits, so the row reports the median run and lists every run's.
    augment: train every hacker with a random resized crop and a horizontal flip (augment_while_training).
    gallery: rank within consecutive galleries of that many test pairs (retrieval.evaluate_retrieval), so that
    a test split of several galleries gives near-chance figures more hits to count; None: the whole split.
    protocol "5x1k": COCO's 5 folds of 1000 pairs (the first 5000 of the test split), averaged; it sets the
    galleries itself, so it refuses `gallery`, and refuses a test split of fewer than 5000 pairs.
    Returns the report (also written as out_dir/report.json, report.md and examples.png); its "retention"
    holds every hacker's text->image R@1 retention against clean and their median and range.
    """
    t_start = time.monotonic()
    clean_root, out_dir = Path(clean_root), Path(out_dir)
    protected = dict(protected or {})
    families = hacker_families(clip_preset)
    selected = _check_arguments(clean_root, protected, conditions, robustness, families, image_size, epochs,
                                batch_size, hackers, scratch, finetune_checkpoint, tokenizer)

    def say(message: str) -> None:
        if progress:
            log.info(message)

    clean_pairs, test_pairs, n_test_available, gallery = _read_splits(clean_root, train_manifest, test_manifest,
                                                                       gallery, protocol)
    # Read and check every protected set before any training: a bad one fails in seconds.
    protected_sets = {name: read_protected_set(path, clean_pairs, name) for name, path in protected.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    levels = epsilon_levels(epsilon if epsilon is not None else _epsilon_of(protected_sets.values()))
    train_sets = _training_sets(clean_root / train_manifest, clean_pairs, protected_sets, selected, robustness,
                                out_dir / "sets", levels, seed, say)
    # How much each set changed the images: measured on the files as written.
    image_stats = {s.name: compare_to_clean(clean_pairs, s.pairs) for s in train_sets if s.kind != "clean"}

    tok = _load_tokenizer(tokenizer) if tokenizer is not None else None
    finetune = _finetune_start(finetune_checkpoint, tok) if finetune_checkpoint is not None else None
    resolutions = {image_size} | ({finetune["model"].image_resolution} if finetune else set())
    test_images = {r: load_images(test_pairs, r, progress=False) for r in sorted(resolutions)}
    test_captions = [p.caption for p in test_pairs]
    checkpoint_retrieval = None
    if finetune is not None:
        checkpoint_retrieval = _checkpoint_retrieval(finetune["model"], test_images, test_captions, tok, device,
                                                     gallery)
        say(f"the checkpoint as given (before fine-tuning): {checkpoint_retrieval['r1_x_chance']:.1f}x chance R@1")

    scratch_hackers = [
        Hacker(clip_preset=family, image_size=image_size, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
               hackers=hackers, device=device, tokenizer=tok, tokenizer_vocab=tokenizer_vocab, finetune=None,
               gallery=gallery, progress=progress, augment=augment)
        for family in families
    ]
    runs = [(s, hacker) for hacker in scratch_hackers for s in train_sets] if scratch else []
    if finetune is not None:
        tuned = replace(scratch_hackers[0], epochs=finetune_epochs or epochs, lr=finetune_lr, finetune=finetune)
        runs += [(s, tuned) for s in train_sets]
    rows = []
    for index, (train_set, hacker) in enumerate(runs, start=1):
        name = _row_name(train_set.name, hacker, several_families=scratch and len(families) > 1)
        rows.append(_condition_row(train_set, hacker, name, test_images, test_captions, image_stats,
                                   f"[{index}/{len(runs)}]", say))

    report = {
        "settings": {
            "clip_preset": ",".join(families), "clip_presets": families, "image_size": image_size, "epochs": epochs,
            "batch_size": batch_size, "lr": lr, "seed": seed, "hackers": hackers, "device": device or "auto",
            "augment": augment, "augmentation": AUGMENTATION if augment else None, "epsilon_levels": levels,
            "tokenizer": str(tokenizer) if tokenizer else f"trained per condition on its captions (<= {tokenizer_vocab})",
            "finetune_checkpoint": str(finetune_checkpoint) if finetune_checkpoint else None,
            "finetune_lr": finetune_lr if finetune_checkpoint else None,
            "finetune_epochs": (finetune_epochs or epochs) if finetune_checkpoint else None,
            "scratch": scratch, "n_train": len(clean_pairs), "n_test": len(test_pairs),
            "n_test_available": n_test_available, "protocol": protocol, "gallery": gallery or len(test_pairs),
            "robustness": list(robustness),
        },
        "data": {"root": str(clean_root), "train_manifest": train_manifest, "test_manifest": test_manifest},
        "chance": {f"r{k}": rows[0]["retrieval"][f"chance_r{k}"] for k in (1, 5, 10)} if rows else {},
        "conditions": rows,
        "finetune_checkpoint_retrieval": checkpoint_retrieval,
    }
    report["retention"] = retention(rows)
    report["summary"] = summary(rows, report["retention"])
    report["seconds_total"] = time.monotonic() - t_start
    return _write_report(report, out_dir, clean_pairs, train_sets, examples)


def _check_arguments(clean_root: Path, protected: dict, conditions: Sequence[str] | None, robustness: Sequence[str],
                     families: list[str], image_size: int, epochs: int, batch_size: int, hackers: int, scratch: bool,
                     finetune_checkpoint: str | Path | None, tokenizer: str | Path | None) -> list[str]:
    """Refuse arguments the evaluation cannot use before any work; returns the selected conditions."""
    if not clean_root.is_dir():
        raise EvaluationError(f"data root {clean_root} is not a directory")
    for name in protected:
        _check_name(name)
    known = ["clean", "random", *protected]
    selected = list(known if conditions is None else conditions)
    unknown = [c for c in selected if c not in known]
    if unknown:
        raise EvaluationError(f"unknown conditions {unknown}; known: {known}")
    for transform in robustness:
        if transform not in ROBUSTNESS_TRANSFORMS:
            raise EvaluationError(f"unknown robustness transform {transform!r}; known: {', '.join(ROBUSTNESS_TRANSFORMS)}")
    if not scratch and finetune_checkpoint is None:
        raise EvaluationError("scratch=False leaves no hacker to train without a fine-tune checkpoint")
    if finetune_checkpoint is not None and tokenizer is None:
        raise EvaluationError(
            "fine-tuning needs the checkpoint's tokenizer (--tokenizer: CLIP's bpe_simple_vocab_16e6.txt.gz "
            "or an aigis-bpe JSON file)"
        )
    from .clip import PRESETS

    if epochs < 1 or batch_size < 2 or hackers < 1:
        raise EvaluationError(f"need epochs >= 1, batch >= 2 and hackers >= 1, got {epochs}, {batch_size} and {hackers}")
    for family in families:
        try:
            replace(PRESETS[family], image_resolution=image_size).validate()
        except ValueError as exc:
            raise EvaluationError(f"image size {image_size} with preset {family}: {exc}") from None
    return selected


def _read_splits(clean_root: Path, train_manifest: str, test_manifest: str, gallery: int | None,
                 protocol: str) -> tuple[list[Pair], list[Pair], int, int | None]:
    """The training and test pairs, the test split's size as read, and the gallery to rank within: the test
    pairs are the first 5000 and the gallery 1000 under protocol "5x1k"."""
    from .retrieval import gallery_size

    if protocol not in PROTOCOLS:
        raise EvaluationError(f"unknown retrieval protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
    if protocol == "5x1k" and gallery is not None:
        raise EvaluationError(f"protocol 5x1k ranks within galleries of {FOLD_SIZE} itself; leave the gallery "
                              f"({gallery}) unset")
    try:
        clean_pairs = read_pairs(clean_root, train_manifest)
        test_pairs = read_pairs(clean_root, test_manifest)
    except PairsManifestError as exc:
        raise EvaluationError(str(exc)) from exc
    n_test_available = len(test_pairs)
    if protocol == "5x1k":
        if n_test_available < FOLDS * FOLD_SIZE:
            raise EvaluationError(
                f"protocol 5x1k needs a test split of at least {FOLDS * FOLD_SIZE} pairs ({FOLDS} folds of "
                f"{FOLD_SIZE}), but {test_manifest} has {n_test_available}; use the default protocol (whole) instead"
            )
        test_pairs, gallery = test_pairs[:FOLDS * FOLD_SIZE], FOLD_SIZE
    try:
        gallery_size(len(test_pairs), gallery)
    except ValueError as exc:
        raise EvaluationError(str(exc)) from None
    return clean_pairs, test_pairs, n_test_available, gallery


def _training_sets(clean_manifest: Path, clean_pairs: list[Pair], protected_sets: dict[str, TrainingSet],
                   selected: list[str], robustness: Sequence[str], sets_dir: Path, levels: int, seed: int,
                   say: Callable[[str], None]) -> list[TrainingSet]:
    """Every selected condition as files: clean (and re-encoded, as the control of the protected sets'
    re-encodings), random noise, each protected set and its re-encodings."""
    train_sets: list[TrainingSet] = []
    if "clean" in selected:
        clean_set = TrainingSet("clean", "clean", clean_manifest.parent, clean_pairs, source=str(clean_manifest))
        train_sets.append(clean_set)
        # The same re-encodings of the clean data: what a transform costs clean training is not protection.
        if any(name in selected for name in protected_sets):
            for transform in robustness:
                say(f"re-encoding the clean set as {transform} (control)")
                train_sets.append(write_transformed_set(clean_set, transform, sets_dir / f"clean+{transform}"))
    if "random" in selected:
        say(f"writing the random-noise control (+-{levels}/255) to {sets_dir / 'random'}")
        train_sets.append(write_random_set(clean_pairs, sets_dir / "random", levels, seed))
    for name, pset in protected_sets.items():
        if name not in selected:
            continue
        train_sets.append(pset)
        for transform in robustness:
            say(f"re-encoding {name!r} as {transform}")
            train_sets.append(write_transformed_set(pset, transform, sets_dir / f"{name}+{transform}"))
    return train_sets


def _finetune_start(checkpoint: str | Path, tok) -> dict:
    """The fine-tuned hackers' starting point: the checkpoint's config and a copy of its weights."""
    from .clip import load_openai_state_dict

    try:
        loaded = load_openai_state_dict(checkpoint)
    except (FileNotFoundError, ValueError) as exc:
        raise EvaluationError(f"fine-tune checkpoint: {exc}") from exc
    if tok.vocab_size > loaded.vocab_size:
        raise EvaluationError(f"tokenizer has {tok.vocab_size} tokens but the checkpoint's table only {loaded.vocab_size}")
    return {"config": loaded.config, "state": {k: v.clone() for k, v in loaded.state_dict().items()}, "model": loaded}


def _checkpoint_retrieval(model, test_images: dict[int, np.ndarray], test_captions: list[str], tok, device,
                          gallery: int | None) -> dict:
    """What the fine-tuned hackers start from: the checkpoint's own retrieval on the clean test split."""
    from .retrieval import evaluate_retrieval

    retrieval = evaluate_retrieval(model, test_images[model.image_resolution], test_captions, tok, device=device,
                                   gallery=gallery)
    retrieval.update(_x_chance(retrieval))
    return retrieval


def _row_name(set_name: str, hacker: Hacker, several_families: bool) -> str:
    """A row's name: the condition, with "(fine-tune)" or, when several families train from scratch, the family."""
    if hacker.finetune is not None:
        return f"{set_name} (fine-tune)"
    return f"{set_name} ({hacker.clip_preset})" if several_families else set_name


def _condition_row(train_set: TrainingSet, hacker: Hacker, label: str, test_images: dict[int, np.ndarray],
                   test_captions: list[str], image_stats: dict, step: str, say: Callable[[str], None]) -> dict:
    """Train hacker.hackers hackers of one family on one condition and report the median run, and every run's
    seed and R@1 under "runs"."""
    mode = "fine-tune" if hacker.finetune is not None else "scratch"
    say(f"{step} hacker CLIP {hacker.family} on {label!r}: {len(train_set.pairs)} pairs, {hacker.epochs} epochs, "
        f"batch {hacker.batch_size}" + (f", {hacker.hackers} seeds" if hacker.hackers > 1 else ""))
    seeds = [hacker.seed + h for h in range(hacker.hackers)]
    results = [_train_and_measure(train_set, test_images, test_captions, hacker, seed) for seed in seeds]
    per_run = [_x_chance(res["retrieval"])["r1_x_chance"] for res in results]
    result = results[int(np.argsort(per_run, kind="stable")[(len(per_run) - 1) // 2])]  # the median run
    r = result["retrieval"]
    runs = [{"seed": seed, **{k: res["retrieval"][k] for k in ("i2t_r1", "t2i_r1", "mean_r1")}, "r1_x_chance": x}
            for seed, res, x in zip(seeds, results, per_run)]
    row = {
        "name": label, "set": train_set.name, "kind": train_set.kind, "training": mode, "family": hacker.family,
        "source": train_set.source, "n_train": len(train_set.pairs), "meta": train_set.meta,
        **image_stats.get(train_set.name, {"psnr_db": None, "psnr_min_db": None, "linf_255": 0}),
        **result, **_x_chance(r), "r1_x_chance_runs": per_run, "runs": runs,
        "train_seconds": sum(res["train_seconds"] for res in results),
        "train_cpu_seconds": sum(res["train_cpu_seconds"] for res in results),
    }
    say(f"{step} {label}: i2t R@1 {r['i2t_r1']:.1%}, t2i R@1 {r['t2i_r1']:.1%} "
        f"({row['r1_x_chance']:.1f}x chance {r['chance_r1']:.2%}"
        + (f"; runs {', '.join(f'{x:.1f}' for x in per_run)}" if hacker.hackers > 1 else "")
        + f") after {row['train_seconds']:.1f}s training "
        f"({len(train_set.pairs) * hacker.epochs * hacker.hackers / max(row['train_seconds'], 1e-9):.0f} pairs/s)")
    return row


def _write_report(report: dict, out_dir: Path, clean_pairs: list[Pair], train_sets: list[TrainingSet],
                  examples: int) -> dict:
    """report.md, report.json and examples.png in out_dir; the report with their paths."""
    (out_dir / "report.md").write_text(markdown_table(report), encoding="utf-8")
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=json_default) + "\n", encoding="utf-8")
    sheet_sets = [s for s in train_sets if s.kind == "protected"] or [s for s in train_sets if s.kind == "random"]
    if sheet_sets and examples > 0:
        example_sheet(clean_pairs, sheet_sets[:2], out_dir / "examples.png", examples=examples)
        report["examples_png"] = str(out_dir / "examples.png")
    report["report_md"], report["report_json"] = str(out_dir / "report.md"), str(out_dir / "report.json")
    return report


def _epsilon_of(sets) -> float:
    """The protection's epsilon (from the first protection.json that states one), else 8/255."""
    for s in sets:
        value = s.meta.get("epsilon")
        if isinstance(value, (int, float)) and value > 0:
            return float(value)
    return DEFAULT_EPSILON
