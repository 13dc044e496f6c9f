"""Captioned image data: a procedural scene generator and the manifest reader.

No caption corpus (COCO, Flickr) installs offline, so tests and demos use procedural scenes: one to
three objects, each with a shape, colour, size and grid position, on a coloured background (or, style
"photo", a textured crop of a bundled photo), described by compositional captions with varied wording.
The captions are near-unique per image and the attributes are visible at 32 px, so a small CLIP trained
from scratch on a CPU for a minute or two retrieves far above chance -- which is what MEM protection must then destroy.
Styles "fashion" and "boutique" draw Fashion-MNIST clothing items instead (fashion.py samples and renders
them); their captions are worded here.

Manifests are JSON lines {"image": "<path relative to the root>", "caption": "..."}; the same reader
serves the user's own data.
"""

from __future__ import annotations

import json
import math
import os
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from aigis.errors import ProtectionError
from aigis.preprocess import BadImageError, load_image, resized_window, short_side_shape

from . import fashion

log = logging.getLogger(__name__)

# name -> RGB; backgrounds have words of their own, so "red" always means an object.
COLOURS = {
    "red": (215, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 215, 40),
    "purple": (140, 50, 170), "orange": (245, 140, 30), "pink": (245, 130, 190), "cyan": (60, 215, 225),
}
BACKGROUNDS = {
    "white": (240, 240, 240), "gray": (128, 128, 128), "black": (20, 20, 20),
    "beige": (225, 205, 160), "navy": (20, 30, 90),
}
# style "photo": the backdrop is a random crop of one of scikit-image's bundled photos (no download), named
# in the caption like a flat colour -- texture a model has to see past, as in real photographs.
PHOTO_BACKGROUNDS = {
    "brick": "brick", "grass": "grass", "gravel": "gravel", "starry": "hubble_deep_field", "cell": "immunohistochemistry",
}
# style "fashion": Fashion-MNIST clothing items on a 2x2 grid, named by kind (fashion.py) -- shape, not colour.
# style "boutique": the same items in named colours on a 3x3 grid over a painted, textured backdrop, in other
# words and sentence shapes -- a look the protection presets were not tuned on.
STYLES = ("flat", "photo", "fashion", "boutique")
ITEM_STYLES = ("fashion", "boutique")  # the styles that need Fashion-MNIST's files
SHAPES = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses", "ring": "rings", "star": "stars"}
SIZES = {"small": 0.24, "large": 0.44}  # radius as a fraction of a grid cell
# grid cell (row, col) -> ways to say where it is
POSITIONS = {
    (0, 0): ("in the top left corner", "at the top left"),
    (0, 1): ("at the top", "in the top middle"),
    (0, 2): ("in the top right corner", "at the top right"),
    (1, 0): ("on the left", "at the left side"),
    (1, 1): ("in the center", "in the middle"),
    (1, 2): ("on the right", "at the right side"),
    (2, 0): ("in the bottom left corner", "at the bottom left"),
    (2, 1): ("at the bottom", "in the bottom middle"),
    (2, 2): ("in the bottom right corner", "at the bottom right"),
}
COUNT_WORDS = {1: "a", 2: "two", 3: "three", 4: "four"}
# Style "boutique". Fashion-MNIST label -> the names a caption may use for it.
BOUTIQUE_NOUNS: dict[int, tuple[str, ...]] = {
    0: ("tee", "t-shirt"), 1: ("trousers", "pants"), 2: ("jumper", "sweater"), 3: ("dress", "frock"),
    4: ("coat", "jacket"), 5: ("sandal",), 6: ("shirt", "blouse"), 7: ("trainer", "sneaker"),
    8: ("handbag", "bag"), 9: ("ankle boot", "boot"),
}
PLURAL_NOUNS = frozenset({"trousers", "pants"})  # said without "a", and they "sit", not "sits"
# 3x3 grid cell (row, col) -> ways to say where it is; no phrase contains another, so each names one cell.
BOUTIQUE_PLACES = {
    (0, 0): ("in the top left corner", "high on the left"),
    (0, 1): ("at the top centre", "along the top edge"),
    (0, 2): ("in the top right corner", "high on the right"),
    (1, 0): ("at the left edge", "halfway up the left"),
    (1, 1): ("in the centre", "dead centre"),
    (1, 2): ("at the right edge", "halfway up the right"),
    (2, 0): ("in the bottom left corner", "low on the left"),
    (2, 1): ("at the bottom centre", "along the bottom edge"),
    (2, 2): ("in the bottom right corner", "low on the right"),
}
SUPERSAMPLE = 4  # draw at 4x and box-filter down: anti-aliased edges


class PairsManifestError(ProtectionError):
    """A manifest line that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Pair:
    path: Path
    caption: str


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    cell: tuple[int, int]


# ----------------------------------------------------------------------------------------------
# Scenes


def sample_scene(rng: np.random.Generator, style: str = "flat") -> tuple[str, list[SceneObject]]:
    """A background and 1-3 objects in distinct grid cells; a later object repeats an earlier one's
    look a quarter of the time, so counts ("two red stars") occur."""
    if style not in STYLES:
        raise ValueError(f"unknown scene style {style!r}; known: {', '.join(STYLES)}")
    if style in ITEM_STYLES:
        raise ValueError(f"{style} scenes come from fashion.py (they need the item catalogue)")
    background = str(rng.choice(list(BACKGROUNDS if style == "flat" else PHOTO_BACKGROUNDS)))
    count = int(rng.choice([1, 2, 3], p=[0.2, 0.4, 0.4]))
    cells = [list(POSITIONS)[i] for i in rng.choice(len(POSITIONS), size=count, replace=False)]
    objects: list[SceneObject] = []
    for cell in cells:
        if objects and rng.random() < 0.25:
            like = objects[int(rng.integers(len(objects)))]
            objects.append(SceneObject(like.shape, like.colour, like.size, cell))
        else:
            objects.append(
                SceneObject(str(rng.choice(list(SHAPES))), str(rng.choice(list(COLOURS))), str(rng.choice(list(SIZES))), cell)
            )
    return background, objects


def _star(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    points = []
    for k in range(10):
        radius = r if k % 2 == 0 else 0.45 * r
        angle = -math.pi / 2 + k * math.pi / 5
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple[int, int, int]) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        s = 0.85 * r
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + 0.95 * r, cy + 0.8 * r), (cx - 0.95 * r, cy + 0.8 * r)], fill=fill)
    elif shape == "cross":
        t = 0.33 * r
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(1, round(0.4 * r)))
    elif shape == "star":
        draw.polygon(_star(cx, cy, r), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _backdrop(background: str, big: int, rng: np.random.Generator) -> Image.Image:
    if background in BACKGROUNDS:
        base = np.array(BACKGROUNDS[background]) + rng.integers(-12, 13, size=3)
        return Image.new("RGB", (big, big), tuple(int(v) for v in np.clip(base, 0, 255)))
    from aigis.data.synth import bundled_photos

    photo = bundled_photos(PHOTO_BACKGROUNDS[background])[0]
    side = int(min(photo.shape[:2]) * rng.uniform(0.25, 0.5))
    y, x = (int(rng.integers(0, photo.shape[i] - side + 1)) for i in (0, 1))
    return Image.fromarray(photo[y : y + side, x : x + side]).resize((big, big), Image.BILINEAR)


def render_scene(background: str, objects: list[SceneObject], size: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [size, size, 3]: jittered colours and positions, a little sensor-like noise."""
    big = size * SUPERSAMPLE
    image = _backdrop(background, big, rng)
    draw = ImageDraw.Draw(image)
    cell = big / 3
    for obj in objects:
        row, col = obj.cell
        cx = (col + 0.5 + rng.uniform(-0.1, 0.1)) * cell
        cy = (row + 0.5 + rng.uniform(-0.1, 0.1)) * cell
        r = SIZES[obj.size] * cell * rng.uniform(0.9, 1.1)
        colour = np.clip(np.array(COLOURS[obj.colour]) + rng.integers(-20, 21, size=3), 0, 255)
        _draw(draw, obj.shape, cx, cy, r, tuple(int(v) for v in colour))
    small = np.asarray(image.resize((size, size), Image.BOX), dtype=np.float32)
    small = small + rng.normal(0.0, 3.0, size=small.shape)
    return np.clip(np.rint(small), 0, 255).astype(np.uint8)


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def describe_scene(background: str, objects: list[SceneObject], rng: np.random.Generator) -> str:
    """A compositional caption: objects of one look are grouped and counted, order and wording vary."""
    groups: dict[tuple[str, str, str], list[tuple[int, int]]] = {}
    for obj in objects:
        groups.setdefault((obj.size, obj.colour, obj.shape), []).append(obj.cell)
    phrases = []
    for (size, colour, shape), cells in groups.items():
        noun = shape if len(cells) == 1 else SHAPES[shape]
        wheres = [POSITIONS[c][int(rng.integers(2))] for c in cells]
        phrases.append(f"{COUNT_WORDS[len(cells)]} {size} {colour} {noun} {_join(wheres)}")
    order = rng.permutation(len(phrases))
    things = _join([phrases[i] for i in order])
    template = int(rng.integers(5))
    if template == 0:
        return f"{things} on a {background} background"
    if template == 1:
        return f"a {background} background with {things}"
    if template == 2:
        return f"there is {things} on a {background} background"
    if template == 3:
        return f"a picture of {things} over a {background} backdrop"
    return f"{things}, {background} background"


def describe_fashion_scene(placed: list[fashion.PlacedItem], rng: np.random.Generator) -> str:
    """Items of one kind grouped and counted ("two sneakers at the top left and in the lower right"),
    order and wording varied; the tint is never named."""
    cells_of: dict[int, list[tuple[int, int]]] = {}
    for item in placed:
        cells_of.setdefault(item.label, []).append(item.cell)
    phrases = []
    for label, cells in cells_of.items():
        singular, plural = fashion.CLASSES[label]
        count = COUNT_WORDS[len(cells)]
        if count == "a" and singular[0] in "aeiou":
            count = "an"
        wheres = _join([fashion.CELLS[c][int(rng.integers(2))] for c in cells])
        phrases.append(f"{count} {singular if len(cells) == 1 else plural} {wheres}")
    things = _join([phrases[i] for i in rng.permutation(len(phrases))])
    template = int(rng.integers(4))
    if template == 0:
        return things
    if template == 1:
        return f"a dark picture with {things}"
    if template == 2:
        return f"you can see {things}"
    return f"clothes laid out: {things}"


def describe_boutique_scene(backdrop: fashion.Backdrop, items: list[fashion.ColouredItem],
                            rng: np.random.Generator) -> str:
    """One sentence naming every item with its colour and cell, and the backdrop's paint and texture; the
    item names, place phrases, item order and sentence shape are drawn anew per call, so an image's captions
    differ in wording. Short enough for the small presets' 40-token context: at most 36 tokens with a
    vocabulary trained on these captions, as long as the longest "fashion" caption."""
    phrases, nouns = [], []
    for item in items:
        noun = str(rng.choice(BOUTIQUE_NOUNS[item.label]))
        where = BOUTIQUE_PLACES[item.cell][int(rng.integers(2))]
        article = "" if noun in PLURAL_NOUNS else ("an " if item.colour[0] in "aeiou" else "a ")
        phrases.append(f"{article}{item.colour} {noun} {where}")
        nouns.append(noun)
    things = _join([phrases[i] for i in rng.permutation(len(phrases))])
    plural = len(items) > 1 or nouns[0] in PLURAL_NOUNS
    surface = f"{backdrop.paint} {backdrop.texture}"
    sentences = (
        f"{things} on a {surface} backdrop",
        f"on {backdrop.texture} tinted {backdrop.paint}: {things}",
        f"a {surface} backdrop with {things}",
        f"{things} {'sit' if plural else 'sits'} against {surface}",
        f"{surface} behind {things}",
        f"shop display on {surface}: {things}",
    )
    sentence = sentences[int(rng.integers(len(sentences)))]
    return sentence[0].upper() + sentence[1:] + "."


def synth_captioned(
    out_dir: str | Path, n_train: int, n_test: int, size: int = 64, seed: int = 0, style: str = "flat",
    captions_per_image: int = 1, fashion_root: str | Path | None = None,
) -> Path:
    """Write n_train + n_test procedural scenes as images/NNNNN.png with train.jsonl and test.jsonl.

    style "flat": flat-coloured backgrounds; "photo": crops of bundled photos (brick, grass, gravel,
    a starry sky, stained cells) behind the same objects; "fashion": Fashion-MNIST items on a 2x2 grid
    (fashion.py; fashion_root: where its files are); "boutique": the same items in named colours on a
    3x3 grid over a painted texture, worded otherwise -- a look no preset was tuned on.
    captions_per_image > 1 gives every TRAINING image that many differently worded captions, one
    manifest line each, as Flickr and COCO do (5); the test split keeps one per image, so retrieval has
    one right answer.

    Deterministic in (n_train, n_test, size, seed, style) -- and for the item styles the Fashion-MNIST files:
    scene i draws from its own generator seeded by (seed, i), so the bytes written do not depend on
    anything else.
    """
    if n_train < 0 or n_test < 0 or n_train + n_test == 0:
        raise ValueError(f"need a positive number of images, got n_train={n_train}, n_test={n_test}")
    if size < 8:
        raise ValueError(f"size must be at least 8 px, got {size}")
    if style not in STYLES:
        raise ValueError(f"unknown scene style {style!r}; known: {', '.join(STYLES)}")
    if captions_per_image < 1:
        raise ValueError(f"captions_per_image must be >= 1, got {captions_per_image}")
    if style in ITEM_STYLES:
        least = fashion.MIN_SIZE if style == "fashion" else fashion.BOUTIQUE_MIN_SIZE
        if size < least:
            raise ValueError(f"{style} scenes need at least {least} px, got {size}")
        catalogues = {split: fashion.load_catalogue(split, fashion_root) for split in ("train", "test")}
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    digits = max(5, len(str(n_train + n_test - 1)))
    train: list[str] = []
    test: list[str] = []
    for i in range(n_train + n_test):
        rng = np.random.default_rng([seed, i])
        if style == "fashion":
            catalogue = catalogues["train" if i < n_train else "test"]  # test scenes show unseen items
            backdrop, placed = fashion.sample_fashion_scene(rng, catalogue)
            image = fashion.render_fashion_scene(backdrop, placed, catalogue, size, rng)
            describe = lambda: describe_fashion_scene(placed, rng)  # noqa: E731
        elif style == "boutique":
            catalogue = catalogues["train" if i < n_train else "test"]
            painted, items = fashion.sample_boutique_scene(rng, catalogue)
            image = fashion.render_boutique_scene(painted, items, catalogue, size, rng)
            describe = lambda: describe_boutique_scene(painted, items, rng)  # noqa: E731
        else:
            background, objects = sample_scene(rng, style)
            image = render_scene(background, objects, size, rng)
            describe = lambda: describe_scene(background, objects, rng)  # noqa: E731
        relative = f"images/{i:0{digits}d}.png"
        Image.fromarray(image).save(out_dir / relative, format="PNG")
        for _ in range(captions_per_image if i < n_train else 1):
            caption = describe()
            (train if i < n_train else test).append(json.dumps({"image": relative, "caption": caption}))
    for name, chunk in (("train.jsonl", train), ("test.jsonl", test)):
        tmp = out_dir / f".{name}.tmp"
        tmp.write_text("".join(line + "\n" for line in chunk), encoding="utf-8")
        os.replace(tmp, out_dir / name)
    return out_dir


def photo_sized_copies(root: str | Path, manifest: str, size: tuple[int, int]) -> str:
    """Write every image of root/manifest again as a JPEG (quality 90) of `size` = (width, height), beside
    the original, and a manifest naming those, lines in the same order; returns the new manifest's name.

    The procedural scenes are written at the model's size; a data owner's files are photos (Flickr's about
    500x375, COCO's 640x480) that every reader has to decode and resize. The scene is only stretched: what
    the copies change is the files' decoding cost, not their content.
    """
    width, height = size
    if width < 1 or height < 1:
        raise ValueError(f"photo size must be positive, got {width}x{height}")
    root = Path(root)
    lines, written = [], {}
    for pair in read_pairs(root, manifest):
        if pair.path not in written:
            target = pair.path.with_suffix(f".{width}x{height}.jpg")
            with Image.open(pair.path) as image:
                image.convert("RGB").resize((width, height), Image.BICUBIC).save(target, quality=90)
            written[pair.path] = target.relative_to(root.resolve()).as_posix()
        lines.append(json.dumps({"image": written[pair.path], "caption": pair.caption}))
    name = f"{Path(manifest).stem}_{width}x{height}.jsonl"
    (root / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return name


# ----------------------------------------------------------------------------------------------
# Reading


def _inside(root: Path, relative: str, what: str) -> Path:
    if not relative or Path(relative).is_absolute() or "\\" in relative:
        raise PairsManifestError(f"{what}: path {relative!r} must be relative to the data root, with / separators")
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise PairsManifestError(f"{what}: path {relative!r} leaves the data root {root}")
    return path


def read_pairs(root: str | Path, manifest_name: str) -> list[Pair]:
    """Parse root/manifest_name (JSON lines); every image must exist inside root. Errors name the line."""
    root = Path(root).resolve()
    manifest = _inside(root, manifest_name, f"manifest {manifest_name!r}")
    if not manifest.is_file():
        raise PairsManifestError(f"{manifest}: manifest not found")
    pairs: list[Pair] = []
    with manifest.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            where = f"{manifest}:{number}"
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PairsManifestError(f"{where}: not valid JSON ({exc.msg})") from None
            if not isinstance(entry, dict):
                raise PairsManifestError(f"{where}: expected an object with 'image' and 'caption'")
            image, caption = entry.get("image"), entry.get("caption")
            if not isinstance(image, str) or not isinstance(caption, str):
                raise PairsManifestError(f"{where}: 'image' and 'caption' must both be strings")
            if not caption.strip():
                raise PairsManifestError(f"{where}: empty caption")
            path = _inside(root, image, where)
            if not path.is_file():
                raise PairsManifestError(f"{where}: image {image!r} not found ({path})")
            pairs.append(Pair(path, caption))
    if not pairs:
        raise PairsManifestError(f"{manifest}: no image-caption pairs")
    return pairs


def _fit(image: np.ndarray, size: int) -> np.ndarray:
    """Resize the short side to size (bicubic, as CLIP) and centre-crop; size x size input is untouched.

    Only the crop is resampled when the whole resize would be huge (a long thin strip), see resized_window.
    """
    height, width = image.shape[:2]
    if (height, width) == (size, size):
        return image
    new_h, new_w = short_side_shape(height, width, size)
    return resized_window(image, size, (new_h - size) // 2, (new_w - size) // 2, Image.BICUBIC)


def load_images(pairs: list[Pair], size: int, progress: bool = True) -> np.ndarray:
    """Decode every image once into uint8 [N, size, size, 3] (short side resized to size, centre crop)."""
    out = np.empty((len(pairs), size, size, 3), dtype=np.uint8)
    start = last = time.monotonic()
    for i, pair in enumerate(pairs):
        try:
            out[i] = _fit(load_image(pair.path), size)
        except BadImageError as exc:
            raise BadImageError(f"image {i} of {len(pairs)}: {exc}") from exc
        now = time.monotonic()
        if progress and (now - last > 5 or i + 1 == len(pairs)):
            last = now
            rate = (i + 1) / max(now - start, 1e-9)
            log.info(f"decoded {i + 1}/{len(pairs)} images ({rate:.0f} img/s)")
    return out
