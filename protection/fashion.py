"""Captioned scenes whose content is shape, not colour: Fashion-MNIST items on a 2x2 grid.

The procedural scenes in captions.py are named by colour and position, which a network reads off the
pixels almost linearly -- so a from-scratch CLIP learns them within a few steps, before it would ever
pick up a protection noise. Real photographs are the opposite: what a caption
names (a dog, a bicycle) takes learned shape features. These scenes sit in between: two to four
clothing items (t-shirt, sneaker, bag, ...) drawn from Fashion-MNIST, each in a random tint the caption
does NOT name, on a dark backdrop; the caption (captions.describe_fashion_scene) names each item
and its cell. Training scenes draw items from Fashion-MNIST's training split, test scenes from its
test split, so retrieval is measured on unseen items.

Style "boutique" is a second look at the same items, for checking that a claim made on "fashion" (where the
protection presets were tuned) is not an artefact of that one look: one to three items on a 3x3 grid, each
in a colour the caption names, over a painted, textured backdrop (a bundled photo's grain under a named
paint) that the caption names too (captions.describe_boutique_scene, in its own words and sentence shapes).

Fashion-MNIST installs offline from Debian (`apt-get install dataset-fashion-mnist`, files under
/usr/share/datasets/fashion-mnist) or `make fashion-mnist` (unpacks that package into
runs/assets/fashion-mnist without installing it); AIGIS_FASHION_MNIST names another folder.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from aigis.errors import ProtectionError

# Fashion-MNIST's label order; (singular, plural) as a caption says them.
CLASSES = (
    ("t-shirt", "t-shirts"), ("pair of trousers", "pairs of trousers"), ("pullover", "pullovers"),
    ("dress", "dresses"), ("coat", "coats"), ("sandal", "sandals"), ("shirt", "shirts"),
    ("sneaker", "sneakers"), ("bag", "bags"), ("ankle boot", "ankle boots"),
)
CELLS = {
    (0, 0): ("at the top left", "in the upper left"),
    (0, 1): ("at the top right", "in the upper right"),
    (1, 0): ("at the bottom left", "in the lower left"),
    (1, 1): ("at the bottom right", "in the lower right"),
}
SPLIT_FILES = {"train": "train", "test": "t10k"}  # <prefix>-images-idx3-ubyte.gz, <prefix>-labels-idx1-ubyte.gz
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
LOCAL_DIR = Path(__file__).resolve().parent.parent / "runs" / "assets" / "fashion-mnist"
ENV_VAR = "AIGIS_FASHION_MNIST"
MIN_SIZE = 16  # px: an item is drawn in a quarter of the image

# Style "boutique". Item colours and backdrop paints use disjoint words, so a caption's "red" is always an item.
ITEM_COLOURS = {
    "red": (215, 40, 40), "white": (240, 240, 240), "black": (25, 25, 25), "yellow": (240, 210, 40),
    "blue": (45, 90, 225), "pink": (245, 135, 195), "orange": (245, 140, 30), "green": (45, 170, 65),
}
PAINTS = {
    "navy": (35, 45, 105), "olive": (115, 115, 50), "burgundy": (115, 30, 50), "teal": (40, 120, 120),
    "beige": (205, 185, 140), "slate": (105, 115, 130),
}
TEXTURES = {"brick": "brick", "gravel": "gravel", "grass": "grass"}  # name -> scikit-image's bundled photo
GRID = 3  # boutique items sit in the cells of a GRID x GRID grid
BOUTIQUE_MIN_SIZE = 8 * GRID  # px: an item at least 8 px wide
MIN_CONTRAST = 150.0  # RGB distance an item's colour keeps from the paint, so no item melts into its backdrop
GRAIN = 24.0  # std (in 0..255) of the texture laid over the paint: well above the 3.0 of sensor noise


class FashionDataError(ProtectionError):
    """Fashion-MNIST files that are missing or malformed; the message names the file."""


def fashion_mnist_dir(root: str | Path | None = None) -> Path:
    """The folder holding Fashion-MNIST's .gz files: root if given, else $AIGIS_FASHION_MNIST, else the
    Debian package's folder, else runs/assets/fashion-mnist (`make fashion-mnist`)."""
    if root is not None:
        return Path(root)
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    for candidate in (DEBIAN_DIR, LOCAL_DIR):
        if not missing_files(candidate):
            return candidate
    raise FashionDataError(
        f"Fashion-MNIST not found in {DEBIAN_DIR} or {LOCAL_DIR}: install the Debian package "
        f"dataset-fashion-mnist, run `make fashion-mnist`, or set {ENV_VAR} to a folder with its .gz files")


def missing_files(folder: str | Path) -> list[str]:
    """The Fashion-MNIST files (images and labels of both splits) that folder lacks."""
    names = [f"{prefix}-{kind}-idx{dims}-ubyte.gz" for prefix in SPLIT_FILES.values()
             for kind, dims in (("images", 3), ("labels", 1))]
    return [name for name in names if not (Path(folder) / name).is_file()]


def _read_idx(path: Path, magic: int, dims: int) -> np.ndarray:
    if not path.is_file():
        raise FashionDataError(f"missing Fashion-MNIST file {path}")
    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError) as exc:
        raise FashionDataError(f"{path}: not a readable gzip file ({exc})") from exc
    header = 4 + 4 * dims
    if len(raw) < header or int.from_bytes(raw[:4], "big") != magic:
        raise FashionDataError(f"{path}: not an IDX file with magic {magic}")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    if len(raw) - header != int(np.prod(shape)):
        raise FashionDataError(f"{path}: header says {list(shape)} but holds {len(raw) - header} bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


@dataclass(frozen=True)
class Catalogue:
    """One Fashion-MNIST split: uint8 [N, 28, 28] items (white on black) and their labels 0..9."""

    items: np.ndarray
    labels: np.ndarray


def load_catalogue(split: str, root: str | Path | None = None) -> Catalogue:
    if split not in SPLIT_FILES:
        raise ValueError(f"unknown Fashion-MNIST split {split!r}; known: {', '.join(SPLIT_FILES)}")
    folder = fashion_mnist_dir(root)
    prefix = SPLIT_FILES[split]
    items = _read_idx(folder / f"{prefix}-images-idx3-ubyte.gz", 2051, 3)
    labels = _read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", 2049, 1)
    if items.shape[0] != labels.shape[0] or items.shape[0] == 0:
        raise FashionDataError(f"{folder}: {items.shape[0]} {split} images but {labels.shape[0]} labels")
    if labels.max() >= len(CLASSES):
        raise FashionDataError(f"{folder}: label {int(labels.max())} outside 0..{len(CLASSES) - 1}")
    return Catalogue(items, labels)


@dataclass(frozen=True)
class PlacedItem:
    index: int  # into the catalogue
    label: int
    cell: tuple[int, int]
    tint: tuple[float, float, float]  # RGB the white of the item becomes, 0..255


def sample_fashion_scene(rng: np.random.Generator, catalogue: Catalogue) -> tuple[float, list[PlacedItem]]:
    """A backdrop grey level and 2-4 items in distinct cells."""
    backdrop = float(rng.uniform(0, 40))
    count = int(rng.integers(2, 5))
    cells = [list(CELLS)[i] for i in rng.permutation(len(CELLS))[:count]]
    placed = []
    for cell in sorted(cells):
        index = int(rng.integers(len(catalogue.labels)))
        tint = tuple(float(v) for v in rng.uniform(0.4, 1.0, size=3) * 255)
        placed.append(PlacedItem(index, int(catalogue.labels[index]), cell, tint))  # type: ignore[arg-type]
    return backdrop, placed


def render_fashion_scene(backdrop: float, placed: list[PlacedItem], catalogue: Catalogue, size: int,
                         rng: np.random.Generator) -> np.ndarray:
    """uint8 [size, size, 3]: each item resized into its cell, its white tinted, over the backdrop."""
    if size < MIN_SIZE:
        raise ValueError(f"fashion scenes need at least {MIN_SIZE} px, got {size}")
    half = size // 2
    canvas = np.full((size, size, 3), backdrop, dtype=np.float32)
    for item in placed:
        alpha = np.asarray(Image.fromarray(catalogue.items[item.index]).resize((half, half), Image.LANCZOS),
                           dtype=np.float32)[..., None] / 255.0
        row, col = item.cell
        region = canvas[row * half : (row + 1) * half, col * half : (col + 1) * half]
        region[:] = region * (1.0 - alpha) + alpha * np.asarray(item.tint, dtype=np.float32)
    canvas = canvas + rng.normal(0.0, 3.0, size=canvas.shape)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Style "boutique"


@dataclass(frozen=True)
class Backdrop:
    """A bundled photo's grain (a key of TEXTURES) under a flat paint (a key of PAINTS)."""

    paint: str
    texture: str


@dataclass(frozen=True)
class ColouredItem:
    """A boutique item: which catalogue entry, its kind, where it sits and the colour its white becomes."""

    index: int  # into the catalogue
    label: int
    cell: tuple[int, int]  # (row, column) of the GRID x GRID grid
    colour: str  # a key of ITEM_COLOURS


def colours_on(paint: str) -> list[str]:
    """The item colours (ITEM_COLOURS order) at least MIN_CONTRAST away from `paint`: the ones a caption may
    name on it, since the reader has to see them."""
    if paint not in PAINTS:
        raise ValueError(f"unknown paint {paint!r}; known: {', '.join(PAINTS)}")
    base = np.asarray(PAINTS[paint], dtype=np.float64)
    return [name for name, rgb in ITEM_COLOURS.items() if np.linalg.norm(np.asarray(rgb) - base) >= MIN_CONTRAST]


def sample_boutique_scene(rng: np.random.Generator, catalogue: Catalogue) -> tuple[Backdrop, list[ColouredItem]]:
    """A painted, textured backdrop and 1-3 items in distinct cells of the 3x3 grid, each in a colour that
    stands out from the paint."""
    backdrop = Backdrop(str(rng.choice(list(PAINTS))), str(rng.choice(list(TEXTURES))))
    count = int(rng.integers(1, 4))
    cells = sorted(divmod(int(k), GRID) for k in rng.choice(GRID * GRID, size=count, replace=False))
    palette = colours_on(backdrop.paint)
    items = []
    for cell in cells:
        index = int(rng.integers(len(catalogue.labels)))
        items.append(ColouredItem(index, int(catalogue.labels[index]), cell, str(rng.choice(palette))))
    return backdrop, items


@lru_cache(maxsize=None)
def _grain_photo(texture: str) -> np.ndarray:
    """uint8 [H, W] grey levels of the texture's bundled photo, read once per process."""
    from aigis.data.synth import bundled_photos

    if texture not in TEXTURES:
        raise ValueError(f"unknown texture {texture!r}; known: {', '.join(TEXTURES)}")
    grey = np.rint(bundled_photos(TEXTURES[texture])[0].mean(axis=2)).astype(np.uint8)
    grey.setflags(write=False)  # shared by every scene
    return grey


def _painted_backdrop(backdrop: Backdrop, size: int, rng: np.random.Generator) -> np.ndarray:
    """float32 [size, size, 3]: the paint (jittered) plus the grain of a random crop of the texture photo,
    normalised to GRAIN so that every crop reads as textured, however smooth or busy that patch is."""
    photo = _grain_photo(backdrop.texture)
    side = int(min(photo.shape) * rng.uniform(0.25, 0.5))
    y, x = (int(rng.integers(0, photo.shape[i] - side + 1)) for i in (0, 1))
    crop = np.asarray(Image.fromarray(photo[y : y + side, x : x + side]).resize((size, size), Image.BOX),
                      dtype=np.float32)
    grain = np.clip((crop - crop.mean()) / max(float(crop.std()), 1.0), -2.5, 2.5)
    paint = np.asarray(PAINTS[backdrop.paint], dtype=np.float32) + rng.integers(-12, 13, size=3)
    return paint + GRAIN * grain[..., None]


def render_boutique_scene(backdrop: Backdrop, items: list[ColouredItem], catalogue: Catalogue, size: int,
                          rng: np.random.Generator) -> np.ndarray:
    """uint8 [size, size, 3]: each item resized into its grid cell, its white turned its colour, over the
    painted texture; the grid is centred when size is not a multiple of GRID."""
    if size < BOUTIQUE_MIN_SIZE:
        raise ValueError(f"boutique scenes need at least {BOUTIQUE_MIN_SIZE} px, got {size}")
    canvas = _painted_backdrop(backdrop, size, rng)
    cell = size // GRID
    margin = (size - GRID * cell) // 2
    for item in items:
        alpha = np.asarray(Image.fromarray(catalogue.items[item.index]).resize((cell, cell), Image.LANCZOS),
                           dtype=np.float32)[..., None] / 255.0
        colour = np.asarray(ITEM_COLOURS[item.colour], dtype=np.float32) + rng.integers(-15, 16, size=3)
        top, left = (margin + k * cell for k in item.cell)
        region = canvas[top : top + cell, left : left + cell]
        region[:] = region * (1.0 - alpha) + alpha * colour
    canvas = canvas + rng.normal(0.0, 3.0, size=canvas.shape)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
