"""MEM's image noise: error-minimising PGD on the uint8 grid, so the noise is exactly what a published PNG
holds."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .attack import (Negatives, _autocast, _images_for_model, _with_triggers, encode_text_trimmed, pair_losses,
                     surrogates_and_negatives)
from .clip import CLIP
from .settings import MEMSettings


def _cell_mean(grad_nhwc: Tensor, grid: int) -> Tensor:
    """Each pixel's gradient replaced by the mean over its cell of a grid x grid cut of the image.

    Cells are ceil(H / grid) x ceil(W / grid) pixels; the last row and column of cells may be narrower.
    """
    g = grad_nhwc.permute(0, 3, 1, 2)
    h, w = g.shape[-2:]
    bh, bw = -(-h // grid), -(-w // grid)
    mean = F.avg_pool2d(g, (bh, bw), ceil_mode=True)
    return mean.repeat_interleave(bh, -2).repeat_interleave(bw, -1)[..., :h, :w].permute(0, 2, 3, 1)


def pgd_noise(
    model: CLIP | Sequence[CLIP], images_u8: Tensor, delta: Tensor, tokens: Tensor, triggers: Tensor, settings: MEMSettings,
    steps: int, generator: torch.Generator, negatives: Negatives | list[Negatives | None] | None = None,
) -> tuple[Tensor, float]:
    """Error-MINIMISING PGD on the uint8 grid, warm-started from delta (int16 [B, H, W, 3]).

    With a trigger, every step pairs each image with a randomly chosen caption of the batch carrying
    THAT image's trigger, so the noise learns to match the trigger, not the caption. Returns the new
    delta (|delta| <= epsilon levels, image + delta within [0, 255]) and the last step's loss (with an
    ensemble, the mean of the models' losses: the noise follows the sign of their summed gradients).
    """
    models, negs = surrogates_and_negatives(model, negatives)
    eps, step = settings.epsilon_levels, settings.step_levels
    image = images_u8.to(torch.int16)
    delta = delta.to(torch.int16)
    b = tokens.shape[0]
    shuffle = triggers.shape[1] > 0
    loss_value = float("nan")
    text_features = None
    for _ in range(steps):
        if shuffle or text_features is None:
            order = torch.randperm(b, generator=generator).to(tokens.device) if shuffle else None
            text_tokens = _with_triggers(tokens[order] if shuffle else tokens, triggers)
            with torch.no_grad(), _autocast(settings, images_u8.device):
                text_features = [encode_text_trimmed(m, text_tokens) for m in models]
        x = ((image + delta).float() / 255.0).requires_grad_(True)
        with _autocast(settings, images_u8.device):
            loss = sum(pair_losses(m.encode_image(_images_for_model(m, x)), t, m.logit_scale, n).mean()
                       for m, t, n in zip(models, text_features, negs)) / len(models)
        (grad,) = torch.autograd.grad(loss, x)
        if settings.noise_grid:
            grad = _cell_mean(grad, settings.noise_grid)
        delta = (delta - step * grad.sign().to(torch.int16)).clamp(-eps, eps)
        delta = (image + delta).clamp(0, 255) - image
        loss_value = float(loss.detach())
    return delta, loss_value
