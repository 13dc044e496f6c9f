"""Does bfloat16 autocast pay on a CPU? MEM's surrogate step and pass with MEMSettings.amp "off" and "on".

    python benchmarks/mem_amp_cpu.py [--pairs 256] [--batch 128] [--clip rn_tiny]

The two settings run interleaved, iteration by iteration, on the same five-caption data (first iteration with
trigger search, then noise only), each from the same initial surrogate. Prints seconds per surrogate round and
per pass. The answer decides MEMSettings.amp "auto" (autocast on CUDA only).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace

import numpy as np
import torch

from aigis.protection import mem
from aigis.protection.captions import load_images, read_pairs, synth_captioned
from aigis.protection.clip import PRESETS, build_clip
from aigis.protection.tokenizer import Tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=256, help="images, five captions each")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--clip", default="rn_tiny")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cpi, device = 5, torch.device("cpu")
    print(f"CPU kernels: {torch.backends.cpu.get_cpu_capability()}; bfloat16 supported by oneDNN: "
          f"{torch.ops.mkldnn._is_mkldnn_bf16_supported()}")
    with tempfile.TemporaryDirectory() as tmp:
        root = synth_captioned(tmp, args.pairs, 0, size=args.size, seed=0, captions_per_image=cpi)
        pairs = read_pairs(root, "train.jsonl")
        captions = [p.caption for p in pairs]
        groups = mem.CaptionsPerImage(np.repeat(np.arange(args.pairs), cpi), args.pairs)
        tokenizer = Tokenizer.train(captions, 1000)
        config = replace(PRESETS[args.clip], image_resolution=args.size)
        images = load_images(pairs[::cpi], args.size, progress=False)
        runs = {}
        for amp in ("off", "on"):
            settings = mem.MEMSettings(outer_iterations=args.iterations, trigger_iterations=1, surrogate_steps=4,
                                       batch_size=args.batch, norm_stats="running", amp=amp)
            tokens = tokenizer.tokenize(captions, config.context_length, settings.trigger_length)
            torch.manual_seed(0)
            model = build_clip(config, tokenizer.vocab_size)
            state = mem.new_state(model, tokenizer, args.pairs, (args.size, args.size), settings,
                                  noise=np.zeros(images.shape, np.int8))
            runs[amp] = (settings, tokens, state)
        for iteration in range(args.iterations):
            triggers = iteration == 0
            for amp, (settings, tokens, state) in runs.items():
                t0 = time.monotonic()
                mem.train_surrogate(state, images, tokens, settings, device, groups)
                t1 = time.monotonic()
                mem.perturb_pass(state, tokenizer, images, tokens, settings, device, triggers, groups)
                t2 = time.monotonic()
                print(f"iteration {iteration + 1} ({'trigger search' if triggers else 'noise only'}), amp {amp}: "
                      f"surrogate {t1 - t0:.2f} s, pass {t2 - t1:.2f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
