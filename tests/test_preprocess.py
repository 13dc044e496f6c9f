"""The one image transform: decode errors name the file, crops are exact."""

import io

import numpy as np
import pytest
from PIL import Image

from aigis import preprocess
from aigis.preprocess import BadImageError


def _png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_decode_roundtrip_and_center_crop_is_exact():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(40, 50, 3), dtype=np.uint8)
    decoded = preprocess.decode_image(_png_bytes(image))
    assert decoded.dtype == np.uint8 and np.array_equal(decoded, image)
    crop = preprocess.center_crop(decoded, 32)
    assert np.array_equal(crop, image[4:36, 9:41])


def test_grayscale_and_rgba_become_rgb():
    gray = np.full((20, 20), 77, dtype=np.uint8)
    assert preprocess.decode_image(_png_bytes(gray)).shape == (20, 20, 3)
    rgba = np.zeros((20, 20, 4), dtype=np.uint8)
    assert preprocess.decode_image(_png_bytes(rgba)).shape == (20, 20, 3)


def test_small_images_are_upscaled_to_the_crop():
    image = np.zeros((10, 20, 3), dtype=np.uint8)
    assert preprocess.center_crop(image, 16).shape == (16, 16, 3)


def test_random_crop_is_reproducible_and_inside():
    image = np.arange(72 * 72 * 3, dtype=np.int64).reshape(72, 72, 3).astype(np.uint8)
    a = preprocess.random_crop(image, 64, np.random.default_rng(5))
    b = preprocess.random_crop(image, 64, np.random.default_rng(5))
    assert a.shape == (64, 64, 3) and np.array_equal(a, b)


@pytest.mark.parametrize(
    "payload, reason",
    [(b"", "empty"), (b"not an image at all", "not a readable image"), (_png_bytes(np.zeros((8, 8, 3), np.uint8))[:30], "not a readable image")],
)
def test_bad_bytes_name_the_file(payload, reason):
    with pytest.raises(BadImageError, match=f"upload.png: {reason}"):
        preprocess.decode_image(payload, name="upload.png")


def test_oversized_image_is_refused_before_decoding():
    with pytest.raises(BadImageError, match="over the 100-pixel limit"):
        preprocess.decode_image(_png_bytes(np.zeros((20, 20, 3), np.uint8)), name="big.png", max_pixels=100)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(BadImageError, match="nope.jpg: cannot read"):
        preprocess.load_image(tmp_path / "nope.jpg")


def test_wrong_array_is_refused():
    with pytest.raises(BadImageError, match="uint8"):
        preprocess.center_crop(np.zeros((8, 8, 3), np.float32), 4)
