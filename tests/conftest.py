"""Shared test settings: small thread counts so the suite behaves on 2-core machines."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random CLIP, its tokenizer and a batch of 6 scenes at 32 px (for in-process MEM checks)."""
    from aigis.protection.captions import load_images, read_pairs, synth_captioned
    from aigis.protection.clip import build_clip
    from aigis.protection.tokenizer import Tokenizer

    root = synth_captioned(tmp_path_factory.mktemp("mem-tiny"), 6, 0, size=32, seed=5)
    pairs = read_pairs(root, "train.jsonl")
    captions = [p.caption for p in pairs]
    tokenizer = Tokenizer.train(captions, 700)
    torch.manual_seed(0)
    model = build_clip("rn_tiny", tokenizer.vocab_size).eval()
    return model, tokenizer, load_images(pairs, 32, progress=False), captions
