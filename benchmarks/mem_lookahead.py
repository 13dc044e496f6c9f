"""Noise fitted to what a model learns NEXT: MEM whose PGD minimises the loss after a virtual training step.

    python benchmarks/mem_lookahead.py                 # step 5e-3, job seed 0, six rn_tiny hackers
    python benchmarks/mem_lookahead.py --outer 2 --hackers 0   # the first iterations only (a quick check)

Why: ResNet hackers keep the item kinds they learn while they are still fitting MEM's shortcut (BENCHMARKS.md,
session 21), so the lever is a shortcut fitted sooner. MEM's PGD lowers the surrogate's loss as it is; this
lowers it as it will be after one more training step -- noise that the surrogate not only reads but learns
to read fast, which is what a fresh hacker needs to take it first. Each PGD step takes the surrogate's
image-tower gradient on the batch (noise and triggered captions, with the graph kept), moves every weight
tensor by `--alpha` times that gradient over its RMS (about what `alpha / 1e-3` Adam steps at lr 1e-3
move it), and differentiates the loss there with respect to the noise, through the step. The text tower
stays fixed in the virtual step (the noise reaches the loss through the images only). Everything else is
the job's default (`rn_tiny`, MEM-16 on 4 x 4 cells, batch statistics, 60 x 2 steps); the hackers as in
protection_efficacy.py. Cost: a noise-only iteration takes about 4x the default's on CPU.

Data: the five-caption Fashion-MNIST scenes of `--data`. Results: benchmarks/results/mem_lookahead_seed<N>.{json,md}.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from protection_results import probe_data, probe_parser, report_probe_set



def lookahead_pgd(alpha: float) -> Callable[..., tuple[torch.Tensor, float]]:
    """A stand-in for mem.pgd_noise inside the protection job (float32, no negatives: not for protect-on-upload)
    whose loss is the surrogates' loss after a virtual step of `alpha`."""
    from torch.func import functional_call
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from aigis.protection import mem

    def loss_after_step(model, x: torch.Tensor, text_features: torch.Tensor) -> tuple[torch.Tensor, float]:
        tower = model.visual
        weights = {n: p.detach().requires_grad_(True) for n, p in tower.named_parameters()}
        buffers = dict(tower.named_buffers())

        def loss_at(w: dict) -> torch.Tensor:
            features = functional_call(tower, {**w, **buffers}, (mem._images_for_model(model, x).to(model.dtype),))
            return mem.pair_losses(features, text_features, model.logit_scale).mean()

        now = loss_at(weights)
        grads = torch.autograd.grad(now, list(weights.values()), create_graph=True, allow_unused=True)
        stepped = {n: w if g is None else w - alpha * g / g.detach().pow(2).mean().sqrt().clamp_min(1e-12)
                   for (n, w), g in zip(weights.items(), grads)}
        return loss_at(stepped), float(now.detach())

    def pgd_noise(model, images_u8: torch.Tensor, delta: torch.Tensor, tokens: torch.Tensor, triggers: torch.Tensor,
                  settings, steps: int, generator: torch.Generator, negatives=None) -> tuple[torch.Tensor, float]:
        if negatives is not None:
            raise ValueError("the look-ahead PGD is for the protection job, which has no negatives")
        models = mem.surrogate_list(model)
        eps, step = settings.epsilon_levels, settings.step_levels
        image, delta = images_u8.to(torch.int16), delta.to(torch.int16)
        loss_value = float("nan")
        for _ in range(steps):
            order = torch.randperm(tokens.shape[0], generator=generator).to(tokens.device)
            with torch.no_grad():
                text = [mem.encode_text_trimmed(m, mem._with_triggers(tokens[order], triggers)) for m in models]
            x = ((image + delta).float() / 255.0).requires_grad_(True)
            with sdpa_kernel(SDPBackend.MATH):  # the fused CPU attention has no second derivative
                results = [loss_after_step(m, x, t) for m, t in zip(models, text)]
            (grad,) = torch.autograd.grad(sum(r[0] for r in results) / len(models), x)
            if settings.noise_grid:
                grad = mem._cell_mean(grad, settings.noise_grid)
            delta = (delta - step * grad.sign().to(torch.int16)).clamp(-eps, eps)
            delta = (image + delta).clamp(0, 255) - image
            loss_value = sum(r[1] for r in results) / len(models)  # the plain loss, as the job reports it
        return delta, loss_value

    return pgd_noise


def main(argv: list[str] | None = None) -> int:
    parser = probe_parser(__doc__, "lookahead", hackers=6)
    parser.add_argument("--alpha", type=float, default=5e-3, help="the virtual step, in RMS-normalised gradients")
    parser.add_argument("--job-seed", type=int, default=0)
    parser.add_argument("--outer", type=int, default=60)
    args = parser.parse_args(argv)
    data = probe_data(parser, args.data)

    from aigis.protection import job, mem

    settings = mem.MEMSettings(epsilon=8 / 255, trigger_length=16, outer_iterations=args.outer, surrogate_steps=2,
                               pgd_steps=16, candidates=8, batch_size=100, trigger_iterations=5, lr=5e-4,
                               noise_grid=4, norm_stats="batch", seed=args.job_seed)
    out = Path(args.work) / f"mem_a{args.alpha:g}_seed{args.job_seed}_outer{args.outer}"
    original = mem.pgd_noise
    mem.pgd_noise = lookahead_pgd(args.alpha)  # perturb_pass looks it up in the module at each call
    try:
        started = time.perf_counter()
        summary = job.protect_dataset(data, "train.jsonl", out, settings, clip_preset="rn_tiny", image_size=32)
        seconds = time.perf_counter() - started
    finally:
        mem.pgd_noise = original
    checkpoint = out / "work" / f"ckpt-{summary['outer_iterations_run']}" / "state.json"  # the job's last one
    history = json.loads(checkpoint.read_text())["history"] if checkpoint.is_file() else []
    jobs = {"mem": {"seconds": seconds, "alpha": args.alpha, "settings": settings.to_dict(), **summary,
                    "history": history}}
    if args.hackers == 0:
        print(f"job {seconds:.0f} s; no hackers asked for")
        return 0
    report_probe_set(
        "mem_lookahead.py", argv, f"mem_lookahead_seed{args.job_seed}",
        f"MEM whose PGD minimises the surrogate's loss after a virtual image-tower step of {args.alpha:g} "
        f"(RMS-normalised gradient); `rn_tiny`, MEM-16, 4 x 4 cells, batch statistics, job seed "
        f"{args.job_seed}, job {seconds:.0f} s; {args.hackers} `rn_tiny` hackers from scratch, 10 epochs.",
        data, out, out.parent / f"evaluation_{out.name}", args.hackers, jobs=jobs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
