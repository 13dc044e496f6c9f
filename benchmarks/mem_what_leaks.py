"""What does a hacker trained on protected Fashion-MNIST scenes still retrieve clean pairs BY? (issue 4 diagnostic)

    python benchmarks/mem_what_leaks.py --data runs/bench/fc5_mem16_g4_bnb/captions \
        --set mem=runs/bench/fc5_mem16_g4_bnb/mem_bnbatch_mem16_grid4 --hackers 3

A test caption of the fashion scenes names two things: the LAYOUT (which of the four cells hold an item:
11 patterns) and the item KINDS (t-shirt, sneaker, ...). For every hacker (the efficacy benchmark's:
CLIP rn_tiny from scratch, batch 50, lr 1e-3, 10 epochs, weights from hacker_init_seed) trained on the
clean set and on each protected set, this reports on the clean test split:

  R@1 x chance            as protection_efficacy.py reports it (mean of both directions)
  same layout, x base     how often the image->text top-1 caption has the query's layout, over how
                          often a random caption does: did the hacker learn WHERE things are?
  same kinds, x base      the same for the set of item kinds: did it learn WHAT they are?
  R@1 within layout       image->text R@1 with the candidates cut to the captions of the query's
                          layout, over chance there: kinds told apart where positions cannot help
  R@1 at 1/4, 1/2 of training, and the loss over the epoch before each and over the last one: whether
                          the content came in before the shortcut was fitted or after (the loss floor
                          printed in the header is what tied captions of one image in a batch cost)
  logit scale             the temperature CLIP learns; while it stays low the loss cannot reach zero

Writes benchmarks/results/<name>.{md,json}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from protection_results import machine_and_command, write_results  # noqa: E402


def caption_attributes(caption: str) -> tuple[frozenset, frozenset]:
    """(cells named, item kinds named) of a fashion-scene caption (protection.captions.describe_fashion_scene)."""
    from aigis.protection.fashion import CELLS, CLASSES

    cells = frozenset(cell for cell, phrases in CELLS.items() if any(p in caption for p in phrases))
    # longest names first, each blanked once found, so "shirt" is not found inside "t-shirt"
    names = sorted(((name, label) for label, pair in enumerate(CLASSES) for name in pair), key=lambda x: -len(x[0]))
    kinds, rest = set(), caption
    for name, label in names:
        if name in rest:
            kinds.add(label)
            rest = rest.replace(name, "#")
    if not cells or not kinds:
        raise SystemExit(f"not a fashion-scene caption (no cell or no item named): {caption!r}")
    return cells, frozenset(kinds)


def attribute_scores(similarity: np.ndarray, layouts: np.ndarray, kinds: np.ndarray) -> dict:
    """Image->text top-1 agreement with the query's layout / kinds (each over a random caption's rate), and
    R@1 among the captions of the query's own layout (over chance there). Caption i is image i's."""
    n = len(layouts)
    top = similarity.argmax(1)
    base_layout = np.mean([(layouts == g).mean() for g in layouts])
    base_kinds = np.mean([(kinds == k).mean() for k in kinds])
    within, within_chance = [], []
    for i in range(n):
        group = np.flatnonzero(layouts == layouts[i])
        within.append(group[similarity[i, group].argmax()] == i)
        within_chance.append(1 / len(group))
    return {
        "same_layout": float((layouts[top] == layouts).mean()), "same_layout_base": float(base_layout),
        "same_kinds": float((kinds[top] == kinds).mean()), "same_kinds_base": float(base_kinds),
        "r1_within_layout": float(np.mean(within)), "r1_within_layout_chance": float(np.mean(within_chance)),
    }


def sibling_loss_floor(captions_per_image: list[int], batch_size: int) -> float:
    """The contrastive loss no model can go below when batches are drawn at random from pairs where one image
    has several captions: a caption whose image appears k more times in its batch ties with those copies
    (identical image, identical trigger), so its row costs log(1 + k) in both directions whatever is learned."""
    from math import comb, log

    n = sum(captions_per_image)
    draws = min(batch_size, n) - 1  # the other pairs in a caption's batch
    total = 0.0
    for c in captions_per_image:
        for k in range(1, min(c - 1, draws) + 1):  # hypergeometric: k of the c - 1 siblings among the draws
            total += c * comb(c - 1, k) * comb(n - c, draws - k) / comb(n - 1, draws) * log(1 + k)
    return total / n


def train_one(name: str, images: np.ndarray, captions: list[str], test_images: np.ndarray, test_captions: list[str],
              layouts: np.ndarray, kinds: np.ndarray, seed: int, args) -> dict:
    import torch

    from aigis.protection.evaluate import HACKER_BATCH_SIZE, HACKER_LR, HACKER_TOKENIZER_VOCAB, new_hacker
    from aigis.protection.retrieval import batches_per_epoch, embed, evaluate_retrieval, train_clip
    from aigis.protection.tokenizer import Tokenizer

    tokenizer = Tokenizer.train(captions, vocab_size=HACKER_TOKENIZER_VOCAB)
    longest = max(len(tokenizer.encode(c)) for c in captions) + 2  # as the efficacy hacker: no caption cut
    model = new_hacker(args.clip, args.size, tokenizer.vocab_size, seed, context_length=longest)
    per_epoch = batches_per_epoch(len(images), HACKER_BATCH_SIZE)
    total = args.epochs * per_epoch
    marks = {total // 4: "quarter", total // 2: "half"}
    curve: dict = {"losses": []}

    def x_chance() -> float:
        r = evaluate_retrieval(model, test_images, test_captions, tokenizer, device=args.device)
        return r["mean_r1"] / r["chance_r1"]

    def on_step(step: int, loss: float) -> None:
        curve["losses"].append(loss)
        if step in marks:
            curve[f"x_chance_{marks[step]}"] = x_chance()
            model.train()

    train_clip(model, images, captions, tokenizer, epochs=args.epochs, batch_size=HACKER_BATCH_SIZE, lr=HACKER_LR,
               device=args.device, seed=seed, progress=False, on_step=on_step)
    image_features, text_features = embed(model, test_images, tokenizer.tokenize(test_captions, model.context_length),
                                          torch.device(args.device))
    similarity = (image_features @ text_features.t()).numpy()
    epoch_loss = [float(np.mean(curve["losses"][e * per_epoch : (e + 1) * per_epoch])) for e in range(args.epochs)]
    run = {"set": name, "seed": seed, "x_chance": x_chance(), "x_chance_quarter": curve["x_chance_quarter"],
           "x_chance_half": curve["x_chance_half"], "epoch_loss": epoch_loss,
           "loss_quarter": float(np.mean(curve["losses"][max(0, total // 4 - per_epoch) : total // 4])),
           "loss_half": float(np.mean(curve["losses"][max(0, total // 2 - per_epoch) : total // 2])),
           "final_loss": epoch_loss[-1],
           "logit_scale": float(model.logit_scale.detach().exp()),
           **attribute_scores(similarity, layouts, kinds)}
    print(f"{name} hacker {seed}: R@1 {run['x_chance']:.1f}x chance (1/4: {run['x_chance_quarter']:.1f}, "
          f"1/2: {run['x_chance_half']:.1f}; loss over the epoch before: {run['loss_quarter']:.3f}, "
          f"{run['loss_half']:.3f}); top-1 same layout {run['same_layout'] / run['same_layout_base']:.2f}x base, "
          f"same kinds {run['same_kinds'] / run['same_kinds_base']:.2f}x base, R@1 within layout "
          f"{run['r1_within_layout'] / run['r1_within_layout_chance']:.2f}x chance; last-epoch loss "
          f"{run['final_loss']:.3f}, logit scale {run['logit_scale']:.1f}", file=sys.stderr, flush=True)
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="the clean fashion-scene set (train.jsonl, test.jsonl)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=DIR",
                        help="a protected set (a job's output folder); repeat for more. The clean set always runs")
    parser.add_argument("--hackers", type=int, default=3, help="hackers per set (seeds 0..n-1)")
    parser.add_argument("--clip", default="rn_tiny")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--name", default="mem_what_leaks")
    args = parser.parse_args(argv)

    from aigis.protection.captions import load_images, read_pairs
    from aigis.protection.evaluate import read_protected_set

    data = Path(args.data)
    clean = read_pairs(data, "train.jsonl")
    test = read_pairs(data, "test.jsonl")
    attributes = [caption_attributes(p.caption) for p in test]
    # one integer id per distinct layout / kind set, so that equal ones compare equal
    layouts = np.unique([repr(sorted(a[0])) for a in attributes], return_inverse=True)[1]
    kinds = np.unique([repr(sorted(a[1])) for a in attributes], return_inverse=True)[1]
    test_images = load_images(test, args.size, progress=False)
    test_captions = [p.caption for p in test]
    sets = {"clean": clean}
    for spec in args.set:
        name, _, directory = spec.partition("=")
        if not directory:
            raise SystemExit(f"--set {spec!r}: expected NAME=DIR")
        sets[name] = read_protected_set(directory, clean, name).pairs
    runs = []
    for name, pairs in sets.items():
        images = load_images(pairs, args.size, progress=False)
        for seed in range(args.hackers):
            runs.append(train_one(name, images, [p.caption for p in pairs], test_images, test_captions,
                                  layouts, kinds, seed, args))

    from aigis.protection.evaluate import HACKER_BATCH_SIZE

    per_image = np.unique([p.path.stem for p in clean], return_counts=True)[1].tolist()
    floor = sibling_loss_floor(per_image, HACKER_BATCH_SIZE)
    layout_sizes = np.bincount(layouts)[layouts]
    ceiling = float(np.mean(1 / layout_sizes) * len(test))  # R@1 x chance of a retriever that knows layout only
    header = (f"{machine_and_command('mem_what_leaks.py', argv)}\n"
              f"{len(test)} clean test pairs: {layouts.max() + 1} layouts, {kinds.max() + 1} sets of item kinds; "
              f"a retriever that knew the layout and nothing else would reach {ceiling:.1f}x chance. Hackers "
              f"`{args.clip}`, {args.epochs} epochs, seeds 0-{args.hackers - 1}; medians over them, each run's in "
              f"the JSON. Loss floor from an image's other captions in the same batch of {HACKER_BATCH_SIZE}: "
              f"{floor:.3f}.\n")
    lines = ["| trained on | R@1 x chance | at 1/4 of training | at 1/2 | top-1 same layout, x base | "
             "top-1 same kinds, x base | R@1 within layout, x chance | loss, epoch before 1/4 / 1/2 / last epoch | "
             "logit scale |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in sets:
        mine = [r for r in runs if r["set"] == name]

        def med(f) -> float:
            return statistics.median(f(r) for r in mine)

        lines.append(
            f"| {name} | {med(lambda r: r['x_chance']):.1f} | {med(lambda r: r['x_chance_quarter']):.1f} | "
            f"{med(lambda r: r['x_chance_half']):.1f} | "
            f"{med(lambda r: r['same_layout'] / r['same_layout_base']):.2f} | "
            f"{med(lambda r: r['same_kinds'] / r['same_kinds_base']):.2f} | "
            f"{med(lambda r: r['r1_within_layout'] / r['r1_within_layout_chance']):.2f} | "
            f"{med(lambda r: r['loss_quarter']):.3f} / {med(lambda r: r['loss_half']):.3f} / "
            f"{med(lambda r: r['final_loss']):.3f} | {med(lambda r: r['logit_scale']):.1f} |")
    payload = {"layout_only_ceiling_x_chance": ceiling, "sibling_loss_floor": floor, "runs": runs}
    write_results(args.name, payload, header, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
