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

The parts: attack.py (the loss, the encoders, the frozen surrogates), search.py (the trigger search),
pgd.py (the noise), surrogate.py (the surrogate's training), state.py (what a checkpoint holds),
word_code.py (word-wise noise), upload.py (protect-on-upload), artefact.py (the saved surrogate). This
module holds the outer loop and keeps every public name of the parts importable from here.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from .artefact import (META_FILE, NEGATIVES_FILE, SURROGATE_FORMAT, TOKENIZER_FILE, WEIGHTS_FILE,  # noqa: F401
                       WORD_CODE_FILE, _inside, _member_file, file_sha256, load_surrogate, load_surrogates,
                       load_word_code, save_surrogate, served_settings)
from .attack import (Negatives, _autocast, _device, _encode_images, _images_for_model, _with_triggers,  # noqa: F401
                     attack_mode, autocast_enabled, cpu_has_amx, encode_text_trimmed, pair_losses, surrogate_list,
                     surrogates_and_negatives)
from .clip import CLIP
from .pgd import _cell_mean, pgd_noise  # noqa: F401
from .search import (CPU_SEQUENCES_PER_FORWARD, MAX_SEQUENCES_PER_FORWARD, _candidate_table,  # noqa: F401
                     hotflip_candidates, hotflip_scores, own_words, score_position, search_triggers)
from .settings import MEMSettings
from .state import CaptionsPerImage, MEMState, _batches
from .surrogate import (make_optimizer, restart_due, restart_seed, restart_surrogates,  # noqa: F401
                        train_surrogate)
from .tokenizer import Tokenizer
from .upload import _check_upload_batch, protect_batch  # noqa: F401
from .word_code import (WordCode, _foreign_word_sets, _ranked_words, _write_word_noise, init_word_code,  # noqa: F401
                        protect_with_word_code, texture_owners, texture_pass, upload_size_error, word_code_noise)

log = logging.getLogger(__name__)


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


def _checked_groups(state: MEMState, images: np.ndarray, captions: list[str],
                    groups: CaptionsPerImage | None) -> CaptionsPerImage:
    """groups (default: caption i describes image i), once images, captions, groups and state agree."""
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
    return groups


def _log_iteration(stats: dict, settings: MEMSettings, groups: CaptionsPerImage) -> None:
    """One progress line for an outer iteration's stats."""
    rate = f"{stats['images_per_s']:.1f} images/s"
    if not groups.one_each:
        rate += f" = {stats['pairs_per_s']:.1f} pairs/s"
    redrawn = stats["surrogates_redrawn"]
    log.info(
        f"MEM {stats['iteration']}/{settings.outer_iterations}: surrogate loss {stats['surrogate_loss']:.4f} "
        f"({stats['surrogate_pairs_per_s']:.0f} pairs/s), pass loss {stats['pass_loss']:.4f} "
        f"({rate}{', triggers' if stats['triggers_updated'] else ''}"
        f"{', surrogate ' + '+'.join(map(str, redrawn)) + ' re-drawn' if redrawn else ''}), "
        f"{stats['seconds']:.1f}s"
    )


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
    groups = _checked_groups(state, images, captions, groups)
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
            _log_iteration(stats, settings, groups)
        if callback is not None:
            callback(state, stats)
    if progress and state.iteration < settings.outer_iterations:
        log.info(f"MEM stopped after {state.iteration} outer iterations: pass loss "
                 f"{state.history[-1]['pass_loss']:.4f} <= stop_loss {settings.stop_loss}")
    return state


def protected_images(images: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """clip(image + noise, 0, 255) as uint8 (what is published)."""
    return np.clip(images.astype(np.int16) + np.asarray(noise, dtype=np.int16), 0, 255).astype(np.uint8)
