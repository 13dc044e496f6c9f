"""Subcommands of the training stage: `aigis train`."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    """Add `train` to the `aigis` command."""
    train = sub.add_parser(
        "train",
        help="continual LoRAX training (or a baseline) over the tasks of a CDDB-layout root",
        description="Train one task after another, writing a checkpoint, the manifest and the metrics after "
        "each; --resume continues a run after its last finished task (or extends it with more tasks).",
    )
    train.add_argument("--data", required=True, metavar="ROOT", help="CDDB-layout root (<task>/{train,val}/...)")
    train.add_argument("--out", required=True, metavar="RUN", help="run directory to write")
    train.add_argument("--config", default=None, help="TOML config (default: the paper's settings)")
    order = train.add_mutually_exclusive_group()
    order.add_argument("--tasks", default=None, help="comma-separated task order, e.g. gaugan,biggan,wild")
    order.add_argument("--scenario", default=None, metavar="NAME_OR_FILE",
                       help="a named scenario (easy, hard, long, synth...) or a file with one task per line")
    train.add_argument("--method", choices=("lorax", "finetune", "joint"), default=None,
                       help="overrides the config's method")
    train.add_argument("--resume", action="store_true", help="continue the run in --out")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config setting (TOML value syntax), e.g. --set epochs=2 --set lora.r=8")
    train.add_argument("--on-bad", choices=("skip", "stop"), default=None,
                       help="unreadable image: stop naming it (default) or leave it out and report it")
    train.add_argument("--quiet", action="store_true", help="no progress bars or per-task lines")
    train.set_defaults(func=run_train)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """["epochs=2", "lora.r=8", "backbone=vit_micro"] -> typed values (TOML syntax, bare words as strings)."""
    import tomllib

    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text.strip()
        overrides[key] = value
    return overrides


def resolve_task_order(root: str, tasks: str | None, scenario: str | None) -> list[str]:
    """The task order from --tasks or --scenario (aigis.data.scenarios), else every task under the root."""
    try:
        from aigis.data.scenarios import resolve_tasks
    except ImportError:
        resolve_tasks = None
    if resolve_tasks is not None:
        return list(resolve_tasks(tasks, scenario, root=root))
    if scenario is not None:
        raise ValueError("--scenario needs aigis.data.scenarios, which this installation lacks; use --tasks")
    if tasks:
        return [t.strip() for t in tasks.split(",") if t.strip()]
    return _default_order(root)


def _default_order(root: str) -> list[str]:
    """The synthetic benchmark's own order (synth.json), else the task folders in name order."""
    import json
    from pathlib import Path

    from aigis.data.cddb import list_tasks

    synth = Path(root) / "synth.json"
    if synth.is_file():
        return list(json.loads(synth.read_text())["tasks"])
    return list_tasks(root)


def run_train(args: argparse.Namespace) -> int:
    """Build the config and the task order, train, print the summary. Exit 2 on bad input.

    Under torchrun (`torchrun --nproc-per-node N $(which aigis) train ...`) every process runs this: they join
    one process group (aigis.distributed) and train data-parallel; rank 0 alone writes the run and prints."""
    from aigis import distributed
    from aigis.cpu import apply_threads
    from aigis.data.cddb import CDDB, CDDBLayoutError
    from aigis.preprocess import BadImageError
    from aigis.training.checkpoint import RunError
    from aigis.training.config import ConfigError, TrainConfig
    from aigis.training.metrics import format_percent
    from aigis.training.run import ContinualRun

    main = True
    try:
        overrides = parse_overrides(args.set)
        if args.method:
            overrides["method"] = args.method
        if args.on_bad:
            overrides["on_bad"] = args.on_bad
        config = TrainConfig.from_toml(args.config, overrides)
        with distributed.process_group(config.resolved_device(), quiet=args.quiet) as launch:
            main = launch is None or launch.rank == 0
            progress = not args.quiet and main
            apply_threads(quiet=not progress)
            order = resolve_task_order(args.data, args.tasks, args.scenario)
            data = CDDB(args.data, order, on_bad=config.on_bad, progress=progress)
            spec = args.scenario or args.tasks or ",".join(order)
            summary = ContinualRun(config, data, args.out, resume=args.resume, progress=progress,
                                   data_spec=spec).run()
    except (ConfigError, RunError, CDDBLayoutError, BadImageError, ValueError, FileNotFoundError,
            KeyError) as exc:
        if main or not getattr(exc, "aigis_from_main", False):  # rank 0's error is printed by rank 0
            print(f"aigis train: error: {exc}", file=sys.stderr)
        return 2
    if not main:
        return 0
    skipped = summary.get("skipped_images") or {}
    print(f"{config.method} on {len(summary['tasks'])} task(s) ({', '.join(summary['tasks'])}) -> {args.out}")
    print(f"  average accuracy {format_percent(summary['average_accuracy'])}%  "
          f"forgetting {format_percent(summary['forgetting'])}  BWT {format_percent(summary['bwt'])}  "
          f"binary accuracy {format_percent(summary['binary_accuracy'])}%")
    if skipped:
        print(f"  skipped {len(skipped)} unreadable image(s):")
        for path, reason in skipped.items():
            print(f"    {path}: {reason}")
    return 0
