"""Error minimisation over word textures: each caption word owns one tiled texture, shared by every image.

    python benchmarks/mem_word_textures.py                       # textures start as the random code
    python benchmarks/mem_word_textures.py --start zero --code-seed 1

Why: mem_texture_code.py (session 24) found that a hand-made code whose textures are NAMED BY THE CAPTIONS' OWN
WORDS keeps ResNet hackers under 2x chance, while MEM's per-image noise, searched with caption-word triggers,
does not: in MEM the noise of two images whose triggers share a word need not share anything, so no word comes
to mean one pattern. Here the noise is parameterised the code's way -- an image's noise is epsilon times the
clipped sum of the textures of the words in its trigger (a distinct set of `--per-image` caption words, cycled
to 16 words), each texture a `--tile`-px tile repeated over the image -- and the TEXTURES are what error
minimisation moves: the job's loop (rn_tiny surrogate, 60 outer iterations of 2 surrogate steps, batch
statistics), whose noise pass takes `--steps` signed-gradient steps of `--step` on the shared textures per batch
(each caption shuffled to another image of the batch, as MEM's PGD does). The trigger words are fixed by the
code (no search): they play the part class labels play in class-wise unlearnable examples.

The set is written by the protection job itself (PNGs, manifest, protection.json), then evaluated as the other
probes are (six `rn_tiny` hackers from scratch). Results: benchmarks/results/mem_word_textures_<tag>.{json,md}.
The job option `aigis protect --word-textures K [--texture-sign] [--texture-gray]` (mem.texture_pass, from zero)
is what this probe found, made part of the product; the probe stays to reproduce session 24's probe rows and
--start code, and builds its noise with the product's mem.word_code_noise (--binary is its sign option).
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from mem_texture_code import naming_words, texture_code, texture_words
from protection_results import default_job_settings, probe_data, probe_parser, report_probe_set, run_job_from


def word_texture_runner(textures: int, per_image: int, tile: int, levels: int, seed: int, start: str, steps: int,
                        step: float, names: str, binary: bool = False):
    """A replacement for mem.run_mem: the job's outer loop with the noise parameterised by word textures."""
    import torch

    from aigis.protection import mem
    from aigis.protection.clip import normalize_images
    from aigis.protection.tokenizer import _words

    def run(state, tokenizer, images, captions, settings, *, device=None, groups=None, callback=None, progress=True):
        device = mem._device(device)
        n, h, w, _ = images.shape
        groups = groups or mem.CaptionsPerImage.single(n)
        counts = Counter(word for caption in captions for word in _words(caption))
        words = texture_words(textures, names, counts)
        named = min(textures, len(naming_words(names, counts)))
        word_ids = [tokenizer.encode(word) for word in words[:named]]
        unusable = [word for word, ids in zip(words, word_ids)
                    if len(ids) != 1 or not tokenizer.is_trigger_candidate(ids[0])]
        if unusable:
            raise SystemExit(f"caption words that are not single trigger tokens of the job's tokenizer: {unusable[:5]}")
        word_ids = np.array([ids[0] for ids in word_ids])
        tiles, per_image_code = texture_code(n, textures, per_image, tile, seed, named=named,
                                             named_per_image=per_image)
        sets = torch.zeros(n, per_image, dtype=torch.long)
        for i, (chosen, slots, _) in enumerate(per_image_code(settings.trigger_length)):
            sets[i] = torch.as_tensor(chosen)
            state.triggers[i] = word_ids[slots]
        table = torch.from_numpy(tiles.astype(np.float32)) if start == "code" else torch.zeros(textures, tile, tile, 3)
        table = table.to(device)
        sets = sets.to(device)
        tokens = tokenizer.tokenize(list(captions), state.model.context_length, settings.trigger_length)
        pixels = torch.from_numpy(images).to(device).to(torch.float32)

        def materialise() -> None:
            with torch.no_grad():
                for i in range(0, n, 256):
                    noise = mem.word_code_noise(table, sets[i:i + 256], h, w, levels, sign=binary).round()
                    noisy = (pixels[i:i + 256] + noise).clamp(0, 255)
                    state.noise[i:i + 256] = (noisy - pixels[i:i + 256]).to(torch.int8).cpu().numpy()

        materialise()
        for iteration in range(settings.outer_iterations):
            started = time.monotonic()
            surrogate_loss = mem.train_surrogate(state, images, tokens, settings, device, groups)
            losses = []
            with mem.attack_mode(state.models, batch_statistics=settings.norm_stats == "batch"):
                for index in mem._batches(n, settings.batch_size, state.generator):
                    index_t = torch.from_numpy(index).to(device)
                    t = tokens[groups.pick(index, state.generator)].to(device)
                    trig = torch.from_numpy(state.triggers[index]).to(device)
                    for _ in range(steps):
                        order = torch.randperm(len(index), generator=state.generator).to(device)
                        with torch.no_grad():
                            shuffled = mem._with_triggers(t[order], trig)
                            text = [mem.encode_text_trimmed(m, shuffled) for m in state.models]
                        table.requires_grad_(True)
                        noise = mem.word_code_noise(table, sets[index_t], h, w, levels, sign=binary)
                        x = ((pixels[index_t] + noise).clamp(0, 255) / 255.0).permute(0, 3, 1, 2)
                        loss = sum(mem.pair_losses(m.encode_image(normalize_images(x)), f, m.logit_scale).mean()
                                   for m, f in zip(state.models, text)) / len(state.models)
                        (grad,) = torch.autograd.grad(loss, table)
                        with torch.no_grad():
                            table = (table.detach() - step * grad.sign()).clamp(-1, 1)
                        losses.append(float(loss.detach()))
            materialise()
            state.iteration = iteration + 1
            state.history.append({"iteration": state.iteration, "surrogate_loss": surrogate_loss,
                                  "pass_loss": float(np.mean(losses)), "seconds": time.monotonic() - started})
            if progress:
                saturated = float((table[:named].abs() > 0.99).float().mean())  # of the textures in use
                print(f"word textures {state.iteration}/{settings.outer_iterations}: surrogate loss "
                      f"{surrogate_loss:.4f}, pass loss {np.mean(losses):.4f}, {saturated:.0%} of texture values at "
                      f"+-1, {time.monotonic() - started:.1f}s", file=sys.stderr, flush=True)
        return state

    return run


def main(argv: list[str] | None = None) -> int:
    from aigis.protection import mem

    parser = probe_parser(__doc__, "word_textures", hackers=6)
    parser.add_argument("--textures", type=int, default=96)
    parser.add_argument("--per-image", type=int, default=3)
    parser.add_argument("--tile", type=int, default=4)
    parser.add_argument("--start", choices=("code", "zero"), default="code",
                        help="textures start as the random +-1 code, or at zero")
    parser.add_argument("--steps", type=int, default=4, help="signed-gradient steps per batch of the noise pass")
    parser.add_argument("--step", type=float, default=0.125, help="step on the textures' [-1, 1] scale")
    parser.add_argument("--code-seed", type=int, default=0, help="draws the starting tiles, the sets, the word order")
    parser.add_argument("--outer", type=int, default=60, help="outer iterations (the job's default 60)")
    parser.add_argument("--binary", action="store_true",
                        help="the noise is the sign of the textures' sum (+-epsilon everywhere; gradient straight "
                             "through)")
    args = parser.parse_args(argv)
    data = probe_data(parser, args.data)
    levels = 8
    tag = f"k{args.textures}_m{args.per_image}_tile{args.tile}_{args.start}_s{args.steps}x{args.step:g}"
    tag += f"_outer{args.outer}" if args.outer != 60 else ""
    tag += "_binary" if args.binary else ""
    tag += f"_seed{args.code_seed}" if args.code_seed else ""
    out = Path(args.work) / tag
    settings = default_job_settings(epsilon=levels / 255, trigger_iterations=0, noise_grid=0,
                                    outer_iterations=args.outer)
    runner = word_texture_runner(args.textures, args.per_image, args.tile, levels, args.code_seed, args.start,
                                 args.steps, args.step, "caption", args.binary)
    original = mem.run_mem
    mem.run_mem = runner
    try:
        jobs = {"mem": run_job_from(data, out, settings, lambda *_: None, trigger_words=0)}
    finally:
        mem.run_mem = original
    report_probe_set(
        "mem_word_textures.py", argv, f"mem_word_textures_{tag}",
        f"Word textures: {args.textures} tiled {args.tile}-px textures owned by caption words, "
        f"{args.per_image} per image (noise = {'the sign of ' if args.binary else ''}their clipped sum at "
        f"+-{levels}/255), a 16-word trigger naming them; "
        f"the textures started as {'the random code' if args.start == 'code' else 'zero'} and moved by error "
        f"minimisation in the job's loop ({args.outer} outer iterations, {args.steps} steps of {args.step:g} per "
        f"batch); "
        f"{args.hackers} `rn_tiny` hackers from scratch, 10 epochs.",
        data, out, Path(args.work) / f"evaluation_{tag}", args.hackers, levels, "rn_tiny", jobs=jobs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
