"""Subcommands of the data stage: `aigis data synth` and `aigis data check`."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="make the synthetic benchmark, or check a CDDB-layout root")
    actions = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")

    synth = actions.add_parser("synth", help="write the deterministic synthetic CDDB-style benchmark")
    synth.add_argument("--out", required=True, help="root to write (<task>/{train,val}/[<sub>/]{0_real,1_fake})")
    synth.add_argument("--tasks", type=int, default=None, help="number of tasks (generator families), default 7")
    synth.add_argument("--train-per-class", type=int, default=None)
    synth.add_argument("--val-per-class", type=int, default=None)
    synth.add_argument("--size", type=int, default=None, help="image side in pixels (multiple of 4)")
    synth.add_argument("--seed", type=int, default=None)
    synth.add_argument("--force", action="store_true", help="replace a benchmark written with other settings")
    synth.add_argument("--quiet", action="store_true")
    synth.set_defaults(func=run_synth)

    check = actions.add_parser("check", help="list and screen every image of a CDDB-layout root")
    check.add_argument("--data", required=True, metavar="ROOT")
    order = check.add_mutually_exclusive_group()
    order.add_argument("--tasks", default=None, help="comma-separated task order")
    order.add_argument("--scenario", default=None, help="easy, hard, long, synth, synth5 or a file")
    check.add_argument("--on-bad", choices=("skip", "stop"), default="skip",
                       help="skip (default: list every bad file) or stop at the first")
    crop = check.add_mutually_exclusive_group()
    crop.add_argument("--config", default=None, help="training config whose crop to check against the image sizes")
    crop.add_argument("--crop", type=int, default=None, help="a crop size to check against the image sizes")
    check.add_argument("--quiet", action="store_true")
    check.set_defaults(func=run_check)


def run_synth(args: argparse.Namespace) -> int:
    import dataclasses

    from aigis.data.synth import SynthConfig, generate

    given = {"tasks": args.tasks, "train_per_class": args.train_per_class, "val_per_class": args.val_per_class,
             "size": args.size, "seed": args.seed}
    config = SynthConfig(**{k: v for k, v in given.items() if v is not None})
    try:
        made = generate(args.out, config, force=args.force, progress=not args.quiet)
    except (ValueError, FileExistsError) as exc:
        print(f"aigis data synth: error: {exc}", file=sys.stderr)
        return 2
    fields = ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(config).items())
    print(f"{args.out}: {'written' if made else 'already up to date, left alone'} ({fields})")
    return 0


def run_check(args: argparse.Namespace) -> int:
    from aigis.data.cddb import CDDB, CDDBLayoutError
    from aigis.data.scenarios import resolve_tasks
    from aigis.preprocess import BadImageError

    try:
        order = resolve_tasks(args.tasks, args.scenario, root=args.data)
        data = CDDB(args.data, order, on_bad=args.on_bad, progress=not args.quiet)
        data.prepare()
    except (CDDBLayoutError, BadImageError, ValueError) as exc:
        print(f"aigis data check: error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.data}: {len(order)} task(s)")
    print(f"  {'task':<20} {'split':<6} {'real':>7} {'fake':>7}  subcategories")
    for index, task in enumerate(order):
        for split in ("train", "val"):
            samples = data.samples(index, split)
            real = sum(s.is_real for s in samples)
            subcategories = sorted({s.subcategory for s in samples if s.subcategory})
            print(f"  {task:<20} {split:<6} {real:>7} {len(samples) - real:>7}  {', '.join(subcategories)}")
    crop = args.crop
    if crop is None and args.config is not None:
        from aigis.training.config import ConfigError, TrainConfig

        try:
            crop = TrainConfig.from_toml(args.config, {}).crop
        except (ConfigError, FileNotFoundError, ValueError) as exc:
            print(f"aigis data check: error: --config {args.config}: {exc}", file=sys.stderr)
            return 2
    report_sizes(data, order, crop)
    skipped = dict(data.bad.skipped)
    if skipped:
        print(f"{len(skipped)} unreadable image(s) left out:")
        for path, reason in skipped.items():
            print(f"  {path}: {reason}")
        return 1
    print("every image is readable")
    return 0


def report_sizes(data, order: list[str], crop: int | None) -> None:
    """Image sizes per task (from the headers), and a warning when `crop` keeps under half of a median image."""
    from aigis.data.sizes import task_sizes

    print(f"  {'task':<20} {'median size':>12}  short side min-max")
    for sizes in task_sizes(data, order):
        print(f"  {sizes.task:<20} {f'{sizes.width}x{sizes.height}':>12}  {sizes.short_min}-{sizes.short_max}")
        warning = sizes.crop_warning(crop) if crop is not None else None
        if warning:
            print(f"  warning: {warning}")
    if crop is None:
        print("  (--config or --crop: also check that a training crop uses these images)")
