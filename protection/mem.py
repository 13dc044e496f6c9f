"""Multimodal Unlearnable Examples (MEM): per-image noise on the uint8 grid plus a short text trigger.

MEM (Liu et al., ACM MM 2024) makes image-caption pairs useless for contrastive training: each image
gets an imperceptible noise and each caption a k-word trigger, both chosen to MINIMISE a surrogate
CLIP's contrastive loss, so a model trained on the pairs learns the shortcut noise <-> trigger instead
of image <-> caption. This implementation follows the method and fixes the official code's costs:

- trigger search: the image embeddings of a batch are computed once and cached; HotFlip scoring runs
  on the device over the trigger candidates only; all candidates of one position are scored in ONE
  batched text-tower forward; the current token stays a candidate, so the loss never increases;
- candidates are tokens that survive decode -> tokenize (tokenizer.trigger_candidates()), never
  start/end-of-text or padding, so the published caption text carries exactly the optimised trigger;
- noise: PGD on the uint8 grid (an int16 delta on the device, stored as int8 with |delta| <=
  round(epsilon * 255)); protected = clip(image + delta, 0, 255) is exactly what a PNG holds;
- the causal text tower runs only up to the batch's last end-of-text token (padding never matters);
- batches gather and scatter with array indexing (no per-sample loops); bfloat16 autocast on CUDA and on
  CPUs with bfloat16 matrix units (AMX);
- the surrogate's AdamW is fused (one kernel over all its tensors; PyTorch's default loops per tensor on a CPU);
- a ResNet surrogate's BatchNorm normalises each attacked batch with its own statistics (norm_stats), as a
  hacker's model in training does, instead of averages that lag a young surrogate's weights;
- run_mem() reads images decoded once (uint8 [N, H, W, 3]) and keeps the noise in an int8 array
  that may be an np.memmap (1 byte per sub-pixel per IMAGE, instead of float32 per caption);
- an image with several captions (Flickr and COCO have five) gets ONE noise and ONE trigger, and each
  pass pairs it with one of its captions (CaptionsPerImage): a pass costs one PGD per image, not one
  per caption, and the published image is a single file whatever its number of captions.

EM mode (trigger_length = 0) is the unimodal error-minimising baseline: noise only, no shuffle.

Word-wise noise (settings.word_textures = K) parameterises the noise differently: the K caption words used most
each own one small texture, tiled over the image and SHARED by every image; an image's noise is the clipped sum
of its words' textures (with texture_sign, that sum's sign: the full +-epsilon) and its trigger names those
words. Error minimisation (texture_pass) moves the textures instead of each image's pixels, and the triggers are
drawn, not searched (with foreign_triggers, from the words the image's own captions do not use). A hacker then
learns each of the captions' own words as a pattern: with the sign on 2-px tiles and foreign words (the
word-code preset) ResNet hackers trained from scratch kept about 1x chance, where per-image noise kept about 4x
(measured on synthetic scenes: BENCHMARKS.md, "MEM protection: efficacy"). With texture_gray the textures are
luminance only, which grayscale re-encoding keeps whole.

Several surrogates (an ensemble, e.g. a ViT and a ResNet) may be given to new_state, search_triggers and
pgd_noise (and so to run_mem): the noise and the triggers then minimise the MEAN of their losses, and each
surrogate trains on the same batches. save_surrogate writes every member into one artefact and
protect_batch protects against all of them, so protect-on-upload gives what the job gave. A
hacker's architecture is unknown to the data owner; noise made against one architecture transfers only
partly to another, and an ensemble asks it to fool both at once.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import logging
import time
from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .clip import CLIP, MAX_LOGIT_SCALE, CLIPConfig, contrastive_loss, normalize_images
from .settings import MEMSettings
from .tokenizer import Tokenizer, apply_trigger_text

log = logging.getLogger(__name__)

SURROGATE_FORMAT = "aigis-mem-surrogate-1"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
NEGATIVES_FILE = "negatives.safetensors"
WORD_CODE_FILE = "word_code.safetensors"
META_FILE = "meta.json"

# The most text sequences one batched candidate forward may hold. On a GPU, one big forward (bounded by
# memory); on a CPU, cache-sized chunks are faster than one huge matmul (measured: 64 rows ~1.8x faster
# than 544 rows at once for the tiny presets).
MAX_SEQUENCES_PER_FORWARD = 8192
CPU_SEQUENCES_PER_FORWARD = 64


def _device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# Protect-on-upload's stored (image [M, D], text [M, D]) embeddings of one surrogate.
Negatives = tuple[Tensor, Tensor]


def surrogate_list(model: CLIP | Sequence[CLIP]) -> list[CLIP]:
    """One CLIP or an ensemble of them, as a non-empty list whose models agree on what they read."""
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    if not models:
        raise ValueError("need at least one surrogate CLIP")
    first = models[0]
    for other in models[1:]:
        if (other.image_resolution, other.context_length) != (first.image_resolution, first.context_length):
            raise ValueError(f"an ensemble's surrogates must share image resolution and context length, got "
                             f"{first.image_resolution} px / {first.context_length} and "
                             f"{other.image_resolution} px / {other.context_length}")
    return models


def surrogates_and_negatives(
    model: CLIP | Sequence[CLIP], negatives: Negatives | list[Negatives | None] | None = None,
) -> tuple[list[CLIP], list[Negatives | None]]:
    """The surrogates as a list, and each one's negatives. Negatives are embeddings in ONE model's space,
    so an ensemble takes a list with an entry (or None) per member; a lone (image, text) pair is for a
    lone model only."""
    models = surrogate_list(model)
    if negatives is None:
        return models, [None] * len(models)
    if isinstance(negatives, list):
        if len(negatives) != len(models):
            raise ValueError(f"{len(negatives)} negatives entries for {len(models)} surrogates: need one per member")
        return models, list(negatives)
    if len(models) > 1:
        raise ValueError("negatives belong to one surrogate; give an ensemble a list with one entry per member")
    return models, [negatives]


@contextmanager
def attack_mode(models: Sequence[CLIP], batch_statistics: bool = False):
    """The surrogates frozen and in eval mode while PGD and the trigger search use them (only the noise and
    the trigger embeddings need gradients). With batch_statistics, their BatchNorm layers normalise with
    each batch's own statistics, as in training, and leave the stored averages untouched."""
    was_training = [m.training for m in models]
    frozen = [p for m in models for p in m.parameters() if p.requires_grad]
    switched = []
    for m in models:
        m.eval()
        if batch_statistics:
            for layer in m.modules():
                if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm):
                    switched.append((layer, layer.track_running_stats))
                    layer.train()
                    layer.track_running_stats = False
    for parameter in frozen:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter in frozen:
            parameter.requires_grad_(True)
        for layer, tracked in switched:
            layer.track_running_stats = tracked
        for m, mode in zip(models, was_training):
            m.train(mode)


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (Intel Xeon since Sapphire Rapids), where oneDNN runs bfloat16
    convolutions and matmuls on matrix units. The probe is PyTorch's private API: if it moves, no."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except Exception:  # noqa: BLE001 - an unknown CPU is treated as one without
        return False


def autocast_enabled(amp: str, device: torch.device) -> bool:
    """Whether MEM's models run under bfloat16 autocast for MEMSettings.amp on this device.

    "auto" turns it on for CUDA and for a CPU with AMX, where no kind of MEM step measured slower with it
    and RN50 at 224 px ran 3x faster (BENCHMARKS.md, "bfloat16 autocast"); other CPUs were not measured:
    float32.
    """
    if amp != "auto":
        return amp == "on"
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_amx())


def _autocast(settings: MEMSettings, device: torch.device):
    on = autocast_enabled(settings.amp, device)
    return torch.autocast(device.type, dtype=torch.bfloat16) if on else nullcontext()


# ----------------------------------------------------------------------------------------------
# Loss


def pair_losses(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor,
    negatives: Negatives | None = None,
) -> Tensor:
    """Per-pair symmetric InfoNCE: image_features [B, D], text_features [..., B, D] -> [..., B].

    The mean over the last axis equals clip.contrastive_loss. Leading axes of text_features are
    alternatives (e.g. trigger candidates) each scored against the same images. negatives, when given,
    are extra (image [M, D], text [M, D]) embeddings that every pair is contrasted with as well, so a
    batch of one image still has a loss to minimise (protect-on-upload).
    """
    scale = logit_scale.float().exp().clamp(max=MAX_LOGIT_SCALE)
    image = F.normalize(image_features.float(), dim=-1)
    text = F.normalize(text_features.float(), dim=-1)
    logits = scale * torch.matmul(text, image.t()).transpose(-1, -2)  # [..., B_img, B_txt]
    positive = logits.diagonal(dim1=-2, dim2=-1)
    i2t, t2i = logits, logits.transpose(-1, -2)
    if negatives is not None:
        neg_image = F.normalize(negatives[0].float().to(image.device), dim=-1)
        neg_text = F.normalize(negatives[1].float().to(image.device), dim=-1)
        extra_i2t = (scale * image @ neg_text.t()).expand(*i2t.shape[:-1], neg_text.shape[0])
        i2t = torch.cat([i2t, extra_i2t], dim=-1)
        t2i = torch.cat([t2i, scale * text @ neg_image.t()], dim=-1)
    return (torch.logsumexp(i2t, dim=-1) + torch.logsumexp(t2i, dim=-1)) / 2 - positive


# ----------------------------------------------------------------------------------------------
# One batch: trigger search and PGD against a fixed model


def _images_for_model(model: CLIP, images_float01_nhwc: Tensor) -> Tensor:
    """[B, H, W, 3] in [0, 1] -> normalised [B, 3, r, r]; other sizes are resized differentiably."""
    x = images_float01_nhwc.permute(0, 3, 1, 2)
    r = model.image_resolution
    if x.shape[-2:] != (r, r):
        x = F.interpolate(x, size=(r, r), mode="bilinear", align_corners=False, antialias=True)
    return normalize_images(x)


def _encode_images(model: CLIP, images_u8: Tensor, delta: Tensor) -> Tensor:
    return model.encode_image(_images_for_model(model, (images_u8.float() + delta.float()) / 255.0))


def encode_text_trimmed(model: CLIP, tokens: Tensor, token_embeddings: Tensor | None = None) -> Tensor:
    """model.encode_text on the batch cut just after its last end-of-text token.

    The text tower is causal, so its output at each row's end-of-text position never depends on the
    padding after it: the same embedding, without computing ~half the positions of short captions.
    """
    if not model.transformer.causal:
        return model.encode_text(tokens, token_embeddings)
    eot = tokens.argmax(dim=-1)
    length = int(eot.max()) + 1
    x = model.token_embedding(tokens[:, :length]) if token_embeddings is None else token_embeddings[:, :length]
    x = x.to(model.dtype) + model.positional_embedding[:length].to(model.dtype)
    x = model.ln_final(model.transformer(x))
    return x[torch.arange(x.shape[0], device=x.device), eot] @ model.text_projection


def _with_triggers(tokens: Tensor, triggers: Tensor) -> Tensor:
    """Write each row's trigger ids [B, k] into its slots 1..k (after SOT)."""
    if triggers.shape[1] == 0:
        return tokens
    tokens = tokens.clone()
    tokens[:, 1 : 1 + triggers.shape[1]] = triggers
    return tokens


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


def score_position_looped(
    model: CLIP, images_u8: Tensor, delta: Tensor, tokens: Tensor, position: int, options: Tensor,
    negatives: Negatives | None = None,
) -> Tensor:
    """The official way of doing score_position (kept for the equality test and the benchmark): one
    candidate at a time on a deep copy of the batch, re-running the image tower every time."""
    rows = []
    for c in range(options.shape[1]):
        trial = copy.deepcopy(tokens)
        for i in range(trial.shape[0]):  # per-sample writes, as the official code does
            trial[i, position] = options[i, c]
        image_features = _encode_images(model, images_u8, delta)
        rows.append(pair_losses(image_features, model.encode_text(trial), model.logit_scale, negatives))
    return torch.stack(rows)


def own_words(tokens: Tensor, vocab_size: int) -> Tensor:
    """bool [B, vocab_size]: which ids occur in each row of tokens (the caption's own words)."""
    own = torch.zeros(tokens.shape[0], vocab_size, dtype=torch.bool, device=tokens.device)
    return own.scatter_(1, tokens.clamp(0, vocab_size - 1), True)


def search_triggers(
    model: CLIP | Sequence[CLIP], tokenizer: Tokenizer, images_u8: Tensor, delta: Tensor, tokens: Tensor, triggers: Tensor,
    settings: MEMSettings, negatives: Negatives | list[Negatives | None] | None = None,
    candidate_ids: Tensor | None = None, _looped: bool = False,
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
                if _looped:
                    losses = sum(score_position_looped(m, images_u8, delta, base, 1 + j, options, n)
                                 for m, n in zip(models, negs)) / len(models)
                else:
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


# ----------------------------------------------------------------------------------------------
# Protect-on-upload against a frozen surrogate


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


# ----------------------------------------------------------------------------------------------
# The outer loop


class CaptionsPerImage:
    """Which captions describe which image: caption_image[c] is the image of caption c.

    MEM keeps one noise and one trigger per IMAGE; every pass pairs each image with one of its captions
    drawn at random, so over the passes the noise and trigger must fit all of them.
    """

    def __init__(self, caption_image: np.ndarray, n_images: int):
        caption_image = np.asarray(caption_image)
        if caption_image.ndim != 1 or caption_image.dtype.kind not in "iu":
            raise ValueError(f"caption_image must be a 1-D integer array, got {caption_image.dtype} "
                             f"{list(caption_image.shape)}")
        if caption_image.size and (caption_image.min() < 0 or caption_image.max() >= n_images):
            raise ValueError(f"caption_image holds image indices outside [0, {n_images})")
        counts = np.bincount(caption_image.astype(np.int64), minlength=n_images)
        if (counts == 0).any():
            raise ValueError(f"image {int(np.argmin(counts))} of {n_images} has no caption")
        self.image_of = caption_image  # image index of each caption
        self.counts = counts
        self.order = np.argsort(caption_image, kind="stable")  # caption ids grouped by image
        self.starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self.one_each = bool((counts == 1).all())

    @classmethod
    def single(cls, n: int) -> "CaptionsPerImage":
        return cls(np.arange(n), n)

    @classmethod
    def by_key(cls, keys: list) -> "CaptionsPerImage":
        """Captions with equal keys (e.g. resolved image paths) describe one image; images are numbered in
        order of first appearance."""
        index: dict = {}
        return cls(np.array([index.setdefault(k, len(index)) for k in keys], dtype=np.int64), len(index))

    @property
    def n_captions(self) -> int:
        return int(self.order.size)

    @property
    def n_images(self) -> int:
        return int(self.counts.size)

    def first(self, images: np.ndarray) -> np.ndarray:
        """The first caption id of each image."""
        return self.order[self.starts[images]]

    def pick(self, images: np.ndarray, generator: torch.Generator) -> np.ndarray:
        """One caption id per image, at random (no draw when every image has one caption)."""
        if self.one_each:
            return self.first(images)
        counts = self.counts[images]
        u = torch.rand(len(images), generator=generator, dtype=torch.float64).numpy()
        return self.order[self.starts[images] + np.minimum((u * counts).astype(np.int64), counts - 1)]


@dataclass
class MEMState:
    """Everything run_mem changes, i.e. what a checkpoint must hold."""

    model: CLIP  # the primary surrogate (an ensemble's first)
    optimizer: torch.optim.Optimizer
    generator: torch.Generator  # CPU generator: batch sampling, pass order, caption shuffles
    noise: np.ndarray  # int8 [N, H, W, 3], may be an np.memmap
    triggers: np.ndarray  # int64 [N, trigger_length]
    iteration: int = 0  # outer iterations completed
    history: list[dict] = field(default_factory=list)
    # Further surrogates of an ensemble, each with its own optimiser; trained on the same batches.
    extra_surrogates: list[tuple[CLIP, torch.optim.Optimizer]] = field(default_factory=list)
    # Word-wise noise (settings.word_textures): the shared textures (float [K, t, t, 3], or [K, t, t, 1] if gray,
    # in [-1, 1], on the CPU), the token id of the word that owns each, and each image's words (indices into them,
    # [N, words_per_image]).
    textures: Tensor | None = None
    texture_words: Tensor | None = None
    word_sets: np.ndarray | None = None

    @property
    def surrogates(self) -> list[tuple[CLIP, torch.optim.Optimizer]]:
        return [(self.model, self.optimizer), *self.extra_surrogates]

    @property
    def models(self) -> list[CLIP]:
        return [m for m, _ in self.surrogates]


def make_optimizer(model: CLIP, settings: MEMSettings, fused: bool = True) -> torch.optim.Optimizer:
    """AdamW as CLIP trains (betas 0.9/0.98, eps 1e-6), no decay on gains, biases and embeddings.

    fused: one kernel over every tensor (the same update up to rounding); False leaves PyTorch's default
    (a loop per tensor on a CPU, grouped foreach kernels on CUDA), as the benchmark's official way does.
    Every surrogate step updates the whole token table (CLIP's has 49,408 rows); on a CPU the per-tensor
    loop over CLIP's was half of a rn_tiny step at batch 32. A checkpoint's param groups carry their
    own `fused`, so a resumed job keeps the step it was written with.
    """
    from .retrieval import _param_groups

    fused = fused and all(p.device.type in ("cpu", "cuda") for p in model.parameters())  # where PyTorch has it
    return torch.optim.AdamW(_param_groups(model, settings.weight_decay), lr=settings.lr, betas=(0.9, 0.98), eps=1e-6,
                             fused=fused or None)


def new_state(model: CLIP | Sequence[CLIP], tokenizer: Tokenizer, n: int, image_shape: tuple[int, int],
              settings: MEMSettings, noise: np.ndarray | None = None) -> MEMState:
    """A fresh state: zero noise (or the given int8 array, e.g. a memmap, zeroed), placeholder triggers.
    model may be an ensemble (a list; the first is the primary surrogate)."""
    settings.validate()
    models = surrogate_list(model)
    if len({id(m) for m in models}) != len(models):
        raise ValueError("an ensemble names the same model twice (it would train twice per batch)")
    shape = (n, *image_shape, 3)
    if noise is None:
        noise = np.zeros(shape, dtype=np.int8)
    else:
        if noise.dtype != np.int8 or noise.shape != shape:
            raise ValueError(f"noise store must be int8 {list(shape)}, got {noise.dtype} {list(noise.shape)}")
        noise[...] = 0
    triggers = np.full((n, settings.trigger_length), tokenizer.placeholder_id, dtype=np.int64)
    return MEMState(models[0], make_optimizer(models[0], settings), torch.Generator().manual_seed(settings.seed),
                    noise, triggers, extra_surrogates=[(m, make_optimizer(m, settings)) for m in models[1:]])


def restart_due(settings: MEMSettings, iteration: int, member: int, members: int) -> bool:
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


def restart_surrogates(state: MEMState, settings: MEMSettings) -> list[int]:
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


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[np.ndarray]:
    """A random partition into ceil(n / batch_size) batches of near-equal size (never a batch of one)."""
    order = torch.randperm(n, generator=generator).numpy()
    count = max(1, math.ceil(n / batch_size))
    return [np.sort(chunk) for chunk in np.array_split(order, count)]


def train_surrogate(state: MEMState, images: np.ndarray, tokens: Tensor, settings: MEMSettings,
                    device: torch.device, groups: CaptionsPerImage | None = None) -> float:
    """settings.surrogate_steps AdamW steps on random batches of (image + noise, triggered caption):
    distinct images, each with one of its captions (tokens [n_captions, L]). Every surrogate of an
    ensemble takes a step on each batch; the returned loss is their mean."""
    n = images.shape[0]
    groups = groups or CaptionsPerImage.single(n)
    b = min(settings.batch_size, n)
    losses = []
    for model in state.models:
        model.train()
    for _ in range(settings.surrogate_steps):
        index = torch.randperm(n, generator=state.generator)[:b].sort().values.numpy()
        x = torch.from_numpy(images[index]).to(device).to(torch.int16)
        x = (x + torch.from_numpy(np.asarray(state.noise[index])).to(device)).clamp(0, 255).to(torch.uint8)
        t = _with_triggers(tokens[groups.pick(index, state.generator)],
                           torch.from_numpy(state.triggers[index])).to(device)
        step_losses = []
        for model, optimizer in state.surrogates:
            with _autocast(settings, device):
                loss = contrastive_loss(model.encode_image(normalize_images(x)), encode_text_trimmed(model, t),
                                        model.logit_scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(MAX_LOGIT_SCALE))
            step_losses.append(float(loss.detach()))
        losses.append(float(np.mean(step_losses)))
    for model in state.models:
        model.eval()
    return float(np.mean(losses)) if losses else float("nan")


def perturb_pass(state: MEMState, tokenizer: Tokenizer, images: np.ndarray, tokens: Tensor, settings: MEMSettings,
                 device: torch.device, update_triggers: bool, groups: CaptionsPerImage | None = None) -> float:
    """One pass over the images in batches, each with one of its captions: trigger search (if
    update_triggers), then PGD on the noise."""
    models = state.models
    groups = groups or CaptionsPerImage.single(images.shape[0])
    candidate_ids = _candidate_table(tokenizer, models, device) if settings.trigger_length else None
    losses = []
    with attack_mode(models, batch_statistics=settings.norm_stats == "batch"):
        for index in _batches(images.shape[0], settings.batch_size, state.generator):
            x = torch.from_numpy(images[index]).to(device)
            delta = torch.from_numpy(np.asarray(state.noise[index])).to(device).to(torch.int16)
            t = tokens[groups.pick(index, state.generator)].to(device)
            trig = torch.from_numpy(state.triggers[index]).to(device)
            if update_triggers and settings.trigger_length:
                trig, _ = search_triggers(models, tokenizer, x, delta, t, trig, settings, candidate_ids=candidate_ids)
                state.triggers[index] = trig.cpu().numpy()
            delta, loss = pgd_noise(models, x, delta, t, trig, settings, settings.pgd_steps, state.generator)
            state.noise[index] = delta.to(torch.int8).cpu().numpy()
            losses.append(loss)
    return float(np.mean(losses))


# ----------------------------------------------------------------------------------------------
# Word-wise noise: shared textures owned by caption words (settings.word_textures)


def texture_owners(tokenizer: Tokenizer, captions: list[str], models: Sequence[CLIP], count: int) -> Tensor:
    """Token ids [<= count] of the trigger candidates the captions use most (ties: the lower id first)."""
    candidates = set(_candidate_table(tokenizer, models, torch.device("cpu")).tolist())
    counts = Counter(i for caption in captions for i in tokenizer.encode(caption) if i in candidates)
    return torch.tensor(sorted(counts, key=lambda i: (-counts[i], i))[:count], dtype=torch.long)


def init_word_code(state: MEMState, tokenizer: Tokenizer, captions: list[str], settings: MEMSettings,
                   groups: CaptionsPerImage | None = None) -> None:
    """Pick the words that own textures, draw every image's words (a set no other image has; with
    foreign_triggers, none of them a word of the image's own captions) and its trigger (those words cycled in a
    random order), and start every texture, hence every noise, at zero."""
    n, m, length = state.noise.shape[0], settings.words_per_image, settings.trigger_length
    words = texture_owners(tokenizer, captions, state.models, settings.word_textures)
    k = len(words)
    if k < m or math.comb(k, m) < n:
        raise ValueError(f"word textures: the captions use {k} distinct words that can be triggers, which give "
                         f"{math.comb(k, m) if k >= m else 0} sets of {m} for {n} images; lower words_per_image "
                         f"or give the captions more words")
    rng = np.random.default_rng(settings.seed)
    if settings.foreign_triggers:
        word_sets = _foreign_word_sets(words, tokenizer, captions, groups or CaptionsPerImage.single(n), m, rng)
    else:
        sets: set[tuple[int, ...]] = set()
        while len(sets) < n:
            sets.add(tuple(sorted(rng.choice(k, size=m, replace=False).tolist())))
        word_sets = np.array(sorted(sets), dtype=np.int64)[rng.permutation(n)]
    for i, chosen in enumerate(word_sets):
        order = rng.permutation(chosen)
        state.triggers[i] = words[[int(order[j % m]) for j in range(length)]].numpy()
    state.word_sets = word_sets
    state.texture_words = words
    channels = 1 if settings.texture_gray else 3
    state.textures = torch.zeros(k, settings.texture_tile, settings.texture_tile, channels)
    state.noise[...] = 0


def _foreign_word_sets(words: Tensor, tokenizer: Tokenizer, captions: list[str], groups: CaptionsPerImage, m: int,
                       rng: np.random.Generator, tries: int = 1000) -> np.ndarray:
    """[N, m] indices into words: per image, m words none of its captions uses, a set no other image has. A
    caption word then names another image's texture more often than its own content, so a hacker that reads
    it as content gains less (the reasoning of foreign_triggers)."""
    own: list[set[int]] = [set() for _ in range(groups.n_images)]
    for c, caption in enumerate(captions):
        own[int(groups.image_of[c])].update(tokenizer.encode(caption))
    ids = words.tolist()
    taken: set[tuple[int, ...]] = set()
    word_sets = np.empty((groups.n_images, m), dtype=np.int64)
    for i, mine in enumerate(own):
        allowed = np.array([j for j, w in enumerate(ids) if w not in mine], dtype=np.int64)
        if len(allowed) < m:
            raise ValueError(f"word textures with foreign_triggers: image {i}'s captions use all but "
                             f"{len(allowed)} of the {len(ids)} texture words, fewer than words_per_image ({m})")
        for _ in range(tries):
            chosen = tuple(sorted(rng.choice(allowed, size=m, replace=False).tolist()))
            if chosen not in taken:
                break
        else:
            raise ValueError(f"word textures with foreign_triggers: no unused set of {m} words left for image {i}; "
                             f"lower words_per_image or give the captions more words")
        taken.add(chosen)
        word_sets[i] = chosen
    return word_sets


def word_code_noise(textures: Tensor, word_sets: Tensor, height: int, width: int, levels: int,
                    sign: bool = False) -> Tensor:
    """float [B, H, W, C] in +-levels: each image's textures (word_sets [B, m]) summed, clipped to [-1, 1]
    (sign: the sum's sign, its gradient passed straight through), repeated over the image. C is the textures'
    channels: 3, or 1 for gray textures (it broadcasts over R, G and B when added to an image)."""
    tile = textures.shape[1]
    total = textures[word_sets].sum(1).clamp(-1, 1)
    if sign:
        total = total + (torch.sign(total) - total).detach()
    return levels * total.repeat(1, -(-height // tile), -(-width // tile), 1)[:, :height, :width]


def _write_word_noise(state: MEMState, images: np.ndarray, settings: MEMSettings) -> None:
    """state.noise <- the textures' noise on the uint8 grid, kept inside [0, 255] once added."""
    n, h, w, _ = images.shape
    for i in range(0, n, 256):
        sets = torch.from_numpy(state.word_sets[i : i + 256])
        noise = word_code_noise(state.textures, sets, h, w, settings.epsilon_levels, settings.texture_sign)
        noise = noise.round().to(torch.int16)
        pixels = torch.from_numpy(images[i : i + 256]).to(torch.int16)
        state.noise[i : i + 256] = ((pixels + noise).clamp(0, 255) - pixels).to(torch.int8).numpy()


@dataclass
class WordCode:
    """A word-texture job's code over its whole data set: textures[k] (float [K, t, t, C]) is the pattern that
    token id words[k] names. Saved with the surrogate, it lets protect-on-upload give new images the SAME code,
    so each word still means one pattern across the job's images and every upload."""

    textures: Tensor
    words: Tensor


def load_word_code(directory: str | Path, meta: dict, settings: MEMSettings) -> WordCode | None:
    """The artefact's word code (None if its job had none), checked against the settings it is served with;
    load_surrogates has checked its sha256."""
    from safetensors.torch import load_file

    if WORD_CODE_FILE not in meta.get("files", {}):
        return None
    stored = load_file(str(_inside(Path(directory), WORD_CODE_FILE)))
    textures, words = stored["textures"], stored["words"]
    channels = 1 if settings.texture_gray else 3
    if textures.ndim != 4 or textures.shape[0] != words.shape[0] or textures.shape[1] != textures.shape[2] \
            or textures.shape[3] != channels or words.shape[0] < settings.words_per_image:
        raise ValueError(f"{directory}: a word code of textures {list(textures.shape)} for {list(words.shape)} words "
                         f"does not fit settings with {channels}-channel textures and {settings.words_per_image} "
                         f"words per image")
    return WordCode(textures, words)


def upload_size_error(height: int, width: int, code_size: int) -> str | None:
    """Why an upload cannot carry a word code made at code_size px (None: it can)."""
    if min(height, width) < code_size:
        return (f"a {height}x{width} upload is smaller than the {code_size} px the word code was made at: its "
                f"texture tiles cannot be drawn")
    return None


def _ranked_words(allowed: np.ndarray, key: bytes) -> np.ndarray:
    """allowed, ordered by a hash of (key, word index): a draw that depends on nothing but its inputs."""
    scores = [hashlib.sha256(key + int(j).to_bytes(4, "little")).digest() for j in allowed]
    return allowed[np.argsort(scores, kind="stable")]


def protect_with_word_code(
    code: WordCode, tokenizer: Tokenizer, images_uint8: np.ndarray, captions: list[str], settings: MEMSettings,
    code_size: int,
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Protect uploads with a job's word code: no search, no surrogate. Returns what protect_batch returns.

    Each image gets words_per_image of the code's words -- with foreign_triggers none of its caption's words,
    unless the caption uses so many that too few are left -- chosen by a hash of its pixels and caption (the
    same upload is protected the same way every time, on any machine). Its noise is those words' textures as the
    job draws them, in blocks of (short side / code_size) px aligned with the centre crop a model takes (the job
    published short-side-resized, centre-cropped images), so a model resizing the upload reads the job's code;
    its trigger names the words, cycled to trigger_length. Uploads under code_size px are refused.
    """
    settings.validate()
    if not settings.word_textures:
        raise ValueError("protect_with_word_code needs word-texture settings (word_textures > 0)")
    _check_upload_batch(images_uint8, captions)
    n, h, w, _ = images_uint8.shape
    problem = upload_size_error(h, w, code_size)
    if problem:
        raise ValueError(problem)
    m, k = settings.words_per_image, settings.trigger_length
    ids = code.words.tolist()
    if len(ids) < m:
        raise ValueError(f"a word code of {len(ids)} words cannot give {m} words per image")
    word_sets = np.empty((n, m), dtype=np.int64)
    trigger_ids = np.empty((n, k), dtype=np.int64)
    for i, caption in enumerate(captions):
        own = set(tokenizer.encode(caption)) if settings.foreign_triggers else set()
        is_own = np.array([word in own for word in ids])
        key = hashlib.sha256(images_uint8[i].tobytes() + caption.encode("utf-8")).digest()
        chosen = np.concatenate([_ranked_words(np.flatnonzero(~is_own), key),
                                 _ranked_words(np.flatnonzero(is_own), key)])[:m]
        word_sets[i] = np.sort(chosen)
        trigger_ids[i] = [ids[int(chosen[j % m])] for j in range(k)]
    tile = code.textures.shape[1]
    period = word_code_noise(code.textures, torch.from_numpy(word_sets), tile, tile, settings.epsilon_levels,
                             settings.texture_sign).round().to(torch.int16)  # one tile of each image's noise
    short = min(h, w)
    # upload pixel y lies in code pixel floor((y - top) * code_size / short) of the centre crop; the code repeats
    # every `tile` code pixels, so pixels outside the crop continue the pattern
    rows = np.floor((np.arange(h) - (h - short) // 2) * code_size / short).astype(np.int64) % tile
    cols = np.floor((np.arange(w) - (w - short) // 2) * code_size / short).astype(np.int64) % tile
    noise = period[:, torch.from_numpy(rows)][:, :, torch.from_numpy(cols)]
    pixels = torch.from_numpy(np.ascontiguousarray(images_uint8)).to(torch.int16)
    protected = (pixels + noise).clamp(0, 255)
    delta = (protected - pixels).to(torch.int8).numpy()
    texts = [apply_trigger_text(trigger_ids[i], c, tokenizer) for i, c in enumerate(captions)]
    return protected.to(torch.uint8).numpy(), texts, delta


def served_settings(meta: dict, settings: MEMSettings | None = None) -> MEMSettings:
    """What a published mem_protect version protects uploads with: the job's settings (or `settings`) and, for a
    word-texture job whose artefact holds its code, that code (protect_with_word_code); otherwise a trigger
    search and PGD per request (protect_batch), per image."""
    settings = settings if settings is not None else MEMSettings.from_dict(meta.get("settings", {}))
    if settings.word_textures and WORD_CODE_FILE in meta.get("files", {}):
        return settings
    return settings.per_image()


def texture_pass(state: MEMState, images: np.ndarray, tokens: Tensor, settings: MEMSettings, device: torch.device,
                 groups: CaptionsPerImage) -> float:
    """One pass of error minimisation over the SHARED textures: per batch, pgd_steps signed-gradient steps of one
    noise level (step_levels / epsilon_levels of the textures' range; with texture_sign the published noise is
    their sum's sign, so a step may flip a sub-pixel -- with texture_gray a whole pixel -- across the whole range),
    each image against shuffled captions carrying its own trigger (as pgd_noise); then every image's noise is
    rewritten from the textures."""
    models = state.models
    h, w = images.shape[1:3]
    step = settings.step_levels / settings.epsilon_levels
    table = state.textures.to(device)
    losses = []
    with attack_mode(models, batch_statistics=settings.norm_stats == "batch"):
        for index in _batches(images.shape[0], settings.batch_size, state.generator):
            pixels = torch.from_numpy(images[index]).to(device).float()
            sets = torch.from_numpy(state.word_sets[index]).to(device)
            t = tokens[groups.pick(index, state.generator)].to(device)
            trig = torch.from_numpy(state.triggers[index]).to(device)
            for _ in range(settings.pgd_steps):
                order = torch.randperm(len(index), generator=state.generator).to(device)
                with torch.no_grad(), _autocast(settings, device):
                    shuffled = _with_triggers(t[order], trig)
                    text_features = [encode_text_trimmed(m, shuffled) for m in models]
                table.requires_grad_(True)
                noise = word_code_noise(table, sets, h, w, settings.epsilon_levels, settings.texture_sign)
                noisy = (pixels + noise).clamp(0, 255) / 255.0
                with _autocast(settings, device):
                    loss = sum(pair_losses(m.encode_image(_images_for_model(m, noisy)), f, m.logit_scale).mean()
                               for m, f in zip(models, text_features)) / len(models)
                (grad,) = torch.autograd.grad(loss, table)
                table = (table.detach() - step * grad.sign()).clamp(-1, 1)
                losses.append(float(loss.detach()))
    state.textures = table.cpu()
    _write_word_noise(state, images, settings)
    return float(np.mean(losses)) if losses else float("nan")


def run_mem(
    state: MEMState,
    tokenizer: Tokenizer,
    images: np.ndarray,
    captions: list[str],
    settings: MEMSettings,
    *,
    device: str | torch.device | None = None,
    groups: CaptionsPerImage | None = None,
    callback: Callable[[MEMState, dict], None] | None = None,
    progress: bool = True,
) -> MEMState:
    """MEM's outer loop from state.iteration to settings.outer_iterations (or settings.stop_loss).

    Each iteration trains the surrogate(s) (surrogate_steps batches), then perturbs every image once
    (triggers too during the first trigger_iterations; with settings.word_textures, the shared textures
    instead: texture_pass, its word code drawn by init_word_code before the first iteration). callback(state, stats) runs after each
    iteration (checkpointing); stats has iteration, surrogate_loss, pass_loss, images_per_s, pairs_per_s
    (image-caption pairs protected per second of the pass), seconds.
    images: uint8 [N, H, W, 3] decoded once, at the model's resolution. groups: which captions describe
    which image when an image has several (default: caption i describes image i).
    """
    settings.validate()
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 [N, H, W, 3], got {images.dtype} {list(images.shape)}")
    groups = groups or CaptionsPerImage.single(images.shape[0])
    if groups.n_images != images.shape[0] or groups.n_captions != len(captions):
        raise ValueError(f"{images.shape[0]} images and {len(captions)} captions, but the caption groups cover "
                         f"{groups.n_images} images and {groups.n_captions} captions")
    if state.noise.shape != images.shape or state.triggers.shape[0] != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images, noise {list(state.noise.shape)}, "
                         f"triggers {list(state.triggers.shape)}")
    if images.shape[0] < 2:
        raise ValueError("MEM needs at least 2 distinct images (a contrastive loss needs negatives)")
    device = _device(device)
    for model in state.models:
        model.to(device)
    tokens = tokenizer.tokenize(list(captions), state.model.context_length, settings.trigger_length)
    n = images.shape[0]
    if settings.word_textures and state.textures is None:
        init_word_code(state, tokenizer, captions, settings, groups)
    while not settings.finished(state.iteration, state.history[-1]["pass_loss"] if state.history else math.inf):
        started = time.monotonic()
        redrawn = restart_surrogates(state, settings)
        surrogate_loss = train_surrogate(state, images, tokens, settings, device, groups)
        trained = time.monotonic()
        update = state.iteration < settings.trigger_iterations and not settings.word_textures
        if settings.word_textures:
            pass_loss = texture_pass(state, images, tokens, settings, device, groups)
        else:
            pass_loss = perturb_pass(state, tokenizer, images, tokens, settings, device, update, groups)
        done = time.monotonic()
        state.iteration += 1
        stats = {
            "iteration": state.iteration,
            "surrogate_loss": surrogate_loss,
            "pass_loss": pass_loss,
            "triggers_updated": bool(update and settings.trigger_length),
            "surrogates_redrawn": redrawn,
            "surrogate_pairs_per_s": settings.surrogate_steps * min(settings.batch_size, n) / max(trained - started, 1e-9),
            "images_per_s": n / max(done - trained, 1e-9),
            "pairs_per_s": groups.n_captions / max(done - trained, 1e-9),  # every caption of an image is covered
            "seconds": done - started,
        }
        state.history.append(stats)
        if progress:
            rate = f"{stats['images_per_s']:.1f} images/s"
            if not groups.one_each:
                rate += f" = {stats['pairs_per_s']:.1f} pairs/s"
            log.info(
                f"MEM {state.iteration}/{settings.outer_iterations}: surrogate loss {surrogate_loss:.4f} "
                f"({stats['surrogate_pairs_per_s']:.0f} pairs/s), pass loss {pass_loss:.4f} "
                f"({rate}{', triggers' if stats['triggers_updated'] else ''}"
                f"{', surrogate ' + '+'.join(map(str, redrawn)) + ' re-drawn' if redrawn else ''}), "
                f"{stats['seconds']:.1f}s"
            )
        if callback is not None:
            callback(state, stats)
    if progress and state.iteration < settings.outer_iterations:
        log.info(f"MEM stopped after {state.iteration} outer iterations: pass loss "
                 f"{state.history[-1]['pass_loss']:.4f} <= stop_loss {settings.stop_loss}")
    return state


def protected_images(images: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """clip(image + noise, 0, 255) as uint8 (what is published)."""
    return np.clip(images.astype(np.int16) + np.asarray(noise, dtype=np.int16), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# The surrogate artefact


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 1 MiB blocks (artefacts, checkpoints and protected images)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _member_file(i: int, name: str) -> str:
    """Ensemble member i's copy of a file name; the primary (0) keeps the plain name."""
    return name if i == 0 else f"member{i}.{name}"


def save_surrogate(
    directory: str | Path, model: CLIP | Sequence[CLIP], tokenizer: Tokenizer, settings: MEMSettings,
    extra: dict[str, Any] | None = None, negatives: Negatives | list[Negatives | None] | None = None,
    word_code: WordCode | None = None,
) -> dict:
    """Write a surrogate artefact: model.safetensors, tokenizer.json, optional negatives and word code (a
    word-texture job's textures and their words, for protect-on-upload), meta.json (last).

    An ensemble's primary is written as a lone surrogate is; member i >= 1 adds member<i>.model.safetensors
    (and its negatives), listed with its config under meta["members"]. meta.json holds the format tag,
    the primary's CLIP config, the MEM settings, the sha256 of every file, and an identity derived from
    the weights' hash (an ensemble's: from all members' weights). `extra` is stored under "extra". No
    pickle anywhere.
    """
    from safetensors.torch import save_file

    models, negs = surrogates_and_negatives(model, negatives)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(directory / TOKENIZER_FILE)
    files = [TOKENIZER_FILE]
    members = []
    for i, (member, member_negatives) in enumerate(zip(models, negs)):
        weights = _member_file(i, WEIGHTS_FILE)
        state = {k: v.detach().to("cpu").contiguous() for k, v in member.state_dict().items()}
        save_file(state, str(directory / weights), metadata={"format": SURROGATE_FORMAT})
        files.append(weights)
        entry = {"config": dataclasses.asdict(member.config), "weights": weights, "negatives": None}
        if member_negatives is not None:
            entry["negatives"] = _member_file(i, NEGATIVES_FILE)
            save_file({"image": member_negatives[0].detach().float().cpu().contiguous(),
                       "text": member_negatives[1].detach().float().cpu().contiguous()},
                      str(directory / entry["negatives"]))
            files.append(entry["negatives"])
        members.append(entry)
    if word_code is not None:
        save_file({"textures": word_code.textures.detach().float().cpu().contiguous(),
                   "words": word_code.words.detach().to(torch.int64).cpu().contiguous()},
                  str(directory / WORD_CODE_FILE), metadata={"format": SURROGATE_FORMAT})
        files.append(WORD_CODE_FILE)
    hashes = {name: file_sha256(directory / name) for name in files}
    weight_hashes = [hashes[m["weights"]] for m in members]
    sha256 = weight_hashes[0] if len(members) == 1 else hashlib.sha256("\n".join(weight_hashes).encode()).hexdigest()
    meta = {
        "format": SURROGATE_FORMAT,
        "identity": f"mem-surrogate-{sha256[:16]}",
        "sha256": sha256,
        "files": hashes,
        "config": members[0]["config"],
        "settings": settings.to_dict(),
        "extra": extra or {},
    }
    if len(members) > 1:
        meta["members"] = [{"config": m["config"], "weights": m["weights"], "negatives": m["negatives"]}
                           for m in members[1:]]
    tmp = directory / f".{META_FILE}.tmp"
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
    tmp.replace(directory / META_FILE)
    return meta


def _inside(directory: Path, name: str) -> Path:
    """directory / name, refusing a name from meta.json that would leave the artefact's folder."""
    path = (directory / name).resolve()
    if not path.is_relative_to(directory.resolve()):
        raise ValueError(f"{directory}: meta.json names {name!r}, outside the artefact")
    return path


def load_surrogates(directory: str | Path) -> tuple[list[CLIP], Tokenizer, dict]:
    """(every surrogate of the artefact, the primary first, in eval mode on the CPU; tokenizer; meta)
    from save_surrogate's folder; every file's sha256 is checked. Saved negatives are attached to their
    model as model.mem_negatives for protect_batch."""
    from safetensors.torch import load_file

    directory = Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{directory}: not a surrogate artefact (no {META_FILE})")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{meta_path}: not valid JSON ({exc})") from None
    if meta.get("format") != SURROGATE_FORMAT:
        raise ValueError(f"{meta_path}: format {meta.get('format')!r}, expected {SURROGATE_FORMAT!r}")
    files = meta.get("files", {})
    for name, expected in files.items():
        path = _inside(directory, name)
        if not path.is_file():
            raise ValueError(f"{directory}: {name} is missing")
        if file_sha256(path) != expected:
            raise ValueError(f"{path}: sha256 does not match meta.json (the artefact was modified or is incomplete)")
    primary = {"config": meta["config"], "weights": WEIGHTS_FILE,
               "negatives": NEGATIVES_FILE if NEGATIVES_FILE in files else None}
    models = []
    for entry in [primary, *meta.get("members", [])]:
        for name in (entry["weights"], entry.get("negatives")):
            if name is not None and name not in files:
                raise ValueError(f"{meta_path}: {name} has no sha256 in meta.json")
        config = dict(entry["config"])
        if isinstance(config["vision_layers"], list):
            config["vision_layers"] = tuple(config["vision_layers"])
        model = CLIP(CLIPConfig(**config))
        model.load_state_dict(load_file(str(_inside(directory, entry["weights"]))), strict=True)
        model.eval()
        if entry.get("negatives") is not None:
            stored = load_file(str(_inside(directory, entry["negatives"])))
            model.mem_negatives = (stored["image"], stored["text"])
        models.append(model)
    surrogate_list(models)  # members must agree on resolution and context length
    tokenizer = Tokenizer.load(directory / TOKENIZER_FILE)
    return models, tokenizer, meta


def load_surrogate(directory: str | Path) -> tuple[CLIP, Tokenizer, dict]:
    """The artefact's primary surrogate alone (load_surrogates for an ensemble's every member)."""
    models, tokenizer, meta = load_surrogates(directory)
    return models[0], tokenizer, meta
