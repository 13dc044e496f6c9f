"""What an ops command on an s3:// repository costs, with and without the mirror's local cache.

The demo's repository is copied into a bucket of moto's S3 server (a real HTTP server on 127.0.0.1), then each
command runs as ops run it, as its own process, side by side in rounds:

  list (no cache)     `aigis models list --repo s3://...` with AIGIS_S3_CACHE=off: every object downloaded
  list (cold cache)   the same with an empty cache (downloads, and fills the cache)
  list (warm cache)   the same again: only the listing goes over the network
  validate (warm)     `aigis models validate --repo s3://...` on the warm cache

    python benchmarks/s3_mirror.py                        # uses runs/demo (run `make demo` first)
    python benchmarks/s3_mirror.py --repo runs/demo_fresh/model_repository --rounds 5

A local server answers in microseconds where a real store takes milliseconds per request and is bandwidth-bound,
so the gap measured here is a lower bound. Writes benchmarks/results/s3_mirror.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
BUCKET = "aigis-bench"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _moto(port: int, log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                   stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"moto's server did not start: {log.read_text()[-2000:]}")
            time.sleep(0.1)


def _timed(command: list[str], env: dict) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", default="runs/demo/model_repository", help="a model repository folder")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import boto3

    from aigis import contract
    from aigis.objectstore import upload_repository

    repo = Path(args.repo)
    if not (repo / contract.ENSEMBLE_MODEL).is_dir():
        raise SystemExit(f"{repo}: no model repository here (run `make demo`, or give --repo)")
    size = sum(p.stat().st_size for p in repo.rglob("*") if p.is_file())
    work = Path(tempfile.mkdtemp(prefix="aigis-s3-bench-"))
    port = _free_port()
    server = _moto(port, work / "moto.log")
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
           "AWS_SHARED_CREDENTIALS_FILE": str(work / "none"), "AWS_CONFIG_FILE": str(work / "none"),
           "AWS_EC2_METADATA_DISABLED": "true"}
    try:
        os.environ.update({k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                               "AWS_ENDPOINT_URL")})
        client = boto3.client("s3")
        client.create_bucket(Bucket=BUCKET)
        url = f"s3://{BUCKET}/models"
        objects = upload_repository(repo, url, client)
        aigis = [sys.executable, "-m", "aigis.cli"]
        listing = [*aigis, "models", "list", "--repo", url]
        cache = work / "cache"
        times: dict[str, list[float]] = {"list (no cache)": [], "list (cold cache)": [], "list (warm cache)": [],
                                          "validate (warm cache)": []}
        for round_ in range(args.rounds):
            times["list (no cache)"].append(_timed(listing, {**env, "AIGIS_S3_CACHE": "off"}))
            shutil.rmtree(cache, ignore_errors=True)
            warm = {**env, "AIGIS_S3_CACHE": str(cache)}
            times["list (cold cache)"].append(_timed(listing, warm))
            times["list (warm cache)"].append(_timed(listing, warm))
            times["validate (warm cache)"].append(_timed([*aigis, "models", "validate", "--repo", url], warm))
            print(f"round {round_ + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()),
                  flush=True)
    finally:
        server.terminate()
        server.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)

    medians = {k: statistics.median(v) for k, v in times.items()}
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    command = "python benchmarks/s3_mirror.py " + " ".join(sys.argv[1:])
    lines = [f"Repository {repo} ({objects} objects, {size / 2**20:.1f} MiB) in moto's S3 server on 127.0.0.1; "
             f"each command its own process, median of {args.rounds} rounds. {machine}. Command: `{command}`", "",
             "| command | median s | runs |", "|---|---:|---|"]
    lines += [f"| {k} | {medians[k]:.2f} | {', '.join(f'{t:.2f}' for t in v)} |" for k, v in times.items()]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "s3_mirror.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "s3_mirror.json").write_text(json.dumps(
        {"repository": str(repo), "objects": objects, "bytes": size, "rounds": args.rounds, "seconds": times,
         "median_s": medians, "machine": machine, "command": command}, indent=2) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
