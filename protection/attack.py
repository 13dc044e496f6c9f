"""What every MEM step shares: the surrogates held frozen while they are attacked, bfloat16 autocast, the
per-pair contrastive loss that the noise and the triggers minimise, and the encoders it is computed from."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .clip import CLIP, MAX_LOGIT_SCALE, normalize_images
from .settings import SurrogateSettings


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
    """Whether MEM's models run under bfloat16 autocast for the settings' amp on this device.

    "auto" turns it on for CUDA and for a CPU with AMX, where no kind of MEM step measured slower with it
    and RN50 at 224 px ran 3x faster (BENCHMARKS.md, "bfloat16 autocast"); other CPUs were not measured:
    float32.
    """
    if amp != "auto":
        return amp == "on"
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_amx())


def _autocast(settings: SurrogateSettings, device: torch.device):
    on = autocast_enabled(settings.amp, device)
    return torch.autocast(device.type, dtype=torch.bfloat16) if on else nullcontext()


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
