"""`aigis demo`: the main job end to end on the embedded default, printing what it measured.

1. data: the synthetic CDDB-style benchmark (5 generator families) and a procedural captioned set;
2. train: continual LoRAX over the tasks (EfficientNet-Lite0 with its ImageNet weights, configs/demo.toml);
3. export: the model after the second-to-last task and after the last task, as two versions of the
   Triton ensemble (the second export adds one extractor and new classifier/ensemble versions only);
4. serve: a real tritonserver on 127.0.0.1; attribution of every held-out image over gRPC through the
   client library with the older version, then a roll-forward to the newest without a restart; the
   accuracy measured through the server and its agreement with the in-process PyTorch model;
5. protect: a MEM protection job on the procedural captioned set and its efficacy evaluation (hacker
   CLIPs trained from scratch on the files read back: clean, random noise, MEM, MEM after JPEG/grayscale),
   then protect-on-upload through the served `mem_protect` model on the same server.

Everything lands under --out (default runs/demo); a second run reuses what is already there.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_OUT = "runs/demo"
# Five generator families, small enough that data + training take a few minutes on 2 CPU cores.
DEMO_DATA = {"tasks": 5, "train_per_class": 60, "val_per_class": 30}


def register(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo", help="the main job end to end on the embedded default (data -> train -> export -> "
                                       "Triton -> gRPC attribution -> MEM protection)")
    demo.add_argument("--out", default=DEFAULT_OUT, help=f"where everything is written (default {DEFAULT_OUT})")
    demo.add_argument("--config", default=None, help="training config (default: configs/demo.toml)")
    demo.add_argument("--fresh", action="store_true", help="delete --out first instead of reusing it")
    demo.add_argument("--skip-protection", action="store_true", help="attribution only")
    demo.set_defaults(func=run_demo)


def default_config_path() -> Path:
    """configs/demo.toml of the source tree (the package is installed editable by `make setup`)."""
    path = Path(__file__).resolve().parent.parent / "configs" / "demo.toml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the demo from a checkout of the repository, or pass --config")
    return path


class Clock:
    """Wall time per stage, printed as it goes and kept for the summary."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.stages: dict[str, float] = {}

    def stage(self, name: str) -> "_Stage":
        return _Stage(self, name)

    def total(self) -> float:
        return time.perf_counter() - self.start


class _Stage:
    def __init__(self, clock: Clock, name: str) -> None:
        self.clock, self.name = clock, name

    def __enter__(self) -> None:
        print(f"\n== {self.name} " + "=" * max(0, 70 - len(self.name)), flush=True)
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        seconds = time.perf_counter() - self.t0
        self.clock.stages[self.name] = round(seconds, 1)
        print(f"-- {self.name}: {seconds:.1f}s (total {self.clock.total():.0f}s)", flush=True)


# ---- attribution -----------------------------------------------------------------------------------

def make_data(out: Path) -> Path:
    from aigis.data.synth import SynthConfig, generate

    root = out / "data"
    made = generate(root, SynthConfig(**DEMO_DATA), progress=True)
    print(f"synthetic benchmark at {root} ({'generated' if made else 'up to date'})")
    return root


def train(out: Path, data_root: Path, config_path: Path) -> dict[str, Any]:
    from aigis.data.cddb import CDDB
    from aigis.data.scenarios import resolve_tasks
    from aigis.training.config import TrainConfig
    from aigis.training.run import ContinualRun

    config = TrainConfig.from_toml(config_path)
    run_dir = out / "run"
    tasks = resolve_tasks(None, None, root=data_root)
    summary = ContinualRun(config, CDDB(data_root, tasks), run_dir, resume=run_dir.exists()).run()
    print(f"LoRAX on {len(tasks)} tasks: average accuracy {100 * summary['average_accuracy']:.1f}%, "
          f"forgetting {100 * summary['forgetting']:.1f} points, binary accuracy "
          f"{100 * summary['binary_accuracy']:.1f}%  (matrix: {run_dir / 'accuracy_matrix.png'})")
    return summary


def export_versions(out: Path, data_root: Path, num_tasks: int) -> tuple[Path, list[int]]:
    from aigis.export import export_run

    repo = out / "model_repository"
    versions = []
    for tasks in (num_tasks - 1, num_tasks):
        report = export_run(out / "run", repo, num_tasks=tasks, data_root=data_root)
        versions.append(report.version)
        print(report.summary())
    return repo, versions


def serve_and_call(out: Path, repo: Path, versions: list[int], data_root: Path,
                   protection: tuple[Path, Path] | None) -> dict[str, Any]:
    """protection: the captioned set's root and its protection job's folder (None: attribution only)."""
    import numpy as np
    import torch

    from aigis.client import AttributionClient
    from aigis.data.cddb import CDDB
    from aigis.export import load_version
    from aigis.serving.server import TritonServer
    from aigis.training.metrics import multi_real_correct
    from aigis.training.run import load_run

    model = load_run(out / "run")
    tasks = list(model.manifest["tasks"])
    crop = int(model.manifest["crop"])
    images, labels = CDDB(data_root, tasks, progress=False).eval_images(crop)   # every held-out image
    with torch.no_grad():
        local = torch.cat([model(torch.from_numpy(images[i:i + 64])) for i in range(0, len(images), 64)])
    local_pred = local.argmax(1).numpy()

    results: dict[str, Any] = {}
    with TritonServer(repo, models=[], log_path=out / "tritonserver.log") as server:
        print(f"tritonserver up: gRPC {server.grpc_url}, metrics {server.metrics_url}")
        with server.control() as control:
            load_version(control, repo, versions[0])
            with AttributionClient(server.grpc_url) as client:
                older = client.attribute(images[:8])
                print(f"version {versions[0]} answers with {len(client.manifest.tasks)} tasks: "
                      f"{', '.join(client.manifest.tasks)}")
            t0 = time.perf_counter()
            load_version(control, repo, versions[1])
            print(f"rolled forward to version {versions[1]} in {time.perf_counter() - t0:.1f}s, no restart")
            with AttributionClient(server.grpc_url) as client:
                t0 = time.perf_counter()
                futures = [client.submit(image) for image in images]   # micro-batched single submissions
                answers = [f.result() for f in futures]
                seconds = time.perf_counter() - t0
        names = list(model.manifest["class_names"])
        served_pred = np.array([names.index(a.label) for a in answers])
        accuracy = float(np.mean(multi_real_correct(served_pred, labels)))
        agreement = float(np.mean(served_pred == local_pred))
        results = {
            "images": int(len(images)), "versions": versions, "server_accuracy": accuracy,
            "agreement_with_pytorch": agreement, "images_per_second": len(images) / seconds,
            "older_version_answered": older[0].model_version, "newest_version_answered": answers[0].model_version,
        }
        print(f"attributed {len(images)} held-out images over gRPC at {results['images_per_second']:.0f} images/s: "
              f"accuracy {100 * accuracy:.1f}% (multi-real), agreement with in-process PyTorch {100 * agreement:.1f}%")
        if protection is not None:
            with server.control() as control:
                results["protect_on_upload"] = publish_and_protect_over_grpc(repo, *protection, server.grpc_url,
                                                                             control)
    return results


# ---- protection ----------------------------------------------------------------------------------

# Small enough for the demo's time budget on 2 CPU cores (about 2.5 minutes); BENCHMARKS.md has the full
# comparison. Five captions per image (the Flickr/COCO layout) and the recommended `word-code` preset; test
# queries ranked within galleries of 100 pairs (chance R@1 = 1 %).
DEMO_PROTECT: dict[str, Any] = {
    "train": 200, "captions_per_image": 5, "test": 500, "gallery": 100, "size": 32, "clip": "rn_tiny",
    "hacker_epochs": 12, "preset": "word-code",
}


def demo_scene_style() -> str:
    """Fashion-MNIST item scenes when the dataset is installed (`make fashion-mnist`), else flat-colour ones."""
    from aigis.protection.fashion import FashionDataError, fashion_mnist_dir, missing_files

    try:
        folder = fashion_mnist_dir()
        missing = missing_files(folder)
        if not missing:
            return "fashion"
        reason = f"{folder} lacks {', '.join(missing)}"
    except FashionDataError as exc:
        reason = str(exc)
    print(f"protection demo on flat-colour scenes ({reason}); the word code kept 0.12-0.15 of clean there, not "
          f"under 2x chance: `make fashion-mnist` for the item scenes it was measured on (BENCHMARKS.md)")
    return "flat"


def protection_job(out: Path) -> tuple[tuple[Path, Path], dict[str, Any]]:
    """MEM over the procedural captioned set, then the hacker CLIPs that measure it (read back from PNG)."""
    from aigis.protection.captions import synth_captioned
    from aigis.protection.evaluate import evaluate_protection
    from aigis.protection.job import protect_dataset
    from aigis.protection.settings import preset_settings

    style = demo_scene_style()
    data, protected = out / f"captions_{style}", out / f"protected_{style}"
    if not (data / "test.jsonl").is_file():
        synth_captioned(data, n_train=DEMO_PROTECT["train"], n_test=DEMO_PROTECT["test"], size=DEMO_PROTECT["size"],
                        style=style, captions_per_image=DEMO_PROTECT["captions_per_image"])
    settings = preset_settings(DEMO_PROTECT["preset"])
    job = protect_dataset(data, "train.jsonl", protected, settings, clip_preset=DEMO_PROTECT["clip"],
                          image_size=DEMO_PROTECT["size"])
    print(f"MEM job ({DEMO_PROTECT['preset']} preset, {style} scenes): "
          f"{json.dumps({k: v for k, v in job.items() if not isinstance(v, (dict, list))})}")
    report = evaluate_protection(data, "train.jsonl", "test.jsonl", {"mem": protected},
                                 out_dir=out / f"protection_eval_{style}", clip_preset=DEMO_PROTECT["clip"],
                                 image_size=DEMO_PROTECT["size"], epochs=DEMO_PROTECT["hacker_epochs"],
                                 gallery=DEMO_PROTECT["gallery"])
    print(Path(report["report_md"]).read_text(encoding="utf-8").rstrip())
    print(f"efficacy table, JSON and example sheet: {out / f'protection_eval_{style}'}")
    return (data, protected), {"scenes": style, "preset": DEMO_PROTECT["preset"], "job": job, "evaluation": report}


def publish_and_protect_over_grpc(repo: Path, data: Path, protected_dir: Path, server_url: str, control) -> dict:
    """Publish the job's surrogate as mem_protect, load it, and protect a few uploads through the client."""
    import numpy as np

    from aigis import contract
    from aigis.client import ProtectionClient
    from aigis.export.rollout import load_model_version
    from aigis.protection.captions import load_images, read_pairs
    from aigis.protection.served import publish_protect_model

    surrogate = protected_dir / json.loads((protected_dir / "protection.json").read_text())["surrogate"]["path"]
    version = publish_protect_model(repo, surrogate)  # a word-code job's artefact: uploads get its code
    load_model_version(control, repo, contract.PROTECT_MODEL, version)  # serve it (a re-run may add a version)
    pairs = read_pairs(data, "test.jsonl")[:8]
    images = load_images(pairs, DEMO_PROTECT["size"], progress=False)
    with ProtectionClient(server_url, timeout_s=120) as client:
        t0 = time.perf_counter()
        answer = client.protect(images, [p.caption for p in pairs])
        seconds = time.perf_counter() - t0
    linf = int(np.abs(answer.images.astype(np.int16) - images.astype(np.int16)).max())
    print(f"protect-on-upload: mem_protect version {version} protected {len(pairs)} pairs over gRPC in {seconds:.1f}s "
          f"(L-inf {linf}/255); e.g. {answer.captions[0]!r}")
    return {"version": version, "pairs": len(pairs), "seconds": seconds, "linf_levels": linf,
            "example_caption": answer.captions[0]}


def run_demo(args: argparse.Namespace) -> int:
    import shutil

    out = Path(args.out)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    from aigis.cpu import apply_threads

    summary: dict[str, Any] = {"threads": apply_threads()}
    clock = Clock()
    config_path = Path(args.config) if args.config else default_config_path()
    with clock.stage("data"):
        data_root = make_data(out)
    with clock.stage("train"):
        trained = train(out, data_root, config_path)
        summary["training"] = {k: trained[k] for k in ("tasks", "average_accuracy", "forgetting", "bwt",
                                                         "binary_accuracy")}
    with clock.stage("export"):
        repo, versions = export_versions(out, data_root, len(trained["tasks"]))
    protection = None
    if not args.skip_protection:
        with clock.stage("protect + evaluate"):
            protection, summary["protection"] = protection_job(out)
    with clock.stage("serve + call over gRPC"):
        summary["serving"] = serve_and_call(out, repo, versions, data_root, protection)
    summary["seconds"] = {**clock.stages, "total": round(clock.total(), 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"\ndemo finished in {clock.total():.0f}s; summary in {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    from aigis.cli import main

    sys.exit(main(["demo", *sys.argv[1:]]))
