"""The "fashion" and "boutique" captioned scenes: Fashion-MNIST's IDX files read with checks, captions that
name exactly what is drawn where. Uses tiny IDX files written here, so it needs no Debian package -- but for
one boutique test on the real items, skipped (with the reason) where Fashion-MNIST is not installed."""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aigis.protection import captions, fashion
from aigis.protection.captions import synth_captioned

SIZE = 32


def write_idx(folder: Path, prefix: str, items: np.ndarray, labels: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    images = (2051).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in items.shape) + items.tobytes()
    tags = (2049).to_bytes(4, "big") + labels.shape[0].to_bytes(4, "big") + labels.astype(np.uint8).tobytes()
    (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(images))
    (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(tags))


@pytest.fixture()
def catalogue_dir(tmp_path: Path) -> Path:
    """Every training item is a sneaker (7), every test item a bag (8): solid white squares, so a
    drawn cell is bright and an empty one stays dark."""
    root = tmp_path / "fmnist"
    solid = np.full((6, 28, 28), 255, dtype=np.uint8)
    write_idx(root, "train", solid, np.full(6, 7))
    write_idx(root, "t10k", solid[:4], np.full(4, 8))
    return root


CELL_WORDS = {
    (0, 0): ("top left", "upper left"), (0, 1): ("top right", "upper right"),
    (1, 0): ("bottom left", "lower left"), (1, 1): ("bottom right", "lower right"),
}


def cells_named(caption: str) -> set[tuple[int, int]]:
    return {cell for cell, words in CELL_WORDS.items() if any(w in caption for w in words)}


def test_captions_name_each_drawn_item_and_its_cell_and_nothing_else(tmp_path, catalogue_dir):
    out = synth_captioned(tmp_path / "set", 12, 6, size=SIZE, style="fashion", captions_per_image=2,
                          fashion_root=catalogue_dir)
    train = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    test = [json.loads(line) for line in (out / "test.jsonl").read_text().splitlines()]
    assert len(train) == 24 and len(test) == 6
    others = [s for i, (s, _) in enumerate(fashion.CLASSES) if i not in (7, 8)]
    for split, lines, kind in (("train", train, "sneaker"), ("test", test, "bag")):
        for line in lines:
            caption = line["caption"]
            assert kind in caption, (split, caption)
            assert not any(re.search(rf"\b{re.escape(o)}\b", caption) for o in others), caption
            image = np.asarray(Image.open(out / line["image"]), dtype=np.float32)
            assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.float32
            named = cells_named(caption)
            assert 2 <= len(named) <= 4, caption
            half = SIZE // 2
            for (row, col) in CELL_WORDS:
                cell = image[row * half : (row + 1) * half, col * half : (col + 1) * half]
                # a drawn item's white becomes a tint >= 0.4 * 255 in every channel; the backdrop is <= 40
                assert (cell.mean() > 80) == ((row, col) in named), (caption, (row, col), cell.mean())


def test_same_arguments_write_the_same_bytes(tmp_path, catalogue_dir):
    a = synth_captioned(tmp_path / "a", 5, 2, size=SIZE, style="fashion", fashion_root=catalogue_dir)
    b = synth_captioned(tmp_path / "b", 5, 2, size=SIZE, style="fashion", fashion_root=catalogue_dir)
    for name in ("train.jsonl", "test.jsonl", "images/00003.png", "images/00006.png"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_missing_or_malformed_files_are_named(tmp_path, catalogue_dir, monkeypatch):
    with pytest.raises(fashion.FashionDataError, match="missing Fashion-MNIST file .*t10k-images"):
        bad = tmp_path / "half"
        write_idx(bad, "train", np.zeros((2, 28, 28), np.uint8), np.zeros(2))
        synth_captioned(tmp_path / "x", 2, 1, size=SIZE, style="fashion", fashion_root=bad)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(fashion.FashionDataError, match="train-images-idx3-ubyte.gz: not a readable gzip"):
        fashion.load_catalogue("train", corrupt)
    (corrupt / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress((2049).to_bytes(4, "big") + bytes(8)))
    with pytest.raises(fashion.FashionDataError, match="not an IDX file with magic 2051"):
        fashion.load_catalogue("train", corrupt)
    short = tmp_path / "short"
    write_idx(short, "train", np.zeros((3, 28, 28), np.uint8), np.zeros(2))
    with pytest.raises(fashion.FashionDataError, match="3 train images but 2 labels"):
        fashion.load_catalogue("train", short)
    monkeypatch.setenv(fashion.ENV_VAR, str(catalogue_dir))
    assert fashion.fashion_mnist_dir() == catalogue_dir
    with pytest.raises(ValueError, match="at least 16 px"):
        synth_captioned(tmp_path / "tiny", 2, 0, size=12, style="fashion")


def test_the_demo_protects_item_scenes_when_fashion_mnist_is_there_and_says_why_when_not(tmp_path, catalogue_dir,
                                                                                        monkeypatch, capsys):
    from aigis.demo import demo_scene_style

    monkeypatch.setenv(fashion.ENV_VAR, str(catalogue_dir))
    assert demo_scene_style() == "fashion"
    monkeypatch.setenv(fashion.ENV_VAR, str(tmp_path / "empty"))
    assert demo_scene_style() == "flat"
    assert f"{tmp_path / 'empty'} lacks train-images-idx3-ubyte.gz" in capsys.readouterr().out
    (catalogue_dir / "t10k-labels-idx1-ubyte.gz").unlink()  # a partial download
    monkeypatch.setenv(fashion.ENV_VAR, str(catalogue_dir))
    assert demo_scene_style() == "flat" and "lacks t10k-labels-idx1-ubyte.gz" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# Style "boutique": the same items in named colours on a 3x3 grid over a painted texture, other wording

BOUTIQUE_SIZE = 30  # not a multiple of 3: the grid sits centred, 1 px in


@pytest.fixture(scope="module")
def fashion_mnist() -> Path:
    """The real Fashion-MNIST folder, or a skip that says what is missing."""
    try:
        folder = fashion.fashion_mnist_dir()
        missing = fashion.missing_files(folder)
        reason = f"{folder} lacks {', '.join(missing)}" if missing else ""
    except fashion.FashionDataError as exc:
        reason = str(exc)
    if reason:
        print(f"skipped: {reason} (`make fashion-mnist`)")
        pytest.skip(reason)
    return folder


def cell_meant(phrase: str) -> tuple[int, int]:
    """What a place phrase means to a reader: the row from top/high vs bottom/low, the column from left/right."""
    words = set(phrase.split())
    row = 0 if words & {"top", "high"} else 2 if words & {"bottom", "low"} else 1
    col = 0 if "left" in words else 2 if "right" in words else 1
    return row, col


def said(words: Iterable[str], caption: str) -> set[str]:
    """The words of `words` that caption uses as whole words ("shirt" is not in "t-shirt", "bag" not in "handbag")."""
    return {w for w in words if re.search(rf"(?<![\w-]){re.escape(w)}(?![\w-])", caption)}


def check_boutique_caption(caption: str, backdrop: fashion.Backdrop, items: list[fashion.ColouredItem]) -> None:
    """The caption names the backdrop's paint and texture, and each item with its colour and place -- and nothing
    that is not in the picture."""
    assert caption[0].isupper() and caption.endswith("."), caption
    text = caption.lower()  # a sentence starts with a capital
    assert said(fashion.PAINTS, text) == {backdrop.paint}, caption
    assert said(fashion.TEXTURES, text) == {backdrop.texture}, caption
    assert said(fashion.ITEM_COLOURS, text) == {item.colour for item in items}, caption
    places = {cell for cell, ways in captions.BOUTIQUE_PLACES.items() if said(ways, text)}
    assert places == {item.cell for item in items}, caption
    kinds = {label for label, nouns in captions.BOUTIQUE_NOUNS.items() if said(nouns, text)}
    assert kinds == {item.label for item in items}, caption
    for item in items:  # colour, kind and place said together, in that order
        nouns, ways = captions.BOUTIQUE_NOUNS[item.label], captions.BOUTIQUE_PLACES[item.cell]
        assert re.search(rf"\b{item.colour} ({'|'.join(nouns)}) ({'|'.join(ways)})\b", text), (caption, item)


def boutique_scenes(out: Path, seed: int, n_train: int, root: Path) -> list[tuple[np.ndarray, list[str], tuple]]:
    """(image, captions, (backdrop, items)) per image written by synth_captioned: the scene is sampled again from
    scene i's generator and the item catalogue of its split, and must render to the very pixels written."""
    catalogues = {split: fashion.load_catalogue(split, root) for split in ("train", "test")}
    lines = [json.loads(line) for name in ("train.jsonl", "test.jsonl")
             for line in (out / name).read_text().splitlines()]
    scenes = []
    for i, relative in enumerate(dict.fromkeys(line["image"] for line in lines)):
        catalogue = catalogues["train" if i < n_train else "test"]
        rng = np.random.default_rng([seed, i])
        backdrop, items = fashion.sample_boutique_scene(rng, catalogue)
        image = np.asarray(Image.open(out / relative))
        rendered = fashion.render_boutique_scene(backdrop, items, catalogue, image.shape[0], rng)
        assert np.array_equal(image, rendered), relative
        texts = [line["caption"] for line in lines if line["image"] == relative]
        for caption in texts:
            check_boutique_caption(caption, backdrop, items)
        scenes.append((image, texts, (backdrop, items)))
    return scenes


def cell_pixels(image: np.ndarray, cell: tuple[int, int]) -> np.ndarray:
    side = image.shape[0] // 3
    top, left = ((image.shape[0] - 3 * side) // 2 + k * side for k in cell)
    return image[top : top + side, left : left + side].astype(np.float32)


def test_boutique_place_phrases_say_the_cell_they_stand_for():
    phrases = [(cell, way) for cell, ways in captions.BOUTIQUE_PLACES.items() for way in ways]
    assert {cell for cell, _ in phrases} == {(r, c) for r in range(3) for c in range(3)}
    for cell, way in phrases:
        assert cell_meant(way) == cell, way
        assert not [other for _, other in phrases if other != way and way in other], way  # one phrase, one cell


def test_boutique_captions_fit_the_small_presets_context():
    """The hackers' small CLIPs read 40 tokens, start and end of text included: a caption must fit whole."""
    from aigis.protection.clip import PRESETS
    from aigis.protection.tokenizer import Tokenizer

    every_kind = fashion.Catalogue(np.zeros((10, 28, 28), np.uint8), np.arange(10))
    texts = []
    for i in range(300):
        rng = np.random.default_rng([0, i])
        backdrop, items = fashion.sample_boutique_scene(rng, every_kind)
        texts += [captions.describe_boutique_scene(backdrop, items, rng) for _ in range(5)]
    tokenizer = Tokenizer.train(texts)
    assert max(len(tokenizer.encode(text)) for text in texts) + 2 <= PRESETS["rn_tiny"].context_length


def test_boutique_scenes_draw_what_their_captions_say(tmp_path, catalogue_dir):
    out = synth_captioned(tmp_path / "set", 12, 6, size=BOUTIQUE_SIZE, seed=3, style="boutique",
                          captions_per_image=5, fashion_root=catalogue_dir)
    scenes = boutique_scenes(out, 3, 12, catalogue_dir)
    assert len(scenes) == 18
    for i, (image, texts, (backdrop, items)) in enumerate(scenes):
        assert len(texts) == (5 if i < 12 else 1) and 1 <= len(items) <= 3
        if i < 12:
            assert len(set(texts)) > 1, texts  # five captions, not one wording five times
        # The fixture's training items are all sneakers, its test items all bags: test scenes show test items.
        assert {item.label for item in items} == {7 if i < 12 else 8}
        for cell in {(r, c) for r in range(3) for c in range(3)}:
            pixels = cell_pixels(image, cell)
            drawn = [item for item in items if item.cell == cell]
            if drawn:  # the fixture's items are solid squares: the cell is the named colour (+-15 jitter)
                colour = np.asarray(fashion.ITEM_COLOURS[drawn[0].colour])
                assert np.abs(pixels.mean(axis=(0, 1)) - colour).max() < 20, (texts[0], cell)
            else:  # an empty cell shows the backdrop's texture, not a flat colour with sensor noise (std 3)
                assert pixels.std(axis=(0, 1)).mean() > 8, (texts[0], cell)
    with pytest.raises(ValueError, match="boutique scenes need at least 24 px"):
        synth_captioned(tmp_path / "tiny", 2, 0, size=20, style="boutique", fashion_root=catalogue_dir)


def test_boutique_on_fashion_mnist_is_fixed_by_its_seed(tmp_path, fashion_mnist):
    five = synth_captioned(tmp_path / "five", 6, 3, size=32, seed=0, style="boutique", captions_per_image=5,
                          fashion_root=fashion_mnist)
    again = synth_captioned(tmp_path / "again", 6, 3, size=32, seed=0, style="boutique", captions_per_image=5,
                          fashion_root=fashion_mnist)
    one = synth_captioned(tmp_path / "one", 6, 3, size=32, seed=0, style="boutique", fashion_root=fashion_mnist)
    other = synth_captioned(tmp_path / "other", 6, 3, size=32, seed=1, style="boutique", fashion_root=fashion_mnist)
    files = ["train.jsonl", "test.jsonl", *(f"images/{i:05d}.png" for i in range(9))]
    assert all((five / name).read_bytes() == (again / name).read_bytes() for name in files)
    for root, per_image in ((five, 5), (one, 1), (other, 1)):
        assert len((root / "train.jsonl").read_text().splitlines()) == 6 * per_image
        assert len((root / "test.jsonl").read_text().splitlines()) == 3
    # The captions drawn do not change the scenes; the seed does.
    assert all((five / name).read_bytes() == (one / name).read_bytes() for name in files[2:])
    assert all((five / name).read_bytes() != (other / name).read_bytes() for name in files)
    for root, seed in ((five, 0), (other, 1)):
        for i, (image, texts, (backdrop, items)) in enumerate(boutique_scenes(root, seed, 6, fashion_mnist)):
            if root is five and i < 6:
                assert len(set(texts)) > 1, texts  # five wordings, not one five times
            empty = {(r, c) for r in range(3) for c in range(3)} - {item.cell for item in items}
            assert min(cell_pixels(image, cell).std(axis=(0, 1)).mean() for cell in empty) > 8, texts
