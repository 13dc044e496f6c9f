"""Attribution throughput, three ways, side by side in one run:

  (a) the paper's way: PyTorch + peft, adapters unmerged, one backbone pass per adapter (set_adapter), with
      torch's default threads and with one (on a shared machine the default can be the slower);
  (b) in-process onnxruntime on the merged extractors + the classifier, with onnxruntime's default threads
      and with one thread per session, and the same models in OpenVINO's CPU runtime (one thread each: what
      the server runs with the default `cpu_execution_accelerator: openvino`);
  (c) the real Triton server over gRPC through the client library (aigis.client.AttributionClient).

Each is measured at batch 1 and batch 32 with `--in-flight` concurrent callers ((a) takes one caller: a
peft model switches adapters in place, so it cannot serve concurrent requests), `--repeats` times
interleaved; the medians are reported. Then the cost per image against the number of tasks (1, 3, 5, 7)
for (a) and (b).

    python benchmarks/inference.py                       # uses runs/demo (run `make demo` first)
    python benchmarks/inference.py --run R --data D      # any LoRAX run and its data root

Writes benchmarks/results/inference.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
PYTORCH = ("a_pytorch_peft_unmerged", "a1_pytorch_peft_unmerged_1thread")
IN_PROCESS = ("b_onnxruntime_merged", "b1_onnxruntime_merged_1thread", "b2_openvino_merged_1thread")


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def throughput(call, batch: np.ndarray, in_flight: int, seconds: float) -> float:
    """Images per second of `call(batch)` from `in_flight` threads calling back to back for `seconds`."""
    call(batch)                                   # warm-up
    stop = time.perf_counter() + seconds
    done = [0] * in_flight

    def worker(i: int) -> None:
        while time.perf_counter() < stop:
            call(batch)
            done[i] += len(batch)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(in_flight)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done) / (time.perf_counter() - start)


class OrtModel:
    """One ONNX model in onnxruntime; run(names, feeds) may be called from several threads."""

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(self, names: list[str], feeds: dict) -> list[np.ndarray]:
        return self.session.run(names, feeds)


class OpenVinoModel:
    """One ONNX model compiled by OpenVINO as the server does; one infer request per calling thread."""

    def __init__(self, path: Path, threads: int) -> None:
        from aigis.openvino_cpu import compile_cpu

        self.model = compile_cpu(path, threads)     # as the server compiles it
        self.local = threading.local()

    def run(self, names: list[str], feeds: dict) -> list[np.ndarray]:
        if not hasattr(self.local, "request"):
            self.local.request = self.model.create_infer_request()
        results = self.local.request.infer(feeds)
        return [np.array(results[self.model.output(name)]) for name in names]


class InProcessPipeline:
    """(b): the exported models in one process as the ensemble runs them: a shared trunk (when the repository
    has one) once, then the merged extractors in parallel, then the classifier."""

    def __init__(self, repo: Path, tasks: list[str], version: int, threads: int = 0, runtime: str = "onnxruntime") -> None:
        """threads: intra-op threads per model (0 = the runtime's default, one per core)."""
        from aigis import contract

        model = {"onnxruntime": OrtModel, "openvino": OpenVinoModel}[runtime]
        self.contract = contract
        trunk = repo / contract.TRUNK_MODEL / "1" / "model.onnx"
        self.trunk = model(trunk, threads) if trunk.is_file() else None
        self.extractors = [model(repo / contract.extractor_model(t) / "1" / "model.onnx", threads) for t in tasks]
        self.classifier = model(repo / contract.classifier_model(version) / "1" / "model.onnx", threads)
        self.pool = ThreadPoolExecutor(max_workers=len(tasks))

    def __call__(self, images: np.ndarray) -> np.ndarray:
        c = self.contract
        feed = {c.IMAGES: images}
        if self.trunk is not None:
            feed = {c.TRUNK: self.trunk.run([c.TRUNK], feed)[0]}
        features = list(self.pool.map(lambda m: m.run([c.FEATURES], feed)[0], self.extractors))
        return self.classifier.run([c.PROBS], {c.features_input(k): f for k, f in enumerate(features)})[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/demo/run")
    parser.add_argument("--data", default="runs/demo/data")
    parser.add_argument("--repo", default="runs/bench/model_repository", help="written here if missing")
    parser.add_argument("--in-flight", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=4.0, help="per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--task-counts", default="1,3,5,7")
    args = parser.parse_args(argv)

    import torch

    from aigis import contract
    from aigis.client import AttributionClient
    from aigis.data.cddb import CDDB
    from aigis.export import export_run, load_version, versions
    from aigis.serving.server import TritonServer
    from aigis.training.run import load_run

    run, repo = Path(args.run), Path(args.repo)
    if not (run / "manifest.json").is_file():
        print(f"no training run at {run}: run `make demo` first or pass --run", file=sys.stderr)
        return 2
    full = load_run(run)
    tasks = list(full.manifest["tasks"])
    crop = int(full.manifest["crop"])
    counts = [k for k in (int(x) for x in args.task_counts.split(",")) if 1 <= k <= len(tasks)]
    for k in sorted(set(counts + [len(tasks)])):
        if k not in versions(repo, contract.ENSEMBLE_MODEL):
            print(export_run(run, repo, num_tasks=k, data_root=args.data, progress=False).summary().splitlines()[0])

    pool, _ = CDDB(args.data, tasks, progress=False).eval_images(crop, per_task=-(-64 // len(tasks)))
    batches = {1: pool[:1], 32: pool[:32]}
    print(f"machine: {machine()}; {len(tasks)} tasks, {full.manifest['backbone']['name']}, crop {crop}; "
          f"torch threads {torch.get_num_threads()}")

    def pytorch_call(model):
        def call(images: np.ndarray) -> None:
            with torch.no_grad():
                model(torch.from_numpy(images))
        return call

    default_torch_threads = torch.get_num_threads()

    results: dict = {"machine": machine(), "tasks": len(tasks), "backbone": full.manifest["backbone"]["name"],
                     "crop": crop, "in_flight": args.in_flight, "seconds_per_measurement": args.seconds,
                     "repeats": args.repeats, "command": " ".join([Path(sys.argv[0]).name] + (argv or sys.argv[1:]))}
    samples: dict[str, list[float]] = {}
    ort_default = InProcessPipeline(repo, tasks, len(tasks))
    ort_single = InProcessPipeline(repo, tasks, len(tasks), threads=1)
    openvino_single = InProcessPipeline(repo, tasks, len(tasks), threads=1, runtime="openvino")
    with TritonServer(repo, models=[], log_path=repo.parent / "tritonserver.log") as server:
        with server.control() as control:
            load_version(control, repo, len(tasks), bytes_ensemble=False)
        with AttributionClient(server.grpc_url, max_batch_size=32, max_in_flight=args.in_flight,
                               timeout_s=60) as client:
            # name -> (call, callers, torch threads while measuring)
            ways = {
                "a_pytorch_peft_unmerged": (pytorch_call(full), 1, default_torch_threads),
                "a1_pytorch_peft_unmerged_1thread": (pytorch_call(full), 1, 1),
                "b_onnxruntime_merged": (ort_default, args.in_flight, default_torch_threads),
                "b1_onnxruntime_merged_1thread": (ort_single, args.in_flight, default_torch_threads),
                "b2_openvino_merged_1thread": (openvino_single, args.in_flight, default_torch_threads),
                "c_triton_grpc_client": (client.attribute, args.in_flight, default_torch_threads),
            }
            for repeat in range(args.repeats):
                for name, (call, in_flight, torch_threads) in ways.items():
                    torch.set_num_threads(torch_threads)
                    for batch_size, batch in batches.items():
                        key = f"{name}@batch{batch_size}"
                        value = throughput(call, batch, in_flight, args.seconds)
                        samples.setdefault(key, []).append(value)
                        print(f"  [{repeat + 1}/{args.repeats}] {key:<40} {value:8.1f} images/s", flush=True)
    medians = {key: statistics.median(values) for key, values in samples.items()}
    results["images_per_second"] = medians
    results["samples"] = samples
    torch.set_num_threads(default_torch_threads)
    # (c) is compared with the best variant of (a) and of (b).
    def best(names: tuple[str, ...], batch_size: int) -> float:
        return max(medians[f"{name}@batch{batch_size}"] for name in names)

    c = {b: medians[f"c_triton_grpc_client@batch{b}"] for b in (1, 32)}
    results["ratios"] = {
        "c_over_b_batch32": c[32] / best(IN_PROCESS, 32),
        "c_over_a_batch32": c[32] / best(PYTORCH, 32),
        "c_over_a_batch1": c[1] / best(PYTORCH, 1),
    }

    # Cost per image against the number of tasks, batch 32, one caller: T backbone passes per image.
    scaling = {}
    for k in counts:
        model_k = load_run(run, num_tasks=k)
        in_process_k = InProcessPipeline(repo, tasks[:k], k, threads=1, runtime="openvino")
        a = statistics.median(throughput(pytorch_call(model_k), batches[32], 1, args.seconds / 2)
                              for _ in range(args.repeats))
        b = statistics.median(throughput(in_process_k, batches[32], 1, args.seconds / 2) for _ in range(args.repeats))
        scaling[k] = {"a_ms_per_image": 1000 / a, "b_ms_per_image": 1000 / b}
        print(f"  {k} task(s): (a) {1000 / a:.2f} ms/image, (b) {1000 / b:.2f} ms/image", flush=True)
    results["cost_vs_tasks"] = scaling

    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "inference.json").write_text(json.dumps(results, indent=2))
    lines = [f"Machine: {results['machine']}. {len(tasks)} tasks ({results['backbone']}, {crop}x{crop}), "
             f"{args.in_flight} requests in flight for (b) and (c), one caller for (a); median of {args.repeats} "
             f"runs of {args.seconds:.0f} s each, interleaved.", "",
             "| way | batch 1 (images/s) | batch 32 (images/s) |", "|---|---|---|"]
    for name, label in (("a_pytorch_peft_unmerged", "(a) PyTorch + peft, unmerged, default threads"),
                        ("a1_pytorch_peft_unmerged_1thread", "(a) PyTorch + peft, unmerged, 1 thread"),
                        ("b_onnxruntime_merged", "(b) onnxruntime in-process, merged, default threads"),
                        ("b1_onnxruntime_merged_1thread", "(b) onnxruntime in-process, merged, 1 thread/session"),
                        ("b2_openvino_merged_1thread", "(b) OpenVINO in-process, merged, 1 thread/model"),
                        ("c_triton_grpc_client", "(c) Triton over gRPC, client library")):
        lines.append(f"| {label} | {medians[f'{name}@batch1']:.1f} | {medians[f'{name}@batch32']:.1f} |")
    r = results["ratios"]
    lines += ["", f"(c)/(best b) at batch 32: {r['c_over_b_batch32']:.2f} (target >= 0.8); "
                  f"(c)/(best a) at batch 32: {r['c_over_a_batch32']:.2f}, at batch 1: {r['c_over_a_batch1']:.2f} "
                  f"(target >= 3)", "",
              "| tasks | (a) ms/image | (b) OpenVINO ms/image |", "|---|---|---|"]
    lines += [f"| {k} | {v['a_ms_per_image']:.2f} | {v['b_ms_per_image']:.2f} |" for k, v in scaling.items()]
    (RESULTS / "inference.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
