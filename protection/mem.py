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

The word code (WordCodeSettings, word_code.WordCodeMEM) parameterises the noise differently: the K caption words used most
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

The parts: method.py (the interface both methods implement, and their shared outer loop), per_image.py
(per-image MEM), word_code.py (the word code), attack.py (the loss, the encoders, the frozen surrogates),
search.py (the trigger search), pgd.py (the noise), surrogate.py (the surrogate's training), state.py (what a
checkpoint holds), upload.py (per-image protect-on-upload), artefact.py (the saved surrogate). This module
keeps every public name of the parts importable from one place, with run_mem and new_state as functions.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

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
from .method import Protected, Protection, load_protection, protection_class, protection_for  # noqa: F401
from .per_image import PerImageMEM, perturb_pass  # noqa: F401
from .settings import MEMSettings, SurrogateSettings, WordCodeSettings, settings_from_dict  # noqa: F401
from .state import CaptionsPerImage, MEMState, _batches  # noqa: F401
from .surrogate import (make_optimizer, restart_due, restart_seed, restart_surrogates,  # noqa: F401
                        train_surrogate)
from .tokenizer import Tokenizer
from .upload import _check_upload_batch, protect_batch  # noqa: F401
from .word_code import (WordCode, WordCodeMEM, _foreign_word_sets, _ranked_words, _write_word_noise, init_word_code,  # noqa: F401
                        protect_with_word_code, texture_owners, texture_pass, upload_size_error, word_code_noise)


def new_state(model: CLIP | Sequence[CLIP], tokenizer: Tokenizer, n: int, image_shape: tuple[int, int],
              settings: SurrogateSettings, noise: np.ndarray | None = None) -> MEMState:
    """A fresh state for the method the settings name (Protection.new_state). model may be an ensemble (a list;
    the first is the primary surrogate)."""
    return protection_for(settings, model, tokenizer).new_state(n, image_shape, noise)


def run_mem(
    state: MEMState,
    tokenizer: Tokenizer,
    images: np.ndarray,
    captions: list[str],
    settings: SurrogateSettings,
    *,
    device: str | torch.device | None = None,
    groups: CaptionsPerImage | None = None,
    callback: Callable[[MEMState, dict], None] | None = None,
    progress: bool = True,
) -> MEMState:
    """The outer loop of the method the settings name (Protection.fit) over the state's surrogates."""
    return protection_for(settings, state.models, tokenizer).fit(state, images, captions, groups=groups, device=device,
                                                                 callback=callback, progress=progress)


def protected_images(images: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """clip(image + noise, 0, 255) as uint8 (what is published)."""
    return np.clip(images.astype(np.int16) + np.asarray(noise, dtype=np.int16), 0, 255).astype(np.uint8)
