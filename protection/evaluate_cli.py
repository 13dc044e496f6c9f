"""`aigis protect-eval`: train hacker CLIPs of one or more families on clean, random-noise and protected pairs;
compare their retrieval and each hacker's retention."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# evaluate.py's DEFAULT_CLIP and PROTOCOLS, repeated so that `aigis --help` imports neither numpy nor torch
# (tests/test_protect_eval.py checks that they match).
DEFAULT_CLIP = "rn_tiny,vit_tiny,cnn_words"
PROTOCOLS = ("whole", "5x1k")


def register(sub: argparse._SubParsersAction) -> None:
    """Add `protect-eval` to the `aigis` command."""
    p = sub.add_parser(
        "protect-eval",
        help="measure protection: CLIPs trained on clean / random-noise / protected pairs, clean-test retrieval",
        description="Train hacker CLIPs from scratch on each training condition (the clean pairs, uniform "
        "noise of the same epsilon, each protected set, and each protected set re-encoded as JPEG-75 and "
        "grayscale): every family given to --clip, --hackers seeds each, with the same seeds, steps and "
        "augmentation on every condition. Then report image<->text Recall@1/5/10 on the clean test split beside "
        "chance, each hacker's retention (its text->image R@1 on a condition over its own on the clean pairs) "
        "with the median and range per family and over all hackers, and PSNR against the originals. "
        "Writes report.json, report.md and examples.png.",
    )
    p.add_argument("--data", required=True, metavar="ROOT", help="root of the clean data (manifest paths are relative to it)")
    p.add_argument("--train-manifest", required=True, metavar="JSONL", help="clean training manifest, relative to ROOT")
    p.add_argument("--test-manifest", required=True, metavar="JSONL", help="clean test manifest, relative to ROOT")
    p.add_argument("--protected", action="append", default=[], metavar="NAME=DIR",
                   help="a protected set (manifest.jsonl, images/, protection.json) made from the training manifest; repeatable")
    p.add_argument("--no-robustness", action="store_true", help="skip the JPEG-75 and grayscale conditions")
    p.add_argument("--no-random", action="store_true", help="skip the random-noise control")
    p.add_argument("--epsilon", type=float, default=None,
                   help="random-noise budget, 8/255 or 8 (default: the protected set's, else 8/255)")
    p.add_argument("--finetune", default=None, metavar="CKPT",
                   help="also fine-tune this OpenAI-format CLIP state dict on each condition (needs --tokenizer)")
    p.add_argument("--finetune-lr", type=float, default=1e-5, help="fine-tuning learning rate (default 1e-5, the paper's)")
    p.add_argument("--finetune-epochs", type=int, default=None, help="fine-tuning epochs (default: --epochs)")
    p.add_argument("--finetune-only", action="store_true", help="with --finetune, train no from-scratch hackers")
    p.add_argument("--tokenizer", default=None, metavar="FILE",
                   help="CLIP's bpe_simple_vocab_16e6.txt.gz or an aigis-bpe JSON (default: trained per condition)")
    p.add_argument("--clip", default=DEFAULT_CLIP, metavar="PRESETS",
                   help="hacker families, comma-separated, each training every condition: rn_tiny, rn_wide, "
                        "vit_tiny, cnn_words (a plain CNN image tower with a word transformer), RN50, ViT-B/32 "
                        "(default rn_tiny,vit_tiny,cnn_words: three families, so that a result does not rest on one "
                        "architecture; each costs its own training time)")
    p.add_argument("--size", type=int, default=32, help="training resolution in px (default 32)")
    p.add_argument("--epochs", type=int, default=10, help="epochs per hacker (default 10)")
    p.add_argument("--batch", type=int, default=50, help="batch size (default 50)")
    p.add_argument("--lr", type=float, default=1e-3, help="from-scratch learning rate (default 1e-3)")
    p.add_argument("--seed", type=int, default=0, help="one seed for every condition (default 0)")
    p.add_argument("--hackers", type=int, default=1,
                   help="hackers per condition and family, seeds --seed, --seed + 1, ...; each row reports its "
                        "median run, and retention is reported for every hacker (default 1)")
    p.add_argument("--no-augment", action="store_true",
                   help="train the hackers on the images exactly as read (default: a random resized crop of "
                        "50-100%% of the area at aspect 3/4-4/3 and a horizontal flip, per image and step, drawn "
                        "from the hacker's seed; test images are never augmented)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="whole",
                   help="whole: rank each test query against the whole test split, or within --gallery blocks "
                        "(default); 5x1k: COCO's protocol, the first 5000 test pairs in 5 folds of 1000, "
                        "recall averaged over the folds (needs at least 5000 test pairs)")
    p.add_argument("--gallery", type=int, default=None, metavar="N",
                   help="rank each test query among the N pairs of its own consecutive block; the split must "
                        "divide into them (default: the whole split, one gallery; not with --protocol 5x1k)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--quiet", action="store_true", help="no progress lines and no printed table")
    p.set_defaults(func=run_protect_eval)


def _parse_protected(items: list[str]) -> dict[str, Path]:
    protected: dict[str, Path] = {}
    for item in items:
        name, sep, directory = item.partition("=")
        if not sep or not name or not directory:
            raise ValueError(f"--protected {item!r}: expected NAME=DIR")
        if name in protected:
            raise ValueError(f"--protected: the name {name!r} is given twice")
        protected[name] = Path(directory)
    return protected


def _relative_manifest(root: Path, manifest: str) -> str:
    """Accept a manifest given as a path (absolute or from the working directory) inside ROOT."""
    path = Path(manifest)
    for candidate in (path, Path.cwd() / path):
        if candidate.is_absolute() and candidate.is_file():
            try:
                return candidate.resolve().relative_to(root.resolve()).as_posix()
            except ValueError:
                pass
    return manifest


def run_protect_eval(args: argparse.Namespace) -> int:
    from aigis.cpu import apply_threads
    from aigis.preprocess import BadImageError

    from .captions import PairsManifestError
    from .evaluate import ROBUSTNESS_TRANSFORMS, evaluate_protection

    try:
        apply_threads(quiet=args.quiet)
        root = Path(args.data)
        if not root.is_dir():
            raise ValueError(f"--data {root}: not a directory")
        protected = _parse_protected(args.protected)
        conditions = ["clean", *([] if args.no_random else ["random"]), *protected]
        report = evaluate_protection(
            root,
            _relative_manifest(root, args.train_manifest),
            _relative_manifest(root, args.test_manifest),
            protected,
            out_dir=args.out,
            conditions=conditions,
            robustness=() if args.no_robustness else ROBUSTNESS_TRANSFORMS,
            clip_preset=args.clip,
            image_size=args.size,
            epochs=args.epochs,
            batch_size=args.batch,
            lr=args.lr,
            seed=args.seed,
            hackers=args.hackers,
            device=args.device,
            epsilon=args.epsilon,
            tokenizer=args.tokenizer,
            finetune_checkpoint=args.finetune,
            finetune_lr=args.finetune_lr,
            finetune_epochs=args.finetune_epochs,
            scratch=not args.finetune_only,
            progress=not args.quiet,
            gallery=args.gallery,
            augment=not args.no_augment,
            protocol=args.protocol,
        )
    except (ValueError, FileNotFoundError, PairsManifestError, BadImageError) as exc:
        print(f"aigis protect-eval: error: {exc}", file=sys.stderr)
        return 2
    if args.quiet:
        print(Path(args.out) / "report.md")
    else:
        print(Path(report["report_md"]).read_text(encoding="utf-8"), flush=True)
    return 0
