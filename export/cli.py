"""Subcommands of the export stage: `aigis export` and the ops commands `aigis models list|validate|rollout|status`."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from aigis import contract


def register(sub: argparse._SubParsersAction) -> None:
    export = sub.add_parser("export", help="publish a trained run as a new version of the Triton ensemble")
    export.add_argument("--run", required=True, help="training run directory (aigis train --out)")
    export.add_argument("--repo", required=True, help="Triton model repository to add the version to: a folder, or "
                                                      "s3://BUCKET/PREFIX (the store's endpoint in AWS_ENDPOINT_URL)")
    export.add_argument("--tasks", type=int, default=None, help="export the model after this many tasks (default all)")
    export.add_argument("--data", default=None, help="data root: check the ONNX models on its held-out images too")
    export.add_argument("--gpu", action="store_true", help="GPU instances (Triton's native onnxruntime backend)")
    export.add_argument("--tensorrt-fp16", action="store_true", help="with --gpu: TensorRT execution accelerator, FP16")
    export.add_argument("--tensorrt-plan", action="store_true",
                        help="also build tensorrt_plan engines (needs the tensorrt package and a GPU)")
    export.add_argument("--max-batch", type=int, default=64, help="max_batch_size of every model (default 64)")
    export.add_argument("--cpu-threads", type=int, default=1,
                        help="threads per CPU model instance, onnxruntime or OpenVINO (default 1: the ensemble's "
                             "extractors run at the same time and share the cores; 0 = the runtime's default)")
    export.add_argument("--cpu-accelerator", choices=["openvino", "none"], default="openvino",
                        help="CPU instances: run the ONNX models in OpenVINO's CPU runtime (default; FP32, about "
                             "twice onnxruntime's speed) or plain onnxruntime (none)")
    export.add_argument("--fused", action="store_true",
                        help=f"also publish the version as one graph, {contract.FUSED_MODEL} (trunk, every tail or "
                             f"extractor, classifier; the same answers as {contract.ENSEMBLE_MODEL}). Faster with a "
                             f"shared trunk, but every version holds every task's weights again; rollouts move it "
                             f"with the ensembles")
    export.add_argument("--rtol", type=float, default=None,
                        help="refuse to publish a model whose ONNX output differs from PyTorch by more than "
                             "RTOL * (0.1 + max|output|) (default 1e-3)")
    export.add_argument("--quiet", action="store_true")
    export.set_defaults(func=run_export)

    models = sub.add_parser("models", help="ops on a model repository: list, validate, roll out a version")
    actions = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="models, versions and the tasks of each ensemble version")
    listing.add_argument("--repo", required=True, help="a folder or s3://BUCKET/PREFIX")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(func=run_list)
    check = actions.add_parser("validate", help="every ensemble step resolves; names, dtypes, shapes agree")
    check.add_argument("--repo", required=True, help="a folder or s3://BUCKET/PREFIX")
    check.set_defaults(func=run_validate)
    rollout = actions.add_parser("rollout", help="serve another version of the ensemble (or of --model) on running "
                                                 "servers (no restart), replica by replica")
    rollout.add_argument("--repo", required=True, help="a folder or s3://BUCKET/PREFIX")
    rollout.add_argument("--url", default="127.0.0.1:8001",
                         help="the server's gRPC endpoint, or a fleet's as HOST:PORT,HOST:PORT,... (rolled one after "
                              "another; if one fails, the ones already moved go back)")
    rollout.add_argument("--version", type=int, required=True, help="version to serve (back or forward)")
    rollout.add_argument("--model", default=None,
                         help=f"a stand-alone model to roll instead of the ensemble, e.g. {contract.PROTECT_MODEL}")
    rollout.add_argument("--control-key-file", default=None,
                         help="file holding the server's control key (default: $AIGIS_CONTROL_KEY, else the file "
                              "`aigis serve` wrote for each port)")
    rollout.add_argument("--prune", action="store_true",
                         help="also unload the extractors the version does not use (after a rollback); the old "
                              "version's classifier and decode steps are always unloaded once it has drained")
    rollout.set_defaults(func=run_rollout)
    status = actions.add_parser("status", help="the models and versions each replica has ready")
    status.add_argument("--url", default="127.0.0.1:8001", help="gRPC endpoints, HOST:PORT,HOST:PORT,...")
    status.add_argument("--repo", default=None, help="also show the versions this repository points at")
    status.add_argument("--control-key-file", default=None, help="as for rollout")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=run_status)


def run_export(args: argparse.Namespace) -> int:
    from aigis.export.configs import TargetOptions
    from aigis.export.onnx_export import ExportCheckError
    from aigis.export.attribution import export_run
    from aigis.export.remote import repository_at
    from aigis.export.repository import RepositoryError
    from aigis.objectstore import ObjectStoreError
    from aigis.training.checkpoint import RunError

    try:
        options = TargetOptions(gpu=args.gpu, tensorrt_fp16=args.tensorrt_fp16, max_batch_size=args.max_batch,
                                cpu_threads=args.cpu_threads, cpu_accelerator=args.cpu_accelerator)
        with repository_at(args.repo, write=True) as repo:
            report = export_run(args.run, repo, args.tasks, data_root=args.data, options=options,
                                progress=not args.quiet, rtol=args.rtol, fused=args.fused)
            if args.tensorrt_plan:
                from aigis.export.tensorrt_plan import build_plans

                for line in build_plans(repo, report.tasks):
                    print(line)
    except (RepositoryError, ExportCheckError, RunError, ObjectStoreError, ValueError, FileNotFoundError,
            RuntimeError) as exc:
        print(f"aigis export: error: {exc}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0


def run_list(args: argparse.Namespace) -> int:
    from aigis.export.remote import repository_at
    from aigis.export.repository import RepositoryError, list_models
    from aigis.objectstore import ObjectStoreError

    try:
        with repository_at(args.repo) as repo:
            rows = list_models(repo)
    except (RepositoryError, ObjectStoreError) as exc:
        print(f"aigis models list: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        print(f"{row['model']:<32} versions {row['versions'] or '-'} (latest {row['latest']}, served {row['served']})")
        for version, tasks in (row.get("tasks") or {}).items():
            print(f"    version {version}: {len(tasks)} task{'s' if len(tasks) != 1 else ''}: {', '.join(tasks)}")
    return 0


def run_validate(args: argparse.Namespace) -> int:
    from aigis.export.remote import remote_notes, repository_at
    from aigis.export.repository import notes, validate
    from aigis.objectstore import ObjectStoreError

    try:
        with repository_at(args.repo) as repo:
            problems = validate(repo)
            found = notes(repo) + remote_notes(repo)
    except ObjectStoreError as exc:
        print(f"aigis models validate: error: {exc}", file=sys.stderr)
        return 2
    for note in found:
        print(f"  note: {note}")
    if problems:
        print(f"{args.repo}: {len(problems)} problem(s)")
        for problem in problems:
            print(f"  {problem}")
        return 1
    print(f"{args.repo}: valid")
    return 0


def _controls(urls: list[str], key_file: str | None) -> list[tuple[str, Any]]:
    from aigis.serving.control import ModelControl, read_control_key

    return [(url, ModelControl(url, control_key=read_control_key(url, key_file))) for url in urls]


def run_rollout(args: argparse.Namespace) -> int:
    from aigis.export.fleet import FleetRolloutError, fleet_rollout, parse_urls
    from aigis.export.remote import repository_at
    from aigis.export.repository import RepositoryError
    from aigis.objectstore import ObjectStoreError
    from aigis.serving.control import ModelControlError

    if args.model is not None and args.prune:
        print("aigis models rollout: error: --prune is for ensemble rollbacks, not --model", file=sys.stderr)
        return 2
    replicas: list[tuple[str, Any]] = []
    try:
        replicas = _controls(parse_urls(args.url), args.control_key_file)
        with repository_at(args.repo, write=True) as repo:  # on S3, each moved pointer is written through at once
            results = fleet_rollout(replicas, repo, args.version, model=args.model, prune=args.prune)
    except FleetRolloutError as exc:
        print(f"aigis models rollout: error: {exc}", file=sys.stderr)
        for result in exc.results:
            print(f"  {result.summary()}", file=sys.stderr)
        return 2
    except (RepositoryError, ModelControlError, ObjectStoreError, ValueError) as exc:
        print(f"aigis models rollout: error: {exc}", file=sys.stderr)
        return 2
    finally:
        for _, control in replicas:
            control.close()
    what = args.model or "ensemble"
    for result in results:
        done = result.rollout
        line = f"{result.url}: {what} version {result.before} -> {result.after}"
        if args.model is None:
            line += (f" (loaded {', '.join(done.loaded) or 'nothing new'})"
                     + (f"; unloaded {', '.join(done.unloaded)}" if done.unloaded else "")
                     + (f"; still draining {', '.join(done.lingering)}: their steps stay loaded until the next "
                        f"rollout" if done.lingering else ""))
        print(line)
    return 0


def run_status(args: argparse.Namespace) -> int:
    from aigis.export.fleet import parse_urls, replica_status
    from aigis.export.repository import pointed_version, versions
    from aigis.serving.control import ModelControlError

    rows: dict[str, Any] = {}
    failed = False
    try:
        replicas = _controls(parse_urls(args.url), args.control_key_file)
    except (ModelControlError, ValueError) as exc:
        print(f"aigis models status: error: {exc}", file=sys.stderr)
        return 2
    for url, control in replicas:
        try:
            rows[url] = replica_status(control)
        except Exception as exc:  # noqa: BLE001 - an unreachable replica is reported, the others still shown
            rows[url] = {"error": str(exc).splitlines()[0]}
            failed = True
        finally:
            control.close()
    pointed = {}
    if args.repo is not None:
        from aigis.export.remote import repository_at

        with repository_at(args.repo) as repo:
            models = sorted(p.name for p in repo.iterdir() if p.is_dir() and versions(repo, p.name))
            pointed = {m: pointed_version(repo, m) for m in models}
    if args.json:
        print(json.dumps({"replicas": rows, **({"repository": pointed} if args.repo else {})}, indent=2))
        return 1 if failed else 0
    for url, status in rows.items():
        if "error" in status:
            print(f"{url}: unreachable ({status['error']})")
            continue
        served = ", ".join(f"{name} {'+'.join(v)}" for name, v in sorted(status.items()) if not _is_step(name))
        print(f"{url}: {served or 'nothing ready'} ({len(status)} models ready)")
    if pointed:
        print(f"{args.repo} points at: " + ", ".join(f"{m} {v}" for m, v in pointed.items() if v is not None
                                                     and not _is_step(m)))
    return 1 if failed else 0


def _is_step(name: str) -> bool:
    """A per-task or per-version step of the ensembles (listed by count, not by name)."""
    return name.startswith((contract.extractor_model(""), contract.classifier_model(""), contract.decode_model(""),
                            contract.TRUNK_MODEL))
