"""Turn what callers pass (arrays, file paths, encoded bytes) into exactly what the model expects.

Files and bytes go through aigis.preprocess -- the same decode and centre crop as training evaluation --
so a served answer for a file equals the in-process answer for that file. Arrays must already be in the
evaluation view; checking them here names the bad input before anything is sent.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Sequence, Union

import numpy as np

from aigis import preprocess

from .errors import InvalidInputError

ImageLike = Union[np.ndarray, str, os.PathLike, bytes, bytearray, memoryview]


def is_single(images: object) -> bool:
    """One image (a 3-D array, a path, or bytes) rather than a batch of them."""
    if isinstance(images, np.ndarray):
        return images.ndim != 4
    return isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview))


def as_items(images: ImageLike | Sequence[ImageLike] | np.ndarray) -> list[ImageLike]:
    """A single image or a batch -> a list of single images (a 4-D array is split along axis 0)."""
    if is_single(images):
        return [images]  # type: ignore[list-item]
    if isinstance(images, np.ndarray):
        return list(images)
    if isinstance(images, Sequence):
        return list(images)
    raise InvalidInputError(f"expected an image or a sequence of images, got {type(images).__name__}")


def describe(item: ImageLike, index: int | None) -> str:
    """How an error message names an input: its path when it has one, else its position."""
    if isinstance(item, (str, os.PathLike)):
        return str(item)
    return "image" if index is None else f"images[{index}]"


class ImagePreparer:
    """Makes the uint8 [crop, crop, 3] evaluation view (or the encoded bytes) of one input."""

    def __init__(self, crop: int) -> None:
        self.crop = crop

    def pixels(self, item: ImageLike, index: int | None = None) -> np.ndarray:
        """uint8 [crop, crop, 3] for the IMAGES input; raises InvalidInputError naming the input."""
        if isinstance(item, np.ndarray):
            return self.check_array(item, describe(item, index))
        try:
            if isinstance(item, (str, os.PathLike)):
                return preprocess.eval_view_from_file(item, self.crop)
            if isinstance(item, (bytes, bytearray, memoryview)):
                return preprocess.eval_view_from_bytes(bytes(item), self.crop, name=describe(item, index))
        except preprocess.BadImageError as exc:
            raise InvalidInputError(str(exc)) from exc
        raise InvalidInputError(f"{describe(item, index)}: unsupported type {type(item).__name__}")

    def encoded(self, item: ImageLike, index: int | None = None) -> bytes:
        """Encoded file bytes for the IMAGE_BYTES input: the server decodes and crops."""
        name = describe(item, index)
        if isinstance(item, (str, os.PathLike)):
            try:
                data = Path(item).read_bytes()
            except OSError as exc:
                raise InvalidInputError(f"{name}: cannot read ({exc.strerror or exc})") from exc
        elif isinstance(item, (bytes, bytearray, memoryview)):
            data = bytes(item)
        elif isinstance(item, np.ndarray):
            return png_bytes(self.check_array(item, name))
        else:
            raise InvalidInputError(f"{name}: unsupported type {type(item).__name__}")
        if not data:
            raise InvalidInputError(f"{name}: empty file")
        if len(data) > preprocess.MAX_FILE_BYTES:
            raise InvalidInputError(f"{name}: {len(data)} bytes is over the {preprocess.MAX_FILE_BYTES}-byte limit")
        return data

    def check_array(self, array: np.ndarray, name: str) -> np.ndarray:
        """Refuse anything but uint8 [crop, crop, 3]: silently casting or resizing would change answers."""
        if array.dtype != np.uint8:
            raise InvalidInputError(f"{name}: dtype {array.dtype}, expected uint8 pixels")
        if array.ndim != 3 or array.shape[2] != 3:
            raise InvalidInputError(f"{name}: shape {list(array.shape)}, expected [H, W, 3] RGB")
        if array.shape[:2] != (self.crop, self.crop):
            raise InvalidInputError(
                f"{name}: size {array.shape[0]}x{array.shape[1]}, the model expects {self.crop}x{self.crop} "
                "(pass the file, or aigis.preprocess.center_crop(image, crop))"
            )
        return np.ascontiguousarray(array)


def png_bytes(array: np.ndarray) -> bytes:
    """Lossless encoding, so the server decodes exactly these pixels."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def check_batch(array: np.ndarray, name: str = "images") -> np.ndarray:
    """uint8 [N, H, W, 3] with N >= 1, for models that take whole batches (protection)."""
    if not isinstance(array, np.ndarray):
        raise InvalidInputError(f"{name}: expected a numpy array, got {type(array).__name__}")
    if array.dtype != np.uint8:
        raise InvalidInputError(f"{name}: dtype {array.dtype}, expected uint8 pixels")
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[3] != 3 or array.shape[0] == 0:
        raise InvalidInputError(f"{name}: shape {list(array.shape)}, expected [N, H, W, 3] RGB with N >= 1")
    return np.ascontiguousarray(array)
