"""The training conditions a protection evaluation compares, as files: the clean pairs, a random-noise control of
the same budget, each protected set as published, and each re-encoded as a hacker might (JPEG-75, grayscale);
and how much each changed the images."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from aigis.errors import ProtectionError
from aigis.preprocess import load_image

from .captions import Pair, PairsManifestError, load_images, read_pairs

# The transforms a hacker could apply to every scraped image before training.
ROBUSTNESS_TRANSFORMS = ("jpeg75", "gray")
PROTECTED_MANIFEST = "manifest.jsonl"
PROTECTION_META = "protection.json"


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
