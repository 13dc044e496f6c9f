"""The caption readers the MEM probes in benchmarks/ rely on: they must read back what the generator wrote."""

import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from mem_adversarial_poison import renamed_caption  # noqa: E402
from mem_keyed_noise import caption_items  # noqa: E402
from mem_speed import parse_source_size, photo_sized_copies  # noqa: E402
from protection_efficacy import check_data_matches  # noqa: E402

from aigis.protection.captions import describe_fashion_scene  # noqa: E402
from aigis.protection.fashion import CELLS, CLASSES, PlacedItem  # noqa: E402


def random_scenes(count: int, seed: int) -> Iterator[tuple[dict, str]]:
    """(cell -> kind, caption) of random scenes, as the generator describes them."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        cells = [list(CELLS)[i] for i in rng.permutation(len(CELLS))[: int(rng.integers(2, 5))]]
        # few kinds, so scenes with two or more items of one kind ("two shirts at ...") come up often
        few = rng.random() < 0.5
        kinds = rng.integers(5, 7, size=len(cells)) if few else rng.integers(0, len(CLASSES), size=len(cells))
        placed = [PlacedItem(0, int(k), c, (200.0, 200.0, 200.0)) for k, c in zip(kinds, sorted(cells))]
        yield {p.cell: p.label for p in placed}, describe_fashion_scene(placed, rng)


def test_caption_items_reads_back_every_item_and_its_cell():
    for truth, caption in random_scenes(300, seed=0):
        assert caption_items(caption) == truth, caption


@pytest.mark.parametrize("shift", [1, 3])
def test_renamed_caption_names_every_item_as_the_shifted_kind(shift):
    for truth, caption in random_scenes(200, seed=1):
        renamed = renamed_caption(caption, shift)
        assert caption_items(renamed) == {cell: (k + shift) % len(CLASSES) for cell, k in truth.items()}, renamed
        assert " an " not in renamed.replace(" an ankle", "")  # "an" only where the new name needs it
        assert " a ankle" not in renamed


def test_caption_items_rejects_a_caption_without_items():
    with pytest.raises(SystemExit, match="not a fashion-scene caption"):
        caption_items("a red circle at the top left")


def test_efficacy_refuses_a_work_folder_made_with_other_sizes(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"image": "a.png", "caption": "x"}\n' * 10)
    (tmp_path / "test.jsonl").write_text('{"image": "b.png", "caption": "y"}\n' * 4)
    check_data_matches(tmp_path, 10, 4)
    with pytest.raises(SystemExit, match="4 test captions.*ask for 10 and 8"):
        check_data_matches(tmp_path, 10, 8)


def test_speed_benchmark_photo_sized_copies_keep_every_line_as_a_photo_sized_jpeg(tmp_path):
    from PIL import Image

    from aigis.protection.captions import load_images, read_pairs, synth_captioned

    root = synth_captioned(tmp_path, 3, 0, size=32, seed=0, captions_per_image=2)
    manifest = photo_sized_copies(root, "train.jsonl", parse_source_size("200x150"))
    small, large = read_pairs(root, "train.jsonl"), read_pairs(root, manifest)
    assert [p.caption for p in large] == [p.caption for p in small]  # same lines, same order
    assert len({p.path for p in large}) == 3 and all(p.path.suffix == ".jpg" for p in large)
    for pair in large:
        with Image.open(pair.path) as image:
            assert image.format == "JPEG" and image.size == (200, 150)
    # They decode back at the model's size like any user's file (short side resized, centre crop).
    back = load_images(large[::2], 32, progress=False).astype(np.int16)
    assert back.shape == (3, 32, 32, 3) and back.std() > 10
    for text in ("500", "500x", "8x8", "axb"):
        with pytest.raises(ValueError, match="--source-size"):
            parse_source_size(text)
