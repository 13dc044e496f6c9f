"""`aigis protect` (MEM protection of a folder of image-caption pairs, see aigis.protection.job) and
`aigis protect-publish` (a finished job's surrogate as a new mem_protect version)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from aigis.contract import PROTECT_MODEL

from .settings import AMP_CHOICES, MEM_PRESETS, NORM_STATS, MEMSettings, preset_settings

_DEFAULTS = MEMSettings()

# `aigis protect` options that set a MEMSettings field of another name (the rest share theirs).
_OPTION_FIELDS = {"outer": "outer_iterations", "batch": "batch_size"}
_SETTING_OPTIONS = ("trigger_length", "foreign_triggers", "word_textures", "texture_tile", "words_per_image",
                    "texture_sign", "texture_gray", "outer", "trigger_iterations", "surrogate_steps", "noise_grid",
                    "pgd_steps", "candidates", "batch", "lr", "surrogate_restart", "norm_stats", "seed",
                    "stop_loss", "amp")


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
    p.add_argument("--preset", choices=tuple(MEM_PRESETS), default="paper",
                   help="named settings (protection/settings.py); an option below given beside it overrides that "
                        "value, the '(paper N)' in each help is the paper preset's: paper (default; the reference's "
                        "MEM, one noise per image, a 3-token trigger), word-code (word-wise noise and 16 foreign "
                        "trigger words: the setting that met the 2x-chance target, BENCHMARKS.md), word-code-gray "
                        "(the same in luminance, for images that may be re-encoded in grayscale)")
    p.add_argument("--mode", choices=("mem", "em"), default="mem", help="mem: noise + trigger; em: noise only")
    p.add_argument("--epsilon", type=float, default=None,
                   help=f"L-inf noise budget in /255 units (paper {round(_DEFAULTS.epsilon * 255)})")
    p.add_argument("--trigger-length", type=int, default=None,
                   help=f"trigger words for --mode mem (paper {_DEFAULTS.trigger_length})")
    p.add_argument("--trigger-words", type=int, default=None,
                   help="made-up words added to the tokenizer for triggers to use (default "
                        "protection.job.DEFAULT_TRIGGER_WORDS; 0: triggers from the captions' own words)")
    p.add_argument("--foreign-triggers", action=argparse.BooleanOptionalAction, default=None,
                   help="a pair's trigger never uses a word of its own caption(s): for --trigger-words 0, and with "
                        "--word-textures each image's words are drawn from those its captions do not use")
    p.add_argument("--word-textures", type=int, default=None, metavar="K",
                   help="word-wise noise: the K most used caption words each own a shared texture, an image's noise "
                        "sums its words' textures and its trigger names them (paper 0: one noise per image)")
    p.add_argument("--texture-tile", type=int, default=None,
                   help=f"px per side of a word texture's tile (paper {_DEFAULTS.texture_tile})")
    p.add_argument("--words-per-image", type=int, default=None,
                   help=f"words (textures) per image (paper {_DEFAULTS.words_per_image})")
    p.add_argument("--texture-sign", action=argparse.BooleanOptionalAction, default=None,
                   help="word-wise noise at the range's ends: +-epsilon, the sign of the image's textures' sum")
    p.add_argument("--texture-gray", action=argparse.BooleanOptionalAction, default=None,
                   help="word textures in luminance only (the same on R, G, B): the code survives grayscale "
                        "re-encoding; keep a 4-px --texture-tile (a gray tile has a third of the values)")
    p.add_argument("--outer", type=int, default=None, help=f"outer iterations (paper {_DEFAULTS.outer_iterations})")
    p.add_argument("--trigger-iterations", type=int, default=None,
                   help=f"outer iterations that update triggers (paper {_DEFAULTS.trigger_iterations})")
    p.add_argument("--surrogate-steps", type=int, default=None,
                   help=f"surrogate batches per outer iteration (paper {_DEFAULTS.surrogate_steps})")
    p.add_argument("--noise-grid", type=int, default=None,
                   help="cut each image into N x N cells of one noise value each: a low-frequency noise that a "
                        "fresh model picks up sooner; paper 0: per-pixel noise")
    p.add_argument("--pgd-steps", type=int, default=None, help=f"PGD steps per pass (paper {_DEFAULTS.pgd_steps})")
    p.add_argument("--candidates", type=int, default=None,
                   help=f"HotFlip candidates per trigger slot (paper {_DEFAULTS.candidates})")
    p.add_argument("--batch", type=int, default=None, help=f"batch size (paper {_DEFAULTS.batch_size})")
    p.add_argument("--lr", type=float, default=None, help=f"surrogate learning rate (paper {_DEFAULTS.lr})")
    p.add_argument("--surrogate-restart", type=int, default=None, metavar="R",
                   help="re-draw each surrogate from fresh random weights every R outer iterations (ensemble members "
                        "staggered); paper 0: never")
    p.add_argument("--norm-stats", choices=NORM_STATS, default=None,
                   help="BatchNorm statistics a ResNet surrogate uses while noise and triggers are optimised: each "
                        "batch's own, as a model in training sees them (default from scratch), or the stored averages "
                        "(default with --init, whose pretrained averages are sound)")
    p.add_argument("--seed", type=int, default=None, help=f"the job's random draws (paper {_DEFAULTS.seed})")
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
    p.add_argument("--size", type=int, default=None, help="image size in px (default: the CLIP preset's)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: CUDA when present)")
    p.add_argument("--amp", choices=AMP_CHOICES, default=None,
                   help=f"bfloat16 autocast: auto = on CUDA and on CPUs with AMX, where it is faster (paper "
                        f"{_DEFAULTS.amp})")
    p.add_argument("--no-resume", action="store_true", help="discard checkpoints in --out and start over")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=_protect)

    publish = sub.add_parser(
        "protect-publish", help=f"publish a protection job's surrogate as a new version of the {PROTECT_MODEL} model",
        description=f"Add a version of {PROTECT_MODEL} (protect-on-upload) to a Triton model repository from a "
                    "finished `aigis protect` job. The repository's first version is served at once; later ones after "
                    f"`aigis models rollout --model {PROTECT_MODEL} --version N` on a running server.")
    publish.add_argument("--repo", required=True, help="the Triton model repository")
    publish.add_argument("--job", required=True,
                         help="the job's output folder (the surrogate its protection.json names is published), or "
                              "one surrogate artefact folder (OUT/surrogate/N)")
    publish.add_argument("--steps", type=int, default=None,
                         help="PGD steps per request for a search + PGD version (default: the job's; a word code has none)")
    publish.add_argument("--gpu", action="store_true", help="a GPU instance (default: CPU)")
    publish.add_argument("--max-batch", type=int, default=16, help="max_batch_size: images per request (default 16)")
    publish.set_defaults(func=_publish)


def _protect(args: argparse.Namespace) -> int:
    from aigis.cpu import apply_threads
    from aigis.preprocess import BadImageError

    from .captions import PairsManifestError
    from .job import protect_dataset

    try:
        apply_threads(quiet=args.quiet)
        settings = settings_from_options(args)
        summary = protect_dataset(
            args.data, args.manifest, args.out, settings, clip_preset=args.clip, image_size=args.size,
            device=args.device, resume=not args.no_resume, progress=not args.quiet,
            trigger_words=args.trigger_words, tokenizer_file=args.tokenizer, init_checkpoint=args.init,
        )
    except (PairsManifestError, BadImageError, ValueError, FileNotFoundError) as exc:
        print(f"aigis protect: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1))
    return 0


def settings_from_options(args: argparse.Namespace) -> MEMSettings:
    """The --preset's settings with every option the user gave on top (None: not given)."""
    given: dict[str, Any] = {_OPTION_FIELDS.get(name, name): getattr(args, name) for name in _SETTING_OPTIONS
                             if getattr(args, name) is not None}
    if args.epsilon is not None:
        given["epsilon"] = args.epsilon / 255
    if args.norm_stats is None and args.init:
        given["norm_stats"] = "running"  # a pretrained surrogate's averages are sound
    code_preset = bool(MEM_PRESETS[args.preset].get("word_textures"))
    if code_preset and given.get("word_textures") == 0:
        raise ValueError(f"--word-textures 0 turns preset {args.preset!r}'s word code off: use --preset paper")
    if args.mode == "em":
        if code_preset or given.get("word_textures"):
            raise ValueError("--mode em is noise only, with no trigger to name word textures: use --preset paper "
                             "without --word-textures")
        given["trigger_length"] = 0
    elif given.get("trigger_length", 1) < 1:
        raise ValueError("--mode mem needs --trigger-length >= 1 (use --mode em for noise only)")
    return preset_settings(args.preset, **given)


def _publish(args: argparse.Namespace) -> int:
    from pathlib import Path

    from aigis.export.repository import RepositoryError

    from .served import PROTECTS_WITH_SEARCH, publish_protect_model
    from .triton_model import SETTINGS_FILE

    job = Path(args.job)
    artefact = job
    try:
        if (job / "protection.json").is_file():  # a job's folder: the surrogate it reported, inside the folder
            try:
                path = json.loads((job / "protection.json").read_text())["surrogate"]["path"]
            except (KeyError, TypeError) as exc:
                raise ValueError(f"{job / 'protection.json'}: no surrogate path ({exc})") from None
            artefact = (job / path).resolve()
            if not artefact.is_relative_to(job.resolve()):
                raise ValueError(f"{job / 'protection.json'} names a surrogate outside the job's folder: {path!r}")
        version = publish_protect_model(args.repo, artefact, steps=args.steps, gpu=args.gpu,
                                        max_batch_size=args.max_batch)
        recorded = json.loads((Path(args.repo) / PROTECT_MODEL / str(version) / SETTINGS_FILE).read_text())
    except (RepositoryError, ValueError, FileNotFoundError) as exc:
        print(f"aigis protect-publish: error: {exc}", file=sys.stderr)
        return 2
    protects_with = recorded.get("protects_with", PROTECTS_WITH_SEARCH)  # (versions published before say nothing)
    print(f"{PROTECT_MODEL} version {version} in {args.repo}: protects with {protects_with} "
          f"(surrogate {recorded['surrogate']})")
    return 0
