"""Adversarial poisons for captions: noise that makes each item look, to a TRAINED model, like another kind.

    python benchmarks/mem_adversarial_poison.py                  # 100 PGD steps per pixel, six rn_tiny hackers
    python benchmarks/mem_adversarial_poison.py --noise-grid 4   # one value per 4 x 4 cell, as MEM's default

Why: error-minimising noise (EM, MEM) is fitted to a surrogate in its early phase and is a shortcut a fresh
hacker takes -- but ResNet hackers still learn the item kinds while they fit it (BENCHMARKS.md, sessions
20-22). In supervised learning the other strong family is the targeted adversarial poison (class y made to
look like class y + 1 to a model trained on clean data): the hacker then learns the wrong non-robust features
for every class, and such poisons are known to transfer across architectures better than EM. The captioned
analogue: train an `rn_tiny` CLIP on the CLEAN pairs (as a hacker would, its own seed), then push every image
towards the text embedding of its captions with every item kind k renamed to kind (k + 1) mod 10 ("a bag at
the top left" -> "an ankle boot at the top left"), by PGD on the uint8 grid within +-8/255. The published
captions are unchanged; no trigger.

Data: the five-caption Fashion-MNIST scenes of `--data`. Hackers as in protection_efficacy.py. Results:
benchmarks/results/mem_adversarial_poison[_<tag>].{json,md}.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import numpy as np

from protection_results import probe_data, probe_parser, report_probe_set, write_probe_manifest

SURROGATE_SEED = 100  # a hacker seed the evaluation's hackers (0..5) never use


def renamed_caption(caption: str, shift: int) -> str:
    """The caption with every item kind k named as kind (k + shift) mod len(CLASSES), articles fixed ("a"/"an")."""
    from aigis.protection.fashion import CLASSES

    lookup = {}
    for label, (singular, plural) in enumerate(CLASSES):
        target = CLASSES[(label + shift) % len(CLASSES)]
        lookup[singular], lookup[plural] = target
    names = sorted(lookup, key=len, reverse=True)  # "t-shirt" before "shirt"
    pattern = r"(?<![\w-])(" + "|".join(map(re.escape, names)) + r")\b"
    renamed = re.sub(pattern, lambda m: lookup[m.group(1)], caption)
    return re.sub(r"\b(a|an) (\w)", lambda m: ("an " if m.group(2) in "aeiou" else "a ") + m.group(2), renamed)


def main(argv: list[str] | None = None) -> int:
    parser = probe_parser(__doc__, "adversarial_poison", hackers=6)
    parser.add_argument("--steps", type=int, default=100, help="PGD steps of 1/255")
    parser.add_argument("--noise-grid", type=int, default=0, help="N x N cells of one value (default 0: per pixel)")
    parser.add_argument("--shift", type=int, default=1, help="kind k is made to look like kind k + shift")
    args = parser.parse_args(argv)
    data = probe_data(parser, args.data)

    import torch
    import torch.nn.functional as F
    from PIL import Image

    from aigis.protection import mem
    from aigis.protection.captions import load_images, read_pairs
    from aigis.protection.evaluate import HACKER_TOKENIZER_VOCAB, new_hacker
    from aigis.protection.retrieval import train_clip
    from aigis.protection.tokenizer import Tokenizer

    levels, grid = 8, args.noise_grid
    tag = f"steps{args.steps}_{f'grid{grid}' if grid else 'pixel'}_shift{args.shift}"
    out = Path(args.work) / tag
    pairs = read_pairs(data, "train.jsonl")
    root = data.resolve()
    captions = [p.caption for p in pairs]
    keys = [p.path.relative_to(root).as_posix() for p in pairs]
    started = time.perf_counter()

    # 1. A CLIP trained on the clean pairs, as a hacker would train it (its context also fits the renamed captions).
    renamed = [renamed_caption(c, args.shift) for c in captions]
    tokenizer = Tokenizer.train(captions, vocab_size=HACKER_TOKENIZER_VOCAB)
    longest = max(len(tokenizer.encode(c)) for c in captions + renamed) + 2
    model = new_hacker("rn_tiny", 32, tokenizer.vocab_size, SURROGATE_SEED, context_length=longest)
    pair_images = load_images(pairs, 32, progress=False)
    train_clip(model, pair_images, captions, tokenizer, epochs=10, batch_size=50, lr=1e-3, seed=SURROGATE_SEED)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)

    # 2. Each image's target: the direction of its renamed captions' summed embeddings (pair_losses normalises).
    unique = sorted(set(keys))
    row = {key: i for i, key in enumerate(unique)}
    first_pair = {key: i for i, key in reversed(list(enumerate(keys)))}
    images = np.stack([pair_images[first_pair[key]] for key in unique])
    with torch.no_grad():
        text = F.normalize(mem.encode_text_trimmed(model, tokenizer.tokenize(renamed, model.context_length, 0)), dim=-1)
    owner = torch.tensor([row[k] for k in keys])
    targets = torch.zeros(len(unique), text.shape[1]).index_add_(0, owner, text)

    # 3. PGD on the uint8 grid: each image towards its own target among the batch's targets.
    noise = torch.zeros(images.shape, dtype=torch.int16)
    generator = torch.Generator().manual_seed(0)
    target_losses = []
    for index in mem._batches(len(unique), 100, generator):
        x_u8 = torch.from_numpy(images[index]).to(torch.int16)
        delta = noise[index]
        for _ in range(args.steps):
            x = ((x_u8 + delta).float() / 255.0).requires_grad_(True)
            loss = mem.pair_losses(model.encode_image(mem._images_for_model(model, x)), targets[index],
                                   model.logit_scale).mean()
            (grad,) = torch.autograd.grad(loss, x)
            if grid:
                grad = mem._cell_mean(grad, grid)
            delta = (delta - grad.sign().to(torch.int16)).clamp(-levels, levels)
            delta = (x_u8 + delta).clamp(0, 255) - x_u8
        noise[index] = delta
        target_losses.append(float(loss))  # of the last step: how far the model now sees the renamed kinds
        print(f"batch of {len(index)}: target loss {target_losses[-1]:.4f} after {args.steps} steps", file=sys.stderr,
              flush=True)
    seconds = time.perf_counter() - started

    # 4. The published set: protected PNGs, captions unchanged.
    for key in unique:
        (out / key).parent.mkdir(parents=True, exist_ok=True)
        protected = (torch.from_numpy(images[row[key]]).to(torch.int16) + noise[row[key]]).clamp(0, 255)
        Image.fromarray(protected.to(torch.uint8).numpy()).save(out / key)
    write_probe_manifest(out, list(zip(keys, captions)), {
        "mode": "adversarial-poison", "epsilon": levels / 255, "epsilon_uint8_levels": levels, "trigger_length": 0,
        "steps": args.steps, "shift": args.shift, "noise_grid": grid})

    report_probe_set(
        "mem_adversarial_poison.py", argv, f"mem_adversarial_poison_{tag}",
        f"Targeted adversarial poison: items pushed towards kind k + {args.shift} under an `rn_tiny` CLIP trained on "
        f"the clean pairs; {args.steps} PGD steps, {f'{grid} x {grid} cells' if grid else 'per pixel'}, "
        f"+-{levels}/255, captions unchanged; made in {seconds:.0f} s; {args.hackers} `rn_tiny` hackers from "
        f"scratch, 10 epochs.",
        data, out, Path(args.work) / f"evaluation_{tag}", args.hackers, levels,
        seconds=seconds, target_losses=target_losses)
    return 0


if __name__ == "__main__":
    sys.exit(main())
