"""What every protection benchmark writes beside its figures: the machine line and the result files.

Imported by the benchmark scripts (run as `python benchmarks/<script>.py`, so this folder is on sys.path).
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine_and_command(script: str, argv: list[str] | None) -> str:
    """"Machine: <cpu>, <n> cores, Python <v>, torch <v> (<kernels>). Command: python benchmarks/<script> <args>"
    for a results header. The kernels torch picks (AVX2, AVX512, ...) are named because float results, and so a
    long MEM job's chaotic path, differ between them (BENCHMARKS.md, session 20)."""
    import torch

    cpu = "unknown CPU"
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    except OSError:
        pass
    args = " ".join(argv if argv is not None else sys.argv[1:])
    kernels = torch.backends.cpu.get_cpu_capability()
    return (f"Machine: {cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"torch {torch.__version__} ({kernels} kernels). "
            f"Command: python benchmarks/{script} {args}")


def write_results(name: str, payload: dict, header: str, table: str) -> None:
    """benchmarks/results/<name>.json (payload) and <name>.md (header, table); the header and table printed."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str))
    (RESULTS / f"{name}.md").write_text(header + "\n" + table + "\n")
    print(header)
    print(table)


# ----------------------------------------------------------------------------------------------
# The protection probes on the five-caption Fashion-MNIST scenes (mem_structured_code.py, mem_keyed_noise.py, ...)

FASHION_CAPTIONS = Path(__file__).resolve().parent.parent / "runs" / "bench" / "fc5_mem16_g4_bnb" / "captions"


def probe_parser(description: str, work: str, hackers: int):
    """An argument parser with the probes' shared options: --data, --work (runs/bench/<work>), --hackers."""
    import argparse

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(FASHION_CAPTIONS))
    parser.add_argument("--work", default=str(FASHION_CAPTIONS.parent.parent / work))
    parser.add_argument("--hackers", type=int, default=hackers)
    return parser


def probe_data(parser, data: str) -> Path:
    """--data as a Path, or a parser error naming how to make it."""
    path = Path(data)
    if not (path / "train.jsonl").is_file():
        parser.error(f"--data {path}: no train.jsonl (make it with protection_efficacy.py --style fashion "
                     f"--captions-per-image 5)")
    return path


def evaluate_probe_set(data: Path, protected: Path, out_dir: Path, hackers: int, levels: int = 8,
                       hacker_clip: str = "rn_tiny") -> dict:
    """The efficacy benchmark's hackers (`rn_tiny` unless told, from scratch, 10 epochs, 32 px) on one protected set."""
    from aigis.protection.evaluate import evaluate_protection

    return evaluate_protection(data, "train.jsonl", "test.jsonl", {"mem": protected}, out_dir=out_dir,
                               conditions=["mem"], robustness=[], clip_preset=hacker_clip, image_size=32, epochs=10,
                               hackers=hackers, epsilon=levels / 255)


def report_probe_set(script: str, argv: list[str] | None, name: str, description: str, data: Path, protected: Path,
                     out_dir: Path, hackers: int, levels: int = 8, hacker_clip: str = "rn_tiny", **payload) -> dict:
    """Evaluate one probe's protected set (evaluate_probe_set) and write results/<name>.{json,md}: the machine and
    command line, then `description`, then the table; the JSON holds `payload` and the report. Returns the report."""
    from aigis.protection.evaluate import markdown_table

    report = evaluate_probe_set(data, protected, out_dir, hackers, levels, hacker_clip)
    header = f"{machine_and_command(script, argv)}\n{description}\n"
    write_results(name, {**payload, "report": report}, header, markdown_table(report))
    return report


def write_probe_manifest(out: Path, lines: list[tuple[str, str]], meta: dict) -> None:
    """manifest.jsonl ((image, caption) per line) and protection.json of a protected set made by a probe."""
    with open(out / "manifest.jsonl", "w", encoding="utf-8") as f:
        for key, caption in lines:
            f.write(json.dumps({"image": key, "caption": caption}) + "\n")
    (out / "protection.json").write_text(json.dumps({"format": "aigis-protection-1", **meta}, indent=2) + "\n")


def default_job_settings(**changes):
    """The efficacy benchmark's default MEM job on these scenes (rn_tiny, MEM-16, 4 x 4 cells, batch statistics,
    60 outer iterations of 2 surrogate steps, 16 PGD steps), with `changes` applied."""
    from aigis.protection.mem import MEMSettings

    values = dict(epsilon=8 / 255, trigger_length=16, outer_iterations=60, surrogate_steps=2, pgd_steps=16,
                  candidates=8, batch_size=100, trigger_iterations=5, lr=5e-4, noise_grid=4, norm_stats="batch")
    return MEMSettings(**{**values, **changes})


def run_job_from(data: Path, out: Path, settings, initialise, trigger_words: int | None = None) -> dict:
    """The protection job (rn_tiny, 32 px) with its noise and triggers first set by initialise(state, tokenizer,
    images) instead of zero / placeholders (a resumed job keeps what it had). trigger_words: the job's (None:
    its default made-up words; 0: the caption words). Returns seconds, settings and the job summary's scalars."""
    import time

    from aigis.protection import job, mem

    original = mem.run_mem

    def started_from(state, tokenizer, images, captions, settings, **kwargs):
        if state.iteration == 0:
            initialise(state, tokenizer, images)
            print("noise and triggers initialised by the probe", file=sys.stderr, flush=True)
        return original(state, tokenizer, images, captions, settings, **kwargs)

    mem.run_mem = started_from
    try:
        started = time.perf_counter()
        summary = job.protect_dataset(data, "train.jsonl", out, settings, clip_preset="rn_tiny", image_size=32,
                                      trigger_words=trigger_words)
    finally:
        mem.run_mem = original
    return {"seconds": time.perf_counter() - started, "settings": settings.to_dict(),
            **{k: v for k, v in summary.items() if not isinstance(v, (dict, list))}}
