"""A shortcut no surrogate chose: does a structured noise <-> trigger code protect against ResNet hackers?

    python benchmarks/mem_structured_code.py --variant code          # the code alone, no surrogate
    python benchmarks/mem_structured_code.py --variant mem           # MEM started from the code, triggers fixed
    python benchmarks/mem_structured_code.py --variant mem --trigger-iterations 5   # ... triggers searched too

Why: noise made by MEM against an `rn_tiny` surrogate keeps 3.25x chance against independently drawn
`rn_tiny` hackers (BENCHMARKS.md, session 18), i.e. what one surrogate reads is not quite what another
learns. Synthetic shortcuts that no model chose (e.g. linearly separable patches in the unlearnable-examples
literature) transfer across architectures by construction, so this tests the multimodal analogue: every
image gets a random 3-bit code per cell of a 4 x 4 grid (the sign of the noise in each colour channel,
+-epsilon), and its trigger's word j names cell j's code (16 positions x 8 symbols = 128 made-up words).
The image<->trigger mapping is then local and linear, the easiest shortcut a fresh model could take.

`code` writes that set as it is; `mem` runs the protection job (session 18's `rn_tiny`, MEM-16, 4 x 4 cells,
batch statistics) with its noise and triggers initialised from the code instead of zero / placeholders.
Hackers as in protection_efficacy.py (six `rn_tiny`, 10 epochs from scratch, the PNGs read back).
Data: the five-caption Fashion-MNIST scenes of `--data` (made by protection_efficacy.py --style fashion
--captions-per-image 5). Results: benchmarks/results/mem_structured_code_<variant>.{json,md}.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from protection_results import (default_job_settings, probe_data, probe_parser, report_probe_set, run_job_from,
                                write_probe_manifest)

GRID = 4
SYMBOLS = 8  # 3 bits: the noise's sign in each colour channel


def code_noise(codes: np.ndarray, height: int, width: int, levels: int) -> np.ndarray:
    """codes int [N, GRID * GRID] in 0..7 -> int16 noise [N, H, W, 3] of +-levels, one value per cell and channel."""
    bits = np.stack([(codes >> c) & 1 for c in range(3)], -1) * 2 - 1  # [N, cells, 3] in {-1, 1}
    cells = bits.reshape(codes.shape[0], GRID, GRID, 3)
    bh, bw = -(-height // GRID), -(-width // GRID)
    return (np.repeat(np.repeat(cells, bh, 1), bw, 2)[:, :height, :width] * levels).astype(np.int16)


def write_code_set(data: Path, out: Path, levels: int, seed: int) -> None:
    """The structured code as a protected set (images/, manifest.jsonl, protection.json), no surrogate."""
    from PIL import Image

    from aigis.protection.captions import read_pairs
    from aigis.protection.tokenizer import _words, made_up_words

    pairs = read_pairs(data, "train.jsonl")  # checks every image path stays inside data
    root = data.resolve()
    lines = [(p.path.relative_to(root).as_posix(), p.caption) for p in pairs]
    keys = sorted({key for key, _ in lines})
    caption_words = {w for _, caption in lines for w in _words(caption)}  # the words the tokenizer sees
    words = np.array(made_up_words(GRID * GRID * SYMBOLS, avoid=caption_words)).reshape(GRID * GRID, SYMBOLS)
    rng = np.random.default_rng(seed)
    codes = {key: rng.integers(0, SYMBOLS, size=GRID * GRID) for key in keys}
    for key in keys:
        image = np.asarray(Image.open(root / key).convert("RGB")).astype(np.int16)
        noise = code_noise(codes[key][None], image.shape[0], image.shape[1], levels)[0]
        (out / key).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(image + noise, 0, 255).astype(np.uint8)).save(out / key)
    triggers = {key: " ".join(words[j, codes[key][j]] for j in range(GRID * GRID)) for key in keys}
    write_probe_manifest(out, [(key, f"{triggers[key]} {caption}") for key, caption in lines], {
        "mode": "structured-code", "epsilon": levels / 255, "epsilon_uint8_levels": levels,
        "trigger_length": GRID * GRID, "seed": seed})


def run_mem_from_code(data: Path, out: Path, levels: int, trigger_iterations: int, seed: int) -> dict:
    """The protection job with noise and triggers initialised from a structured code."""

    def from_code(state, tokenizer, images):
        n, h, w, _ = images.shape
        codes = np.random.default_rng(seed).integers(0, SYMBOLS, size=(n, GRID * GRID))
        noise = code_noise(codes, h, w, levels)
        state.noise[...] = (np.clip(images.astype(np.int16) + noise, 0, 255) - images).astype(np.int8)
        candidates = tokenizer.trigger_candidates().numpy()
        if len(candidates) < GRID * GRID * SYMBOLS:
            raise SystemExit(f"the tokenizer has {len(candidates)} trigger words; the code needs {GRID * GRID * SYMBOLS}")
        table = candidates[: GRID * GRID * SYMBOLS].reshape(GRID * GRID, SYMBOLS)
        state.triggers[...] = table[np.arange(GRID * GRID)[None, :], codes]

    settings = default_job_settings(epsilon=levels / 255, trigger_length=GRID * GRID, noise_grid=GRID,
                                    trigger_iterations=trigger_iterations)
    return run_job_from(data, out, settings, from_code)


def main(argv: list[str] | None = None) -> int:
    parser = probe_parser(__doc__, "structured_code", hackers=6)
    parser.add_argument("--variant", choices=("code", "mem"), required=True)
    parser.add_argument("--trigger-iterations", type=int, default=0, help="with --variant mem (default 0: fixed)")
    args = parser.parse_args(argv)
    data = probe_data(parser, args.data)

    levels = 8
    variant = args.variant if args.variant == "code" else f"mem_t{args.trigger_iterations}"
    out = Path(args.work) / variant
    jobs = {}
    if args.variant == "code":
        write_code_set(data, out, levels, seed=0)
    else:
        jobs["mem"] = run_mem_from_code(data, out, levels, args.trigger_iterations, seed=1234)
    report_probe_set(
        "mem_structured_code.py", argv, f"mem_structured_code_{variant}",
        f"Structured code ({GRID} x {GRID} cells x 3 colour-sign bits <-> a {GRID * GRID}-word trigger), "
        f"variant {variant}; {args.hackers} `rn_tiny` hackers from scratch, 10 epochs.",
        data, out, Path(args.work) / f"evaluation_{variant}", args.hackers, levels, jobs=jobs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
