"""Does the protection work? Train "hacker" CLIPs on each version of the data and compare retrieval.

The threat model of MEM: whoever scrapes the published pairs trains a CLIP on them (from scratch,
or by fine-tuning a pretrained one) and is then measured on CLEAN test pairs. Protection works when
the model trained on protected pairs retrieves about as well as random guessing, while the same
training on the clean pairs retrieves far above it. Every training condition here is read back from
image files -- the clean data, a random-noise control of the same epsilon (written here as PNG),
each protected set as published, and each protected set after JPEG-75 or grayscale re-encoding (the
cheap defences known to weaken unlearnable examples) -- and trained with the same seed, steps and
initialisation, so the only difference between rows is the data.

Outputs in the output folder: report.json, report.md (the table), examples.png (original, noise
amplified around grey, protected, with captions) and sets/ (the random and re-encoded sets).
"""

from __future__ import annotations

import json
import math
import re
import logging
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from aigis.errors import ProtectionError
from aigis.preprocess import load_image

from .captions import Pair, PairsManifestError, load_images, read_pairs

log = logging.getLogger(__name__)

# The transforms a hacker could apply to every scraped image before training.
ROBUSTNESS_TRANSFORMS = ("jpeg75", "gray")
DEFAULT_EPSILON = 8 / 255
PROTECTED_MANIFEST = "manifest.jsonl"
PROTECTION_META = "protection.json"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_RESERVED = {"clean", "random"}


class EvaluationError(ProtectionError):
    """Inputs the evaluation cannot use; the message names what was wrong."""


@dataclass
class TrainingSet:
    """One training condition: the pairs as files, and how they relate to the clean originals."""

    name: str
    kind: str  # clean | random | protected | jpeg75 | gray
    root: Path
    pairs: list[Pair]
    meta: dict = field(default_factory=dict)
    source: str = ""


# ----------------------------------------------------------------------------------------------
# Measurements on images


def psnr(reference: np.ndarray, test: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of uint8 `test` against uint8 `reference` (inf if identical)."""
    if reference.shape != test.shape:
        raise ValueError(f"PSNR needs equal shapes, got {reference.shape} and {test.shape}")
    mse = float(np.mean((reference.astype(np.float64) - test.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def _native_images(pairs: list[Pair]) -> list[np.ndarray]:
    return [load_image(p.path) for p in pairs]


def compare_to_clean(clean_pairs: list[Pair], pairs: list[Pair]) -> dict:
    """Mean and minimum per-image PSNR, and the largest per-pixel change (in uint8 levels), of a set
    against the clean originals, at the set's own resolution (the originals are fitted to it if their
    sizes differ, as a hacker's loader would)."""
    changed = _native_images(pairs)
    originals = _native_images(clean_pairs)
    values, linf = [], 0
    for i, (orig, img) in enumerate(zip(originals, changed)):
        if orig.shape != img.shape:
            if img.shape[0] != img.shape[1]:
                raise EvaluationError(
                    f"{pairs[i].path}: {img.shape[1]}x{img.shape[0]} differs from the original "
                    f"{orig.shape[1]}x{orig.shape[0]} and is not square, so it cannot be compared"
                )
            orig = load_images([clean_pairs[i]], img.shape[0], progress=False)[0]
        values.append(psnr(orig, img))
        linf = max(linf, int(np.abs(orig.astype(np.int16) - img.astype(np.int16)).max()))
    finite = [v for v in values if math.isfinite(v)]
    return {
        "psnr_db": float(np.mean(finite)) if finite else math.inf,
        "psnr_min_db": float(min(values)) if values else math.inf,
        "linf_255": linf,
    }


# ----------------------------------------------------------------------------------------------
# Reading and writing training sets


def _stems(pairs: list[Pair]) -> list[str]:
    return [p.path.stem for p in pairs]


def read_protected_set(directory: str | Path, clean_pairs: list[Pair], name: str) -> TrainingSet:
    """A protected folder (manifest.jsonl, images/, protection.json), checked against the clean
    training manifest: same number of pairs, same image stems in the same order."""
    directory = Path(directory)
    if not directory.is_dir():
        raise EvaluationError(f"protected set {name!r}: {directory} is not a directory")
    if not (directory / PROTECTED_MANIFEST).is_file():
        raise EvaluationError(f"protected set {name!r}: {directory / PROTECTED_MANIFEST} not found")
    try:
        pairs = read_pairs(directory, PROTECTED_MANIFEST)
    except PairsManifestError as exc:
        raise EvaluationError(f"protected set {name!r}: {exc}") from exc
    if len(pairs) != len(clean_pairs):
        raise EvaluationError(
            f"protected set {name!r} has {len(pairs)} pairs but the clean training manifest has "
            f"{len(clean_pairs)}: it was not made from this training split"
        )
    for i, (clean, protected) in enumerate(zip(_stems(clean_pairs), _stems(pairs))):
        if clean != protected:
            raise EvaluationError(
                f"protected set {name!r}: pair {i + 1} is image {protected!r} but the clean training manifest "
                f"has {clean!r} there; the order must match the manifest the set was made from"
            )
    meta: dict = {}
    meta_path = directory / PROTECTION_META
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise EvaluationError(f"{meta_path}: not valid JSON ({exc.msg})") from None
        if not isinstance(meta, dict):
            raise EvaluationError(f"{meta_path}: expected a JSON object")
    kind = "protected"
    return TrainingSet(name, kind, directory, pairs, meta, source=str(directory))


def _write_set(out_dir: Path, stems: list[str], images: list[np.ndarray], captions: list[str], meta: dict, fmt: str) -> None:
    """Write images/<stem>.<png|jpg>, manifest.jsonl and protection.json in the protected-set layout."""
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for stem, image, caption in zip(stems, images, captions):
        if fmt == "jpeg75":
            relative = f"images/{stem}.jpg"
            Image.fromarray(image).save(out_dir / relative, format="JPEG", quality=75)
        else:
            relative = f"images/{stem}.png"
            Image.fromarray(image).save(out_dir / relative, format="PNG")
        lines.append(json.dumps({"image": relative, "caption": caption}))
    (out_dir / PROTECTED_MANIFEST).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    (out_dir / PROTECTION_META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def epsilon_levels(epsilon: float) -> int:
    """An epsilon in image units (8/255) or in uint8 levels (8) -> uint8 levels."""
    if epsilon <= 0:
        raise EvaluationError(f"epsilon must be positive, got {epsilon}")
    levels = int(round(epsilon * 255)) if epsilon <= 1 else int(round(epsilon))
    if not 1 <= levels <= 255:
        raise EvaluationError(f"epsilon {epsilon} is {levels} uint8 levels; need 1..255")
    return levels


def write_random_set(clean_pairs: list[Pair], out_dir: str | Path, levels: int, seed: int) -> TrainingSet:
    """The control: uniform integer noise in [-levels, levels] on the clean images (native size),
    clipped to [0, 255] and written as PNG -- the same budget as the protection, with no structure."""
    out_dir = Path(out_dir)
    rng = np.random.default_rng([seed, 8_675_309])
    noisy: dict[Path, np.ndarray] = {}  # one noise per image, however many captions name it (as the job does)
    for pair in clean_pairs:
        if pair.path not in noisy:
            image = load_image(pair.path)
            noise = rng.integers(-levels, levels + 1, size=image.shape, dtype=np.int16)
            noisy[pair.path] = np.clip(image.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    images = [noisy[pair.path] for pair in clean_pairs]
    meta = {"mode": "random", "epsilon": levels / 255, "epsilon_levels": levels, "seed": seed}
    _write_set(out_dir, _stems(clean_pairs), images, [p.caption for p in clean_pairs], meta, "png")
    return TrainingSet("random", "random", out_dir, read_pairs(out_dir, PROTECTED_MANIFEST), meta, source="uniform noise")


def transform_image(image: np.ndarray, transform: str) -> np.ndarray:
    """What a transform does to one uint8 RGB image before it is written (JPEG loss happens on write)."""
    if transform == "gray":
        return np.asarray(Image.fromarray(image).convert("L").convert("RGB"))
    if transform == "jpeg75":
        return image
    raise EvaluationError(f"unknown robustness transform {transform!r}; known: {', '.join(ROBUSTNESS_TRANSFORMS)}")


def write_transformed_set(source: TrainingSet, transform: str, out_dir: str | Path) -> TrainingSet:
    """The protected set re-encoded as a hacker might: JPEG quality 75, or grayscale (L, back to RGB,
    PNG). Captions (with their triggers) are kept; the result is read back from the files."""
    out_dir = Path(out_dir)
    images = [transform_image(img, transform) for img in _native_images(source.pairs)]
    meta = {"mode": transform, "of": source.name, "source_meta": source.meta}
    _write_set(out_dir, _stems(source.pairs), images, [p.caption for p in source.pairs], meta, transform)
    pairs = read_pairs(out_dir, PROTECTED_MANIFEST)
    return TrainingSet(f"{source.name}+{transform}", transform, out_dir, pairs, meta, source=source.name)


# ----------------------------------------------------------------------------------------------
# Training the hackers

# The from-scratch hacker's defaults (benchmarks follow the same hacker from here).
HACKER_BATCH_SIZE = 50
HACKER_LR = 1e-3
HACKER_TOKENIZER_VOCAB = 1024


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
    from dataclasses import replace

    from .clip import PRESETS, build_clip

    preset = PRESETS[clip_preset]
    config = replace(preset, image_resolution=image_size, context_length=max(preset.context_length, context_length))
    torch.manual_seed(hacker_init_seed(seed))
    return build_clip(config, vocab_size=vocab_size)


def _load_tokenizer(path: str | Path):
    from .tokenizer import Tokenizer

    try:
        return Tokenizer.from_file(path)
    except FileNotFoundError as exc:
        raise EvaluationError(str(exc)) from None


def _train_and_measure(
    train_set: TrainingSet,
    test_images: dict[int, np.ndarray],
    test_captions: list[str],
    *,
    finetune: dict | None,
    tokenizer,
    tokenizer_vocab: int,
    clip_preset: str,
    image_size: int,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    device,
    progress: bool,
    gallery: int | None = None,
) -> dict:
    """Train one hacker on `train_set` and measure retrieval on the clean test split."""
    from .clip import CLIP
    from .retrieval import evaluate_retrieval, train_clip
    from .tokenizer import Tokenizer

    captions = [p.caption for p in train_set.pairs]
    # The hacker's tokenizer is learned from the captions it scraped, unless one is imposed
    # (fine-tuning must use the checkpoint's own vocabulary).
    tok = tokenizer if tokenizer is not None else Tokenizer.train(captions, vocab_size=tokenizer_vocab)
    if finetune is not None:
        model = CLIP(finetune["config"])
        model.load_state_dict(finetune["state"])
    else:
        # A real hacker's CLIP (77 tokens) fits a caption and its trigger whole; a small preset's context
        # must not cut the protected captions' ends, or the trigger would take content away from the hacker.
        longest = max(len(tok.encode(c)) for c in captions) + 2  # + start and end of text
        model = new_hacker(clip_preset, image_size, tok.vocab_size, seed, context_length=longest)
    resolution = model.image_resolution
    images = load_images(train_set.pairs, resolution, progress=False)
    if resolution not in test_images:
        raise EvaluationError(f"no test images at {resolution} px")  # prepared by the caller
    start, cpu = time.monotonic(), time.process_time()
    train_clip(model, images, captions, tok, epochs=epochs, batch_size=batch_size, lr=lr,
               device=device, seed=seed, progress=progress)
    seconds, cpu_seconds = time.monotonic() - start, time.process_time() - cpu
    retrieval = evaluate_retrieval(model, test_images[resolution], test_captions, tok, device=device, gallery=gallery)
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
    clip_preset: str = "rn_tiny",
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
) -> dict:
    """Train a from-scratch hacker CLIP on each condition and report clean-test retrieval.

    conditions: which of "clean", "random" and the protected names to train on (default: all);
    robustness: transforms applied to each selected protected set, each its own extra condition.
    With finetune_checkpoint (an OpenAI-format CLIP state dict) every condition is also fine-tuned
    from it, at finetune_lr for finetune_epochs (default: epochs), which needs `tokenizer` (the
    checkpoint's vocabulary: CLIP's bpe_simple_vocab_16e6.txt.gz or an aigis-bpe JSON file); the
    checkpoint's own retrieval, before any fine-tuning, is reported beside them (what the hacker starts
    from), and scratch=False trains the fine-tuned hackers only.
    hackers > 1 trains that many hackers per condition (seeds seed, seed + 1, ...): one hacker's R@1 on
    a small test split moves by a few hits, so the row reports the median run and lists every run's.
    gallery: rank within consecutive galleries of that many test pairs (retrieval.evaluate_retrieval), so that
    a test split of several galleries gives near-chance figures more hits to count; None: the whole split.
    Returns the report (also written as out_dir/report.json, report.md and examples.png).
    """
    t_start = time.monotonic()
    clean_root, out_dir = Path(clean_root), Path(out_dir)
    protected = dict(protected or {})
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

    if clip_preset not in PRESETS:
        raise EvaluationError(f"unknown CLIP preset {clip_preset!r}; known: {', '.join(PRESETS)}")
    if epochs < 1 or batch_size < 2 or hackers < 1:
        raise EvaluationError(f"need epochs >= 1, batch >= 2 and hackers >= 1, got {epochs}, {batch_size} and {hackers}")
    from dataclasses import replace

    try:
        replace(PRESETS[clip_preset], image_resolution=image_size).validate()
    except ValueError as exc:
        raise EvaluationError(f"image size {image_size} with preset {clip_preset}: {exc}") from None

    def say(message: str) -> None:
        if progress:
            log.info(message)

    try:
        clean_pairs = read_pairs(clean_root, train_manifest)
        test_pairs = read_pairs(clean_root, test_manifest)
    except PairsManifestError as exc:
        raise EvaluationError(str(exc)) from exc
    from .retrieval import gallery_size

    try:
        gallery_size(len(test_pairs), gallery)
    except ValueError as exc:
        raise EvaluationError(str(exc)) from None
    # Read and check every protected set before any training: a bad one fails in seconds.
    protected_sets = {name: read_protected_set(path, clean_pairs, name) for name, path in protected.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    sets_dir = out_dir / "sets"

    levels = epsilon_levels(epsilon if epsilon is not None else _epsilon_of(protected_sets.values()))
    train_sets: list[TrainingSet] = []
    if "clean" in selected:
        clean_set = TrainingSet("clean", "clean", clean_root, clean_pairs, source=str(clean_root / train_manifest))
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

    # How much each set changed the images: measured on the files as written.
    image_stats = {s.name: compare_to_clean(clean_pairs, s.pairs) for s in train_sets if s.kind != "clean"}

    finetune = None
    tok = _load_tokenizer(tokenizer) if tokenizer is not None else None
    resolutions = {image_size}
    if finetune_checkpoint is not None:
        from .clip import load_openai_state_dict

        try:
            loaded = load_openai_state_dict(finetune_checkpoint)
        except (FileNotFoundError, ValueError) as exc:
            raise EvaluationError(f"fine-tune checkpoint: {exc}") from exc
        if tok.vocab_size > loaded.vocab_size:
            raise EvaluationError(
                f"tokenizer has {tok.vocab_size} tokens but the checkpoint's table only {loaded.vocab_size}"
            )
        finetune = {"config": loaded.config, "state": {k: v.clone() for k, v in loaded.state_dict().items()}}
        resolutions.add(loaded.image_resolution)
    test_images = {r: load_images(test_pairs, r, progress=False) for r in sorted(resolutions)}
    test_captions = [p.caption for p in test_pairs]

    runs = [(s, None) for s in train_sets] if scratch else []
    checkpoint_retrieval = None
    if finetune is not None:
        runs += [(s, finetune) for s in train_sets]
        from .retrieval import evaluate_retrieval

        checkpoint_retrieval = evaluate_retrieval(loaded, test_images[loaded.image_resolution], test_captions, tok,
                                                  device=device, gallery=gallery)
        checkpoint_retrieval.update(_x_chance(checkpoint_retrieval))
        say(f"the checkpoint as given (before fine-tuning): {checkpoint_retrieval['r1_x_chance']:.1f}x chance R@1")
    rows = []
    for index, (train_set, ft) in enumerate(runs, start=1):
        mode = "fine-tune" if ft is not None else "scratch"
        label = train_set.name if ft is None else f"{train_set.name} (fine-tune)"
        run_epochs = epochs if ft is None else (finetune_epochs or epochs)
        say(f"[{index}/{len(runs)}] hacker CLIP ({mode}) on {label!r}: {len(train_set.pairs)} pairs, "
            f"{run_epochs} epochs, batch {batch_size}" + (f", {hackers} seeds" if hackers > 1 else ""))
        results = [
            _train_and_measure(
                train_set, test_images, test_captions, finetune=ft, tokenizer=tok, tokenizer_vocab=tokenizer_vocab,
                clip_preset=clip_preset, image_size=image_size, epochs=run_epochs, batch_size=batch_size,
                lr=lr if ft is None else finetune_lr, seed=seed + h, device=device, progress=progress,
                gallery=gallery,
            )
            for h in range(hackers)
        ]
        per_run = [_x_chance(res["retrieval"])["r1_x_chance"] for res in results]
        result = results[int(np.argsort(per_run, kind="stable")[(len(per_run) - 1) // 2])]  # the median run
        r = result["retrieval"]
        row = {
            "name": label, "set": train_set.name, "kind": train_set.kind, "training": mode,
            "source": train_set.source, "n_train": len(train_set.pairs), "meta": train_set.meta,
            **image_stats.get(train_set.name, {"psnr_db": None, "psnr_min_db": None, "linf_255": 0}),
            **result, **_x_chance(r), "r1_x_chance_runs": per_run,
            "train_seconds": sum(res["train_seconds"] for res in results),
            "train_cpu_seconds": sum(res["train_cpu_seconds"] for res in results),
        }
        rows.append(row)
        say(f"[{index}/{len(runs)}] {label}: i2t R@1 {r['i2t_r1']:.1%}, t2i R@1 {r['t2i_r1']:.1%} "
            f"({row['r1_x_chance']:.1f}x chance {r['chance_r1']:.2%}"
            + (f"; runs {', '.join(f'{x:.1f}' for x in per_run)}" if hackers > 1 else "")
            + f") after {row['train_seconds']:.1f}s training "
            f"({len(train_set.pairs) * run_epochs * hackers / max(row['train_seconds'], 1e-9):.0f} pairs/s)")

    chance = {f"r{k}": rows[0]["retrieval"][f"chance_r{k}"] for k in (1, 5, 10)} if rows else {}
    report = {
        "settings": {
            "clip_preset": clip_preset, "image_size": image_size, "epochs": epochs, "batch_size": batch_size,
            "lr": lr, "seed": seed, "hackers": hackers, "device": device or "auto", "epsilon_levels": levels,
            "tokenizer": str(tokenizer) if tokenizer else f"trained per condition on its captions (<= {tokenizer_vocab})",
            "finetune_checkpoint": str(finetune_checkpoint) if finetune_checkpoint else None,
            "finetune_lr": finetune_lr if finetune_checkpoint else None,
            "finetune_epochs": (finetune_epochs or epochs) if finetune_checkpoint else None,
            "scratch": scratch,
            "n_train": len(clean_pairs), "n_test": len(test_pairs), "gallery": gallery or len(test_pairs),
            "robustness": list(robustness),
        },
        "data": {"root": str(clean_root), "train_manifest": train_manifest, "test_manifest": test_manifest},
        "chance": chance,
        "conditions": rows,
        "finetune_checkpoint_retrieval": checkpoint_retrieval,
    }
    report["summary"] = _summary(rows)
    report["seconds_total"] = time.monotonic() - t_start
    table = markdown_table(report)
    (out_dir / "report.md").write_text(table, encoding="utf-8")
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=_json_default) + "\n", encoding="utf-8")
    sheet_sets = [s for s in train_sets if s.kind == "protected"] or [s for s in train_sets if s.kind == "random"]
    if sheet_sets and examples > 0:
        example_sheet(clean_pairs, sheet_sets[:2], out_dir / "examples.png", examples=examples)
        report["examples_png"] = str(out_dir / "examples.png")
    report["report_md"], report["report_json"] = str(out_dir / "report.md"), str(out_dir / "report.json")
    return report


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _epsilon_of(sets) -> float:
    """The protection's epsilon (from the first protection.json that states one), else 8/255."""
    for s in sets:
        value = s.meta.get("epsilon")
        if isinstance(value, (int, float)) and value > 0:
            return float(value)
    return DEFAULT_EPSILON


def _summary(rows: list[dict]) -> dict:
    """Per condition other than clean and its controls: R@1 relative to the clean row of the same training
    mode (for a re-encoded set, to the clean data re-encoded the same way when that row exists), and
    whether it is under twice chance (the benchmark target for protected data)."""
    reference = {(r["training"], r["set"]): r for r in rows if r["set"] == "clean" or r["set"].startswith("clean+")}
    out = {}
    for r in rows:
        if (r["training"], r["set"]) in reference:
            continue
        transform = r["kind"] if r["kind"] in ROBUSTNESS_TRANSFORMS else None
        ref = reference.get((r["training"], f"clean+{transform}")) if transform else None
        ref = ref or reference.get((r["training"], "clean"))
        out[r["name"]] = {
            "r1_x_chance": r["r1_x_chance"],
            # Recall is a count over the test set, so R@1 x chance is a multiple of 1 / (2 * n) computed in float32:
            # exactly 2x arrives as 1.99999995. Rounded first, 2x stays what it is: on the line, not under it.
            "below_2x_chance": round(r["r1_x_chance"], 4) < 2.0,
            "relative_to": ref["name"] if ref else None,
            "r1_relative_to_clean": (r["retrieval"]["mean_r1"] / ref["retrieval"]["mean_r1"])
            if ref and ref["retrieval"]["mean_r1"] > 0 else None,
        }
    return out


# ----------------------------------------------------------------------------------------------
# Outputs


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def galleries_text(n_test: int, gallery: int | None) -> str:
    """'' for one gallery (the whole split), else how the split was cut."""
    if gallery is None or gallery == n_test:
        return ""
    return f" ranked within {n_test // gallery} galleries of {gallery}"


def markdown_table(report: dict) -> str:
    """Rows = training data condition; Recall@K in %, R@1 as a multiple of chance, PSNR in dB."""
    s = report["settings"]
    hackers = s.get("hackers", 1)
    seeds = f"seed {s['seed']}" if hackers == 1 else (
        f"{hackers} hackers per condition (seeds {s['seed']}..{s['seed'] + hackers - 1}): the median run's recall, "
        f"every run's R@1 x chance in the last column")
    runs_head, runs_rule = (" | runs: R@1 x chance", "|---:") if hackers > 1 else ("", "")
    if s.get("scratch", True):
        hacker = (f"Hacker CLIP {s['clip_preset']} at {s['image_size']} px, {s['epochs']} epochs, batch {s['batch_size']}, "
                  f"lr {s['lr']:g}")
    else:  # fine-tuned hackers only: their architecture and resolution are the checkpoint's
        hacker = (f"Hacker CLIPs fine-tuned from {Path(s['finetune_checkpoint']).name}, {s['finetune_epochs']} epochs, "
                  f"batch {s['batch_size']}, lr {s['finetune_lr']:g}")
    lines = [
        f"{hacker}, {seeds}; {s['n_train']} training pairs, {s['n_test']} clean test pairs"
        f"{galleries_text(s['n_test'], s.get('gallery'))}. Recall in %.",
        "",
        f"| training data | i2t R@1 | i2t R@5 | i2t R@10 | t2i R@1 | t2i R@5 | t2i R@10 | R@1 x chance | PSNR dB{runs_head} |",
        f"|---|---:|---:|---:|---:|---:|---:|---:|---:{runs_rule}|",
    ]
    c = report["chance"]
    if c:
        lines.append(f"| *chance* | {_pct(c['r1'])} | {_pct(c['r5'])} | {_pct(c['r10'])} | {_pct(c['r1'])} | "
                     f"{_pct(c['r5'])} | {_pct(c['r10'])} | 1.0 | |" + (" |" if hackers > 1 else ""))
    for row in report["conditions"]:
        r = row["retrieval"]
        p = row["psnr_db"]
        psnr_text = "" if p is None else ("inf" if not math.isfinite(p) else f"{p:.1f}")
        lines.append(
            f"| {row['name']} | {_pct(r['i2t_r1'])} | {_pct(r['i2t_r5'])} | {_pct(r['i2t_r10'])} | "
            f"{_pct(r['t2i_r1'])} | {_pct(r['t2i_r5'])} | {_pct(r['t2i_r10'])} | {row['r1_x_chance']:.1f} | {psnr_text} |"
            + (f" {', '.join(f'{x:.1f}' for x in row['r1_x_chance_runs'])} |" if hackers > 1 else "")
        )
    lines.append("")
    before = report.get("finetune_checkpoint_retrieval")
    if before:
        lines.append(f"Fine-tuned rows start from {Path(s['finetune_checkpoint']).name} (lr {s['finetune_lr']:g}, "
                     f"{s.get('finetune_epochs') or s['epochs']} epochs), which as given retrieves i2t / t2i R@1 "
                     f"{_pct(before['i2t_r1'])} / {_pct(before['t2i_r1'])} %, R@5 {_pct(before['i2t_r5'])} / "
                     f"{_pct(before['t2i_r5'])} % ({before['r1_x_chance']:.1f}x chance).")
    protected = [(n, v) for n, v in report.get("summary", {}).items() if not n.startswith("random")]
    if protected:
        lines.append("Target for protected data: R@1 under 2x chance. " + "; ".join(
            f"{n}: {v['r1_x_chance']:.1f}x ({'met' if v['below_2x_chance'] else 'not met'}"
            + (f"; {v['r1_relative_to_clean']:.2f} of {v['relative_to']}" if v.get("r1_relative_to_clean") is not None
               else "") + ")"
            for n, v in protected
        ) + ".")
    times = ", ".join(f"{row['name']} {row['train_seconds']:.0f}s" for row in report["conditions"])
    lines.append(f"Training time per condition: {times}.")
    return "\n".join(lines) + "\n"


def example_sheet(clean_pairs: list[Pair], sets: list[TrainingSet], path: str | Path, examples: int = 3) -> Path:
    """A PNG: for a few pairs of each set, the original, the change amplified x10 around grey, and the
    published image, with the captions under them (the protected caption shows its trigger)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(clean_pairs)
    picks = sorted({int(i) for i in np.linspace(0, n - 1, num=min(examples, n))})
    rows = [(s, i) for s in sets for i in picks]
    wrap = 34
    # A row is as tall as its longest wrapped caption needs: long triggers must not run into the next row.
    caption_lines = [max(len(textwrap.wrap(c, wrap)) for c in (clean_pairs[i].caption, s.pairs[i].caption))
                     for s, i in rows]
    heights = [3.2 + 0.13 * lines for lines in caption_lines]
    fig, axes = plt.subplots(len(rows), 3, figsize=(9, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for (train_set, i), ax_row in zip(rows, axes):
        changed = load_image(train_set.pairs[i].path)
        original = load_image(clean_pairs[i].path)
        if original.shape != changed.shape:
            original = load_images([clean_pairs[i]], changed.shape[0], progress=False)[0]
        diff = changed.astype(np.int16) - original.astype(np.int16)
        amplified = np.clip(128 + 10 * diff, 0, 255).astype(np.uint8)
        panels = [
            (original, "original", clean_pairs[i].caption),
            (amplified, "change x10 (grey = none)", f"max |change| {int(np.abs(diff).max())}/255"),
            (changed, f"{train_set.name}", train_set.pairs[i].caption),
        ]
        for ax, (image, title, caption) in zip(ax_row, panels):
            ax.imshow(image, interpolation="nearest")
            ax.set_anchor("N")  # the image at the top of its cell, the row's spare height below for the caption
            ax.set_title(title, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(textwrap.fill(caption, wrap), fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
