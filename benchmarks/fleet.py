"""A fleet of replicas through the fleet client: throughput of 1, 2 and 3 replicas, and a replica killed under load.

Three tritonservers (aigis.serving.server.TritonServer) serve one copy of a model repository (by default the
demo's, runs/demo/model_repository: `make demo` first) on 127.0.0.1. Then:

  1. throughput: `--rounds` rounds; in each, the fleet client (AttributionClient) is given the first 1, 2 and 3
     replicas in turn (the order rotates from round to round) and `--callers` threads send batches of `--batch`
     images for `--seconds`; images/s per setting (median over the rounds, with min and max) and each replica's
     share of the requests, from its own statistics. All three servers run the whole time; only the client's
     endpoint list changes. On a host with few cores the replicas share the same cores, so more replicas add
     overhead there, not capacity.
  2. kill: steady loads through the fleet (aigis.client.loadcheck: the sync client's micro-batcher on the
     comma-separated list, the asyncio client on `lorax_bytes` with the list), one replica SIGKILLed and
     restarted at once on the same ports; counts sent / answered / failed / lost per load, the longest time no
     load got an answer, and the times until the killed replica is serving and answering the fleet again.

    python benchmarks/fleet.py                               # about 3 minutes on 2 cores
    python benchmarks/fleet.py --rounds 5 --seconds 4        # the same, spelt out

Writes benchmarks/results/fleet.json and .md. Random images (seeded) at the repository's crop: the models' cost
does not depend on the pixels.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
MODELS = ["lorax", "lorax_bytes"]


def say(text: str) -> None:
    print(f"[fleet {time.strftime('%H:%M:%S')}] {text}", flush=True)


def machine() -> dict:
    model = ""
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=ROOT, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"cpu": model or platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)), "python": platform.python_version(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()], "commit": commit}


def successes(url: str) -> int:
    """Inference requests replica `url` answered on the models of MODELS, from its statistics."""
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(url) as client:
        stats = client.get_inference_statistics("", as_json=True)["model_stats"]
    return sum(int(s.get("inference_stats", {}).get("success", {}).get("count", 0))
               for s in stats if s.get("name") in MODELS)


def server_cpu_s(pids: list[int]) -> float:
    """CPU seconds used so far by the servers `pids` and their children (the model instances run in backend stubs)."""
    import psutil

    total = 0.0
    for pid in pids:
        try:
            process = psutil.Process(pid)
            family = [process, *process.children(recursive=True)]
        except psutil.Error:
            continue
        for member in family:
            try:
                times = member.cpu_times()
                total += times.user + times.system
            except psutil.Error:
                pass
    return total


def host_busy_jiffies() -> tuple[int, int]:
    """(busy, total) CPU jiffies of the whole host so far, from /proc/stat (other users' work included)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


# ---- 1. throughput -------------------------------------------------------------------------------------
def throughput(urls: list[str], pids: list[int], images: np.ndarray, seconds: float, callers: int,
               batch: int) -> dict:
    """`callers` threads sending batches of `batch` images through one fleet client over `urls` for `seconds`;
    `pids`: every server's process, all counted for CPU (the idle ones too)."""
    from aigis.client import AttributionClient

    before = [successes(url) for url in urls]
    stop = threading.Event()
    counts = [0] * callers
    with AttributionClient(urls, max_batch_size=batch, max_in_flight=callers) as client:
        client.attribute(images[:batch])                       # warm: connections, the manifest

        def caller(k: int) -> None:
            rng = np.random.default_rng(k)
            while not stop.is_set():
                start = int(rng.integers(0, len(images) - batch))
                client.attribute(images[start:start + batch])
                counts[k] += batch

        with ThreadPoolExecutor(callers) as pool:
            cpu, client_cpu, host = server_cpu_s(pids), time.process_time(), host_busy_jiffies()
            started = time.monotonic()
            futures = [pool.submit(caller, k) for k in range(callers)]
            time.sleep(seconds)
            stop.set()
            for future in futures:
                future.result()
            elapsed = time.monotonic() - started
            cpu, client_cpu = server_cpu_s(pids) - cpu, time.process_time() - client_cpu
            host = [now - then for now, then in zip(host_busy_jiffies(), host)]
    after = [successes(url) for url in urls]
    share = [a - b for a, b in zip(after, before)]
    return {"replicas": len(urls), "images_per_s": sum(counts) / elapsed, "images": sum(counts),
            "seconds": elapsed, "requests_per_replica": share, "server_cores_busy": cpu / elapsed,
            "images_per_server_cpu_s": sum(counts) / max(cpu, 1e-9),
            "client_cores_busy": client_cpu / elapsed,
            "host_cores_busy": host[0] / max(host[1], 1) * len(os.sched_getaffinity(0))}


# ---- 2. kill under load --------------------------------------------------------------------------------
def kill_run(servers: list, images: np.ndarray, tasks: list[str], before_s: float, after_s: float) -> dict:
    from aigis.client.loadcheck import Tally, async_client_load, client_load

    urls = [server.grpc_url for server in servers]
    victim = servers[-1]
    loads = {"client (micro-batcher), 'a,b,c'": (client_load, ",".join(urls)),
             "asyncio client on lorax_bytes, [a, b, c]": (async_client_load, urls)}
    stop, tallies = threading.Event(), {name: Tally() for name in loads}
    threads = [threading.Thread(target=load, args=(url, images, tasks, None, stop, tallies[name]), daemon=True)
               for name, (load, url) in loads.items()]
    # The longest stretch in which no load got an answer, sampled every 5 ms.
    gap = {"longest_s": 0.0, "last_change": time.monotonic(), "total": 0}
    watching = threading.Event()

    def watch() -> None:
        while not watching.is_set():
            total = sum(t.answered for t in tallies.values())
            now = time.monotonic()
            if total != gap["total"]:
                gap["total"], gap["last_change"] = total, now
            else:
                gap["longest_s"] = max(gap["longest_s"], now - gap["last_change"])
            time.sleep(0.005)

    for thread in threads:
        thread.start()
    watcher = threading.Thread(target=watch, daemon=True)
    time.sleep(1.0)                                               # let the clients connect before watching
    watcher.start()
    time.sleep(before_s)
    at_kill = {name: t.answered for name, t in tallies.items()}
    say(f"SIGKILL {victim.grpc_url} (pid {victim.pid}) under load")
    killed_at = time.monotonic()
    os.kill(victim.pid, signal.SIGKILL)
    victim.restart()                                              # same ports, the models of its repository
    serving_s = time.monotonic() - killed_at
    say(f"{victim.grpc_url} serving again {serving_s:.1f} s after the kill")
    back = successes(victim.grpc_url)
    deadline = time.monotonic() + 60
    while successes(victim.grpc_url) <= back and time.monotonic() < deadline:
        time.sleep(0.02)
    answering_s = time.monotonic() - killed_at
    during = {name: t.answered - at_kill[name] for name, t in tallies.items()}
    time.sleep(after_s)
    stop.set()
    for thread in threads:
        thread.join(timeout=120)
    watching.set()
    watcher.join()
    return {"killed": victim.grpc_url, "restarted_and_ready_s": serving_s,
            "answering_fleet_requests_again_s": answering_s,
            "longest_stretch_without_an_answer_s": gap["longest_s"],
            "answered_between_kill_and_return": during,
            "loads": {name: {**t.summary(), "misread": len(t.misread)} for name, t in tallies.items()}}


def rollout_run(servers: list, repo: Path, images: np.ndarray, tasks: list[str], rollouts: int) -> dict:
    """Fleet rollouts back and forth between the repository's last two ensemble versions, replica by replica,
    while the fleet client's loads run; counts every request."""
    from aigis import contract
    from aigis.client.loadcheck import Tally, async_client_load, client_load
    from aigis.export.fleet import fleet_rollout
    from aigis.export.repository import versions

    urls = [server.grpc_url for server in servers]
    old, new = versions(repo, contract.ENSEMBLE_MODEL)[-2:]
    loads = {"client (micro-batcher), 'a,b,c'": (client_load, ",".join(urls)),
             "asyncio client on lorax_bytes, [a, b, c]": (async_client_load, urls)}
    stop, tallies = threading.Event(), {name: Tally() for name in loads}
    threads = [threading.Thread(target=load, args=(url, images, tasks, None, stop, tallies[name]), daemon=True)
               for name, (load, url) in loads.items()]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    controls = [(server.grpc_url, server.control()) for server in servers]
    seconds = []
    try:
        for k in range(rollouts):
            target = old if k % 2 else new
            started = time.monotonic()
            fleet_rollout(controls, repo, target)
            seconds.append(time.monotonic() - started)
            say(f"fleet rollout {k + 1}/{rollouts} to version {target}: {seconds[-1]:.1f} s for {len(servers)} replicas")
            time.sleep(0.5)
    finally:
        for _, control in controls:
            control.close()
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
    return {"rollouts": rollouts, "versions": [old, new], "seconds": spread(seconds),
            "loads": {name: {**t.summary(), "misread": len(t.misread), "versions_seen": dict(t.versions)}
                      for name, t in tallies.items()}}


# ---- report --------------------------------------------------------------------------------------------
def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def write(results: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "fleet.json").write_text(json.dumps(results, indent=2) + "\n")
    m, t = results["machine"], results["throughput"]
    lines = [f"# A fleet of replicas through the fleet client ({m['cpu']}, {m['cores']} cores)", "",
             f"Commit {m['commit']}; `{results['command']}`; repository {results['repository']}; "
             f"load average at start {m['load_average_at_start']}.", "",
             f"Throughput: {t['callers']} callers, batches of {t['batch']}, {t['seconds']} s per run, "
             f"{t['rounds']} rounds (order rotated each round); all three servers run throughout.", "",
             "Images per server CPU-second: images answered over the CPU time of the three servers and their backend "
             "stubs. Cores busy (medians): the servers, this benchmark's client process, and the whole host (other "
             "users included).", "",
             "| replicas | images/s (median) | min - max | images per server CPU-second (median, min - max) | "
             "cores busy: servers | client | host | requests per replica (last round) |",
             "|---:|---:|---|---|---:|---:|---:|---|"]
    for n, row in t["by_replicas"].items():
        per_cpu = row["images_per_server_cpu_s"]
        lines.append(f"| {n} | {row['images_per_s']['median']:.1f} | {row['images_per_s']['min']:.1f} - "
                     f"{row['images_per_s']['max']:.1f} | {per_cpu['median']:.1f} ({per_cpu['min']:.1f} - "
                     f"{per_cpu['max']:.1f}) | {row['server_cores_busy']['median']:.2f} | "
                     f"{row['client_cores_busy']['median']:.2f} | {row['host_cores_busy']['median']:.2f} | "
                     f"{row['requests_per_replica'][-1]} |")
    k = results["kill"]
    lines += ["", f"Kill: {k['killed']} SIGKILLed under load and restarted at once: ready again after "
              f"{k['restarted_and_ready_s']:.1f} s, answering fleet requests again after "
              f"{k['answering_fleet_requests_again_s']:.1f} s; the longest stretch in which no load got an answer: "
              f"{k['longest_stretch_without_an_answer_s']:.2f} s.", "",
              "| load | sent | answered | failed | lost | answered while the replica was away |",
              "|---|---:|---:|---:|---:|---:|"]
    for name, load in k["loads"].items():
        lines.append(f"| {name} | {load['sent']} | {load['answered']} | {load['failed']} | {load['lost']} | "
                     f"{k['answered_between_kill_and_return'][name]} |")
    r = results.get("rollouts")
    if r:
        lines += ["", f"Fleet rollouts: {r['rollouts']} rollouts back and forth between versions {r['versions'][0]} "
                  f"and {r['versions'][1]} over all {len(results['throughput']['by_replicas'])} replicas, one after "
                  f"another, {r['seconds']['median']:.1f} s each (median; {r['seconds']['min']:.1f} - "
                  f"{r['seconds']['max']:.1f}), under two fleet-client loads:", "",
                  "| load | sent | answered | failed | lost | versions seen |", "|---|---:|---:|---:|---:|---|"]
        for name, load in r["loads"].items():
            lines.append(f"| {name} | {load['sent']} | {load['answered']} | {load['failed']} | {load['lost']} | "
                         f"{', '.join(f'{v}: {n}' for v, n in sorted(load['versions_seen'].items()))} |")
    (RESULTS / "fleet.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", default=str(ROOT / "runs" / "demo" / "model_repository"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--callers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--kill-before", type=float, default=3.0, help="seconds of load before the kill")
    parser.add_argument("--kill-after", type=float, default=3.0, help="seconds of load after the replica is back")
    parser.add_argument("--rollouts", type=int, default=6, help="fleet rollouts under load (0: none)")
    args = parser.parse_args(argv)

    from aigis.client.manifest import ServedModel
    from aigis.serving.server import TritonServer

    source = Path(args.repo)
    if not (source / "lorax" / "config.pbtxt").exists():
        print(f"no model repository at {source}: run `make demo` first, or pass --repo", file=sys.stderr)
        return 2
    results: dict = {"machine": machine(), "command": "python benchmarks/fleet.py " + " ".join(argv or sys.argv[1:]),
                     "repository": str(source.relative_to(ROOT) if source.is_relative_to(ROOT) else source)}
    say(f"{results['machine']}")
    work = Path(tempfile.mkdtemp(prefix="aigis-fleet-bench-"))
    servers: list = []
    try:
        repo = work / "repo"
        shutil.copytree(source, repo)                  # a copy: rollouts elsewhere cannot move its pointers
        for k in range(3):
            started = time.monotonic()
            servers.append(TritonServer(repo, models=MODELS).start())
            say(f"replica {k + 1} at {servers[-1].grpc_url} ready in {time.monotonic() - started:.1f} s")
        urls = [server.grpc_url for server in servers]
        import tritonclient.grpc as grpcclient

        with grpcclient.InferenceServerClient(urls[0]) as probe:
            served = ServedModel.from_config(probe.get_model_config("lorax", as_json=True), ("IMAGES",))
        manifest = served.manifest()
        assert manifest is not None
        crop, tasks = manifest.crop, list(manifest.tasks)
        images = np.random.default_rng(0).integers(0, 256, size=(256, crop, crop, 3), dtype=np.uint8)
        say(f"ensemble version {manifest.version}, {len(tasks)} tasks, crop {crop}")

        runs: dict[int, list[dict]] = {1: [], 2: [], 3: []}
        for round_ in range(args.rounds):
            order = [1, 2, 3][round_ % 3:] + [1, 2, 3][:round_ % 3]
            for n in order:
                row = throughput(urls[:n], [s.pid for s in servers], images, args.seconds, args.callers, args.batch)
                runs[n].append(row)
                say(f"round {round_ + 1}/{args.rounds}: {n} replica(s): {row['images_per_s']:.1f} images/s, "
                    f"{row['images_per_server_cpu_s']:.1f} images per server CPU-second, "
                    f"requests per replica {row['requests_per_replica']}; cores busy: servers "
                    f"{row['server_cores_busy']:.2f}, this client {row['client_cores_busy']:.2f}, host "
                    f"{row['host_cores_busy']:.2f}")
        results["throughput"] = {
            "callers": args.callers, "batch": args.batch, "seconds": args.seconds, "rounds": args.rounds,
            "by_replicas": {str(n): {"images_per_s": spread([r["images_per_s"] for r in rows]),
                                     "images_per_server_cpu_s": spread([r["images_per_server_cpu_s"] for r in rows]),
                                     "server_cores_busy": spread([r["server_cores_busy"] for r in rows]),
                                     "client_cores_busy": spread([r["client_cores_busy"] for r in rows]),
                                     "host_cores_busy": spread([r["host_cores_busy"] for r in rows]),
                                     "requests_per_replica": [r["requests_per_replica"] for r in rows]}
                            for n, rows in runs.items()}}
        results["kill"] = kill_run(servers, images, tasks, args.kill_before, args.kill_after)
        for name, load in results["kill"]["loads"].items():
            say(f"kill: {name}: sent {load['sent']}, answered {load['answered']}, failed {load['failed']}, "
                f"lost {load['lost']}")
        if args.rollouts:
            results["rollouts"] = rollout_run(servers, repo, images, tasks, args.rollouts)
            for name, load in results["rollouts"]["loads"].items():
                say(f"rollouts: {name}: sent {load['sent']}, answered {load['answered']}, failed {load['failed']}, "
                    f"lost {load['lost']}")
    finally:
        with ThreadPoolExecutor(max(1, len(servers))) as pool:
            list(pool.map(lambda server: server.stop(), servers))
        shutil.rmtree(work, ignore_errors=True)
    write(results)
    say(f"wrote {RESULTS / 'fleet.json'} and {RESULTS / 'fleet.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
