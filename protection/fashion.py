"""Captioned scenes whose content is shape, not colour: Fashion-MNIST items on a 2x2 grid.

The procedural scenes in captions.py are named by colour and position, which a network reads off the
pixels almost linearly -- so a from-scratch CLIP learns them within a few steps, before it would ever
pick up a protection noise. Real photographs are the opposite: what a caption
names (a dog, a bicycle) takes learned shape features. These scenes sit in between: two to four
clothing items (t-shirt, sneaker, bag, ...) drawn from Fashion-MNIST, each in a random tint the caption
does NOT name, on a dark backdrop; the caption (captions.describe_fashion_scene) names each item
and its cell. Training scenes draw items from Fashion-MNIST's training split, test scenes from its
test split, so retrieval is measured on unseen items.

Fashion-MNIST installs offline from Debian (`apt-get install dataset-fashion-mnist`, files under
/usr/share/datasets/fashion-mnist) or `make fashion-mnist` (unpacks that package into
runs/assets/fashion-mnist without installing it); AIGIS_FASHION_MNIST names another folder.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
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
