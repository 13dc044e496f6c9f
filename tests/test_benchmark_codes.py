"""The hand-made shortcut of benchmarks/mem_texture_code.py: what it writes must be the code it says it is."""

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from mem_texture_code import (naming_words, kind_nouns, texture_noise, texture_sets, texture_tiles,  # noqa: E402
                              texture_words, write_texture_set)

from aigis.protection.fashion import CLASSES  # noqa: E402


def test_every_image_gets_a_set_of_textures_no_other_image_has():
    sets = texture_sets(400, textures=48, per_image=3, seed=1)
    assert sets.shape == (400, 3)
    assert len({tuple(s) for s in sets}) == 400
    assert all(len(set(s)) == 3 for s in sets)
    assert sets.min() >= 0 and sets.max() < 48


def test_too_few_textures_or_an_even_count_is_refused():
    with pytest.raises(SystemExit, match="fewer than"):
        texture_sets(20, textures=5, per_image=3, seed=0)  # only 10 sets of 3 from 5
    with pytest.raises(SystemExit, match="odd"):
        texture_sets(10, textures=48, per_image=2, seed=0)


def test_the_noise_is_the_sign_of_the_tiles_sum_repeated_over_the_image():
    tiles = texture_tiles(6, tile=4, seed=0)
    noise = texture_noise(tiles, np.array([0, 2, 5]), 32, 32, levels=8)
    assert noise.shape == (32, 32, 3) and set(np.unique(noise)) == {-8, 8}
    expected = np.sign(tiles[0].astype(int) + tiles[2] + tiles[5]) * 8
    for r in range(0, 32, 4):
        for c in range(0, 32, 4):
            assert np.array_equal(noise[r:r + 4, c:c + 4], expected)
    # each chosen tile agrees with the noise on most sub-pixels, an unchosen one on about half
    agree = [np.mean(np.sign(noise[:4, :4]) == tiles[k]) for k in range(6)]
    assert min(agree[k] for k in (0, 2, 5)) > 0.6


@pytest.mark.parametrize("decoys", [0, 4])
def test_the_written_set_carries_the_code_in_its_pixels_and_its_captions(tmp_path, decoys):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(6):
        Image.fromarray(rng.integers(20, 230, size=(32, 32, 3), dtype=np.uint8)).save(data / "images" / f"{i}.png")
        lines += [{"image": f"images/{i}.png", "caption": f"a bag in the lower left number {j}"} for j in range(2)]
    (data / "train.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out"
    write_texture_set(data, out, textures=8, per_image=3, tile=4, trigger_length=10, levels=8, seed=0, decoys=decoys)
    written = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [w["image"] for w in written] == [line["image"] for line in lines]
    nouns = set(kind_nouns())
    triggers = {}
    for w, line in zip(written, lines):
        trigger, caption = w["caption"][: -len(line["caption"]) - 1].split(), w["caption"][-len(line["caption"]):]
        assert caption == line["caption"] and len(trigger) == 10
        assert sum(word in nouns for word in trigger) >= decoys
        assert triggers.setdefault(w["image"], trigger) == trigger  # one trigger per image, on all its captions
    for i in range(6):
        before = np.asarray(Image.open(data / "images" / f"{i}.png")).astype(int)
        after = np.asarray(Image.open(out / "images" / f"{i}.png")).astype(int)
        assert set(np.unique(after - before)) == {-8, 8}  # no pixel near 0 or 255 here, so nothing clipped
        assert len({w for w in triggers[f"images/{i}.png"] if w not in nouns}) == 3  # its three textures' names


def test_kind_nouns_are_words_the_captions_use():
    assert len(kind_nouns()) == len(CLASSES)
    for noun, (singular, plural) in zip(kind_nouns(), CLASSES):
        assert noun in singular.split() and any(word.startswith(noun) for word in plural.split())


def test_by_channel_every_colour_channel_carries_one_texture_whole():
    sets = texture_sets(50, textures=12, per_image=3, seed=2, by_channel=True)  # of 4 ** 3 = 64 possible
    assert len({tuple(s) for s in sets}) == 50 and all(list(s % 3) == [0, 1, 2] for s in sets)
    tiles = texture_tiles(12, tile=4, seed=0)
    noise = texture_noise(tiles, sets[0], 8, 8, levels=8, by_channel=True)
    for channel, k in enumerate(sets[0]):
        assert np.array_equal(noise[:4, :4, channel], tiles[k][..., channel] * 8)
        assert np.array_equal(noise[4:, 4:, channel], tiles[k][..., channel] * 8)
    with pytest.raises(SystemExit, match="one texture per colour channel"):
        texture_sets(10, textures=10, per_image=3, seed=0, by_channel=True)


def test_named_per_image_takes_that_many_textures_from_the_word_named_ones():
    sets = texture_sets(300, textures=96, per_image=3, seed=4, named=10, named_per_image=1)
    assert len({tuple(s) for s in sets}) == 300
    assert all(sum(k < 10 for k in s) == 1 for s in sets)
    every = texture_sets(100, textures=96, per_image=3, seed=4, named=45, named_per_image=3)
    assert every.max() < 45 and len({tuple(s) for s in every}) == 100
    with pytest.raises(SystemExit, match="named-per-image"):
        texture_sets(10, textures=96, per_image=3, seed=0, named=2, named_per_image=3)  # only 2 named
    with pytest.raises(SystemExit, match="fewer than"):
        texture_sets(50, textures=96, per_image=3, seed=0, named=5, named_per_image=3)  # C(5, 3) = 10 sets


def test_caption_words_name_the_first_textures_then_made_up_words():
    counts = Counter({"the": 9, "bag": 5, "left": 7, ",": 8, "coat": 1})
    assert naming_words("caption", counts) == ["the", "left", "bag", "coat"]  # by frequency, no punctuation
    nouns = naming_words("nouns", counts)
    assert nouns[: len(CLASSES)] == kind_nouns() and "bags" in nouns and "trousers" in nouns
    assert len(nouns) == len(set(nouns))  # "pairs of trousers" adds no second "trousers"
    for plural in nouns[len(CLASSES):]:
        assert any(plural == many.split()[-1] for _, many in CLASSES)
    words = texture_words(8, "caption", counts)
    assert words[:4] == ["the", "left", "bag", "coat"] and len(set(words)) == 8
    assert not set(words[4:]) & set(counts)  # the made-up rest avoids every caption word
