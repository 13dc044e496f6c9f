"""A small, deterministic CDDB-style benchmark built from photos that installed packages ship.

Like CDDB, every task pairs one generator with its own real domain. Real images are crops and rescales of
scikit-image's photos (and its LFW faces); fakes are other crops of the same domain passed through a
generator, so each generator leaves its own fingerprint on familiar content:

* four untrained, fixed-seed conv decoders that differ in their upsampling layer (transposed conv,
  nearest + conv, bilinear + conv, pixel shuffle), as GAN decoders do;
* three processing pipelines (double JPEG compression, aliased resampling, Bayer demosaicing).

Every random choice comes from a generator seeded by (seed, task, split, class, index) and all arithmetic
is float64 rounded once to uint8, so the same seed writes byte-identical files.
"""

from __future__ import annotations

import io
import json
import math
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

FORMAT = "aigis-synth/1"
SPLIT_IDS = {"train": 0, "val": 1}
CLASS_IDS = {"0_real": 0, "1_fake": 1}


@dataclass(frozen=True)
class SynthTask:
    """One task: a generator family and the real domain(s) it imitates (two or more = subcategory folders)."""

    name: str
    family: str
    domains: tuple[str, ...]
    description: str


TASKS: tuple[SynthTask, ...] = (
    SynthTask("tconv", "tconv", ("cat", "coffee"), "untrained decoder, 4x4 stride-2 transposed conv"),
    SynthTask("nearest", "nearest", ("astronaut",), "untrained decoder, nearest upsampling + 3x3 conv"),
    SynthTask("bilinear", "bilinear", ("vehicles",), "untrained decoder, bilinear upsampling + 3x3 conv"),
    SynthTask("pixshuffle", "pixshuffle", ("faces",), "untrained decoder, 3x3 conv + pixel shuffle"),
    SynthTask("jpeg2x", "jpeg2x", ("cells",), "JPEG at low quality, grid shift, JPEG again"),
    SynthTask("resample", "resample", ("textures",), "aliased nearest downscale, bicubic 1.5x upscale"),
    SynthTask("demosaic", "demosaic", ("space", "retina"), "Bayer RGGB sampling, bilinear demosaicing"),
    SynthTask("tconv4x", "tconv4x", ("monochrome",), "untrained decoder, two transposed-conv stages"),
)
DEFAULT_TASK_COUNT = 7
DEFAULT_TASKS: tuple[str, ...] = tuple(t.name for t in TASKS[:DEFAULT_TASK_COUNT])


@dataclass(frozen=True)
class SynthConfig:
    """What `aigis data synth` generates; written to synth.json and compared to decide if a root is current."""

    tasks: int = DEFAULT_TASK_COUNT
    train_per_class: int = 100
    val_per_class: int = 50
    size: int = 72
    seed: int = 0

    def validate(self) -> None:
        if not 1 <= self.tasks <= len(TASKS):
            raise ValueError(f"--tasks must be between 1 and {len(TASKS)}, got {self.tasks}")
        if self.train_per_class < 1 or self.val_per_class < 1:
            raise ValueError("--train-per-class and --val-per-class must be at least 1")
        # A class's images are shared out over the task's subcategories; each needs at least one image.
        widest = max(TASKS[: self.tasks], key=lambda t: len(t.domains))
        fewest = min(self.train_per_class, self.val_per_class)
        if fewest < len(widest.domains):
            raise ValueError(f"--train-per-class and --val-per-class must be at least {len(widest.domains)}: "
                             f"task {widest.name} has {len(widest.domains)} subcategories "
                             f"({', '.join(widest.domains)}), each needing an image per class")
        if self.size < 16 or self.size % 4:
            raise ValueError(f"--size must be a multiple of 4 and at least 16, got {self.size}")
        if self.seed < 0:
            raise ValueError(f"--seed must not be negative, got {self.seed}")

    def manifest(self) -> dict:
        chosen = TASKS[: self.tasks]
        return {
            "format": FORMAT,
            "tasks": [t.name for t in chosen],
            "generators": {t.name: {"family": t.family, "description": t.description, "real_domains": list(t.domains),
                                    "subcategories": list(t.domains) if len(t.domains) > 1 else []}
                           for t in chosen},
            "seed": self.seed,
            "size": self.size,
            "train_per_class": self.train_per_class,
            "val_per_class": self.val_per_class,
        }


# ---- real domains --------------------------------------------------------------------------------------

# Each domain: the photos it crops from. Grey sources get a random tint so no class is exactly grey.
DOMAIN_PHOTOS = {
    "cat": ("chelsea",),
    "coffee": ("coffee",),
    "astronaut": ("astronaut",),
    "vehicles": ("rocket", "motorcycle_left", "motorcycle_right"),
    "faces": ("lfw_faces",),
    "cells": ("immunohistochemistry",),
    "textures": ("brick", "grass", "gravel"),
    "space": ("hubble_deep_field",),
    "retina": ("retina",),
    "monochrome": ("camera", "coins", "moon"),
}
VAL_FRACTION = 0.3     # val crops come from the right 30% of each photo (the last 30% of the faces)


@lru_cache(maxsize=None)
def bundled_photos(name: str) -> tuple[np.ndarray, ...]:
    """uint8 [H, W, 3] photos (or [N, H, W, 3] for faces) from scikit-image's bundled data, no download."""
    import skimage.data as data

    if name == "lfw_faces":
        faces = np.round(data.lfw_subset()[:100] * 255).astype(np.uint8)      # the first 100 are faces
        return tuple(np.repeat(f[:, :, None], 3, axis=2) for f in faces)
    if name.startswith("motorcycle_"):
        left, right, _ = data.stereo_motorcycle()
        return (left if name.endswith("left") else right,)
    image = getattr(data, name)()
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    return (np.ascontiguousarray(image[:, :, :3]).astype(np.uint8),)


class RealDomain:
    """Random crops of a domain's photos, rescaled to a square; train and val crop disjoint regions."""

    def __init__(self, name: str) -> None:
        if name not in DOMAIN_PHOTOS:
            raise KeyError(f"unknown real domain {name!r}; known: {', '.join(DOMAIN_PHOTOS)}")
        self.name = name
        self.grey = name in ("faces", "textures", "monochrome")
        self.photos = [image for source in DOMAIN_PHOTOS[name] for image in bundled_photos(source)]

    def _regions(self, split: str) -> list[np.ndarray]:
        if len(self.photos) > 10:                       # many small photos (faces): split by photo
            cut = round(len(self.photos) * (1 - VAL_FRACTION))
            return self.photos[:cut] if split == "train" else self.photos[cut:]
        regions = []
        for photo in self.photos:
            cut = round(photo.shape[1] * (1 - VAL_FRACTION))
            regions.append(photo[:, :cut] if split == "train" else photo[:, cut:])
        return regions

    def render(self, rng: np.random.Generator, split: str, size: int, zoom: tuple[float, float] = (0.6, 2.0),
               ) -> np.ndarray:
        """A float64 [size, size, 3] image in 0..255: crop of side size*zoom, flipped, rescaled, jittered."""
        regions = self._regions(split)
        region = regions[int(rng.integers(len(regions)))]
        height, width = region.shape[:2]
        side = int(round(size * math.exp(rng.uniform(math.log(zoom[0]), math.log(zoom[1])))))
        side = max(8, min(side, height, width))
        top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
        crop = region[top : top + side, left : left + side]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        kernel = Image.LANCZOS if side >= size else Image.BICUBIC
        image = np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((size, size), kernel), np.float64)
        gain = rng.uniform(0.9, 1.1) * (1 + rng.uniform(-0.15, 0.15, size=3) if self.grey else np.ones(3))
        return np.clip((image - 128.0) * gain + 128.0 + rng.uniform(-8, 8), 0, 255)


# ---- generators ----------------------------------------------------------------------------------------

def conv2d(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """'same' 2-D convolution with reflect padding: x [N, C, H, W], weight [O, C, k, k] -> [N, O, H, W]."""
    k = weight.shape[-1]
    pad = k // 2
    padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode="reflect")
    height, width = x.shape[2:]
    out = np.zeros((x.shape[0], weight.shape[0], height, width))
    for i in range(k):
        for j in range(k):
            out += np.einsum("oc,nchw->nohw", weight[:, :, i, j], padded[:, :, i : i + height, j : j + width])
    return out


def upsample_nearest(x: np.ndarray) -> np.ndarray:
    return x.repeat(2, axis=2).repeat(2, axis=3)


def upsample_bilinear(x: np.ndarray) -> np.ndarray:
    """2x bilinear (half-pixel centres, edge clamped), separable: taps 1/4, 3/4."""
    def along(a: np.ndarray, axis: int) -> np.ndarray:
        n = a.shape[axis]
        before = np.take(a, np.r_[0, 0 : n - 1], axis=axis)
        after = np.take(a, np.r_[1:n, n - 1], axis=axis)
        even, odd = 0.25 * before + 0.75 * a, 0.75 * a + 0.25 * after
        return np.stack([even, odd], axis=axis + 1).reshape(a.shape[:axis] + (2 * n,) + a.shape[axis + 1 :])
    return along(along(x, 2), 3)


def pixel_shuffle(x: np.ndarray) -> np.ndarray:
    """[N, 4C, H, W] -> [N, C, 2H, 2W], sub-pixel (a, b) of channel c taken from channel 4c + 2a + b."""
    n, c4, h, w = x.shape
    return x.reshape(n, c4 // 4, 2, 2, h, w).transpose(0, 1, 4, 2, 5, 3).reshape(n, c4 // 4, 2 * h, 2 * w)


def transposed_conv2x(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """4x4 stride-2 padding-1 transposed conv: x [N, C, H, W], weight [C, O, 4, 4] -> [N, O, 2H, 2W].

    Output row 2q takes input rows q (tap 1) and q-1 (tap 3); row 2q+1 takes q+1 (tap 0) and q (tap 2);
    the same for columns. Unequal taps per output parity are what leaves the checkerboard.
    """
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="edge")
    height, width = x.shape[2:]
    rows = {0: ((1, 1), (0, 3)), 1: ((2, 0), (1, 2))}    # parity -> ((offset into padded, tap), ...)
    out = np.zeros((x.shape[0], weight.shape[1], 2 * height, 2 * width))
    for a in (0, 1):
        for b in (0, 1):
            acc = 0.0
            for dy, ty in rows[a]:
                for dx, tx in rows[b]:
                    acc = acc + np.einsum("co,nchw->nohw", weight[:, :, ty, tx],
                                          padded[:, :, dy : dy + height, dx : dx + width])
            out[:, :, a::2, b::2] = acc
    return out


class UpsamplingDecoder:
    """A fixed-seed untrained decoder stage stack: low-res content -> 2x per stage, fingerprinted by its
    upsampling layer. Each stage mixes the image with random tanh features, as a GAN decoder's last
    layers do, so the output looks like the content with the layer's texture on top."""

    def __init__(self, kind: str, rng: np.random.Generator, stages: int = 1, hidden: int = 8,
                 jitter: float = 0.12, detail: float = 0.25) -> None:
        if kind not in ("tconv", "nearest", "bilinear", "pixshuffle"):
            raise ValueError(f"unknown upsampling layer {kind!r}")
        self.kind, self.stages = kind, stages
        self.layers = [self._make_stage(rng, hidden, jitter, detail) for _ in range(stages)]

    def _make_stage(self, rng: np.random.Generator, hidden: int, jitter: float, detail: float) -> dict:
        c = 3 + hidden
        w_in = rng.normal(0, 1.0 / math.sqrt(27), size=(hidden, 3, 3, 3)) * 2.5
        if self.kind == "tconv":
            tap = np.array([0.25, 0.75, 0.75, 0.25])
            base = np.outer(tap, tap)                                    # exact bilinear as a transposed conv
            w = rng.normal(0, detail / math.sqrt(hidden * 4), size=(c, 3, 4, 4))
            for o in range(3):
                w[o, o] = base + jitter * rng.normal(0, 0.25, size=(4, 4))
        elif self.kind == "pixshuffle":
            phase = {0: np.array([0.25, 0.75, 0.0]), 1: np.array([0.0, 0.75, 0.25])}
            w = rng.normal(0, detail / math.sqrt(hidden * 9), size=(12, c, 3, 3))
            for o in range(3):
                for a in (0, 1):
                    for b in (0, 1):
                        w[4 * o + 2 * a + b, o] = np.outer(phase[a], phase[b]) + jitter * rng.normal(0, 0.25, (3, 3))
        else:
            centre = np.array([0.0, 1.0, 0.0])            # bilinear: keep the interpolated pixel
            smooth = np.outer([1, 2, 1], [1, 2, 1]) / 16.0 if self.kind == "nearest" else np.outer(centre, centre)
            w = rng.normal(0, detail / math.sqrt(hidden * 9), size=(3, c, 3, 3))
            for o in range(3):
                w[o, o] = smooth + jitter * rng.normal(0, 0.25, size=(3, 3))
        return {"w_in": w_in, "w": w}

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x: float64 [N, 3, h, w] in -1..1 -> [N, 3, h * 2**stages, w * 2**stages]."""
        for layer in self.layers:
            z = np.concatenate([x, np.tanh(conv2d(x, layer["w_in"]))], axis=1)
            if self.kind == "tconv":
                x = transposed_conv2x(z, layer["w"])
            elif self.kind == "pixshuffle":
                x = pixel_shuffle(conv2d(z, layer["w"]))
            elif self.kind == "nearest":
                x = conv2d(upsample_nearest(z), layer["w"])
            else:
                x = conv2d(upsample_bilinear(z), layer["w"])
        return x


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def _jpeg(image: np.ndarray, quality: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(_to_uint8(image)).save(buffer, format="JPEG", quality=int(quality))
    return buffer.getvalue()


def _decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.float64)


def demosaic_bilinear(image: np.ndarray) -> np.ndarray:
    """Keep one colour per pixel (RGGB Bayer mosaic) and fill the rest by bilinear interpolation."""
    height, width = image.shape[:2]
    mask = np.zeros((3, height, width))
    mask[0, 0::2, 0::2] = 1
    mask[1, 0::2, 1::2] = mask[1, 1::2, 0::2] = 1
    mask[2, 1::2, 1::2] = 1
    mosaic = image.transpose(2, 0, 1)[None] * mask[None]
    kernel_rb = np.outer([0.5, 1, 0.5], [0.5, 1, 0.5])
    kernel_g = np.array([[0, 0.25, 0], [0.25, 1, 0.25], [0, 0.25, 0]])
    weight = np.zeros((3, 3, 3, 3))
    weight[0, 0], weight[1, 1], weight[2, 2] = kernel_rb, kernel_g, kernel_rb
    return conv2d(mosaic, weight)[0].transpose(1, 2, 0)


# ---- one task's images ---------------------------------------------------------------------------------

class TaskRenderer:
    """Draws the real and fake images of one task; fakes start from the task's own real domain."""

    def __init__(self, task: SynthTask, task_index: int, seed: int, size: int) -> None:
        self.task, self.size = task, size
        self.seed, self.task_index = seed, task_index
        weights = np.random.default_rng([seed, task_index, 1_000_000])
        self.decoder = None
        if task.family in ("tconv", "nearest", "bilinear", "pixshuffle"):
            self.decoder = UpsamplingDecoder(task.family, weights)
        elif task.family == "tconv4x":
            self.decoder = UpsamplingDecoder("tconv", weights, stages=2, detail=0.2)
        self.suffix = ".jpg" if task.family == "jpeg2x" else ".png"

    def rng(self, domain: int, split: str, class_name: str, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.task_index, domain, SPLIT_IDS[split], CLASS_IDS[class_name],
                                      index])

    def real(self, domain: RealDomain, rng: np.random.Generator, split: str) -> bytes:
        image = domain.render(rng, split, self.size)
        if self.task.family == "jpeg2x":                     # the real side is a web photo: one JPEG
            return _jpeg(image, int(rng.integers(82, 96)))
        return _png(image + rng.normal(0, rng.uniform(0, 2), image.shape))

    def fakes(self, domain: RealDomain, rngs: list[np.random.Generator], split: str) -> list[bytes]:
        """A batch of fakes (batched so the decoders run one array op per layer)."""
        size = self.size
        if self.decoder is not None:
            low = size >> self.decoder.stages
            content = np.stack([domain.render(rng, split, low) for rng in rngs]).transpose(0, 3, 1, 2)
            out = self.decoder(content / 127.5 - 1.0).transpose(0, 2, 3, 1)
            return [_png((image + 1.0) * 127.5 + rng.normal(0, rng.uniform(0, 2), image.shape))
                    for image, rng in zip(out, rngs)]
        return [self._processed_fake(domain, rng, split) for rng in rngs]

    def _processed_fake(self, domain: RealDomain, rng: np.random.Generator, split: str) -> bytes:
        size = self.size
        if self.task.family == "jpeg2x":
            big = domain.render(rng, split, size + 8)
            first = _decode(_jpeg(big, int(rng.integers(50, 76))))
            dy, dx = (int(v) for v in rng.integers(1, 8, size=2))   # grid shift: the blocks no longer align
            return _jpeg(first[dy : dy + size, dx : dx + size], int(rng.integers(82, 96)))
        if self.task.family == "resample":
            big = domain.render(rng, split, 3 * size // 2)
            small = Image.fromarray(_to_uint8(big)).resize((2 * size // 3, 2 * size // 3), Image.NEAREST)
            image = np.asarray(small.resize((size, size), Image.BICUBIC), np.float64)
        else:  # demosaic
            image = demosaic_bilinear(domain.render(rng, split, size))
        return _png(image + rng.normal(0, rng.uniform(0, 2), image.shape))


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(_to_uint8(image)).save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


# ---- writing the tree ----------------------------------------------------------------------------------

def _split_counts(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def generate(out: str | Path, config: SynthConfig, force: bool = False, progress: bool = True) -> bool:
    """Write the benchmark to `out`; returns False when `out` already holds exactly this configuration.

    The tree is written to a temporary sibling and renamed into place, so `out` is never half-written.
    """
    from tqdm import tqdm

    config.validate()
    out = Path(out)
    manifest = config.manifest()
    if out.exists():
        existing = _read_manifest(out)
        if existing == manifest:
            return False
        if existing is None and any(out.iterdir()):
            raise FileExistsError(f"{out} exists and is not a synthetic benchmark (no synth.json); choose another --out")
        if existing is not None and not force:
            raise FileExistsError(f"{out} holds a synthetic benchmark with other settings; pass --force to replace it")
    staging = out.with_name(f".{out.name}.partial")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    chosen = TASKS[: config.tasks]
    total = 2 * (config.train_per_class + config.val_per_class) * len(chosen)
    with tqdm(total=total, desc="synth", unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for index, task in enumerate(chosen):
            renderer = TaskRenderer(task, index, config.seed, config.size)
            for split, per_class in (("train", config.train_per_class), ("val", config.val_per_class)):
                for d, (domain_name, count) in enumerate(zip(task.domains, _split_counts(per_class, len(task.domains)))):
                    domain = RealDomain(domain_name)
                    folder = staging / task.name / split / (domain_name if len(task.domains) > 1 else "")
                    _write_class(folder / "0_real", [renderer.real(domain, renderer.rng(d, split, "0_real", i), split)
                                                      for i in range(count)], renderer.suffix)
                    bar.update(count)
                    rngs = [renderer.rng(d, split, "1_fake", i) for i in range(count)]
                    _write_class(folder / "1_fake", renderer.fakes(domain, rngs, split), renderer.suffix)
                    bar.update(count)
    (staging / "synth.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return True


def _write_class(folder: Path, files: list[bytes], suffix: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, data in enumerate(files):
        (folder / f"{i:04d}{suffix}").write_bytes(data)


def _read_manifest(root: Path) -> dict | None:
    try:
        return json.loads((root / "synth.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
