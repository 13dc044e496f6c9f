"""`aigis protect`: MEM protection of a folder of image-caption pairs (see aigis.protection.job)."""

from __future__ import annotations

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction) -> None:
    """Add `protect`."""
    p = sub.add_parser(
        "protect",
        help="make image-caption pairs unlearnable for CLIP training (MEM noise + text trigger)",
        description="Run MEM over ROOT/MANIFEST (JSON lines {\"image\": relpath, \"caption\": ...}) and write "
        "protected PNGs, a triggered manifest, protection.json and the surrogate to --out. "
        "Resumes from the last checkpoint unless --no-resume.",
    )
    p.add_argument("--data", required=True, help="data root folder (images are resolved inside it)")
    p.add_argument("--manifest", default="train.jsonl", help="manifest file relative to --data (default train.jsonl)")
    p.add_argument("--out", required=True, help="output folder (never the originals' place)")
    p.add_argument("--mode", choices=("mem", "em"), default="mem", help="mem: noise + trigger; em: noise only")
    p.add_argument("--epsilon", type=float, default=8, help="L-inf noise budget in /255 units (default 8)")
    p.add_argument("--trigger-length", type=int, default=3, help="trigger words for --mode mem (default 3)")
    p.add_argument("--trigger-words", type=int, default=None,
                   help="made-up words added to the tokenizer for triggers to use (default "
                        "protection.job.DEFAULT_TRIGGER_WORDS; 0: triggers from the captions' own words)")
    p.add_argument("--foreign-triggers", action="store_true",
                   help="a pair's trigger never uses a word of its own caption(s): for --trigger-words 0, and with "
                        "--word-textures each image's words are drawn from those its captions do not use")
    p.add_argument("--word-textures", type=int, default=0, metavar="K",
                   help="word-wise noise: the K most used caption words each own a shared texture, an image's noise "
                        "sums its words' textures and its trigger names them (default 0: one noise per image)")
    p.add_argument("--texture-tile", type=int, default=4, help="px per side of a word texture's tile (default 4)")
    p.add_argument("--words-per-image", type=int, default=3, help="words (textures) per image (default 3)")
    p.add_argument("--texture-sign", action="store_true",
                   help="word-wise noise at the range's ends: +-epsilon, the sign of the image's textures' sum")
    p.add_argument("--texture-gray", action="store_true",
                   help="word textures in luminance only (the same on R, G, B): the code survives grayscale "
                        "re-encoding; keep the default 4-px --texture-tile (a gray tile has a third of the values)")
    p.add_argument("--outer", type=int, default=20, help="outer iterations (default 20)")
    p.add_argument("--trigger-iterations", type=int, default=5, help="outer iterations that update triggers")
    p.add_argument("--surrogate-steps", type=int, default=200, help="surrogate batches per outer iteration")
    p.add_argument("--noise-grid", type=int, default=0,
                   help="cut each image into N x N cells of one noise value each: a low-frequency noise that a "
                        "fresh model picks up sooner (BENCHMARKS.md, session 12); default 0: per-pixel noise")
    p.add_argument("--pgd-steps", type=int, default=8, help="PGD steps per pass (default 8)")
    p.add_argument("--candidates", type=int, default=16, help="HotFlip candidates per trigger slot (default 16)")
    p.add_argument("--batch", type=int, default=128, help="batch size (default 128)")
    p.add_argument("--lr", type=float, default=1e-4, help="surrogate learning rate (default 1e-4)")
    p.add_argument("--surrogate-restart", type=int, default=0, metavar="R",
                   help="re-draw each surrogate from fresh random weights every R outer iterations (ensemble members "
                        "staggered); default 0: never")
    p.add_argument("--norm-stats", choices=("running", "batch"), default=None,
                   help="BatchNorm statistics a ResNet surrogate uses while noise and triggers are optimised: each "
                        "batch's own, as a model in training sees them (default from scratch), or the stored averages "
                        "(default with --init, whose pretrained averages are sound)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop-loss", type=float, default=None,
                   help="end early once a pass's loss (noise + trigger against shuffled captions) is at most this, "
                        "after the trigger iterations (default: run all --outer iterations)")
    p.add_argument("--clip", default=None,
                   help="surrogate CLIP preset (rn_tiny, the default; rn_wide, vit_tiny, RN50, ViT-B/32), or several "
                        "joined by '+' (e.g. vit_tiny+rn_tiny): an ensemble the noise and triggers must fool together, "
                        "all saved for protect-on-upload; a preset named twice (rn_tiny+rn_tiny) is two independent "
                        "initialisations")
    p.add_argument("--init", default=None, metavar="CKPT",
                   help="the fine-tune threat model: start the surrogate from this local OpenAI-format CLIP state dict "
                        "(.safetensors, or a torch.save'd dict; never unpickled) instead of a random draw; needs "
                        "--tokenizer, takes no --clip (the paper's fine-tune variant: --lr 1e-5 --outer 10)")
    p.add_argument("--tokenizer", default=None, metavar="FILE",
                   help="a fixed vocabulary instead of one trained on the captions: CLIP's bpe_simple_vocab_16e6.txt.gz "
                        "or an aigis-bpe JSON file; triggers use its whole words")
    p.add_argument("--size", type=int, default=None, help="image size in px (default: the preset's)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: CUDA when present)")
    p.add_argument("--amp", choices=("auto", "on", "off"), default="auto",
                   help="bfloat16 autocast: auto (default) = on CUDA and on CPUs with AMX, where it is faster")
    p.add_argument("--no-resume", action="store_true", help="discard checkpoints in --out and start over")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=_protect)


def _protect(args: argparse.Namespace) -> int:
    from aigis.preprocess import BadImageError

    from .captions import ManifestError
    from .job import protect_dataset
    from .mem import MEMSettings

    try:
        settings = MEMSettings(
            epsilon=args.epsilon / 255, trigger_length=0 if args.mode == "em" else args.trigger_length,
            candidates=args.candidates, outer_iterations=args.outer, trigger_iterations=args.trigger_iterations,
            surrogate_steps=args.surrogate_steps, pgd_steps=args.pgd_steps, batch_size=args.batch, lr=args.lr,
            seed=args.seed, stop_loss=args.stop_loss, noise_grid=args.noise_grid,
            surrogate_restart=args.surrogate_restart, foreign_triggers=args.foreign_triggers,
            word_textures=args.word_textures, texture_tile=args.texture_tile, words_per_image=args.words_per_image,
            texture_sign=args.texture_sign, texture_gray=args.texture_gray, amp=args.amp,
            norm_stats=args.norm_stats or ("running" if args.init else MEMSettings.norm_stats),
        )
        settings.validate()
        if args.mode == "mem" and args.trigger_length < 1:
            raise ValueError("--mode mem needs --trigger-length >= 1 (use --mode em for noise only)")
        summary = protect_dataset(
            args.data, args.manifest, args.out, settings, clip_preset=args.clip, image_size=args.size,
            device=args.device, resume=not args.no_resume, progress=not args.quiet,
            trigger_words=args.trigger_words, tokenizer_file=args.tokenizer, init_checkpoint=args.init,
        )
    except (ManifestError, BadImageError, ValueError, FileNotFoundError) as exc:
        print(f"aigis protect: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1))
    return 0
