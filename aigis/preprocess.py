"""Decode and crop images exactly one way, for training evaluation, export checks and the client.

Images travel as uint8 HWC RGB arrays. Normalisation is NOT done here: it lives inside the models
(and so inside the exported graphs), which is what lets a thin client send raw pixels.

Untrusted files are bounded before they cost anything: the size in the header is checked against a pixel
budget and a side limit before a pixel is decoded, and upscaling a small image to the crop only ever
computes the crop (so a 16384 x 1 strip costs a crop, not a 3.6-million-pixel-wide image).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from aigis.errors import DataError

# Decompression-bomb guards, checked on the header before decoding: total pixels and the longest side.
MAX_PIXELS = 40_000_000
MAX_SIDE = 16_384
MAX_FILE_BYTES = 64 * 1024 * 1024
# Upscales whose whole resized image is at most this many pixels (12 MiB of RGB) are computed whole, as they
# always were, so every ordinary image keeps its pixels bit for bit; larger ones (extreme aspect ratios
# only) resize just the crop window -- see resized_window.
EXACT_RESIZE_PIXELS = 1 << 22


class BadImageError(DataError):
    """An image that cannot be used; the message names the file and the reason."""


def size_problem(width: int, height: int, max_pixels: int = MAX_PIXELS, max_side: int = MAX_SIDE) -> str | None:
    """Why a width x height image is refused before decoding (None: it is accepted)."""
    if max(width, height) > max_side:
        return f"{width}x{height} pixels has a side over the {max_side}-pixel limit"
    if width * height > max_pixels:
        return f"{width}x{height} pixels is over the {max_pixels}-pixel limit"
    return None


def decode_image(data: bytes, name: str = "<bytes>", max_pixels: int = MAX_PIXELS,
                 max_side: int = MAX_SIDE) -> np.ndarray:
    """Encoded bytes -> uint8 [H, W, 3] RGB. Raises BadImageError naming `name`.

    The header's size is checked first (Image.open reads no pixels), so an oversized image costs nothing.
    """
    if len(data) == 0:
        raise BadImageError(f"{name}: empty file")
    if len(data) > MAX_FILE_BYTES:
        raise BadImageError(f"{name}: {len(data)} bytes is over the {MAX_FILE_BYTES}-byte limit")
    try:
        with Image.open(io.BytesIO(data)) as im:
            problem = size_problem(*im.size, max_pixels=max_pixels, max_side=max_side)
            if problem:
                raise BadImageError(f"{name}: {problem}")
            im.load()
            rgb = im.convert("RGB")
    except BadImageError:
        raise
    except Image.DecompressionBombError as exc:   # Pillow's own, larger limit, met while opening
        raise BadImageError(f"{name}: too many pixels ({exc})") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise BadImageError(f"{name}: not a readable image ({exc})") from exc
    return np.asarray(rgb, dtype=np.uint8)


def load_image(path: str | Path, max_pixels: int = MAX_PIXELS, max_side: int = MAX_SIDE) -> np.ndarray:
    """Read and decode an image file -> uint8 [H, W, 3] RGB."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BadImageError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    return decode_image(data, name=str(path), max_pixels=max_pixels, max_side=max_side)


def short_side_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) of an image resized so that its short side is `size`, keeping the aspect ratio."""
    scale = size / min(height, width)
    return max(size, round(height * scale)), max(size, round(width * scale))


def resized_window(image: np.ndarray, size: int, top: int, left: int,
                   resample: Image.Resampling = Image.BILINEAR) -> np.ndarray:
    """Pixels [top:top+size, left:left+size] of `image` resized to short_side_shape(..., size).

    When the whole resized image is at most EXACT_RESIZE_PIXELS it is computed and cut, which is what this
    function has always returned. Beyond that (only extreme aspect ratios: a crop of 224 keeps the whole
    resize up to 83:1) just the window is resampled, so the cost stays O(size * source side) whatever the
    aspect ratio. A window cannot reproduce the whole resize bit for bit (Pillow takes the box as float32),
    and one box resize call strays further (measured: up to 25 levels, bicubic); so each of Pillow's two
    passes is its own call, in Pillow's order -- horizontal, then vertical -- which keeps the window within
    one level (bilinear; two for bicubic) of the whole resize, on under 1% of its pixels.
    """
    height, width = image.shape[:2]
    new_h, new_w = short_side_shape(height, width, size)
    source = Image.fromarray(image)
    if new_h * new_w <= EXACT_RESIZE_PIXELS:
        resized = np.asarray(source.resize((new_w, new_h), resample))
        return np.ascontiguousarray(resized[top : top + size, left : left + size])
    columns = (left * width / new_w, 0, (left + size) * width / new_w, height)
    strip = source.resize((size, height), resample, box=columns)             # horizontal pass, window columns
    rows = (0, top * height / new_h, size, (top + size) * height / new_h)
    return np.ascontiguousarray(np.asarray(strip.resize((size, size), resample, box=rows)))  # vertical pass


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """The evaluation view: centre crop (no resize, as the paper), upscaling only images smaller than `size`."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise BadImageError(f"expected a uint8 [H, W, 3] image, got {image.dtype} {list(image.shape)}")
    height, width = image.shape[:2]
    if min(height, width) < size:
        new_h, new_w = short_side_shape(height, width, size)
        return resized_window(image, size, (new_h - size) // 2, (new_w - size) // 2)
    top, left = (height - size) // 2, (width - size) // 2
    return np.ascontiguousarray(image[top : top + size, left : left + size])


def random_crop(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """The training view: a random crop of `size` (images smaller than that are upscaled first)."""
    height, width = image.shape[:2]
    upscale = min(height, width) < size
    if upscale:
        height, width = short_side_shape(height, width, size)
    top = int(rng.integers(0, height - size + 1))
    left = int(rng.integers(0, width - size + 1))
    if upscale:
        return resized_window(image, size, top, left)
    return np.ascontiguousarray(image[top : top + size, left : left + size])


def eval_view_from_file(path: str | Path, size: int, max_pixels: int = MAX_PIXELS,
                        max_side: int = MAX_SIDE) -> np.ndarray:
    """What the client sends for a file: decoded, RGB, centre-cropped uint8 [size, size, 3]."""
    return center_crop(load_image(path, max_pixels=max_pixels, max_side=max_side), size)


def eval_view_from_bytes(data: bytes, size: int, name: str = "<bytes>", max_pixels: int = MAX_PIXELS,
                         max_side: int = MAX_SIDE) -> np.ndarray:
    """What the client sends for encoded bytes (and the served decode step computes): as eval_view_from_file."""
    return center_crop(decode_image(data, name=name, max_pixels=max_pixels, max_side=max_side), size)
