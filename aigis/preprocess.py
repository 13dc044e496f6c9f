"""Decode and crop images exactly one way, for training evaluation, export checks and the client.

Images travel as uint8 HWC RGB arrays. Normalisation is NOT done here: it lives inside the models
(and so inside the exported graphs), which is what lets a thin client send raw pixels.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

# Decompression-bomb guard: refuse images above this many pixels before decoding them.
MAX_PIXELS = 64_000_000
MAX_FILE_BYTES = 64 * 1024 * 1024


class BadImageError(ValueError):
    """An image that cannot be used; the message names the file and the reason."""


def decode_image(data: bytes, name: str = "<bytes>", max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Encoded bytes -> uint8 [H, W, 3] RGB. Raises BadImageError naming `name`."""
    if len(data) == 0:
        raise BadImageError(f"{name}: empty file")
    if len(data) > MAX_FILE_BYTES:
        raise BadImageError(f"{name}: {len(data)} bytes is over the {MAX_FILE_BYTES}-byte limit")
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            if width * height > max_pixels:
                raise BadImageError(f"{name}: {width}x{height} pixels is over the {max_pixels}-pixel limit")
            im.load()
            rgb = im.convert("RGB")
    except BadImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise BadImageError(f"{name}: not a readable image ({exc})") from exc
    return np.asarray(rgb, dtype=np.uint8)


def load_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Read and decode an image file -> uint8 [H, W, 3] RGB."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BadImageError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    return decode_image(data, name=str(path), max_pixels=max_pixels)


def _resize_short_side(image: np.ndarray, size: int) -> np.ndarray:
    height, width = image.shape[:2]
    scale = size / min(height, width)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    return np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """The evaluation view: centre crop (no resize, as the paper), upscaling only images smaller than `size`."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise BadImageError(f"expected a uint8 [H, W, 3] image, got {image.dtype} {list(image.shape)}")
    if min(image.shape[:2]) < size:
        image = _resize_short_side(image, size)
    height, width = image.shape[:2]
    top, left = (height - size) // 2, (width - size) // 2
    return np.ascontiguousarray(image[top : top + size, left : left + size])


def random_crop(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """The training view: a random crop of `size` (images smaller than that are upscaled first)."""
    if min(image.shape[:2]) < size:
        image = _resize_short_side(image, size)
    height, width = image.shape[:2]
    top = int(rng.integers(0, height - size + 1))
    left = int(rng.integers(0, width - size + 1))
    return np.ascontiguousarray(image[top : top + size, left : left + size])


def eval_view_from_file(path: str | Path, size: int) -> np.ndarray:
    """What the client sends for a file: decoded, RGB, centre-cropped uint8 [size, size, 3]."""
    return center_crop(load_image(path), size)


def eval_view_from_bytes(data: bytes, size: int, name: str = "<bytes>") -> np.ndarray:
    return center_crop(decode_image(data, name=name), size)
