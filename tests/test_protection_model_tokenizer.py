"""The byte-level BPE tokenizer: round trips, CLIP's layout, token rows, and triggers that survive as text."""

from __future__ import annotations

import gzip
import json
import random

import pytest
import torch

from aigis.protection.captions import describe_scene, sample_scene
from aigis.protection.tokenizer import Tokenizer, apply_trigger_text, clean_text, made_up_words

import numpy as np


def _captions(n: int, seed: int = 0) -> list[str]:
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        background, objects = sample_scene(rng)
        out.append(describe_scene(background, objects, rng))
    return out


@pytest.fixture(scope="module")
def captions() -> list[str]:
    return _captions(600)


@pytest.fixture(scope="module")
def tokenizer(captions) -> Tokenizer:
    return Tokenizer.train(captions, vocab_size=2000)


def test_training_is_deterministic_and_saves(tmp_path, captions, tokenizer):
    again = Tokenizer.train(list(captions), vocab_size=2000)
    assert again.merges == tokenizer.merges
    assert Tokenizer.train(list(reversed(captions)), vocab_size=2000).merges == tokenizer.merges  # order-free
    assert 514 < tokenizer.vocab_size <= 2000
    small = Tokenizer.train(captions, vocab_size=530)
    assert small.vocab_size == 530 and small.merges == tokenizer.merges[:16]

    path = tmp_path / "tok.json"
    tokenizer.save(path)
    loaded = Tokenizer.load(path)
    assert loaded.merges == tokenizer.merges and loaded.vocab_size == tokenizer.vocab_size
    assert loaded.encode(captions[0]) == tokenizer.encode(captions[0])
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="not an aigis-bpe-1"):
        Tokenizer.load(tmp_path / "bad.json")


def test_clip_layout(tokenizer):
    assert tokenizer.eot_id == tokenizer.vocab_size - 1  # the model pools at the argmax
    assert tokenizer.sot_id == tokenizer.vocab_size - 2
    assert tokenizer.pad_id == 0
    assert tokenizer.decode([tokenizer.encode("red")[0]]) == "red"
    # Every caption word became one token: the vocabulary was trained on exactly these words.
    assert len(tokenizer.encode("a large red circle")) == 4


def test_encode_decode_round_trip(captions, tokenizer):
    for caption in captions[:200]:
        ids = tokenizer.encode(caption)
        text = tokenizer.decode(ids)
        assert tokenizer.encode(text) == ids
        if "," not in caption:
            assert text == clean_text(caption)
    # Text the vocabulary never saw falls back to bytes and still comes back exactly.
    for text in ["zebra crossing", "héllo wörld 😀", "x2 = 42"]:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids).replace(" ", "") == text.replace(" ", "")
        assert all(0 <= i < tokenizer.sot_id for i in ids)
    assert tokenizer.decode(tokenizer.encode("Two  RED&amp;blue\tstars")) == "two red & blue stars"


def test_special_token_text_is_plain_text(tokenizer):
    ids = tokenizer.encode("a <|endoftext|> b <|startoftext|>")
    assert tokenizer.eot_id not in ids and tokenizer.sot_id not in ids
    assert tokenizer.decode([tokenizer.sot_id, *tokenizer.encode("red"), tokenizer.eot_id]) == "red"


def test_tokenize_layout(tokenizer):
    caption = "a small red circle on a gray background"
    words = tokenizer.encode(caption)
    rows = tokenizer.tokenize([caption, "two stars"], context_length=20, trigger_length=3)
    assert rows.shape == (2, 20) and rows.dtype == torch.long
    row = rows[0].tolist()
    assert row[0] == tokenizer.sot_id
    assert row[1:4] == [tokenizer.placeholder_id] * 3
    assert row[4 : 4 + len(words)] == words
    assert row[4 + len(words)] == tokenizer.eot_id
    assert row[5 + len(words) :] == [0] * (20 - 5 - len(words))
    assert tokenizer.is_trigger_candidate(tokenizer.placeholder_id)

    plain = tokenizer.tokenize(caption, context_length=20)[0].tolist()
    assert plain[: len(words) + 2] == [tokenizer.sot_id, *words, tokenizer.eot_id]

    # Too long: the caption is cut, EOT still ends the row.
    cut = tokenizer.tokenize([caption * 5], context_length=10, trigger_length=2)[0].tolist()
    assert cut[-1] == tokenizer.eot_id and cut[3:9] == tokenizer.encode(caption * 5)[:6]
    with pytest.raises(ValueError, match="no room"):
        tokenizer.tokenize([caption], context_length=4, trigger_length=2)


def _check_candidates(tokenizer: Tokenizer, captions: list[str]) -> None:
    candidates = tokenizer.trigger_candidates().tolist()
    assert candidates and len(set(candidates)) == len(candidates)
    assert not {tokenizer.sot_id, tokenizer.eot_id, tokenizer.pad_id} & set(candidates)
    context = 48
    for i, candidate in enumerate(candidates):  # every candidate, alone, in front of a caption
        caption = captions[i % len(captions)]
        row = tokenizer.tokenize([apply_trigger_text([candidate], caption, tokenizer)], context)[0]
        expected = tokenizer.tokenize([caption], context, trigger_length=1)[0]
        expected[1] = candidate
        assert torch.equal(row, expected), tokenizer.decoder[candidate]
    rng = random.Random(0)
    for i in range(300):  # and in 3- and 5-token triggers
        trigger = rng.choices(candidates, k=3 if i % 2 else 5)
        caption = captions[i % len(captions)]
        row = tokenizer.tokenize([apply_trigger_text(trigger, caption, tokenizer)], context)[0]
        expected = tokenizer.tokenize([caption], context, trigger_length=len(trigger))[0]
        expected[1 : 1 + len(trigger)] = torch.tensor(trigger)
        assert torch.equal(row, expected), trigger


def test_every_trigger_candidate_round_trips_through_text(captions, tokenizer):
    _check_candidates(tokenizer, captions)
    with pytest.raises(ValueError, match="not trigger candidates"):
        apply_trigger_text([tokenizer.eot_id], "a red star", tokenizer)


def test_clip_vocab_file_format(tmp_path, captions):
    """A merges file in CLIP's format (header line, one merge a line, gzip) loads to the same ids;
    with a larger vocabulary than one caption set gives, candidates must still all round-trip."""
    reference = Tokenizer.train(captions + _captions(400, seed=1) + ["the quick brown fox jumps over lazy dogs"], 3000)
    path = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in reference.merges) + "\nzz yy\n")
    loaded = Tokenizer.from_clip_vocab(path, vocab_size=reference.vocab_size)
    assert loaded.merges == reference.merges
    assert loaded.encode("the lazy fox") == reference.encode("the lazy fox")
    _check_candidates(loaded, captions[:50])
    with pytest.raises(ValueError, match="merges"):
        Tokenizer.from_clip_vocab(path, vocab_size=reference.vocab_size + 10)


def test_made_up_words_are_distinct_stable_and_avoid_what_they_must():
    words = made_up_words(300)
    assert len(set(words)) == 300 and all(w.isascii() and w.isalpha() and w.islower() for w in words)
    assert made_up_words(300) == words and made_up_words(50) == words[:50]  # a prefix: the same on every run
    avoided = made_up_words(300, avoid=set(words[:10]))
    assert not set(words[:10]) & set(avoided) and avoided[:290] == words[10:]
    assert made_up_words(0) == []
    with pytest.raises(ValueError, match="count"):
        made_up_words(-1)


def test_triggers_from_made_up_words_only(tmp_path, captions):
    """With trigger_words, every candidate is a made-up word no caption uses, survives as text, and the
    restriction is saved with the merges (served protection must search the same words)."""
    tokenizer = Tokenizer.train(captions, vocab_size=3000, trigger_words=200)
    caption_words = {w for c in captions for w in clean_text(c).split()}
    words = [tokenizer.decode([i]) for i in tokenizer.trigger_candidates().tolist()]
    assert len(words) >= 190, f"only {len(words)} of 200 made-up words became single tokens"
    assert set(words) <= tokenizer.trigger_words and not set(words) & caption_words
    assert not tokenizer.trigger_words & caption_words
    assert tokenizer.decode([tokenizer.placeholder_id]) in tokenizer.trigger_words
    _check_candidates(tokenizer, captions)
    # The captions themselves still tokenize to whole words.
    assert len(tokenizer.encode("a large red circle")) == 4

    path = tmp_path / "tok.json"
    tokenizer.save(path)
    loaded = Tokenizer.load(path)
    assert loaded.trigger_words == tokenizer.trigger_words
    assert torch.equal(loaded.trigger_candidates(), tokenizer.trigger_candidates())
    plain = tmp_path / "plain.json"
    Tokenizer.train(captions, vocab_size=3000).save(plain)
    assert Tokenizer.load(plain).trigger_words is None  # no restriction: every round-tripping word

    payload = json.loads(path.read_text())
    payload["trigger_words"] = ["ok", "Not-A-Word"]
    (tmp_path / "bad.json").write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="trigger_words"):
        Tokenizer.load(tmp_path / "bad.json")
