"""MEM's trigger search: HotFlip proposes replacement words for each trigger slot from one gradient, and
every proposal of a slot is scored in one batched forward of the text tower over cached image embeddings."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from .attack import (Negatives, _autocast, _encode_images, _with_triggers, encode_text_trimmed, pair_losses,
                     surrogate_list, surrogates_and_negatives)
from .clip import CLIP
from .settings import MEMSettings
from .tokenizer import Tokenizer


# The most text sequences one batched candidate forward may hold. On a GPU, one big forward (bounded by
# memory); on a CPU, cache-sized chunks are faster than one huge matmul (measured: 64 rows ~1.8x faster
# than 544 rows at once for the tiny presets).
MAX_SEQUENCES_PER_FORWARD = 8192
CPU_SEQUENCES_PER_FORWARD = 64


def _candidate_table(tokenizer: Tokenizer, model: CLIP | Sequence[CLIP], device: torch.device) -> Tensor:
    ids = tokenizer.trigger_candidates()
    ids = ids[ids < min(m.vocab_size for m in surrogate_list(model))]
    if ids.numel() == 0:
        raise ValueError("the tokenizer has no trigger candidates (whole lower-case words) within the model's vocabulary")
    return ids.to(device)


def hotflip_scores(
    model: CLIP, tokens: Tensor, image_features: Tensor, trigger_length: int, candidate_ids: Tensor,
    negatives: Negatives | None = None,
) -> Tensor:
    """HotFlip's estimate [B, trigger_length, C] of how much writing each candidate into each trigger slot
    LOWERS the loss: -grad . E^T, from one gradient of the batch loss w.r.t. the slots' token embeddings."""
    embeddings = model.token_embedding(tokens).detach().requires_grad_(True)
    loss = pair_losses(image_features, encode_text_trimmed(model, tokens, embeddings), model.logit_scale,
                       negatives).mean()
    (grad,) = torch.autograd.grad(loss, embeddings)
    grad = grad[:, 1 : 1 + trigger_length].float()  # [B, k, W]
    table = model.token_embedding.weight.detach()[candidate_ids].float()  # [C, W]
    return -grad @ table.t()


def hotflip_candidates(
    model: CLIP | Sequence[CLIP], tokens: Tensor, image_features: Tensor | Sequence[Tensor], trigger_length: int,
    candidate_ids: Tensor, k: int, negatives: Negatives | list[Negatives | None] | None = None,
    barred: Tensor | None = None,
) -> Tensor:
    """Top-k replacement ids [B, trigger_length, k] per trigger slot by HotFlip, on the device.

    With an ensemble (image_features one tensor per model), each model's estimate is summed: the
    candidates expected to lower the mean loss. barred [B, C] (optional): candidates a row may not take,
    ranked last.
    """
    models, negs = surrogates_and_negatives(model, negatives)
    features = [image_features] if isinstance(image_features, Tensor) else list(image_features)
    scores = sum(hotflip_scores(m, tokens, f, trigger_length, candidate_ids, n)
                 for m, f, n in zip(models, features, negs, strict=True))
    if barred is not None:
        scores = scores.masked_fill(barred[:, None, :], -math.inf)
    top = scores.topk(min(k, candidate_ids.numel()), dim=-1).indices
    return candidate_ids[top]


def score_position(
    model: CLIP, tokens: Tensor, image_features: Tensor, position: int, options: Tensor,
    negatives: Negatives | None = None,
) -> Tensor:
    """Per-pair loss [K, B] of writing options[:, c] (ids [B, K]) at token `position`, all K in ONE batch.

    Only the text tower runs (image_features are cached); every row keeps the other rows' texts as
    they are in `tokens`, as when each candidate is tried on a copy of the batch.
    """
    b, length = tokens.shape
    k = options.shape[1]
    batched = tokens.unsqueeze(0).expand(k, b, length).clone()
    batched[:, :, position] = options.t()
    flat = batched.reshape(k * b, length)
    chunk = MAX_SEQUENCES_PER_FORWARD if tokens.device.type == "cuda" else CPU_SEQUENCES_PER_FORWARD
    features = torch.cat([encode_text_trimmed(model, flat[i : i + chunk]) for i in range(0, flat.shape[0], chunk)])
    return pair_losses(image_features, features.reshape(k, b, -1), model.logit_scale, negatives)


def own_words(tokens: Tensor, vocab_size: int) -> Tensor:
    """bool [B, vocab_size]: which ids occur in each row of tokens (the caption's own words)."""
    own = torch.zeros(tokens.shape[0], vocab_size, dtype=torch.bool, device=tokens.device)
    return own.scatter_(1, tokens.clamp(0, vocab_size - 1), True)


def search_triggers(
    model: CLIP | Sequence[CLIP], tokenizer: Tokenizer, images_u8: Tensor, delta: Tensor, tokens: Tensor, triggers: Tensor,
    settings: MEMSettings, negatives: Negatives | list[Negatives | None] | None = None,
    candidate_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Greedy left-to-right HotFlip search; returns (new triggers [B, k], per-pair loss [B]).

    tokens: caption tokens [B, L] with k trigger slots; triggers [B, k] the current ids. Each slot's
    options are the current id plus the top `candidates` HotFlip ids; each pair keeps its best option.
    With an ensemble of models, options are scored by the mean of their losses. With
    settings.foreign_triggers, no new option is a word of the pair's own caption (tokens outside the slots).
    """
    models, negs = surrogates_and_negatives(model, negatives)
    k = triggers.shape[1]
    device = images_u8.device
    if candidate_ids is None:
        candidate_ids = _candidate_table(tokenizer, models, device)
    own = own_words(tokens, max(m.vocab_size for m in models)) if settings.foreign_triggers else None
    with _autocast(settings, device):
        with torch.no_grad():
            image_features = [_encode_images(m, images_u8, delta) for m in models]
        current = triggers.clone()
        proposals = hotflip_candidates(models, _with_triggers(tokens, current), image_features, k, candidate_ids,
                                       settings.candidates, negs, None if own is None else own[:, candidate_ids])
        loss = None
        with torch.no_grad():
            for j in range(k):
                options = torch.cat([current[:, j : j + 1], proposals[:, j]], dim=1)  # [B, 1 + K]
                base = _with_triggers(tokens, current)
                losses = sum(score_position(m, base, f, 1 + j, options, n)
                             for m, f, n in zip(models, image_features, negs)) / len(models)
                if own is not None:  # (a row with fewer allowed candidates than K got barred ones ranked last)
                    barred = own.gather(1, options)
                    barred[:, 0] = False  # the current token stays an option
                    losses = losses.masked_fill(barred.t(), math.inf)
                best = losses.argmin(dim=0)  # ties keep the current token (option 0)
                current[:, j] = options.gather(1, best[:, None]).squeeze(1)
                loss = losses.gather(0, best[None]).squeeze(0)
    return current, loss
