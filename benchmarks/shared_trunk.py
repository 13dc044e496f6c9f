"""A shared trunk against LoRA everywhere: accuracy, forgetting and cost(T)/cost(1), measured in one run.

    python benchmarks/shared_trunk.py                                # 7 synthetic tasks, 144-px images, crop 128
    python benchmarks/shared_trunk.py --settings all,4,3 --balance 0,30

Each setting trains configs/demo.toml on the synthetic benchmark (`aigis data synth --size 144`) at crop 128 with
`lora.last_blocks` = k ("all" = LoRA on every block, the paper's setting) and `balance_epochs` = b, through the
same ContinualRun, and reports its final average accuracy and forgetting. Its model after T = 1, 3, 5, 7 tasks is
then exported as `aigis export --fused` writes it and timed at batch 32, side by side:

  in-process   the exported ONNX models in OpenVINO's CPU runtime (one thread per model, tails in parallel,
               as the server runs them), and the version's fused graph (trunk + every tail + classifier,
               all cores);
  Triton       the real tritonserver over gRPC through aigis.client.AttributionClient (4 requests in flight):
               the ensemble (lorax) and the fused graph (lorax_fused) of the version rolled out.

cost(T)/cost(1) = time per image with T tasks / time per image with 1 task. Writes
benchmarks/results/shared_trunk.{json,md} and shared_trunk.png (cost against the number of tasks).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO / "benchmarks"))

from continual import machine  # noqa: E402  (benchmarks/ is not a package)
from inference import InProcessPipeline, OpenVinoModel, throughput  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default="all,4,3",
                        help="comma-separated lora.last_blocks values; 'all' = LoRA on every block (the paper)")
    parser.add_argument("--balance", default="0,30", help="comma-separated balance_epochs values, each with every setting")
    parser.add_argument("--tasks", type=int, default=7)
    parser.add_argument("--size", type=int, default=144, help="synthetic image side (px)")
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.toml"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more config overrides")
    parser.add_argument("--task-counts", default="1,3,5,7")
    parser.add_argument("--seconds", type=float, default=3.0, help="per throughput measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", default=str(REPO / "runs" / "bench" / "shared_trunk"))
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--no-triton", action="store_true", help="in-process timings only")
    parser.add_argument("--no-costs", action="store_true", help="accuracy only: no export and no timings")
    parser.add_argument("--untrained", default="", metavar="BACKBONE@CROP,...",
                        help="also time these backbones at random init (no training), e.g. "
                             "vit_tiny_patch16_224@224,convit_tiny@224, with --untrained-settings")
    parser.add_argument("--untrained-settings", default="all,3,2", help="lora.last_blocks values for --untrained")
    parser.add_argument("--skip-training", action="store_true", help="only the --untrained timings")
    parser.add_argument("--retime", action="store_true",
                        help="no training: time the runs of the last report again, every setting side by side")
    parser.add_argument("--add", action="store_true",
                        help="keep the rows of the last report and add (or replace) the settings trained now; "
                             "each row records the command that trained it")
    parser.add_argument("--quiet", action="store_true")
    return parser.parse_args(argv)


def label(last_blocks: int | None, balance: int) -> str:
    where = ("LoRA on every block" if last_blocks is None
             else f"last {last_blocks} block{'s' if last_blocks != 1 else ''}")
    return where + (f", classifier balanced {balance} epochs" if balance else "")


def train(args: argparse.Namespace, root: Path, order: list[str], last_blocks: int | None, balance: int) -> dict:
    from aigis.data.cddb import CDDB
    from aigis.training.cli import parse_overrides
    from aigis.training.config import TrainConfig
    from aigis.training.run import ContinualRun

    overrides = {**parse_overrides(args.set), "crop": args.crop, "balance_epochs": balance,
                 "lora.last_blocks": "all" if last_blocks is None else last_blocks}
    config = TrainConfig.from_toml(args.config, overrides)
    out = Path(args.work) / f"run_{last_blocks or 'all'}_b{balance}"
    for old in (out, repository_of(out)):
        if old.exists():
            shutil.rmtree(old)
    print(f"== {label(last_blocks, balance)} -> {out}", flush=True)
    started = time.perf_counter()
    summary = ContinualRun(config, CDDB(root, order, progress=False), out, progress=not args.quiet).run()
    return {"run_dir": str(out), "train_seconds": round(time.perf_counter() - started, 1),
            "average_accuracy": summary["average_accuracy"], "forgetting": summary["forgetting"],
            "binary_accuracy": summary["binary_accuracy"], "accuracy_matrix": summary["accuracy_matrix"]}


def fused_graph(model, crop: int, path: Path, classifier=None, tasks: int | None = None) -> Path:
    """The version as `aigis export --fused` writes it, from the first `tasks` (default: every) merged extractors of
    `model` and `classifier` (default: the model's own)."""
    from aigis.export import onnx_export

    fused = onnx_export.FusedVersion(model.trunk_module() if model.shared_trunk else None,
                                     [model.merged_extractor(k) for k in range(tasks or model.num_tasks)],
                                     classifier if classifier is not None else model.classifier_module())
    path.write_bytes(onnx_export.fused_onnx(fused, crop))
    return path


def repository_of(run_dir: Path) -> Path:
    return run_dir.parent / (run_dir.name + "_repo")


def triton_costs(args: argparse.Namespace, batch: np.ndarray, serve_version, way: str, counts: list[int],
                 samples: dict[str, list[float]], model: str) -> None:
    """ms per image of `model` through Triton over gRPC for each count, `serve_version(count)` returning the
    server to call."""
    from aigis.client import AttributionClient

    for count in counts:
        with serve_version(count) as url, AttributionClient(url, model=model, max_batch_size=32, max_in_flight=4,
                                                           timeout_s=60) as client:
            for _ in range(args.repeats):
                value = 1000.0 / throughput(client.attribute, batch, 4, args.seconds)
                samples.setdefault(f"{way}@{count}", []).append(value)
                print(f"  {way:13s} T={count}: {value:.2f} ms/image", flush=True)


def costs(args: argparse.Namespace, result: dict, root: Path, order: list[str], counts: list[int]) -> None:
    """Export versions `counts` of the run (with `--fused`) and time them in process (pipeline and fused graph)
    and through Triton (lorax, the ensemble, and lorax_fused, the same version as one model)."""
    from aigis import contract
    from aigis.data.cddb import CDDB
    from aigis.export import export_run, load_version
    from aigis.serving.server import TritonServer

    run_dir = Path(result["run_dir"])
    repo = repository_of(run_dir)
    for count in counts:      # a version already exported from this run is kept as it is
        export_run(run_dir, repo, num_tasks=count, data_root=root, progress=False, fused=True)
    images, _ = CDDB(root, order, progress=False).eval_images(args.crop, per_task=-(-32 // len(order)))
    batch = images[:32]
    pipelines = {count: InProcessPipeline(repo, order[:count], count, threads=1, runtime="openvino")
                 for count in counts}
    fused = {count: OpenVinoModel(repo / contract.FUSED_MODEL / str(count) / "model.onnx", 0) for count in counts}
    samples = in_process_costs(args, pipelines, fused, batch, counts)
    if not args.no_triton:
        log = repo.parent / "tritonserver.log"
        with TritonServer(repo, models=[], log_path=log) as server:

            @contextlib.contextmanager
            def version(count: int):   # the ensemble and the fused graph of `count`, as a rollout serves them
                with server.control() as control:
                    load_version(control, repo, count, bytes_ensemble=False, prune=True)
                yield server.grpc_url

            triton_costs(args, batch, version, "triton", counts, samples, contract.ENSEMBLE_MODEL)
            triton_costs(args, batch, version, "triton-fused", counts, samples, contract.FUSED_MODEL)
    result["ms_per_image"] = {key: statistics.median(values) for key, values in samples.items()}
    result["samples_ms_per_image"] = samples


def in_process_costs(args: argparse.Namespace, pipelines: dict, fused: dict, batch: np.ndarray,
                     counts: list[int]) -> dict[str, list[float]]:
    """ms per image of each version's pipeline and fused graph, interleaved over `args.repeats` rounds."""
    samples: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for count in counts:
            for way, call in (("pipeline", pipelines[count]),
                              ("fused", lambda x, m=fused[count]: m.run(["PROBS"], {"IMAGES": x}))):
                value = 1000.0 / throughput(call, batch, 1, args.seconds)
                samples.setdefault(f"{way}@{count}", []).append(value)
                print(f"  {way:8s} T={count}: {value:.2f} ms/image", flush=True)
    return samples


def untrained_costs(args: argparse.Namespace, backbone_name: str, crop: int, last_blocks: int | None,
                    counts: list[int]) -> dict:
    """Cost alone (no training) of a backbone at random init with random adapters: its pieces exported as
    `aigis export` writes them (trunk, merged extractors, a classifier per version), timed in process."""
    import torch

    from aigis import contract
    from aigis.export import onnx_export
    from aigis.models import build_backbone
    from aigis.training.config import LoraSettings
    from aigis.training.model import LoRAXModel, UnifiedClassifier

    torch.manual_seed(0)
    model = LoRAXModel(build_backbone(backbone_name, None), LoraSettings(r=8, alpha=16, dropout=0.0,
                                                                         last_blocks=last_blocks))
    generator = torch.Generator().manual_seed(1)
    for task in range(max(counts)):
        model.add_task()
        # LoRA's B starts at zero: every merged extractor would then hold the same weights, and a runtime that
        # folds identical subgraphs would time one of them. Random adapters make each task's weights its own.
        with torch.no_grad():
            for parameter in model.adapter_parameters(task).values():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    model.freeze()
    model.eval()
    repo = Path(args.work) / f"untrained_{backbone_name}_{last_blocks or 'all'}"
    if repo.exists():
        shutil.rmtree(repo)

    def write(name: str, graph: bytes) -> None:
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "1" / "model.onnx").write_bytes(graph)

    tasks = [f"t{k}" for k in range(max(counts))]
    images = torch.randint(0, 256, (32, crop, crop, 3), dtype=torch.uint8)
    source = images
    if model.shared_trunk:
        write(contract.TRUNK_MODEL, onnx_export.trunk_onnx(model.trunk_module(), crop))
        with torch.no_grad():
            source = model.trunk_module()(images)
    for k, task in enumerate(tasks):
        graph = (onnx_export.tail_onnx(model.merged_extractor(k), source) if model.shared_trunk
                 else onnx_export.extractor_onnx(model.merged_extractor(k), crop))
        write(contract.extractor_model(task), graph)
    classifiers = {count: UnifiedClassifier(model.feature_dim, count, 2 * count).eval() for count in counts}
    for count, classifier in classifiers.items():
        write(contract.classifier_model(count), onnx_export.classifier_onnx(classifier, count, model.feature_dim))
    pipelines = {count: InProcessPipeline(repo, tasks[:count], count, threads=1, runtime="openvino")
                 for count in counts}
    fused = {count: OpenVinoModel(fused_graph(model, crop, repo / f"fused{count}.onnx", classifiers[count], count), 0)
             for count in counts}
    samples = in_process_costs(args, pipelines, fused, images.numpy(), counts)
    return {"backbone": backbone_name, "crop": crop, "last_blocks": last_blocks,
            "label": label(last_blocks, 0), "ms_per_image": {k: statistics.median(v) for k, v in samples.items()},
            "samples_ms_per_image": samples}


def markdown(report: dict) -> str:
    counts = report["task_counts"]
    commands = list(dict.fromkeys(row.get("command", report["command"]) for row in report["results"]))
    lines = ["# Shared trunk vs LoRA everywhere", "",
             f"Machine: {report['machine']['cpu']}, {report['machine']['usable_cpus']} usable cores. "
             f"Training: " + ", then ".join(f"`{c}`" for c in commands)
             + (f"; timings: `{report['timing_command']}`" if report.get("timing_command") else "")
             + f". Data: synthetic benchmark, {report['tasks']} tasks, {report['size']}-px images, crop {report['crop']}; "
             f"configs/demo.toml otherwise. Median of {report['repeats']} timings of {report['seconds']:.0f} s each, "
             f"batch 32.", "",
             "| setting | final avg accuracy (%) | forgetting (pts) | training (s) | "
             + " | ".join(f"cost({t})/cost(1) {way}" for way in report["ways"] for t in counts if t > 1) + " |",
             "|---|---:|---:|---:|" + "---:|" * (len(report["ways"]) * (len(counts) - 1))]
    for row in report["results"]:
        ms = row["ms_per_image"]
        ratios = [f"{ms[f'{way}@{t}'] / ms[f'{way}@{counts[0]}']:.2f}" if ms else "-"
                  for way in report["ways"] for t in counts if t > 1]
        lines.append(f"| {row['label']} | {100 * row['average_accuracy']:.2f} | {100 * row['forgetting']:.2f} | "
                     f"{row['train_seconds']:.0f} | " + " | ".join(ratios) + " |")
    lines += ["", "Time per image (ms), batch 32:", "",
              "| setting | " + " | ".join(f"{way} T={t}" for way in report["ways"] for t in counts) + " |",
              "|---|" + "---:|" * (len(report["ways"]) * len(counts))]
    for row in (r for r in report["results"] if r["ms_per_image"]):
        lines.append(f"| {row['label']} | " + " | ".join(f"{row['ms_per_image'][f'{way}@{t}']:.2f}"
                                                        for way in report["ways"] for t in counts) + " |")
    if report.get("untrained"):
        lines += ["", f"Untrained backbones (random init, random adapters; cost only, in process): "
                      f"`{report['untrained_command']}`", "",
                  "| backbone | crop | setting | " + " | ".join(f"cost({t})/cost(1) {way}" for way in ("pipeline", "fused")
                                                          for t in counts if t > 1) + " | fused ms/image T=1 |",
                  "|---|---:|---|" + "---:|" * (2 * (len(counts) - 1) + 1)]
        for row in report["untrained"]:
            ms = row["ms_per_image"]
            ratios = [f"{ms[f'{way}@{t}'] / ms[f'{way}@{counts[0]}']:.2f}" for way in ("pipeline", "fused")
                      for t in counts if t > 1]
            lines.append(f"| {row['backbone']} | {row['crop']} | {row['label']} | " + " | ".join(ratios)
                         + f" | {ms[f'fused@{counts[0]}']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = report["task_counts"]
    figure, axes = plt.subplots(1, len(report["ways"]), figsize=(5 * len(report["ways"]), 4), squeeze=False)
    timed = {}   # one curve per setting: rows that differ only in the classifier's training share their timings
    for row in report["results"]:
        if row["ms_per_image"]:
            timed.setdefault(row["last_blocks"], row)
    for axis, way in zip(axes[0], report["ways"]):
        for row in timed.values():
            ms = row["ms_per_image"]
            axis.plot(counts, [ms[f"{way}@{t}"] / ms[f"{way}@{counts[0]}"] for t in counts], marker="o",
                      label=label(row["last_blocks"], 0))
        axis.set_title(f"{way}: cost(T) / cost(1)")
        axis.set_xlabel("tasks T")
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    counts_wanted = [int(x) for x in args.task_counts.split(",")]
    command = " ".join(["python", "benchmarks/shared_trunk.py"] + (argv if argv is not None else sys.argv[1:]))
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    report_path = results / "shared_trunk.json"
    if args.skip_training or args.retime:
        if not report_path.is_file():
            print(f"no {report_path} to add timings to: run without --skip-training/--retime first", file=sys.stderr)
            return 2
        report = json.loads(report_path.read_text())
        if args.retime:
            retime(args, report, command)
            report_path.write_text(json.dumps(report, indent=2))
    else:
        report = trained_rows(args, command, counts_wanted, report_path)
    if args.untrained:
        report["untrained"] = []
        report["untrained_command"] = command
        for item in args.untrained.split(","):
            name, _, crop = item.partition("@")
            for setting in args.untrained_settings.split(","):
                last_blocks = None if setting.strip() == "all" else int(setting)
                print(f"== untrained {name} at {crop or 224} px, {label(last_blocks, 0)}", flush=True)
                report["untrained"].append(untrained_costs(args, name, int(crop or 224), last_blocks, counts_wanted))
                report_path.write_text(json.dumps(report, indent=2))
    (results / "shared_trunk.md").write_text(markdown(report))
    if any(row["ms_per_image"] for row in report["results"]):     # nothing to plot after --no-costs
        plot(report, results / "shared_trunk.png")
    print(markdown(report))
    return 0


def retime(args: argparse.Namespace, report: dict, command: str) -> None:
    """Time the runs of an earlier report again (e.g. on a quieter machine), all settings side by side."""
    from aigis.data.scenarios import resolve_tasks

    root = Path(args.work) / f"synth{report['size']}"
    order = resolve_tasks(None, None, root=root)[:report["tasks"]]
    args.crop = report["crop"]
    report.update(repeats=args.repeats, seconds=args.seconds, timing_command=command,
                  ways=["pipeline", "fused"] + ([] if args.no_triton else ["triton", "triton-fused"]))
    timed: dict = {}
    for row in report["results"]:
        if row["last_blocks"] not in timed:
            print(f"== timing {label(row['last_blocks'], 0)} ({row['run_dir']})", flush=True)
            costs(args, row, root, order, report["task_counts"])
            timed[row["last_blocks"]] = row["ms_per_image"], row["samples_ms_per_image"]
        row["ms_per_image"], row["samples_ms_per_image"] = timed[row["last_blocks"]]


def trained_rows(args: argparse.Namespace, command: str, counts_wanted: list[int], report_path: Path) -> dict:
    """Train every (balance, setting) on the synthetic benchmark and time each setting's exported versions."""
    from aigis.data.scenarios import resolve_tasks
    from aigis.data.synth import SynthConfig, generate

    root = Path(args.work) / f"synth{args.size}"
    generate(root, SynthConfig(tasks=args.tasks, size=args.size), progress=not args.quiet)
    order = resolve_tasks(None, None, root=root)[:args.tasks]
    counts = [t for t in counts_wanted if 1 <= t <= len(order)]
    settings = [None if s.strip() == "all" else int(s) for s in args.settings.split(",")]
    balances = [int(b) for b in args.balance.split(",")]
    report = {"machine": machine(), "command": command, "tasks": len(order), "size": args.size, "crop": args.crop,
              "task_counts": counts, "repeats": args.repeats, "seconds": args.seconds,
              "ways": ["pipeline", "fused"] + ([] if args.no_triton else ["triton", "triton-fused"]), "results": []}
    if args.add and report_path.is_file():
        earlier = json.loads(report_path.read_text())
        if (earlier["tasks"], earlier["size"], earlier["crop"]) != (report["tasks"], report["size"], report["crop"]):
            raise SystemExit(f"--add: {report_path} holds {earlier['tasks']} tasks at {earlier['size']} px, crop "
                             f"{earlier['crop']}; this run trains {report['tasks']} at {args.size} px, crop {args.crop}")
        for row in earlier["results"]:
            row.setdefault("command", earlier["command"])
        report = {**earlier, "results": [r for r in earlier["results"]
                                         if (r["last_blocks"], r["balance_epochs"]) not in
                                         {(k, b) for k in settings for b in balances}]}
    for balance in balances:
        for last_blocks in settings:
            row = {"last_blocks": last_blocks, "balance_epochs": balance, "label": label(last_blocks, balance),
                   "command": command, **train(args, root, order, last_blocks, balance)}
            print(f"   {row['label']}: accuracy {100 * row['average_accuracy']:.2f} %, forgetting "
                  f"{100 * row['forgetting']:.2f} pts, {row['train_seconds']:.0f} s", flush=True)
            if args.no_costs:
                row["ms_per_image"] = None
            elif balance == balances[0]:    # the cost does not depend on how the classifier was trained
                costs(args, row, root, order, counts)
            else:
                row["ms_per_image"] = next((r["ms_per_image"] for r in report["results"]
                                            if r["last_blocks"] == last_blocks), None)
            report["results"].append(row)
            report_path.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    sys.exit(main())
