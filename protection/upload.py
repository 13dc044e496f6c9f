"""Protect-on-upload with a frozen surrogate: a trigger search and PGD per request, so images that arrive
after a job are protected against the same model."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from .attack import Negatives, _device, attack_mode, surrogate_list, surrogates_and_negatives
from .clip import CLIP
from .pgd import pgd_noise
from .search import search_triggers
from .settings import MEMSettings
from .tokenizer import Tokenizer, apply_trigger_text


def _check_upload_batch(images_uint8: Any, captions: list[str]) -> None:
    """Refuse a batch protect_batch / protect_with_word_code cannot take, naming what is wrong."""
    if not isinstance(images_uint8, np.ndarray) or images_uint8.dtype != np.uint8 or images_uint8.ndim != 4 \
            or images_uint8.shape[-1] != 3:
        raise ValueError(f"images must be a uint8 numpy array [N, H, W, 3], got "
                         f"{getattr(images_uint8, 'dtype', type(images_uint8))} {list(np.shape(images_uint8))}")
    if len(captions) != images_uint8.shape[0]:
        raise ValueError(f"{images_uint8.shape[0]} images but {len(captions)} captions")


def protect_batch(
    model: CLIP | Sequence[CLIP],
    tokenizer: Tokenizer,
    images_uint8: np.ndarray,
    captions: list[str],
    settings: MEMSettings,
    *,
    steps: int | None = None,
    device: str | torch.device | None = None,
    negatives: Negatives | list[Negatives | None] | None = None,
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Protect one batch with a FROZEN surrogate (or ensemble): trigger search, then `steps` PGD steps
    (default pgd_steps).

    images_uint8 [N, H, W, 3] of any size (resized differentiably to the model's resolution, so the
    noise is computed at full resolution). Returns (protected uint8 [N, H, W, 3], captions with the
    trigger text in front, delta int8 [N, H, W, 3]). The models' weights are not changed. negatives
    default to the ones load_surrogates() attached to each model (model.mem_negatives), if any.
    """
    settings.validate()
    _check_upload_batch(images_uint8, captions)
    if images_uint8.shape[0] == 0:
        return images_uint8.copy(), [], np.zeros_like(images_uint8, dtype=np.int8)
    device = _device(device)
    if negatives is None:
        negatives = [getattr(m, "mem_negatives", None) for m in surrogate_list(model)]
    models, negs = surrogates_and_negatives(model, negatives)
    negs = [None if n is None else (n[0].to(device), n[1].to(device)) for n in negs]
    if images_uint8.shape[0] < 2 and any(n is None for n in negs):
        raise ValueError("a batch of one image needs negatives (a surrogate saved with them) to have a loss")
    for m in models:
        m.to(device)
    generator = torch.Generator().manual_seed(settings.seed)
    # Always the stored averages (whatever norm_stats): a frozen surrogate's are up to date with its weights,
    # and an upload batch, perhaps one image, is not a training batch whose own statistics a hacker would see.
    with attack_mode(models):
        k = settings.trigger_length
        tokens = tokenizer.tokenize(list(captions), models[0].context_length, k).to(device)
        images = torch.from_numpy(np.ascontiguousarray(images_uint8)).to(device)
        delta = torch.zeros(images.shape, dtype=torch.int16, device=device)
        triggers = torch.full((len(captions), k), tokenizer.placeholder_id, dtype=torch.long, device=device)
        if k:
            triggers, _ = search_triggers(models, tokenizer, images, delta, tokens, triggers, settings, negs)
        delta, _ = pgd_noise(models, images, delta, tokens, triggers, settings,
                             settings.pgd_steps if steps is None else int(steps), generator, negs)
    protected = (images.to(torch.int16) + delta).clamp(0, 255).to(torch.uint8).cpu().numpy()
    trigger_ids = triggers.cpu().numpy()
    texts = [apply_trigger_text(trigger_ids[i], c, tokenizer) for i, c in enumerate(captions)]
    return protected, texts, delta.to(torch.int8).cpu().numpy()
