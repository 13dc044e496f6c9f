"""Does bfloat16 autocast pay on a CPU? MEM's surrogate step and pass with MEMSettings.amp "off" and "on".

    python benchmarks/mem_amp_cpu.py [--pairs 256] [--batch 128] [--surrogate-steps 4] [--clip rn_tiny]

The two settings run interleaved, iteration by iteration and in alternating order, on the same five-caption data
(first iteration with trigger search, then noise only), each from the same initial surrogate. Reports seconds per
surrogate round and per pass, and the medians over the noise-only iterations. The answer decides MEMSettings.amp
"auto". Results: benchmarks/results/<--name, default mem_amp_cpu>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from aigis.protection import mem
from aigis.protection.captions import load_images, read_pairs, synth_captioned
from aigis.protection.clip import build_clip
from aigis.protection.tokenizer import Tokenizer

RESULTS = Path(__file__).resolve().parent / "results"


def five_caption_data(tmp: str, images: int, captions_per_image: int, size: int, clip: str):
    """The benchmark's data in `tmp`: (pairs, captions, groups, tokenizer, config). Every image has
    captions_per_image caption lines (pairs[i * c + k] describes image i); config is the CLIP preset at `size`."""
    from dataclasses import replace

    from aigis.protection.clip import PRESETS

    root = synth_captioned(tmp, images, 0, size=size, seed=0, captions_per_image=captions_per_image)
    pairs = read_pairs(root, "train.jsonl")
    captions = [p.caption for p in pairs]
    groups = mem.CaptionsPerImage(np.repeat(np.arange(images), captions_per_image), images)
    tokenizer = Tokenizer.train(captions, 1000)
    return pairs, captions, groups, tokenizer, replace(PRESETS[clip], image_resolution=size)


def bf16_kernels() -> str:
    """What this CPU offers bfloat16 (oneDNN's check is private API: report 'unknown' if it moves)."""
    check = getattr(getattr(torch.ops, "mkldnn", None), "_is_mkldnn_bf16_supported", None)
    try:
        supported = "yes" if check() else "no"
    except Exception:  # noqa: BLE001 - a private probe; its absence is not an error of this benchmark
        supported = "unknown"
    return f"{torch.backends.cpu.get_cpu_capability()} kernels, oneDNN bfloat16: {supported}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=256, help="images, five captions each")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--surrogate-steps", type=int, default=4, help="surrogate batches per iteration")
    parser.add_argument("--clip", default="rn_tiny")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="mem_amp_cpu", help="result file stem under benchmarks/results/")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cpi, device = 5, torch.device("cpu")
    kernels = bf16_kernels()
    print(kernels)
    with tempfile.TemporaryDirectory() as tmp:
        pairs, captions, groups, tokenizer, config = five_caption_data(tmp, args.pairs, cpi, args.size, args.clip)
        images = load_images(pairs[::cpi], args.size, progress=False)
        tokens = tokenizer.tokenize(captions, config.context_length, mem.MEMSettings.trigger_length)
        runs = {}
        for amp in ("off", "on"):
            settings = mem.MEMSettings(outer_iterations=args.iterations, trigger_iterations=1,
                                       surrogate_steps=args.surrogate_steps,
                                       batch_size=args.batch, norm_stats="running", amp=amp)
            torch.manual_seed(0)
            model = build_clip(config, tokenizer.vocab_size)
            state = mem.new_state(model, tokenizer, args.pairs, (args.size, args.size), settings,
                                  noise=np.zeros(images.shape, np.int8))
            runs[amp] = (settings, state)
        rows = []
        for iteration in range(args.iterations):
            triggers = iteration == 0
            order = ("off", "on") if iteration % 2 == 0 else ("on", "off")
            for amp in order:
                settings, state = runs[amp]
                t0 = time.monotonic()
                mem.train_surrogate(state, images, tokens, settings, device, groups)
                t1 = time.monotonic()
                mem.perturb_pass(state, tokenizer, images, tokens, settings, device, triggers, groups)
                t2 = time.monotonic()
                rows.append({"iteration": iteration + 1, "triggers": triggers, "amp": amp,
                             "surrogate_s": t1 - t0, "pass_s": t2 - t1})
                print(f"iteration {iteration + 1} ({'trigger search' if triggers else 'noise only'}), amp {amp}: "
                      f"surrogate {t1 - t0:.2f} s, pass {t2 - t1:.2f} s", flush=True)

    def median(amp: str, key: str) -> float:
        return float(np.median([r[key] for r in rows if r["amp"] == amp and not r["triggers"]]))

    medians = {amp: {key: median(amp, key) for key in ("surrogate_s", "pass_s")} for amp in ("off", "on")}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(
        {"platform": platform.platform(), "kernels": kernels, "threads": args.threads, "clip": args.clip,
         "size": args.size, "images": args.pairs, "captions_per_image": cpi, "batch": args.batch,
         "surrogate_steps": args.surrogate_steps, "rows": rows, "noise_only_medians": medians}, indent=1))
    lines = ["# bfloat16 autocast on the CPU: MEM surrogate round and pass, amp off vs on", "",
             f"{platform.platform()}; {kernels}; {args.threads} threads; CLIP {args.clip} at {args.size} px, "
             f"{args.pairs} images x {cpi} captions, batch {args.batch}, {args.surrogate_steps} surrogate steps.", "",
             "| iteration | amp | surrogate s | pass s |", "|---|---|---:|---:|"]
    lines += [f"| {r['iteration']}{' (triggers)' if r['triggers'] else ''} | {r['amp']} | {r['surrogate_s']:.2f} "
              f"| {r['pass_s']:.2f} |" for r in rows]
    ratio = medians["on"]["pass_s"] / medians["off"]["pass_s"]
    lines += ["", f"Noise-only medians: pass {medians['off']['pass_s']:.2f} s off, {medians['on']['pass_s']:.2f} s on "
              f"({ratio:.2f}x the time); surrogate {medians['off']['surrogate_s']:.2f} s off, "
              f"{medians['on']['surrogate_s']:.2f} s on."]
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
