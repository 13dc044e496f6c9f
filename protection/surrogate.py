"""The surrogate CLIP that MEM's noise and triggers are made against: its optimiser, its training steps on
the protected pairs, and its periodic re-draws."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from aigis import distributed

from . import parallel
from .attack import _autocast, _with_triggers, encode_text_trimmed
from .clip import CLIP, MAX_LOGIT_SCALE, contrastive_loss, normalize_images
from .settings import SurrogateSettings
from .state import CaptionsPerImage, MEMState


def make_optimizer(model: CLIP, settings: SurrogateSettings, fused: bool = True) -> torch.optim.Optimizer:
    """AdamW as CLIP trains (betas 0.9/0.98, eps 1e-6), no decay on gains, biases and embeddings.

    fused: one kernel over every tensor (the same update up to rounding); False leaves PyTorch's default
    (a loop per tensor on a CPU, grouped foreach kernels on CUDA), as the official code's optimiser does.
    Every surrogate step updates the whole token table (CLIP's has 49,408 rows); on a CPU the per-tensor
    loop over CLIP's was half of a rn_tiny step at batch 32. A checkpoint's param groups carry their
    own `fused`, so a resumed job keeps the step it was written with.
    """
    from .retrieval import _param_groups

    fused = fused and all(p.device.type in ("cpu", "cuda") for p in model.parameters())  # where PyTorch has it
    return torch.optim.AdamW(_param_groups(model, settings.weight_decay), lr=settings.lr, betas=(0.9, 0.98), eps=1e-6,
                             fused=fused or None)


def restart_due(settings: SurrogateSettings, iteration: int, member: int, members: int) -> bool:
    """Whether surrogate `member` of `members` is re-drawn before outer iteration `iteration` (0-based):
    every surrogate_restart iterations, member j offset by j / members of the period."""
    period = settings.surrogate_restart
    if not period:
        return False
    offset = member * period // members
    return iteration > 0 and iteration >= offset and (iteration - offset) % period == 0


def restart_seed(seed: int, iteration: int, member: int) -> int:
    """The torch seed of a re-drawn surrogate: keyed apart from the job's own draw (its plain seed) and
    from every hacker's (evaluate.hacker_init_seed), so no hacker starts where a surrogate did."""
    return int(np.random.SeedSequence([seed, iteration, member, 0x5E57A7]).generate_state(1)[0])


def restart_surrogates(state: MEMState, settings: SurrogateSettings) -> list[int]:
    """Re-draw the surrogates whose restart is due before the next outer iteration; returns their indices.
    A fresh draw of the same config from restart_seed (the global RNG is left as it was), optimiser
    state cleared."""
    redrawn = []
    surrogates = state.surrogates
    for j, (model, optimizer) in enumerate(surrogates):
        if not restart_due(settings, state.iteration, j, len(surrogates)):
            continue
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(restart_seed(settings.seed, state.iteration, j))
            fresh = CLIP(model.config)
        model.load_state_dict(fresh.state_dict())
        optimizer.state.clear()
        redrawn.append(j)
    return redrawn


def train_surrogate(state: MEMState, images: np.ndarray, tokens: Tensor, settings: SurrogateSettings,
                    device: torch.device, groups: CaptionsPerImage | None = None) -> float:
    """settings.surrogate_steps AdamW steps on random batches of (image + noise, triggered caption):
    distinct images, each with one of its captions (tokens [n_captions, L]). Every surrogate of an
    ensemble takes a step on each batch; the returned loss is their mean.

    Under torchrun with several processes each rank encodes its block of every batch and the loss is taken over
    the gathered features (parallel.py), so the summed gradients are the one-process gradient; the logit scale,
    which every rank's copy of the loss holds whole, takes its gradient from rank 0's copy alone."""
    n = images.shape[0]
    groups = groups or CaptionsPerImage.single(n)
    b = min(settings.batch_size, n)
    split = parallel.split()
    losses = []
    for model in state.models:
        model.train()
    for _ in range(settings.surrogate_steps):
        index = torch.randperm(n, generator=state.generator)[:b].sort().values.numpy()
        picked = groups.pick(index, state.generator)
        if split:  # this rank's block of the batch (every rank drew the same batch and captions)
            block = parallel.batch_block(len(index))
            index, picked = index[block], picked[block]
        x = torch.from_numpy(images[index]).to(device).to(torch.int16)
        x = (x + torch.from_numpy(np.asarray(state.noise[index])).to(device)).clamp(0, 255).to(torch.uint8)
        t = _with_triggers(tokens[picked], torch.from_numpy(state.triggers[index])).to(device)
        step_losses = []
        for model, optimizer in state.surrogates:
            with _autocast(settings, device):
                image_features = model.encode_image(normalize_images(x))
                text_features = encode_text_trimmed(model, t)
                scale = model.logit_scale
                if split:
                    image_features = distributed.gather_rows_live(image_features, b)
                    text_features = distributed.gather_rows_live(text_features, b)
                    scale = scale if distributed.is_main() else scale.detach()
                loss = contrastive_loss(image_features, text_features, scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if split:
                distributed.all_reduce_gradients(model.parameters())
            optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(MAX_LOGIT_SCALE))
            step_losses.append(float(loss.detach()))
        losses.append(float(np.mean(step_losses)))
    for model in state.models:
        model.eval()
        if split and settings.surrogate_steps:
            distributed.broadcast_module(model)  # rank 0's weights and BatchNorm averages on every rank
    return float(np.mean(losses)) if losses else float("nan")
