"""Captioned data written as a data owner's files: photo-sized JPEG copies of the procedural scenes."""

import numpy as np
import pytest
from PIL import Image

from aigis.protection.captions import load_images, photo_sized_copies, read_pairs, synth_captioned


def test_photo_sized_copies_keep_every_line_as_a_photo_sized_jpeg(tmp_path):
    root = synth_captioned(tmp_path, 3, 0, size=32, seed=0, captions_per_image=2)
    manifest = photo_sized_copies(root, "train.jsonl", (200, 150))
    small, large = read_pairs(root, "train.jsonl"), read_pairs(root, manifest)
    assert [p.caption for p in large] == [p.caption for p in small]  # same lines, same order
    assert len({p.path for p in large}) == 3 and all(p.path.suffix == ".jpg" for p in large)
    for pair in large:
        with Image.open(pair.path) as image:
            assert image.format == "JPEG" and image.size == (200, 150)
    # They decode back at the model's size like any user's file (short side resized, centre crop).
    back = load_images(large[::2], 32, progress=False).astype(np.int16)
    assert back.shape == (3, 32, 32, 3) and back.std() > 10


def test_photo_sized_copies_refuse_an_empty_size(tmp_path):
    root = synth_captioned(tmp_path, 1, 0, size=32, seed=0)
    with pytest.raises(ValueError, match="photo size must be positive"):
        photo_sized_copies(root, "train.jsonl", (0, 150))
