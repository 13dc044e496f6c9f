"""Noise keyed by what the caption says: the class-wise shortcut of unlearnable examples, for captions.

    python benchmarks/mem_keyed_noise.py --pattern texture   # one random +-8/255 texture per item kind
    python benchmarks/mem_keyed_noise.py --pattern cells     # one code of 4-px colour cells per item kind

Why: in supervised learning, noise shared by every image of a class ("class-wise") is far more unlearnable
than noise made per image, because the one pattern explains the label across all of them. MEM's noise is
per image and is explained by a per-image trigger, so the caption's content words stay a second,
consistent signal that points at the items' shapes (BENCHMARKS.md, session 21: what ResNet hackers keep is
the item kinds). Here the noise itself carries the content instead: each item's cell of a fashion scene
gets the pattern of its item kind (empty cells none), so "a bag in the lower left" is explained by the
bag pattern in the lower-left quarter as completely as by the bag. No surrogate, no trigger: the captions
are published unchanged. If a fresh model took the patterns first, the shapes would not be learned.

Data: the five-caption Fashion-MNIST scenes of `--data` (protection_efficacy.py --style fashion
--captions-per-image 5). Hackers as in protection_efficacy.py (`rn_tiny`, 10 epochs from scratch, the PNGs
read back). Results: benchmarks/results/mem_keyed_noise_<pattern>.{json,md}.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np

from protection_results import probe_data, probe_parser, report_probe_set, write_probe_manifest

PATTERN_SIDE = {"texture": 16, "cells": 2}  # random +-1 values per side of one item's pattern
CELL_PX = 4  # "cells": each value covers 4 x 4 px, the 8 x 8 code tiled over the item's quarter


def caption_items(caption: str) -> dict[tuple[int, int], int]:
    """{cell: item kind} a fashion-scene caption names (protection.captions.describe_fashion_scene): each kind
    name owns the cell phrases up to the next kind name ("two t-shirts at the top left and at the bottom left")."""
    from aigis.protection.fashion import CELLS, CLASSES

    names = sorted(((name, label) for label, pair in enumerate(CLASSES) for name in pair), key=lambda x: -len(x[0]))
    phrases = sorted(((p, cell) for cell, pair in CELLS.items() for p in pair), key=lambda x: -len(x[0]))
    taken = np.zeros(len(caption), dtype=bool)  # longest names first, so "shirt" is not found inside "t-shirt"
    found = []
    for name, label in names:
        for match in re.finditer(r"\b" + re.escape(name) + r"\b", caption):
            if not taken[match.start() : match.end()].any():
                taken[match.start() : match.end()] = True
                found.append((match.start(), match.end(), label))
    found.sort()
    items = {}
    for j, (_, end, label) in enumerate(found):
        segment = caption[end : found[j + 1][0] if j + 1 < len(found) else len(caption)]
        items.update({cell: label for phrase, cell in phrases if phrase in segment})
    if not items:
        raise SystemExit(f"not a fashion-scene caption (no item in a cell named): {caption!r}")
    return items


def kind_patterns(pattern: str, seed: int) -> np.ndarray:
    """int [kinds, p, p, 3] of +-1: one pattern per Fashion-MNIST kind (p = 16 px texture or 8 px of 4-px cells)."""
    from aigis.protection.fashion import CLASSES

    side = PATTERN_SIDE[pattern]
    values = np.random.default_rng(seed).choice([-1, 1], size=(len(CLASSES), side, side, 3))
    if pattern == "cells":
        values = np.repeat(np.repeat(values, CELL_PX, 1), CELL_PX, 2)
    return values


def write_keyed_set(data: Path, out: Path, pattern: str, levels: int, seed: int) -> int:
    """The protected set (images/, manifest.jsonl, protection.json); returns how many images' captions disagreed."""
    from PIL import Image

    from aigis.protection.captions import read_pairs

    pairs = read_pairs(data, "train.jsonl")  # checks every image path stays inside data
    root = data.resolve()
    lines = [(p.path.relative_to(root).as_posix(), p.caption) for p in pairs]
    captions_of: dict[str, list[str]] = {}
    for key, caption in lines:
        captions_of.setdefault(key, []).append(caption)
    patterns = kind_patterns(pattern, seed)
    disagreeing = 0
    for key, captions in captions_of.items():
        items = caption_items(captions[0])
        disagreeing += any(caption_items(c) != items for c in captions[1:])
        image = np.asarray(Image.open(root / key).convert("RGB")).astype(np.int16)
        half = image.shape[0] // 2
        if image.shape[0] != image.shape[1] or half % patterns.shape[1]:
            raise SystemExit(f"{key}: {image.shape[1]} x {image.shape[0]} px; the patterns need square scenes whose "
                             f"quarter is a multiple of {patterns.shape[1]} px")
        noise = np.zeros_like(image)
        for (row, col), label in items.items():
            reps = half // patterns.shape[1]
            quarter = np.tile(patterns[label], (reps, reps, 1)) * levels
            noise[row * half : (row + 1) * half, col * half : (col + 1) * half] = quarter
        (out / key).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(image + noise, 0, 255).astype(np.uint8)).save(out / key)
    write_probe_manifest(out, lines, {"mode": f"keyed-{pattern}", "epsilon": levels / 255,
                                      "epsilon_uint8_levels": levels, "trigger_length": 0, "seed": seed})
    return disagreeing


def main(argv: list[str] | None = None) -> int:
    parser = probe_parser(__doc__, "keyed_noise", hackers=3)
    parser.add_argument("--pattern", choices=sorted(PATTERN_SIDE), required=True)
    args = parser.parse_args(argv)
    data = probe_data(parser, args.data)

    levels = 8
    out = Path(args.work) / args.pattern
    disagreeing = write_keyed_set(data, out, args.pattern, levels, seed=0)
    report_probe_set(
        "mem_keyed_noise.py", argv, f"mem_keyed_noise_{args.pattern}",
        f"Noise keyed by item kind ({args.pattern}, +-{levels}/255 over each item's quarter, empty quarters none), "
        f"captions unchanged, no surrogate; {args.hackers} `rn_tiny` hackers from scratch, 10 epochs. "
        f"Images whose captions named different items: {disagreeing}.",
        data, out, Path(args.work) / f"evaluation_{args.pattern}", args.hackers, levels,
        captions_disagreeing=disagreeing)
    return 0


if __name__ == "__main__":
    sys.exit(main())
