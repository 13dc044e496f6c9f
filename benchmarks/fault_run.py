"""Serving under load and faults: rollouts, killed servers and bad input, counted request by request.

On the demo's repository (ensemble versions 4 and 5, which differ in their class lists), `aigis serve` runs as
a real process while four loads send steadily (aigis.client.loadcheck: the sync client, the asyncio client on
`lorax_bytes`, plain tritonclient calls to `lorax` and `lorax_bytes`). Then:

  1. `--rollouts` rollouts back and forth between the two versions with `aigis models rollout`;
  2. `--kills` SIGKILLs of tritonserver (aigis serve restarts it), each timed from the kill to the first answers
     again on every load;
  3. the bad-input matrix over gRPC and HTTP: oversized and corrupt uploads, wrong dtypes and shapes, a model
     load carrying code without the control key, and a deeply nested JSON request.

Every answer is checked against the in-process model of the version that produced it.

    python benchmarks/fault_run.py                          # uses runs/demo (run `make demo` first)
    python benchmarks/fault_run.py --rollouts 4 --kills 1   # a shorter run

Writes benchmarks/results/fault_run.json and .md.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    from aigis.serving.server import free_port as pick

    return pick()


def expected_labels(run: Path, data: Path, versions: list[int]) -> tuple[np.ndarray, list[str], dict]:
    """Held-out images, the run's tasks, and the label each version gives each image in-process."""
    import torch

    from aigis import contract
    from aigis.data.cddb import CDDB
    from aigis.training.run import load_run

    full = load_run(run)
    tasks = list(full.manifest["tasks"])
    images, _ = CDDB(data, tasks, progress=False).eval_images(int(full.manifest["crop"]), per_task=24)
    expected = {}
    for version in versions:
        model = load_run(run, version)
        with torch.no_grad():
            predicted = torch.cat([model(torch.from_numpy(images[i:i + 64])) for i in range(0, len(images), 64)])
        names = contract.class_names(tasks[:version])
        expected[str(version)] = [names[k] for k in predicted.argmax(1).tolist()]
    return images, tasks, expected


class Serve:
    """`aigis serve --http` as a real process, its output lines on a queue."""

    def __init__(self, repo: Path, key: str, log: Path) -> None:
        self.grpc_port, self.http_port, self.metrics_port = free_port(), free_port(), free_port()
        command = [sys.executable, "-m", "aigis.cli", "serve", "--repo", str(repo), "--http",
                   "--grpc-port", str(self.grpc_port), "--http-port", str(self.http_port),
                   "--metrics-port", str(self.metrics_port), "--log", str(log)]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env={**os.environ, "AIGIS_CONTROL_KEY": key})
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(line) for line in self.process.stdout], daemon=True).start()
        text = self.wait_for("Ctrl-C", 300)
        self.pid = int(re.search(r"\(pid (\d+)\)", text).group(1))
        self.grpc_url = f"127.0.0.1:{self.grpc_port}"
        self.http_url = f"127.0.0.1:{self.http_port}"

    def wait_for(self, needle: str, timeout: float) -> str:
        seen, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                continue
            seen.append(line)
            if needle in line:
                return "".join(seen)
        raise TimeoutError(f"aigis serve printed no {needle!r} in {timeout} s:\n" + "".join(seen))

    def stop(self) -> str:
        self.process.send_signal(signal.SIGTERM)
        text = self.wait_for("stopped (tritonserver exit status", 120)
        self.process.wait(timeout=60)
        return text


def answered(tallies: dict) -> dict[str, int]:
    return {name: tally.answered for name, tally in tallies.items()}


def wait_recovered(tallies: dict, before: dict[str, int], timeout: float = 120.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(count > before[name] for name, count in answered(tallies).items()):
            return True
        time.sleep(0.02)
    return False


def png(width: int, height: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("1", (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def bad_input_matrix(serve: Serve, crop: int, tasks_ok: callable) -> list[dict]:
    """Each bad request over gRPC and HTTP: the status it got, how long it took, and whether the server still
    answers a good request afterwards."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    from aigis import contract

    good = np.zeros((1, crop, crop, 3), np.uint8)
    cases = [
        ("100000x1 PNG to lorax_bytes", contract.BYTES_ENSEMBLE_MODEL, contract.IMAGE_BYTES, "BYTES",
         np.array([[png(100_000, 1)]], dtype=object)),
        ("8000x8000 PNG (64 MP) to lorax_bytes", contract.BYTES_ENSEMBLE_MODEL, contract.IMAGE_BYTES, "BYTES",
         np.array([[png(8000, 8000)]], dtype=object)),
        ("corrupt bytes to lorax_bytes", contract.BYTES_ENSEMBLE_MODEL, contract.IMAGE_BYTES, "BYTES",
         np.array([[b"\x89PNG\r\n\x1a\nnot really"]], dtype=object)),
        ("float32 IMAGES to lorax", contract.ENSEMBLE_MODEL, contract.IMAGES, "FP32",
         np.zeros((1, crop, crop, 3), np.float32)),
        (f"IMAGES of {crop - 1} px to lorax", contract.ENSEMBLE_MODEL, contract.IMAGES, "UINT8",
         np.zeros((1, crop - 1, crop - 1, 3), np.uint8)),
    ]
    rows = []
    for protocol, module, url in (("gRPC", grpcclient, serve.grpc_url), ("HTTP", httpclient, serve.http_url)):
        client = module.InferenceServerClient(url)
        for name, model, tensor_name, datatype, data in cases:
            tensor = module.InferInput(tensor_name, list(data.shape), datatype)
            try:
                tensor.set_data_from_numpy(data)
            except Exception as exc:  # noqa: BLE001 - the client library refuses it before sending
                rows.append({"protocol": protocol, "input": name, "status": f"refused by tritonclient: {exc}"[:120],
                             "ms": 0.0, "serving_after": tasks_ok(client, module, good)})
                continue
            started = time.perf_counter()
            try:
                client.infer(model, [tensor])
                status = "ANSWERED"
            except Exception as exc:  # noqa: BLE001
                status = (exc.status() if callable(getattr(exc, "status", None)) else type(exc).__name__) or "error"
            rows.append({"protocol": protocol, "input": name, "status": str(status),
                         "ms": round(1000 * (time.perf_counter() - started), 1),
                         "serving_after": tasks_ok(client, module, good)})
        client.close()
    rows += control_attacks(serve)
    return rows


def control_attacks(serve: Serve) -> list[dict]:
    """A model load carrying Python code, without the key, over both protocols; a 60,000-deep JSON request."""
    import tritonclient.grpc as grpcclient

    marker = Path(f"/tmp/aigis-fault-run-payload-{os.getpid()}")
    payload = f"open({str(marker)!r}, 'w').write('ran')\n".encode()
    config = json.dumps({"name": "evil", "backend": "python", "max_batch_size": 0,
                         "input": [{"name": "X", "data_type": "TYPE_FP32", "dims": [1]}],
                         "output": [{"name": "Y", "data_type": "TYPE_FP32", "dims": [1]}]})
    rows = []
    started = time.perf_counter()
    try:
        grpcclient.InferenceServerClient(serve.grpc_url).load_model("evil", config=config,
                                                                    files={"file:1/model.py": payload})
        status = "LOADED"
    except Exception as exc:  # noqa: BLE001
        status = exc.status() or "error"
    rows.append({"protocol": "gRPC", "input": "load with file:1/model.py, no key", "status": str(status),
                 "ms": round(1000 * (time.perf_counter() - started), 1), "serving_after": None})
    body = json.dumps({"parameters": {"config": config,
                                      "file:1/model.py": base64.b64encode(payload).decode()}}).encode()
    started = time.perf_counter()
    status = http_status(f"http://{serve.http_url}/v2/repository/models/evil/load", body)
    rows.append({"protocol": "HTTP", "input": "load with file:1/model.py, no key", "status": status,
                 "ms": round(1000 * (time.perf_counter() - started), 1), "serving_after": None})
    for row in rows[-2:]:
        row["payload_ran"] = marker.exists()
    nested = b'{"inputs":[{"name":"IMAGES","shape":[1],"datatype":"UINT8","data":' + b"[" * 60_000 + b"]" * 60_000 \
        + b"}]}"
    started = time.perf_counter()
    status = http_status(f"http://{serve.http_url}/v2/models/lorax/infer", nested)
    rows.append({"protocol": "HTTP", "input": "infer JSON nested 60,000 deep (120 KB)", "status": status,
                 "ms": round(1000 * (time.perf_counter() - started), 1), "serving_after": None})
    return rows


def http_status(url: str, body: bytes) -> str:
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return str(response.status)
    except urllib.error.HTTPError as exc:
        return str(exc.code)
    except Exception as exc:  # noqa: BLE001 - the connection itself failed (the server died)
        return f"no answer ({type(exc).__name__})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", default=str(ROOT / "runs" / "demo"), help="the demo's output folder")
    parser.add_argument("--rollouts", type=int, default=20)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--name", default="fault_run")
    parser.add_argument("--render", action="store_true", help="only rewrite the .md from the run's .json")
    args = parser.parse_args(argv)
    if args.render:
        write(json.loads((RESULTS / f"{args.name}.json").read_text()), args.name)
        return 0

    from aigis.cli import main as aigis_main
    from aigis.client.loadcheck import start_loads
    from aigis.export import versions as model_versions
    from aigis import contract

    demo = Path(args.demo)
    repo, run, data = demo / "model_repository", demo / "run", demo / "data"
    versions = model_versions(repo, contract.ENSEMBLE_MODEL)[-2:]
    if len(versions) < 2:
        print(f"{repo} needs two ensemble versions: run `make demo` first", file=sys.stderr)
        return 2
    images, tasks, expected = expected_labels(run, data, versions)
    key = base64.b32encode(os.urandom(20)).decode().lower()
    os.environ["AIGIS_CONTROL_KEY"] = key
    serve = Serve(repo, key, demo / "fault_run_tritonserver.log")
    print(f"aigis serve up: gRPC {serve.grpc_url}, HTTP {serve.http_url}; versions {versions}", flush=True)
    results: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                     "versions": versions, "images": len(images)}
    try:
        from aigis.export.rollout import served_version
        from aigis.serving.control import ModelControl

        with ModelControl(serve.grpc_url, control_key=key) as control:
            start_version = served_version(control)
        stop, tallies, threads = start_loads(serve.grpc_url, images, tasks, expected)
        time.sleep(2.0)
        switches = []
        for k in range(args.rollouts):
            version = versions[(versions.index(start_version) + k + 1) % 2]
            started = time.monotonic()
            code = aigis_main(["models", "rollout", "--repo", str(repo), "--url", serve.grpc_url,
                               "--version", str(version)])
            switches.append(round(time.monotonic() - started, 2))
            print(f"rollout {k + 1}/{args.rollouts} -> {version}: exit {code} in {switches[-1]} s", flush=True)
            time.sleep(0.5)
        results["rollouts"] = {"count": args.rollouts, "seconds": switches,
                               "median_s": round(float(np.median(switches)), 2) if switches else None}
        after_rollouts = {name: tally.summary() for name, tally in tallies.items()}
        results["loads_rollouts"] = after_rollouts
        recovered, pid = [], serve.pid
        for k in range(args.kills):
            time.sleep(2.0)
            before = answered(tallies)
            os.kill(pid, signal.SIGKILL)
            killed = time.monotonic()
            text = serve.wait_for(f"restart {k + 1}: serving again", 300)
            pid = int(re.findall(r"serving again \(pid (\d+)\)", text)[-1])
            ok = wait_recovered(tallies, before)
            recovered.append(round(time.monotonic() - killed, 2) if ok else None)
            print(f"kill {k + 1}/{args.kills}: every load answering again after {recovered[-1]} s", flush=True)
        results["kills"] = {"count": args.kills, "recovered_s": recovered}
        time.sleep(2.0)
        stop.set()
        for thread in threads:
            thread.join(timeout=300)
        results["loads_kills"] = {name: minus(tally.summary(), after_rollouts[name]) for name, tally in tallies.items()}

        def still_serving(client, module, good) -> bool:
            tensor = module.InferInput(contract.IMAGES, list(good.shape), "UINT8")
            tensor.set_data_from_numpy(good)
            try:
                client.infer(contract.ENSEMBLE_MODEL, [tensor])
                return True
            except Exception:  # noqa: BLE001
                return False

        results["bad_input"] = bad_input_matrix(serve, images.shape[1], still_serving)
        restarts_before = len(recovered)
        try:   # did the nested JSON kill tritonserver? aigis serve then restarts it
            text = serve.wait_for(f"restart {restarts_before + 1}: serving again", 60)
            results["nested_json_restart"] = True
        except TimeoutError:
            results["nested_json_restart"] = False
        results["serve_stopped"] = serve.stop().strip().splitlines()[-1]
    finally:
        if serve.process.poll() is None:
            serve.process.kill()
    write(results, args.name)
    return 0


def minus(now: dict, before: dict) -> dict:
    """The counts of a phase: totals now less the totals at its start."""
    keys = ("sent", "answered", "failed", "lost", "misread")
    return {**{key: now[key] - before[key] for key in keys},
            "versions": {v: n - before["versions"].get(v, 0) for v, n in now["versions"].items()}}


def write(results: dict, name: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=2))
    lines = [f"# Serving under load and faults ({results['machine']})", "",
             f"Versions {results['versions']}, {results['images']} held-out images; "
             f"{results['rollouts']['count']} rollouts (median {results['rollouts']['median_s']} s each), "
             f"{results['kills']['count']} kills (back after {results['kills']['recovered_s']} s).", "",
             "Requests in flight when a phase ended are counted in the next one; `lost` (sent, never answered nor "
             "failed) is over the whole run.", "",
             "| phase | load | answered | failed | misread | versions |", "|---|---|---|---|---|---|"]
    for phase, key in (("rollouts", "loads_rollouts"), ("kills", "loads_kills")):
        for load, row in results[key].items():
            lines.append(f"| {phase} | {load} | {row['answered']} | {row['failed']} | {row['misread']} | "
                         f"{row['versions']} |")
    lost = {load: results["loads_rollouts"][load]["lost"] + results["loads_kills"][load]["lost"]
            for load in results["loads_rollouts"]}
    lines += ["", f"Lost over the whole run: {lost}."]
    lines += ["", "| protocol | bad input | status | ms | serving after |", "|---|---|---|---|---|"]
    for row in results["bad_input"]:
        lines.append(f"| {row['protocol']} | {row['input']} | {row['status']} | {row['ms']} | "
                     f"{row['serving_after'] if row['serving_after'] is not None else '-'} |")
    lines += ["", f"Nested JSON restarted tritonserver: {results.get('nested_json_restart')}; "
              f"{results.get('serve_stopped')}"]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
