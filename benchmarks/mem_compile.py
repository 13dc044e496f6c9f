"""Does torch.compile pay for MEM? Eager vs compiled image tower, side by side.

A PGD step is one forward and one input-gradient backward of the surrogate's image tower against cached
text embeddings (aigis.protection.mem.pgd_noise); a surrogate step is a training step of both towers
(mem.train_surrogate). This times both with the image tower eager and compiled, and the compiles
themselves (inductor caches kernels on disk: set TORCHINDUCTOR_CACHE_DIR to a fresh folder for a cold
compile), so the break-even point can be read off for a job's size.

    python benchmarks/mem_compile.py [--clip rn_tiny] [--batch 100] [--steps 20] [--device cpu]

Writes benchmarks/results/<name>.json and .md (default name mem_compile).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from aigis.protection.clip import PRESETS, build_clip, contrastive_loss, normalize_images

RESULTS = Path(__file__).resolve().parent / "results"


def _step_times(encode, images: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        delta = torch.zeros_like(images).requires_grad_(True)
        loss = contrastive_loss(encode(normalize_images((images + delta).clamp(0, 1))), text, logit_scale)
        torch.autograd.grad(loss, delta)
        if images.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def _train_times(encode, model, optimizer, images, tokens, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = contrastive_loss(encode(normalize_images(images)), model.encode_text(tokens), model.logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if images.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clip", default="rn_tiny")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--steps", type=int, default=20, help="timed PGD steps per variant")
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="mem_compile", help="result file stem under benchmarks/results/")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)

    config = replace(PRESETS[args.clip], vocab_size=1024)
    model = build_clip(config).to(device).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    size = config.image_resolution
    images = torch.rand(args.batch, 3, size, size, device=device)
    tokens = torch.randint(3, 1000, (args.batch, config.context_length), device=device)
    tokens[:, -1] = config.vocab_size - 1  # the largest id, where CLIP's argmax pooling takes the end of text
    with torch.no_grad():
        text = model.encode_text(tokens)

    eager = model.encode_image
    _step_times(eager, images, text, model.logit_scale, 2)  # warm-up
    compiled = torch.compile(eager)
    start = time.perf_counter()
    _step_times(compiled, images, text, model.logit_scale, 1)  # the first call compiles
    compile_s = time.perf_counter() - start
    _step_times(compiled, images, text, model.logit_scale, 1)
    eager_times, compiled_times = [], []
    for _ in range(args.steps):  # interleaved, so machine load hits both alike
        eager_times += _step_times(eager, images, text, model.logit_scale, 1)
        compiled_times += _step_times(compiled, images, text, model.logit_scale, 1)
    eager_s, compiled_s = statistics.median(eager_times), statistics.median(compiled_times)
    saved = eager_s - compiled_s

    # The surrogate's training step: train mode, gradients for the weights (a second compile).
    model.train()
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    _train_times(eager, model, optimizer, images, tokens, 2)
    compiled_train = torch.compile(model.encode_image)
    start = time.perf_counter()
    _train_times(compiled_train, model, optimizer, images, tokens, 1)
    train_compile_s = time.perf_counter() - start
    train_eager, train_compiled = [], []
    for _ in range(args.steps):
        train_eager += _train_times(eager, model, optimizer, images, tokens, 1)
        train_compiled += _train_times(compiled_train, model, optimizer, images, tokens, 1)
    train_eager_s, train_compiled_s = statistics.median(train_eager), statistics.median(train_compiled)

    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {device}",
        "command": "python benchmarks/mem_compile.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "clip": args.clip, "batch": args.batch, "image_size": size, "steps": args.steps,
        "pgd": {"eager_s": eager_s, "compiled_s": compiled_s, "compile_s": compile_s,
                "speed_up": eager_s / compiled_s, "break_even_steps": (compile_s / saved) if saved > 0 else None},
        "surrogate": {"eager_s": train_eager_s, "compiled_s": train_compiled_s, "compile_s": train_compile_s,
                      "speed_up": train_eager_s / train_compiled_s},
    }
    lines = [
        "# torch.compile for MEM's image tower\n",
        f"{result['machine']}; CLIP {args.clip} at {size} px, batch {args.batch}; medians of {args.steps} interleaved steps.",
        f"Command: {result['command']}\n",
        "| step | eager (s) | compiled (s) | speed-up | compile (s) |",
        "|---|---:|---:|---:|---:|",
        f"| PGD (eval, input gradient) | {eager_s:.4f} | {compiled_s:.4f} | {eager_s / compiled_s:.2f}x | {compile_s:.1f} |",
        f"| surrogate training (both towers, weight gradients) | {train_eager_s:.4f} | {train_compiled_s:.4f} | "
        f"{train_eager_s / train_compiled_s:.2f}x | {train_compile_s:.1f} |",
        "",
        "PGD break-even: " + (f"{compile_s / saved:.0f} steps." if saved > 0 else "never (no gain)."),
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
