"""The "fashion" captioned scenes: Fashion-MNIST's IDX files read with checks, captions that name
exactly what is drawn where. Uses tiny IDX files written here, so it needs no Debian package."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aigis.protection import fashion
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
