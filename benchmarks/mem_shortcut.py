"""Does a hacker learn the protection's shortcut, or the captions -- and when? (issue 4 diagnostic)

    python benchmarks/mem_shortcut.py          # the sets protection_efficacy.py left under runs/bench/protection
    python benchmarks/mem_shortcut.py --set mem=runs/bench/protection/mem --set other=path/to/set

For each protected set with a text trigger, the efficacy benchmark's hacker (CLIP rn_tiny from scratch,
batch 50, lr 1e-3, 10 epochs, the same seed) is trained twice on the images as published:

  published      captions as published (trigger + the pair's own caption): what a scraper trains on;
  shortcut only  each caption replaced by ANOTHER pair's caption carrying THIS pair's trigger, so only
                 noise <-> trigger links a pair: how learnable the shortcut is on its own.

and followed every few steps: training loss, Recall@1 x chance on the clean test split (what protection
must keep near 1) and "shortcut" Recall@1 x chance on the training images, each against its own trigger
written into another pair's caption (what protection wants a model to learn instead). The clean set's
hacker is the reference. Writes benchmarks/results/mem_shortcut.{json,md} and mem_shortcut.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
EARLY_CHECKPOINTS = (4, 8, 16, 24, 32, 40, 48, 56, 64, 72, 80)  # where the shortcut and the content take off
LATE_EVERY = 40  # then every this many steps to the end: content can creep in long after the shortcut


def checkpoints(total_steps: int) -> set[int]:
    """Dense early steps, sparser later ones, and always the last step."""
    late = range(EARLY_CHECKPOINTS[-1] + LATE_EVERY, total_steps + 1, LATE_EVERY)
    return {s for s in EARLY_CHECKPOINTS if s <= total_steps} | set(late) | {total_steps}


def split_triggers(protected: list[str], clean: list[str]) -> list[str]:
    """The trigger text in front of each clean caption (the job writes 'trigger caption')."""
    triggers = []
    for i, (text, caption) in enumerate(zip(protected, clean)):
        if not text.endswith(caption):
            raise SystemExit(f"pair {i + 1}: protected caption {text!r} does not end with the clean caption {caption!r}")
        triggers.append(text[: len(text) - len(caption)].strip())
    return triggers


def follow(name: str, images: np.ndarray, captions: list[str], probe_images: np.ndarray, probe_captions: list[str],
           test_images: np.ndarray, test_captions: list[str], args) -> list[dict]:
    """Train one hacker on (images, captions); at checkpoints() measure clean-test and shortcut retrieval."""
    from aigis.protection.evaluate import HACKER_BATCH_SIZE, HACKER_LR, HACKER_TOKENIZER_VOCAB, new_hacker
    from aigis.protection.retrieval import batches_per_epoch, evaluate_retrieval, train_clip
    from aigis.protection.tokenizer import Tokenizer

    tokenizer = Tokenizer.train(captions, vocab_size=HACKER_TOKENIZER_VOCAB)
    model = new_hacker(args.clip, args.size, tokenizer.vocab_size, args.seed)  # as the efficacy hacker, never a surrogate
    curve: list[dict] = []
    marks = checkpoints(args.epochs * batches_per_epoch(len(images), HACKER_BATCH_SIZE))

    def x_chance(result: dict) -> float:
        return result["mean_r1"] / result["chance_r1"]

    def on_step(step: int, loss: float) -> None:
        if step not in marks:
            return
        test = evaluate_retrieval(model, test_images, test_captions, tokenizer, device=args.device)
        probe = evaluate_retrieval(model, probe_images, probe_captions, tokenizer, device=args.device)
        curve.append({"step": step, "loss": loss, "test_x_chance": x_chance(test), "shortcut_x_chance": x_chance(probe)})
        print(f"{name}: step {step:3d}, loss {loss:.3f}, clean test R@1 {x_chance(test):5.1f} x chance, "
              f"shortcut R@1 {x_chance(probe):6.1f} x chance", file=sys.stderr, flush=True)

    train_clip(model, images, captions, tokenizer, epochs=args.epochs, batch_size=HACKER_BATCH_SIZE, lr=HACKER_LR,
               device=args.device, seed=args.seed, progress=False, on_step=on_step)
    return curve


def plot(runs: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, curve in runs.items():
        steps = [c["step"] for c in curve]
        for ax, key in zip(axes, ("loss", "test_x_chance", "shortcut_x_chance")):
            ax.plot(steps, [c[key] for c in curve], marker="o", markersize=3, label=name)
    for ax, title in zip(axes, ("training loss", "clean test R@1 x chance (protection wants ~1)",
                                "shortcut R@1 x chance on training images")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("hacker step")
        ax.grid(alpha=0.3)
    axes[2].set_yscale("symlog", linthresh=10)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO / "runs" / "bench" / "protection" / "captions"),
                        help="the clean captioned set (train.jsonl, test.jsonl)")
    parser.add_argument("--set", action="append", default=None, metavar="NAME=DIR",
                        help="a protected set with a text trigger (default: mem=runs/bench/protection/mem)")
    parser.add_argument("--clip", default="rn_tiny")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--name", default="mem_shortcut")
    args = parser.parse_args(argv)

    from aigis.protection.captions import load_images, read_pairs

    data = Path(args.data)
    sets = args.set or [f"mem={REPO / 'runs' / 'bench' / 'protection' / 'mem'}"]
    clean = read_pairs(data, "train.jsonl")
    test = read_pairs(data, "test.jsonl")
    clean_captions = [p.caption for p in clean]
    test_images = load_images(test, args.size, progress=False)
    clean_images = load_images(clean, args.size, progress=False)
    other = np.random.default_rng(args.seed + 1).permutation(len(clean))  # pair i borrows caption other[i]
    runs: dict[str, list[dict]] = {}
    # the reference: a hacker on clean data; its "shortcut" probe has no trigger to find, so it sits near 1
    test_captions = [p.caption for p in test]
    runs["clean"] = follow("clean", clean_images, clean_captions, clean_images,
                           [clean_captions[j] for j in other], test_images, test_captions, args)
    for spec in sets:
        name, _, directory = spec.partition("=")
        if not directory:
            raise SystemExit(f"--set {spec!r}: expected NAME=DIR")
        pairs = read_pairs(directory, "manifest.jsonl")
        if [p.path.stem for p in pairs] != [p.path.stem for p in clean]:
            raise SystemExit(f"{directory}: its pairs are not the clean training manifest's, in order")
        triggers = split_triggers([p.caption for p in pairs], clean_captions)
        if not any(triggers):
            raise SystemExit(f"{directory}: no text triggers (an EM set?) -- nothing to follow")
        images = load_images(pairs, args.size, progress=False)
        swapped = [f"{triggers[i]} {clean_captions[j]}" for i, j in enumerate(other)]
        runs[f"{name} published"] = follow(f"{name} published", images, [p.caption for p in pairs], images, swapped,
                                           test_images, test_captions, args)
        runs[f"{name} shortcut only"] = follow(f"{name} shortcut only", images, swapped, images, swapped,
                                               test_images, test_captions, args)

    RESULTS.mkdir(parents=True, exist_ok=True)
    lines = [f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
             f"{platform.python_version()}. Command: python benchmarks/mem_shortcut.py "
             f"{' '.join(argv if argv is not None else sys.argv[1:])}", "",
             "| hacker trained on | step | loss | clean test R@1 x chance | shortcut R@1 x chance |",
             "|---|---:|---:|---:|---:|"]
    for name, curve in runs.items():
        for c in curve:
            if c["step"] in (8, 16, 32, 48, 80) or (c["step"] > 80 and c["step"] % 80 == 0) or c is curve[-1]:
                lines.append(f"| {name} | {c['step']} | {c['loss']:.2f} | {c['test_x_chance']:.1f} | "
                             f"{c['shortcut_x_chance']:.1f} |")
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    (RESULTS / f"{args.name}.json").write_text(json.dumps(runs, indent=2))
    plot(runs, RESULTS / f"{args.name}.png")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
