"""A shared trunk against LoRA everywhere: accuracy, forgetting and cost(T)/cost(1), measured in one run.

    python benchmarks/shared_trunk.py                                # 7 synthetic tasks, 144-px images, crop 128
    python benchmarks/shared_trunk.py --settings all,4,3 --balance 0,30

Each setting trains configs/demo.toml on the synthetic benchmark (`aigis data synth --size 144`) at crop 128 with
`lora.last_blocks` = k ("all" = LoRA on every block, the paper's setting) and `balance_epochs` = b, through the
same ContinualRun, and reports its final average accuracy and forgetting. Its model after T = 1, 3, 5, 7 tasks is
then exported as `aigis export` writes it and timed at batch 32, side by side:

  in-process   the exported ONNX models in OpenVINO's CPU runtime (one thread per model, tails in parallel,
               as the server runs them), and one fused graph per version (trunk + every tail + classifier,
               all cores);
  Triton       the real tritonserver over gRPC through aigis.client.AttributionClient (4 requests in flight).

cost(T)/cost(1) = time per image with T tasks / time per image with 1 task. Writes
benchmarks/results/shared_trunk.{json,md} and shared_trunk.png (cost against the number of tasks).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO / "benchmarks"))

from continual import machine  # noqa: E402  (benchmarks/ is not a package)
from inference import OpenVinoModel, throughput  # noqa: E402


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
    parser.add_argument("--quiet", action="store_true")
    return parser.parse_args(argv)


def label(last_blocks: int | None, balance: int) -> str:
    where = "LoRA on every block" if last_blocks is None else f"last {last_blocks} blocks"
    return where + (f", classifier balanced {balance} epochs" if balance else "")


def train(args: argparse.Namespace, root: Path, order: list[str], last_blocks: int | None, balance: int) -> dict:
    from aigis.data.cddb import CDDB
    from aigis.training.cli import parse_overrides
    from aigis.training.config import TrainConfig
    from aigis.training.run import ContinualRun

    overrides = {**parse_overrides(args.set), "crop": args.crop, "balance_epochs": balance,
                 "lora.last_blocks": last_blocks}
    config = TrainConfig.from_toml(args.config, overrides)
    out = Path(args.work) / f"run_{last_blocks or 'all'}_b{balance}"
    if out.exists():
        shutil.rmtree(out)
    print(f"== {label(last_blocks, balance)} -> {out}", flush=True)
    started = time.perf_counter()
    summary = ContinualRun(config, CDDB(root, order, progress=False), out, progress=not args.quiet).run()
    return {"run_dir": str(out), "train_seconds": round(time.perf_counter() - started, 1),
            "average_accuracy": summary["average_accuracy"], "forgetting": summary["forgetting"],
            "binary_accuracy": summary["binary_accuracy"], "accuracy_matrix": summary["accuracy_matrix"]}


class Pipeline:
    """The exported models of one version in process, as the ensemble runs them: trunk once, tails in parallel."""

    def __init__(self, repo: Path, tasks: list[str], version: int) -> None:
        from aigis import contract

        self.c = contract
        trunk = repo / contract.TRUNK_MODEL / "1" / "model.onnx"
        self.trunk = OpenVinoModel(trunk, 1) if trunk.is_file() else None
        self.extractors = [OpenVinoModel(repo / contract.extractor_model(t) / "1" / "model.onnx", 1) for t in tasks]
        self.classifier = OpenVinoModel(repo / contract.classifier_model(version) / "1" / "model.onnx", 1)
        self.pool = ThreadPoolExecutor(max_workers=len(tasks))

    def __call__(self, images: np.ndarray) -> np.ndarray:
        c = self.c
        if self.trunk is not None:
            feed = {c.TRUNK: self.trunk.run([c.TRUNK], {c.IMAGES: images})[0]}
        else:
            feed = {c.IMAGES: images}
        features = list(self.pool.map(lambda m: m.run([c.FEATURES], feed)[0], self.extractors))
        return self.classifier.run([c.PROBS], {c.features_input(k): f for k, f in enumerate(features)})[0]


def fused_graph(run_dir: Path, version: int, crop: int, path: Path) -> Path:
    """One ONNX graph for the whole version: (trunk +) every merged extractor + the classifier."""
    import torch
    from torch import nn

    from aigis import contract
    from aigis.export import onnx_export
    from aigis.training.run import load_run

    model = load_run(run_dir, version)

    class Fused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.trunk = model.trunk_module() if model.shared_trunk else None
            self.extractors = nn.ModuleList(model.merged_extractor(k) for k in range(model.num_tasks))
            self.classifier = model.classifier_module()

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            source = self.trunk(images) if self.trunk is not None else images
            return torch.softmax(self.classifier(*[e(source) for e in self.extractors]), dim=1)

    fused = Fused()
    for module in [fused.trunk] + list(fused.extractors):
        backbone = getattr(module, "backbone", None)
        if hasattr(backbone, "fix_input_size"):
            backbone.fix_input_size(crop)
    path.write_bytes(onnx_export._to_onnx_bytes(fused, (torch.zeros(2, crop, crop, 3, dtype=torch.uint8),),
                                                [contract.IMAGES], [contract.PROBS]))
    return path


def costs(args: argparse.Namespace, result: dict, root: Path, order: list[str], counts: list[int]) -> None:
    """Export versions `counts` of the run and time them in process (pipeline and fused) and through Triton."""
    from aigis.client import AttributionClient
    from aigis.data.cddb import CDDB
    from aigis.export import export_run, load_version
    from aigis.serving.server import TritonServer

    run_dir = Path(result["run_dir"])
    repo = run_dir.parent / (run_dir.name + "_repo")
    if repo.exists():
        shutil.rmtree(repo)
    for count in counts:
        export_run(run_dir, repo, num_tasks=count, data_root=root, progress=False)
    images, _ = CDDB(root, order, progress=False).eval_images(args.crop, per_task=-(-32 // len(order)))
    batch = images[:32]
    pipelines = {count: Pipeline(repo, order[:count], count) for count in counts}
    fused = {count: OpenVinoModel(fused_graph(run_dir, count, args.crop, repo.parent / f"{run_dir.name}_fused{count}.onnx"),
                                  0) for count in counts}
    samples: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for count in counts:
            for way, call in (("pipeline", pipelines[count]), ("fused", lambda x, m=fused[count]: m.run(["PROBS"], {"IMAGES": x}))):
                value = 1000.0 / throughput(call, batch, 1, args.seconds)
                samples.setdefault(f"{way}@{count}", []).append(value)
                print(f"  {way:8s} T={count}: {value:.2f} ms/image", flush=True)
    if not args.no_triton:
        with TritonServer(repo, models=[], log_path=repo.parent / "tritonserver.log") as server:
            for count in counts:
                with server.control() as control:
                    load_version(control, repo, count, bytes_ensemble=False, prune=True)
                with AttributionClient(server.grpc_url, max_batch_size=32, max_in_flight=4, timeout_s=60) as client:
                    for _ in range(args.repeats):
                        value = 1000.0 / throughput(client.attribute, batch, 4, args.seconds)
                        samples.setdefault(f"triton@{count}", []).append(value)
                        print(f"  triton   T={count}: {value:.2f} ms/image", flush=True)
    result["ms_per_image"] = {key: statistics.median(values) for key, values in samples.items()}
    result["samples_ms_per_image"] = samples


def markdown(report: dict) -> str:
    counts = report["task_counts"]
    lines = [f"# Shared trunk vs LoRA everywhere", "",
             f"Machine: {report['machine']['cpu']}, {report['machine']['usable_cpus']} usable cores. "
             f"Command: `{report['command']}`. Data: synthetic benchmark, {report['tasks']} tasks, {report['size']}-px "
             f"images, crop {report['crop']}; configs/demo.toml otherwise. Median of {report['repeats']} timings "
             f"of {report['seconds']:.0f} s each, batch 32.", "",
             "| setting | final avg accuracy (%) | forgetting (pts) | training (s) | "
             + " | ".join(f"cost({t})/cost(1) {way}" for way in report["ways"] for t in counts if t > 1) + " |",
             "|---|---:|---:|---:|" + "---:|" * (len(report["ways"]) * (len(counts) - 1))]
    for row in report["results"]:
        ms = row["ms_per_image"]
        ratios = [f"{ms[f'{way}@{t}'] / ms[f'{way}@{counts[0]}']:.2f}" for way in report["ways"] for t in counts if t > 1]
        lines.append(f"| {row['label']} | {100 * row['average_accuracy']:.2f} | {100 * row['forgetting']:.2f} | "
                     f"{row['train_seconds']:.0f} | " + " | ".join(ratios) + " |")
    lines += ["", "Time per image (ms), batch 32:", "",
              "| setting | " + " | ".join(f"{way} T={t}" for way in report["ways"] for t in counts) + " |",
              "|---|" + "---:|" * (len(report["ways"]) * len(counts))]
    for row in report["results"]:
        lines.append(f"| {row['label']} | " + " | ".join(f"{row['ms_per_image'][f'{way}@{t}']:.2f}"
                                                        for way in report["ways"] for t in counts) + " |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = report["task_counts"]
    figure, axes = plt.subplots(1, len(report["ways"]), figsize=(5 * len(report["ways"]), 4), squeeze=False)
    for axis, way in zip(axes[0], report["ways"]):
        for row in report["results"]:
            ms = row["ms_per_image"]
            axis.plot(counts, [ms[f"{way}@{t}"] / ms[f"{way}@{counts[0]}"] for t in counts], marker="o",
                      label=row["label"])
        axis.set_title(f"{way}: cost(T) / cost(1)")
        axis.set_xlabel("tasks T")
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from aigis.data.synth import SynthConfig, generate

    root = Path(args.work) / f"synth{args.size}"
    generate(root, SynthConfig(tasks=args.tasks, size=args.size), progress=not args.quiet)
    from aigis.data.scenarios import resolve_tasks

    order = resolve_tasks(None, None, root=root)[:args.tasks]
    counts = [t for t in (int(x) for x in args.task_counts.split(",")) if 1 <= t <= len(order)]
    settings = [None if s.strip() == "all" else int(s) for s in args.settings.split(",")]
    balances = [int(b) for b in args.balance.split(",")]
    report = {"machine": machine(), "command": " ".join(["python", "benchmarks/shared_trunk.py"] + (argv or sys.argv[1:])),
              "tasks": len(order), "size": args.size, "crop": args.crop, "task_counts": counts, "repeats": args.repeats,
              "seconds": args.seconds, "ways": ["pipeline", "fused"] + ([] if args.no_triton else ["triton"]),
              "results": []}
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    for balance in balances:
        for last_blocks in settings:
            row = {"last_blocks": last_blocks, "balance_epochs": balance, "label": label(last_blocks, balance),
                   **train(args, root, order, last_blocks, balance)}
            print(f"   {row['label']}: accuracy {100 * row['average_accuracy']:.2f} %, forgetting "
                  f"{100 * row['forgetting']:.2f} pts, {row['train_seconds']:.0f} s", flush=True)
            if balance == balances[0]:    # the cost does not depend on how the classifier was trained
                costs(args, row, root, order, counts)
            else:
                row["ms_per_image"] = next(r["ms_per_image"] for r in report["results"]
                                           if r["last_blocks"] == last_blocks)
            report["results"].append(row)
            (results / "shared_trunk.json").write_text(json.dumps(report, indent=2))
    (results / "shared_trunk.md").write_text(markdown(report))
    plot(report, results / "shared_trunk.png")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
