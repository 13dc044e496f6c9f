"""`aigis protect` (protection of a folder of image-caption pairs, see aigis.protection.job; its setting options
are built from the settings classes' fields) and `aigis protect-publish` (a finished job's artefact as a new
mem_protect version)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from aigis.contract import PROTECT_MODEL

from .settings import DEFAULT_TRIGGER_WORDS, PRESETS, SETTINGS_CLASSES, MEMSettings, preset_settings


def _setting_fields() -> dict[str, dataclasses.Field]:
    """Every settings field with a command-line option, of either method, in declaration order."""
    fields: dict[str, dataclasses.Field] = {}
    for cls in SETTINGS_CLASSES.values():
        for f in dataclasses.fields(cls):
            if f.metadata.get("option", f.name) is not None:
                fields.setdefault(f.name, f)
    return fields


def _option(f: dataclasses.Field) -> str:
    return "--" + f.metadata.get("option", f.name).replace("_", "-")


def _shown(value: Any, f: dataclasses.Field) -> str:
    if isinstance(value, float) and f.metadata.get("scale"):
        return f"{value * f.metadata['scale']:g}"
    if isinstance(value, bool):
        return "on" if value else "off"
    return "none" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def _preset_defaults(f: dataclasses.Field) -> str:
    """Each preset's value of a field, as '(paper: 3; word-code, word-code-gray: 16)'."""
    by_value: dict[str, list[str]] = {}
    for name, (cls, values) in PRESETS.items():
        if f.name in {g.name for g in dataclasses.fields(cls)}:
            by_value.setdefault(_shown(values.get(f.name, getattr(cls(), f.name)), f), []).append(name)
    return "; ".join(f"{', '.join(names)}: {value}" for value, names in by_value.items())


def _add_setting_options(p: argparse.ArgumentParser) -> None:
    """An option per settings field, its help from the field's, every default None (= the preset's)."""
    groups: dict[tuple[str, ...], argparse._ArgumentGroup] = {}
    for f in _setting_fields().values():
        methods = tuple(m for m, cls in SETTINGS_CLASSES.items() if f.name in {g.name for g in dataclasses.fields(cls)})
        if methods not in groups:
            title = "settings of every method" if len(methods) == len(SETTINGS_CLASSES) else \
                f"settings of the {' and '.join(methods)} method"
            groups[methods] = p.add_argument_group(title, "each defaults to the --preset's value, in brackets" + (
                "" if len(methods) == len(SETTINGS_CLASSES) else "; refused with a preset of another method"))
        group = groups[methods]
        help_text = f.metadata["help"] + (f" (in {f.metadata['units']})" if f.metadata.get("units") else "")
        help_text += f" [{_preset_defaults(f)}]"
        kind = type(f.default) if f.default is not None else float
        extra: dict[str, Any] = {"default": None, "help": help_text}
        if "metavar" in f.metadata:
            extra["metavar"] = f.metadata["metavar"]
        if kind is bool:
            group.add_argument(_option(f), action=argparse.BooleanOptionalAction, dest=f.name, **extra)
        else:
            group.add_argument(_option(f), type=kind, dest=f.name, choices=f.metadata.get("choices"), **extra)


def register(sub: argparse._SubParsersAction) -> None:
    """Add `protect` and `protect-publish`."""
    p = sub.add_parser(
        "protect",
        help="make image-caption pairs unlearnable for CLIP training (noise + caption trigger)",
        description="Protect ROOT/MANIFEST (JSON lines {\"image\": relpath, \"caption\": ...}) with the --preset's "
        "method and write protected PNGs, a triggered manifest, protection.json and the fitted artefact (for "
        "protect-on-upload) to --out. The noise is fitted at --size and laid over each source at its own size: "
        "every protected file has its source's width and height, as a PNG (JPEG sources too, since re-encoding "
        "as JPEG would blur the noise). Resumes from the last checkpoint unless --no-resume.",
    )
    p.add_argument("--data", required=True, help="data root folder (images are resolved inside it)")
    p.add_argument("--manifest", default="train.jsonl", help="manifest file relative to --data (default train.jsonl)")
    p.add_argument("--out", required=True, help="output folder (never the originals' place)")
    p.add_argument("--preset", choices=tuple(PRESETS), default="paper",
                   help="named settings (protection/settings.py): paper (default; the paper's MEM, one noise per "
                        "image, a 3-token trigger searched per image), word-code (the word code: a shared texture "
                        "per caption word, 16 trigger words naming an image's textures), word-code-gray (the word "
                        "code in luminance, for images that may be re-encoded in grayscale)")
    p.add_argument("--mode", choices=("mem", "em"), default="mem",
                   help="with the paper preset: mem = noise + trigger; em = noise only")
    p.add_argument("--trigger-words", type=int, default=None,
                   help=f"made-up words added to the tokenizer for searched triggers to use (default "
                        f"{DEFAULT_TRIGGER_WORDS}; 0: triggers from the captions' own words)")
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
    p.add_argument("--size", type=int, default=None, help="the size in px the noise is fitted at, on each image's centre "
                   "square (default: the CLIP preset's); outputs keep their sources' sizes")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: CUDA when present)")
    p.add_argument("--no-resume", action="store_true", help="discard checkpoints in --out and start over")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    _add_setting_options(p)
    p.set_defaults(func=_protect)

    publish = sub.add_parser(
        "protect-publish", help=f"publish a protection job's surrogate as a new version of the {PROTECT_MODEL} model",
        description=f"Add a version of {PROTECT_MODEL} (protect-on-upload) to a Triton model repository from a "
                    "finished `aigis protect` job. The repository's first version is served at once; later ones after "
                    f"`aigis models rollout --model {PROTECT_MODEL} --version N` on a running server.")
    publish.add_argument("--repo", required=True, help="the Triton model repository: a folder or s3://BUCKET/PREFIX")
    publish.add_argument("--job", required=True,
                         help="the job's output folder (the surrogate its protection.json names is published), or "
                              "one surrogate artefact folder (OUT/surrogate/N)")
    publish.add_argument("--steps", type=int, default=None,
                         help="PGD steps per request for a search + PGD version (default: the job's; a word code has none)")
    publish.add_argument("--gpu", action="store_true", help="a GPU instance (default: CPU)")
    publish.add_argument("--max-batch", type=int, default=16, help="max_batch_size: images per request (default 16)")
    publish.set_defaults(func=_publish)


def _protect(args: argparse.Namespace) -> int:
    """Under torchrun (`torchrun --nproc-per-node N $(which aigis) protect ...`) every process runs this: they join
    one process group (aigis.distributed) and share the job (protection/parallel.py); rank 0 prints the summary."""
    from aigis import distributed
    from aigis.cpu import apply_threads
    from aigis.preprocess import BadImageError

    from .captions import PairsManifestError
    from .job import protect_dataset

    main = True
    try:
        settings = settings_from_options(args)
        device = args.device or _default_device()
        with distributed.process_group(device, quiet=args.quiet) as launch:
            main = launch is None or launch.rank == 0
            apply_threads(quiet=args.quiet or not main)
            summary = protect_dataset(
                args.data, args.manifest, args.out, settings, clip_preset=args.clip, image_size=args.size,
                device=args.device, resume=not args.no_resume, progress=not args.quiet and main,
                trigger_words=args.trigger_words, tokenizer_file=args.tokenizer, init_checkpoint=args.init,
            )
    except (PairsManifestError, BadImageError, ValueError, FileNotFoundError) as exc:
        if main or not getattr(exc, "aigis_from_main", False):  # rank 0's error is printed by rank 0
            print(f"aigis protect: error: {exc}", file=sys.stderr)
        return 2
    if main:
        print(json.dumps(summary, indent=1))
    return 0


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def settings_from_options(args: argparse.Namespace) -> Any:
    """The --preset's settings with every option the user gave on top (None: not given)."""
    fields = _setting_fields()
    given: dict[str, Any] = {name: getattr(args, name) for name in fields if getattr(args, name, None) is not None}
    if "epsilon" in given:
        given["epsilon"] /= fields["epsilon"].metadata["scale"]
    if "norm_stats" not in given and args.init:
        given["norm_stats"] = "running"  # a pretrained surrogate's averages are sound
    cls = PRESETS[args.preset][0]
    if args.mode == "em":
        if cls is not MEMSettings:
            raise ValueError(f"--mode em is noise only, with no trigger: preset {args.preset!r} names its textures "
                             f"with triggers; use --preset paper")
        given["trigger_length"] = 0
    elif given.get("trigger_length", 1) < 1:
        raise ValueError("--mode mem needs --trigger-length >= 1 (use --mode em for noise only)")
    own = {f.name for f in dataclasses.fields(cls)}
    foreign = [_option(fields[name]) for name in given if name not in own]
    if foreign:
        raise ValueError(f"{', '.join(foreign)}: not a setting of preset {args.preset!r} (method {cls.method}); "
                         f"choose a preset of the method it belongs to")
    return preset_settings(args.preset, **given)


def _publish(args: argparse.Namespace) -> int:
    from pathlib import Path

    from aigis.export.remote import repository_at
    from aigis.export.repository import RepositoryError
    from aigis.objectstore import ObjectStoreError

    from .served import publish_protect_model
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
        with repository_at(args.repo, write=True) as repo:
            version = publish_protect_model(repo, artefact, steps=args.steps, gpu=args.gpu,
                                            max_batch_size=args.max_batch)
            recorded = json.loads((repo / PROTECT_MODEL / str(version) / SETTINGS_FILE).read_text())
    except (RepositoryError, ObjectStoreError, ValueError, FileNotFoundError) as exc:
        print(f"aigis protect-publish: error: {exc}", file=sys.stderr)
        return 2
    print(f"{PROTECT_MODEL} version {version} in {args.repo}: protects with {recorded['protects_with']} "
          f"(surrogate {recorded['surrogate']})")
    return 0
