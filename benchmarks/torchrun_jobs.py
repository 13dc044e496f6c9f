"""`aigis train` and `aigis protect` in 1 process and under torchrun in N, on the same data, wall-clock timed.

    python benchmarks/torchrun_jobs.py --repeats 2           # 1 vs 2 processes, this machine's CPUs shared out
    python benchmarks/torchrun_jobs.py --procs 1,2,4 --device cuda   # on a GPU host: a process per GPU

The one-process run is the plain command (no torchrun); N processes are
`python -m torch.distributed.run --nproc-per-node N $(which aigis) ...`. On the CPU the machine's threads are
shared out: OMP_NUM_THREADS = threads // N per process. The jobs: LoRAX on the first 2 tasks of the synthetic
benchmark (100 + 50 images per class, configs/demo.toml with LoRA on every block: EfficientNet-Lite0, 3 epochs,
batch 32) and per-image
MEM (rn_tiny at 32 px, 256 procedural scenes, 4 outer iterations of 20 surrogate steps, 4 PGD steps, batch 32).
Writes benchmarks/results/torchrun_jobs.json and .md (also printed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
PAPER_SETTING = ["--set", "lora.last_blocks=all", "--set", "balance_epochs=0"]   # LoRA on every block
PROTECT = ["--clip", "rn_tiny", "--size", "32", "--outer", "4", "--surrogate-steps", "20", "--pgd-steps", "4",
           "--batch", "32", "--trigger-iterations", "2", "--candidates", "8", "--quiet"]


def _aigis() -> list[str]:
    script = Path(sys.executable).with_name("aigis")
    return [str(script)] if script.is_file() else ["-m", "aigis.cli"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(procs: int, args: list[str]) -> list[str]:
    if procs == 1:
        return [sys.executable, *_aigis(), *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs), "--master-port",
            str(_port()), *_aigis(), *args]


def timed(cmd: list[str], threads: int | None) -> float:
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--procs", default="1,2", help="process counts to compare (1 = the plain command)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="CPU threads shared out over the processes (default: this process's CPUs)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (a process per GPU)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds over --procs, interleaved (1, 2, 1, 2 ...)")
    parser.add_argument("--work", default=str(REPO / "runs" / "bench" / "torchrun"))
    parser.add_argument("--name", default=str(RESULTS / "torchrun_jobs"))
    args = parser.parse_args(argv)
    procs = [int(p) for p in args.procs.split(",")]
    work = Path(args.work)
    synth, scenes = work / "synth", work / "scenes"
    if not (synth / "synth.json").is_file():
        subprocess.run([sys.executable, *_aigis(), "data", "synth", "--out", str(synth), "--tasks", "2", "--quiet"],
                       check=True)
    if not (scenes / "train.jsonl").is_file():
        from aigis.protection.captions import synth_captioned

        synth_captioned(scenes, 256, 0, size=32, seed=0)
    rows = []
    for n in [n for _ in range(args.repeats) for n in procs]:
        threads = max(1, args.threads // n) if args.device == "cpu" else None
        train_out, protect_out = work / f"train-{n}", work / f"protect-{n}"
        shutil.rmtree(train_out, ignore_errors=True)
        shutil.rmtree(protect_out, ignore_errors=True)
        train_s = timed(command(n, ["train", "--data", str(synth), "--out", str(train_out), "--config",
                                    str(REPO / "configs" / "demo.toml"), "--set", f'device="{args.device}"',
                                    *PAPER_SETTING, "--quiet"]), threads)
        manifest = json.loads((train_out / "manifest.json").read_text())
        protect_s = timed(command(n, ["protect", "--data", str(scenes), "--out", str(protect_out), "--device",
                                      args.device, *PROTECT]), threads)
        report = json.loads((protect_out / "protection.json").read_text())
        state = json.loads(sorted((protect_out / "work").glob("ckpt-*/state.json"))[-1].read_text())
        rows.append({
            "processes": n, "threads_per_process": threads, "world_size": manifest["world_size"],
            "train_wall_s": round(train_s, 1),
            "train_images_per_s": round(sum(e["train_images_per_second"] for e in manifest["task_entries"])
                                        / len(manifest["task_entries"]), 1),
            "train_average_accuracy": round(manifest["metrics"]["average_accuracy"], 4),
            "protect_wall_s": round(protect_s, 1), "protect_world_size": report["world_size"],
            "protect_final_pass_loss": round(state["history"][-1]["pass_loss"], 4),
        })
        print(json.dumps(rows[-1]), flush=True)
    result = {"host": platform.node(), "cpus": len(os.sched_getaffinity(0)), "load_avg_1m_after": os.getloadavg()[0],
              "device": args.device, "torch": __import__("torch").__version__, "rows": rows,
              "command": shlex.join([sys.executable, *sys.argv])}
    name = Path(args.name)
    name.parent.mkdir(parents=True, exist_ok=True)
    name.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["| processes | threads each | train wall s | train img/s | train AA | protect wall s | final pass loss |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['processes']} | {r['threads_per_process']} | {r['train_wall_s']} | {r['train_images_per_s']} | "
              f"{r['train_average_accuracy']:.3f} | {r['protect_wall_s']} | {r['protect_final_pass_loss']} |"
              for r in rows]
    text = "\n".join(lines) + f"\n\n{result['cpus']} CPUs, load average {result['load_avg_1m_after']:.1f} after; " \
                              f"`{result['command']}`\n"
    name.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
