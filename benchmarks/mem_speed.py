"""MEM speed and host memory: aigis.protection.mem vs the official code's way of doing the same work.

The "official way" is this implementation with each fix switched off (the weaknesses listed in the
MEM reference): images re-decoded from disk on every pass and every surrogate batch; noise stored per
caption as float32 in host RAM and gathered/scattered one sample at a time; HotFlip scored on the
CPU; each trigger candidate scored one at a time on a deep copy of the batch, re-running the image
tower; float32 noise (no uint8 grid) and no autocast; the surrogate's AdamW as PyTorch's default (one
tensor at a time on a CPU, grouped "foreach" kernels on CUDA) where ours is fused. Both run the same
settings on the same data, interleaved iteration by iteration so that machine load hits both alike.

    python benchmarks/mem_speed.py [--pairs 64] [--batch 32] [--outer 2] [--device cpu]
    python benchmarks/mem_speed.py --captions-per-image 5 --name mem_speed_5captions   # Flickr/COCO layout
    python benchmarks/mem_speed.py --captions-per-image 5 --pairs 448 --paper-schedule coco --outer 5 \
        --name mem_speed_schedule_coco
    python benchmarks/mem_speed.py --captions-per-image 5 --pairs 256 --batch 128 --clip-vocab \
        --paper-schedule flickr8k --source-size 500x375 --outer 5 --name ...   # the paper's batch, vocabulary, files

How much an outer iteration gains depends on how much of it is surrogate training (the same forward and
backward passes both ways; the optimiser step and the official way's decoding differ). The paper trains the
surrogate 200 minibatches per iteration whatever the dataset, then passes over every caption line, so that
share shrinks as the dataset grows. --paper-schedule DATASET sets the surrogate steps to keep the paper's
ratio of surrogate minibatches to the official way's pass minibatches for that dataset's training split,
at this benchmark's --pairs and --batch; the report then also combines the measured medians into a whole
job of the paper's schedule (triggers searched in the first 5 of 20 outer iterations).

With --captions-per-image c every image has c captions (c manifest lines): the official way treats each
line as a sample of its own (a noise per caption, c PGDs per image per pass); ours keeps one noise and one
trigger per image and pairs it with one of its captions per pass. Rates are image-caption pairs per second.

With --source-size WxH the image files are photo-sized JPEGs (quality 90) rather than PNGs already at the
model's size: the data owner's files (Flickr's are about 500x375, COCO's 640x480) are what the official way
decodes and resizes for every batch, and what ours decodes once. Without it, decoding costs next to nothing.

With --clip-vocab both models carry CLIP's 49,408-row token table, as the official code's always does (and
ours when the data owner gives CLIP's BPE vocabulary), rather than one row per token of the benchmark's small
trained tokenizer. AdamW updates every row at every surrogate step, which is where the fused optimiser pays;
--our-optimizer loop runs ours with PyTorch's default AdamW (per tensor on a CPU) to measure that fix alone.

Ours runs bfloat16 autocast where the job would (--our-amp auto: CUDA, and CPUs with AMX); --our-amp off
measures it in float32, as the official way always runs.

Writes benchmarks/results/<name>.json and .md (default name mem_speed).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from aigis.protection import mem
from aigis.protection.captions import load_images, photo_sized_copies, read_pairs, synth_captioned
from aigis.protection.clip import MAX_LOGIT_SCALE, OPENAI_VOCAB_SIZE, build_clip, contrastive_loss, normalize_images
from aigis.protection.tokenizer import Tokenizer

RESULTS = Path(__file__).resolve().parent / "results"

# Karpathy training splits (images, caption lines) and the paper's schedule (mem.md): the surrogate trains
# 200 minibatches of 128 per outer iteration, then one pass over every caption line in batches of 128;
# 20 outer iterations, triggers searched in the first 5.
PAPER_TRAIN_SPLITS = {"flickr8k": (6_000, 30_000), "flickr30k": (29_000, 145_000), "coco": (113_287, 566_747)}
PAPER_SURROGATE_STEPS, PAPER_BATCH, PAPER_OUTER, PAPER_TRIGGER_ITERATIONS = 200, 128, 20, 5


def paper_pass_batches(dataset: str) -> int:
    """Minibatches of the official way's pass over `dataset`'s training caption lines."""
    return math.ceil(PAPER_TRAIN_SPLITS[dataset][1] / PAPER_BATCH)


def paper_surrogate_share(dataset: str) -> float:
    """Surrogate minibatches per official-way pass minibatch in one of the paper's outer iterations."""
    return PAPER_SURROGATE_STEPS / paper_pass_batches(dataset)


def surrogate_steps_for(dataset: str, pass_batches: int) -> int:
    """Surrogate steps that keep the paper's share for `dataset` beside a pass of `pass_batches`."""
    return max(1, round(paper_surrogate_share(dataset) * pass_batches))


def paper_job_speedup(rows: list[dict]) -> dict | None:
    """A whole job of the paper's schedule from the measured medians: (5 trigger + 15 noise-only
    iterations) of the official way over the same of ours, in wall seconds and CPU seconds."""
    out = {}
    for kind in ("", "cpu_"):
        medians = {}
        for path in ("fast", "naive"):
            for triggers in (True, False):
                seconds = [r[f"{path}_{kind}seconds"] for r in rows if r["triggers_updated"] == triggers]
                if not seconds:
                    return None
                medians[path, triggers] = float(np.median(seconds))
        job = {path: PAPER_TRIGGER_ITERATIONS * medians[path, True]
               + (PAPER_OUTER - PAPER_TRIGGER_ITERATIONS) * medians[path, False] for path in ("fast", "naive")}
        out[f"{kind}speedup"] = job["naive"] / job["fast"]
        out[f"{kind}seconds"] = job
    return out


def parse_source_size(text: str) -> tuple[int, int]:
    """'500x375' -> (500, 375)."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--source-size must be WIDTHxHEIGHT in px, e.g. 500x375; got {text!r}") from None
    if not (16 <= width <= 4096 and 16 <= height <= 4096):
        raise ValueError(f"--source-size {text}: each side must be 16..4096 px")
    return width, height


def five_caption_data(tmp: str, images: int, captions_per_image: int, size: int, clip: str,
                      source_size: tuple[int, int] | None = None):
    """The benchmark's data in `tmp`: (pairs, captions, groups, tokenizer, config). Every image has
    captions_per_image caption lines (pairs[i * c + k] describes image i); config is the preset at `size`."""
    from dataclasses import replace

    from aigis.protection.clip import PRESETS

    root = synth_captioned(tmp, images, 0, size=size, seed=0, captions_per_image=captions_per_image)
    manifest = photo_sized_copies(root, "train.jsonl", source_size) if source_size else "train.jsonl"
    pairs = read_pairs(root, manifest)
    captions = [p.caption for p in pairs]
    groups = mem.CaptionsPerImage(np.repeat(np.arange(images), captions_per_image), images)
    tokenizer = Tokenizer.train(captions, 1000)
    return pairs, captions, groups, tokenizer, replace(PRESETS[clip], image_resolution=size)


# ----------------------------------------------------------------------------------------------
# The official way (every fix off)


class NaiveState:
    """Every (image, caption) line a sample of its own: noise per caption as float32 [n_pairs, 3, H, W]
    in host RAM; triggers as Python lists."""

    def __init__(self, model, tokenizer, n_pairs: int, size: int, settings: mem.MEMSettings):
        self.model = model
        self.optimizer = mem.make_optimizer(model, settings, fused=False)  # PyTorch's default AdamW
        self.generator = torch.Generator().manual_seed(settings.seed)
        self.noise = np.zeros((n_pairs, 3, size, size), dtype=np.float32)
        self.triggers = [[tokenizer.placeholder_id] * settings.trigger_length for _ in range(n_pairs)]


def _naive_gather(state: NaiveState, pairs, index, device):
    """Decode the batch's images from disk again, then per-sample noise/trigger copies to the device."""
    images = torch.from_numpy(load_images([pairs[i] for i in index], state.noise.shape[-1], progress=False))
    x = images.permute(0, 3, 1, 2).float().div(255).to(device)
    delta = torch.stack([torch.from_numpy(state.noise[i].copy()).to(device) for i in index])
    trig = torch.stack([torch.tensor(state.triggers[i], dtype=torch.long).to(device) for i in index])
    return x, delta, trig


def _encode_float(model, x01_nchw, delta):
    return model.encode_image(normalize_images((x01_nchw + delta).clamp(0, 1)))


def naive_train_surrogate(state: NaiveState, pairs, tokens, settings, device) -> None:
    model = state.model.train()
    n = len(pairs)
    for _ in range(settings.surrogate_steps):
        index = torch.randperm(n, generator=state.generator)[: min(settings.batch_size, n)].sort().values.tolist()
        x, delta, trig = _naive_gather(state, pairs, index, device)
        t = mem._with_triggers(tokens[index].to(device), trig)
        loss = contrastive_loss(_encode_float(model, x, delta), model.encode_text(t), model.logit_scale)
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        state.optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(MAX_LOGIT_SCALE))
    model.eval()


def naive_search(model, tokenizer, x, delta, tokens, triggers, settings, candidate_ids_cpu):
    """HotFlip on the CPU, then every candidate scored alone on a deep copy, image tower re-run each time."""
    import copy

    k = triggers.shape[1]
    current = triggers.clone()
    base = mem._with_triggers(tokens, current)
    embeddings = model.token_embedding(base).detach().requires_grad_(True)
    with torch.no_grad():
        image_features = _encode_float(model, x, delta)
    loss = contrastive_loss(image_features, model.encode_text(base, token_embeddings=embeddings), model.logit_scale)
    (grad,) = torch.autograd.grad(loss, embeddings)
    grad = grad[:, 1 : 1 + k].cpu()
    table = model.token_embedding.weight.detach().cpu()[candidate_ids_cpu]
    proposals = candidate_ids_cpu[(-grad @ table.t()).topk(settings.candidates, dim=-1).indices].to(x.device)
    with torch.no_grad():
        for j in range(k):
            options = torch.cat([current[:, j : j + 1], proposals[:, j]], dim=1)
            rows = []
            for c in range(options.shape[1]):
                trial = copy.deepcopy(mem._with_triggers(tokens, current))
                for i in range(trial.shape[0]):
                    trial[i, 1 + j] = options[i, c]
                features = _encode_float(model, x, delta)  # no cache: the image tower again
                rows.append(mem.pair_losses(features, model.encode_text(trial), model.logit_scale))
            best = torch.stack(rows).argmin(dim=0)
            for i in range(current.shape[0]):  # per-sample writes
                current[i, j] = options[i, best[i]]
    return current


def naive_pass(state: NaiveState, tokenizer, pairs, tokens, settings, device, update_triggers: bool) -> None:
    model = state.model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    candidate_ids_cpu = tokenizer.trigger_candidates()
    eps, step = settings.epsilon, settings.pgd_step
    for index in mem._batches(len(pairs), settings.batch_size, state.generator):
        index = index.tolist()
        x, delta, trig = _naive_gather(state, pairs, index, device)
        t = tokens[index].to(device)
        if update_triggers and settings.trigger_length:
            trig = naive_search(model, tokenizer, x, delta, t, trig, settings, candidate_ids_cpu)
            for row, i in enumerate(index):
                state.triggers[i] = trig[row].cpu().tolist()
        for _ in range(settings.pgd_steps):
            order = torch.randperm(len(index), generator=state.generator) if settings.trigger_length else None
            with torch.no_grad():
                text = model.encode_text(mem._with_triggers(t[order] if order is not None else t, trig))
            d = delta.clone().requires_grad_(True)
            loss = contrastive_loss(_encode_float(model, x, d), text, model.logit_scale)
            (grad,) = torch.autograd.grad(loss, d)
            delta = (delta - step * grad.sign()).clamp(-eps, eps)
            delta = (x + delta).clamp(0, 1) - x
        for row, i in enumerate(index):  # per-sample scatter to host float32
            state.noise[i] = delta[row].cpu().numpy()
    for p in model.parameters():
        p.requires_grad_(True)


# ----------------------------------------------------------------------------------------------


def gpu_reset(device: torch.device) -> int:
    """Start a GPU memory measurement: reset the peak, return what is allocated now (bytes; 0 off CUDA)."""
    if device.type != "cuda":
        return 0
    torch.cuda.reset_peak_memory_stats(device)
    return int(torch.cuda.memory_allocated(device))


def gpu_peak_above(device: torch.device, base: int) -> int | None:
    """Peak GPU memory allocated since gpu_reset beyond what was allocated then (bytes); None off CUDA.
    Both paths' models, optimisers and stores stay resident, so each path is measured above them."""
    return int(torch.cuda.max_memory_allocated(device)) - base if device.type == "cuda" else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=64, help="images (each with --captions-per-image captions)")
    parser.add_argument("--captions-per-image", type=int, default=1, help="5 for the Flickr/COCO layout")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--outer", type=int, default=2)
    parser.add_argument("--surrogate-steps", type=int, default=4)
    parser.add_argument("--paper-schedule", choices=sorted(PAPER_TRAIN_SPLITS), default=None,
                        help="set the surrogate steps to the paper's share of an iteration on this dataset "
                             "(overrides --surrogate-steps)")
    parser.add_argument("--trigger-iterations", type=int, default=1, help="leading iterations that search triggers")
    parser.add_argument("--clip", default="rn_tiny")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--source-size", default=None, metavar="WxH",
                        help="image files as photo-sized JPEGs (e.g. 500x375, Flickr's) instead of PNGs at --size")
    parser.add_argument("--clip-vocab", action="store_true",
                        help="both models carry CLIP's 49,408-row token table (the official code's; ours when given "
                             "CLIP's BPE vocabulary) instead of one row per token of the benchmark's small tokenizer")
    parser.add_argument("--our-optimizer", choices=("fused", "loop"), default="fused",
                        help="ours with its fused AdamW (the job's) or PyTorch's default (a loop per tensor on a CPU), "
                             "to measure that fix")
    parser.add_argument("--our-amp", choices=("auto", "on", "off"), default="auto",
                        help="ours with bfloat16 autocast as a job decides it (auto), forced on, or off (float32, "
                             "as the official way), to measure that fix")
    parser.add_argument("--name", default="mem_speed", help="result file stem under benchmarks/results/")
    args = parser.parse_args(argv)
    try:
        source_size = parse_source_size(args.source_size) if args.source_size else None
    except ValueError as exc:
        parser.error(str(exc))
    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not 0 < args.trigger_iterations <= args.outer:
        parser.error("--trigger-iterations must be between 1 and --outer")
    pass_batches = math.ceil(args.pairs * args.captions_per_image / args.batch)  # official way: per caption line
    surrogate_steps = args.surrogate_steps
    if args.paper_schedule:
        surrogate_steps = surrogate_steps_for(args.paper_schedule, pass_batches)
    # Stored BatchNorm averages on both paths, as every recorded speed table ran (the official way's loop
    # below puts the surrogate in eval mode).
    settings = mem.MEMSettings(outer_iterations=args.outer, trigger_iterations=args.trigger_iterations,
                               surrogate_steps=surrogate_steps, batch_size=args.batch, norm_stats="running",
                               amp=args.our_amp)
    our_autocast = mem.autocast_enabled(settings.amp, device)

    with tempfile.TemporaryDirectory() as tmp:
        cpi = args.captions_per_image
        pairs, captions, groups, tokenizer, config = five_caption_data(tmp, args.pairs, cpi, args.size, args.clip,
                                                                       source_size)
        tokens = tokenizer.tokenize(captions, config.context_length, settings.trigger_length)
        vocab_rows = OPENAI_VOCAB_SIZE if args.clip_vocab else tokenizer.vocab_size
        torch.manual_seed(0)
        fast_model = build_clip(config, vocab_rows).to(device)
        torch.manual_seed(0)
        naive_model = build_clip(config, vocab_rows).to(device)

        t0 = time.monotonic()
        images = load_images(pairs[::cpi], args.size, progress=False)  # decoded once, one per image
        decode_s = time.monotonic() - t0
        noise_file = Path(tmp) / "noise.npy"
        noise = np.lib.format.open_memmap(noise_file, mode="w+", dtype=np.int8, shape=images.shape)
        fast = mem.new_state(fast_model, tokenizer, args.pairs, (args.size, args.size), settings, noise=noise)
        if args.our_optimizer == "loop":  # new_state's optimiser is the job's (fused)
            fast.optimizer = mem.make_optimizer(fast_model, settings, fused=False)
        naive = NaiveState(naive_model, tokenizer, len(pairs), args.size, settings)

        rows = []
        for iteration in range(args.outer):
            update = iteration < settings.trigger_iterations
            row = {"iteration": iteration + 1, "triggers_updated": update}
            clock = []  # (wall, process CPU) at each boundary: CPU time is less hit by other processes' load

            def mark() -> None:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                clock.append((time.monotonic(), time.process_time()))

            base = gpu_reset(device)
            mark()
            mem.train_surrogate(fast, images, tokens, settings, device, groups)
            mark()
            mem.perturb_pass(fast, tokenizer, images, tokens, settings, device, update, groups)
            mark()
            row["fast_gpu_peak_bytes"] = gpu_peak_above(device, base)
            base = gpu_reset(device)
            naive_train_surrogate(naive, pairs, tokens, settings, device)
            mark()
            naive_pass(naive, tokenizer, pairs, tokens, settings, device, update)
            mark()
            row["naive_gpu_peak_bytes"] = gpu_peak_above(device, base)
            n = len(pairs)
            for kind, k in (("", 0), ("cpu_", 1)):
                t0, t1, t2, t3, t4 = (c[k] for c in clock)
                row.update({
                    f"fast_pass_{kind}pairs_per_s": n / (t2 - t1), f"naive_pass_{kind}pairs_per_s": n / (t4 - t3),
                    f"fast_iteration_{kind}pairs_per_s": n / (t2 - t0), f"naive_iteration_{kind}pairs_per_s": n / (t4 - t2),
                    f"fast_{kind}seconds": t2 - t0, f"naive_{kind}seconds": t4 - t2,
                    f"fast_surrogate_{kind}seconds": t1 - t0, f"naive_surrogate_{kind}seconds": t3 - t2,
                })
                row[f"pass_{kind}speedup"] = row[f"fast_pass_{kind}pairs_per_s"] / row[f"naive_pass_{kind}pairs_per_s"]
                row[f"iteration_{kind}speedup"] = (row[f"fast_iteration_{kind}pairs_per_s"]
                                                   / row[f"naive_iteration_{kind}pairs_per_s"])
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)

        memory = {  # measured from the two stores of this run
            "captions_per_image": cpi,
            "fast_noise_bytes_per_image": int(fast.noise.nbytes // args.pairs),
            "fast_trigger_bytes_per_image": int(fast.triggers.nbytes // args.pairs),
            "naive_noise_bytes_per_image": int(naive.noise.nbytes // args.pairs),
            "fast_store": "int8 np.memmap on disk, one per image",
            "naive_store": "float32 in host RAM, one per caption",
        }
        memory["ratio"] = memory["naive_noise_bytes_per_image"] / memory["fast_noise_bytes_per_image"]
        memory["at_224px_5_captions_GiB_per_30k_images"] = {
            "fast": 30000 * 3 * 224 * 224 / 2**30, "naive": 30000 * 5 * 4 * 3 * 224 * 224 / 2**30}

    schedule = None
    if args.paper_schedule:
        schedule = {"dataset": args.paper_schedule, "train_split_images_captions": PAPER_TRAIN_SPLITS[args.paper_schedule],
                    "paper_surrogate_share": paper_surrogate_share(args.paper_schedule),
                    "surrogate_steps": settings.surrogate_steps, "official_pass_batches": pass_batches,
                    "share_used": settings.surrogate_steps / pass_batches, "job": paper_job_speedup(rows)}
    result = {
        "device": str(device), "torch_threads": args.threads, "platform": platform.platform(),
        "clip": args.clip, "size": args.size, "images": args.pairs, "captions_per_image": cpi,
        "our_optimizer": args.our_optimizer, "our_autocast": "bfloat16" if our_autocast else "off",
        "token_table_rows": vocab_rows,
        "source_files": f"JPEG {source_size[0]}x{source_size[1]}" if source_size else f"PNG {args.size}x{args.size}",
        "pairs": len(pairs), "settings": settings.to_dict(),
        "decode_once_seconds": decode_s, "iterations": rows, "memory": memory, "paper_schedule": schedule,
        "note": "naive = this implementation with each fix switched off (see module docstring); CPU timings on a "
                "shared machine are noisy, both paths are interleaved per iteration",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    lines = [
        "# MEM speed: this implementation vs the official way (fixes off)", "",
        f"Device {device}, {args.threads} threads, CLIP {args.clip} at {args.size}px, {args.pairs} images x {cpi} "
        f"caption{'s' if cpi > 1 else ''} = {len(pairs)} pairs, batch "
        f"{settings.batch_size}, {settings.candidates} candidates, {settings.pgd_steps} PGD steps, trigger length "
        f"{settings.trigger_length}, {settings.surrogate_steps} surrogate steps, {vocab_rows:,}-row token table; "
        f"image files: {result['source_files']}. Ours {'with bfloat16 autocast' if our_autocast else 'in float32'}, "
        f"the official way in float32.", "",
        "Wall-clock pairs/s, and in brackets pairs per CPU-second of this process (steadier on a shared machine).", "",
        "| outer iteration | triggers | pass pairs/s (ours) | pass pairs/s (official way) | pass speed-up | "
        "iteration speed-up |", "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['iteration']} | {'yes' if r['triggers_updated'] else 'no'} | {r['fast_pass_pairs_per_s']:.2f} "
            f"({r['fast_pass_cpu_pairs_per_s']:.2f}) | {r['naive_pass_pairs_per_s']:.2f} ({r['naive_pass_cpu_pairs_per_s']:.2f}) "
            f"| {r['pass_speedup']:.1f}x ({r['pass_cpu_speedup']:.1f}x) | {r['iteration_speedup']:.1f}x "
            f"({r['iteration_cpu_speedup']:.1f}x) |")
    surrogate = {path: float(np.median([r[f"{path}_surrogate_seconds"] for r in rows])) for path in ("fast", "naive")}
    default_adamw = "AdamW per-tensor loop" if device.type == "cpu" else "PyTorch default AdamW"
    lines += ["", f"Surrogate training per iteration (median, wall): ours {surrogate['fast']:.2f} s "
              f"({'fused AdamW' if args.our_optimizer == 'fused' else default_adamw}), official way "
              f"{surrogate['naive']:.2f} s ({default_adamw}, images decoded per batch).", ""]
    if device.type == "cuda":
        peaks = {path: max(r[f"{path}_gpu_peak_bytes"] for r in rows) / 2**30 for path in ("fast", "naive")}
        lines += [f"GPU memory each path's iterations took at their peak, beyond what both paths keep resident "
                  f"(models, optimisers, stores): ours {peaks['fast']:.2f} GiB, official way {peaks['naive']:.2f} GiB "
                  f"(torch.cuda.max_memory_allocated). On CUDA the per-CPU-second figures mostly count the host "
                  f"waiting for the GPU.", ""]
    lines += ["| noise store | bytes per image |", "|---|---|",
              f"| ours (int8 memmap, one per image) | {memory['fast_noise_bytes_per_image']} |",
              f"| official (float32 per caption, {cpi} caption{'s' if cpi > 1 else ''}/image) | "
              f"{memory['naive_noise_bytes_per_image']} ({memory['ratio']:.0f}x) |", ""]
    if schedule:
        lines += [
            f"Paper schedule, {schedule['dataset']} ({schedule['train_split_images_captions'][0]:,} training images, "
            f"{schedule['train_split_images_captions'][1]:,} caption lines): {PAPER_SURROGATE_STEPS} surrogate minibatches "
            f"per pass of {paper_pass_batches(schedule['dataset']):,} = "
            f"{schedule['paper_surrogate_share']:.3f} per pass minibatch; here {schedule['surrogate_steps']} per "
            f"{schedule['official_pass_batches']} = {schedule['share_used']:.3f}.", ""]
        if schedule["job"]:
            job = schedule["job"]
            lines += [
                f"A whole job of the paper's schedule ({PAPER_TRIGGER_ITERATIONS} trigger iterations + "
                f"{PAPER_OUTER - PAPER_TRIGGER_ITERATIONS} noise-only, from the medians above): ours "
                f"{job['seconds']['fast']:.1f} s, official way {job['seconds']['naive']:.1f} s = "
                f"**{job['speedup']:.1f}x** ({job['cpu_speedup']:.1f}x per CPU-second).", ""]
    if cpi > 1:
        lines += [
            f"With {cpi} captions per image the official way protects each caption's copy of an image as a sample of",
            f"its own ({cpi} trigger searches and {cpi} PGDs per image per pass, and {cpi} different protected copies",
            "of one image to publish); ours keeps one noise and one trigger per image and pairs it with one of its",
            "captions each pass, so a pass covers every pair at the cost of one PGD per image.", ""]
    if device.type == "cpu" and cpi == 1:
        lines += [
            "On a CPU both paths run the same text-tower forwards (B x (candidates + 1) sequences per trigger slot)",
            "and the same PGD forward/backward passes (in bfloat16 for ours where the CPU has AMX); what the fixes",
            "remove here is the image tower re-run per candidate, the padding after end-of-text, deep copies,",
            "per-sample copies and re-decoding. Batching, device-side HotFlip and fewer host<->device copies pay",
            "off on a GPU:",
            "`python benchmarks/mem_speed.py --device cuda --pairs 512 --batch 128`.", ""]
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
