"""LoRAX against sequential fine-tuning and joint training on the synthetic benchmark, in one harness.

    python benchmarks/continual.py                 # 5 tasks, configs/demo.toml, data in runs/bench/synth
    python benchmarks/continual.py --tasks 7 --data /path/to/cddb --scenario easy

All three methods go through training.run.ContinualRun with the same config, data, seeds and evaluation,
so the only difference is the method. Fine-tuning trains the whole network on each new task with no
memory (the forgetting baseline); joint trains once on every task together (the upper bound, no BWT).
Writes benchmarks/results/continual.json and continual.md (also printed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
METHODS = ("lorax", "finetune", "joint")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None,
                        help="CDDB-layout root (default: the synthetic benchmark, made in runs/bench/synth)")
    parser.add_argument("--tasks", default="5",
                        help="a number N (the first N tasks of the order) or a comma-separated task list")
    parser.add_argument("--scenario", default=None, help="task order: easy, hard, long, synth... or a file")
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.toml"))
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from lorax,finetune,joint")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every method, as in `aigis train --set`")
    parser.add_argument("--runs", default=str(REPO / "runs" / "bench" / "continual"),
                        help="where each method's run directory goes (replaced on each benchmark)")
    parser.add_argument("--results", default=str(RESULTS), help="folder for continual.json and continual.md")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--render", action="store_true",
                        help="only rewrite continual.md from the continual.json in --results (no training)")
    return parser.parse_args(argv)


def task_order(args: argparse.Namespace, root: Path) -> list[str]:
    """--tasks N takes the first N of the scenario (or the root's own order); a list is used as given."""
    from aigis.data.scenarios import resolve_tasks

    if args.tasks.strip().isdigit():
        order = resolve_tasks(None, args.scenario, root=root)
        count = int(args.tasks)
        if not 1 <= count <= len(order):
            raise ValueError(f"--tasks {count}: the order has {len(order)} task(s) ({', '.join(order)})")
        return order[:count]
    return resolve_tasks(args.tasks, args.scenario, root=root)


def ensure_data(args: argparse.Namespace) -> tuple[Path, str]:
    """The data root, making the default synthetic benchmark when no --data is given."""
    if args.data:
        return Path(args.data), f"CDDB-layout root {args.data}"
    from aigis.data.synth import SynthConfig, generate

    root = REPO / "runs" / "bench" / "synth"
    made = generate(root, SynthConfig(), progress=not args.quiet)
    print(f"{root}: {'generated' if made else 'already up to date'}", flush=True)
    return root, f"synthetic benchmark ({root.relative_to(REPO)}, `aigis data synth` defaults)"


def run_method(method: str, args: argparse.Namespace, root: Path, order: list[str]) -> dict:
    """One fresh run of `method`; its summary plus wall time and per-task trainable parameters."""
    from aigis.data.cddb import CDDB
    from aigis.training.cli import parse_overrides
    from aigis.training.config import TrainConfig
    from aigis.training.run import ContinualRun

    overrides = {**parse_overrides(args.set), "method": method}
    config = TrainConfig.from_toml(args.config, overrides)
    out = Path(args.runs) / method
    if out.exists():
        shutil.rmtree(out)
    print(f"== {method}: {len(order)} task(s) -> {out}", flush=True)
    started = time.perf_counter()
    data = CDDB(root, order, on_bad=config.on_bad, progress=not args.quiet)
    summary = ContinualRun(config, data, out, progress=not args.quiet, data_spec=",".join(order)).run()
    wall = time.perf_counter() - started
    entries = summary.get("task_entries") or []
    return {
        "method": method,
        "run_dir": str(out),
        "wall_seconds": round(wall, 1),
        "average_accuracy": summary["average_accuracy"],
        "average_incremental_accuracy": summary.get("average_incremental_accuracy"),
        "forgetting": summary["forgetting"],
        "bwt": summary["bwt"],
        "binary_accuracy": summary["binary_accuracy"],
        "trainable_parameters_per_stage": [e.get("trainable_parameters") for e in entries],
        "adapter_parameters_per_stage": [e.get("adapter_parameters") for e in entries],
        "accuracy_matrix": summary["accuracy_matrix"],
        "skipped_images": summary.get("skipped_images") or {},
    }


def machine() -> dict:
    """CPU model and core counts, so the wall times can be read against the hardware."""
    model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": model or "unknown", "logical_cpus": os.cpu_count(), "usable_cpus": usable,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value + 0.0:.2f}"


def params(values: list) -> str:
    shown = sorted({v for v in values if v is not None})
    if not shown:
        return "-"
    return f"{shown[0]:,}" if len(shown) == 1 else f"{shown[0]:,} to {shown[-1]:,}"


def markdown(report: dict) -> str:
    rows = report["results"]
    lines = [
        f"# Continual benchmark: {', '.join(report['methods'])}",
        "",
        f"Data: {report['data']}; tasks ({len(report['tasks'])}): {', '.join(report['tasks'])}.",
        f"Config: {report['config']} (same for every method, only `method` differs).",
        f"Machine: {report['machine']['cpu']}, {report['machine']['usable_cpus']} usable core(s), "
        f"torch {report['machine']['torch']} ({report['machine']['torch_threads']} threads)"
        + (f", GPU {report['machine']['cuda']}" if report['machine']['cuda'] else ", no GPU") + ".",
        f"Command: `{report['command']}`  ",
        f"Finished: {report['finished']}.",
        "",
        "Accuracy is multi-real (a real image counts as right under any real class; a fake must get its own "
        "generator), in % on each task's val split after the last task. Forgetting = -BWT = mean over old tasks "
        "of (accuracy just after learning it - accuracy at the end). Joint trains once on everything, so it "
        "has no forgetting. Accuracy just after learning = mean of R[i, i] (how well each task was learned "
        "at all; forgetting is measured from it). Trainable parameters: per training stage "
        "(LoRAX: one adapter + the heads).",
        "",
        "| method | final avg accuracy (%) | forgetting (pts) | BWT (pts) | accuracy just after learning (%) "
        "| binary accuracy (%) | trainable params per task | wall time (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['method']} | {pct(r['average_accuracy'])} | {pct(r['forgetting'])} | {pct(r['bwt'])} "
                     f"| {pct(just_learned(r))} | {pct(r['binary_accuracy'])} "
                     f"| {params(r['trainable_parameters_per_stage'])} | {r['wall_seconds']:.0f} |")
    verdict = report.get("verdict")
    if verdict:
        lines += ["", verdict]
    for r in rows:
        matrix = r["accuracy_matrix"]
        lines += ["", f"{r['method']} accuracy matrix (%; row = task, column = after training stage):", "",
                  "| task | " + " | ".join(str(j + 1) for j in range(len(matrix[0]))) + " |",
                  "|---|" + "---:|" * len(matrix[0])]
        for name, row in zip(report["tasks"], matrix):
            lines.append(f"| {name} | " + " | ".join(pct(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def just_learned(result: dict) -> float | None:
    """Mean of the diagonal R[i, i]: each task's accuracy right after it was trained (None for joint)."""
    matrix = result["accuracy_matrix"]
    if len(matrix[0]) != len(matrix):
        return None
    return sum(matrix[i][i] for i in range(len(matrix))) / len(matrix)


def verdict(results: list[dict]) -> str | None:
    """The claim (LoRAX forgets clearly less than sequential fine-tuning), stated with the numbers whether it
    holds or not."""
    by = {r["method"]: r for r in results}
    if "lorax" not in by or "finetune" not in by:
        return None
    lorax, finetune = by["lorax"]["forgetting"], by["finetune"]["forgetting"]
    if lorax is None or finetune is None:
        return None
    holds = lorax < finetune - 0.02          # "clearly less": at least 2 points below
    text = (f"LoRAX forgetting {pct(lorax)} pts vs sequential fine-tuning {pct(finetune)} pts: "
            + ("LoRAX forgets clearly less." if holds else
               "LoRAX does NOT forget clearly less than fine-tuning in this run."))
    learned = just_learned(by["finetune"])
    if learned is not None and learned < 0.6:
        text += (f" Caution: fine-tuning reached only {pct(learned)}% on the tasks just after learning them "
                 "(about chance), so its forgetting is measured from a low starting point and understates "
                 "how much it loses; compare the final average accuracies too.")
    joint = by.get("joint")
    if joint is not None and joint["average_accuracy"] < by["lorax"]["average_accuracy"]:
        text += (f" Joint training ({pct(joint['average_accuracy'])}%) is below LoRAX "
                 f"({pct(by['lorax']['average_accuracy'])}%): it is meant as the upper bound, so it did not "
                 "train properly under this config (full-network training at these learning rates).")
    return text


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        return render(Path(args.results))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        print(f"--methods: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(METHODS)}",
              file=sys.stderr)
        return 2
    root, data_description = ensure_data(args)
    try:
        order = task_order(args, root)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    results = [run_method(m, args, root, order) for m in methods]
    report = {
        "methods": methods,
        "data": data_description,
        "tasks": order,
        "config": os.path.relpath(args.config, REPO) + "".join(f" --set {s}" for s in args.set),
        "machine": machine(),
        "command": " ".join(["python", os.path.relpath(__file__, REPO),
                             *map(shlex.quote, sys.argv[1:] if argv is None else argv)]),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "results": results,
    }
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "continual.json").write_text(json.dumps(report, indent=2) + "\n")
    return render(out)


def render(out: Path) -> int:
    """Add the derived numbers to continual.json, write continual.md from it, print it."""
    report = json.loads((out / "continual.json").read_text())
    for result in report["results"]:
        result["accuracy_just_after_learning"] = just_learned(result)
    report["verdict"] = verdict(report["results"])
    (out / "continual.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    (out / "continual.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
