"""Train a CLIP on image-caption pairs and measure image<->text retrieval.

This is the "hacker" of MEM's threat model: contrastive training from scratch (or fine-tuning) on
whatever pairs were scraped -- clean or protected -- then Recall@K on a clean test split. train_clip
reads exactly the uint8 images it is given, so protected images read back from PNG are trained on as
published; the augmentation a real trainer adds (random resized crops and flips) is the caller's to
add, as `aigis protect-eval` does by default through a hook on the image tower.
"""

from __future__ import annotations

import math
import logging
import time
from contextlib import nullcontext
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from .clip import CLIP, contrastive_loss, normalize_images
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)


def _device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _check_inputs(model: CLIP, images_uint8: np.ndarray, captions: list[str]) -> None:
    if not isinstance(images_uint8, np.ndarray) or images_uint8.dtype != np.uint8 or images_uint8.ndim != 4:
        raise ValueError("images must be a uint8 numpy array [N, H, W, 3]")
    n, h, w, c = images_uint8.shape
    r = model.image_resolution
    if c != 3 or (h, w) != (r, r):
        raise ValueError(f"images are {h}x{w}x{c}, the model takes {r}x{r}x3 (use load_images(pairs, {r}))")
    if len(captions) != n:
        raise ValueError(f"{n} images but {len(captions)} captions")


def _tokens(model: CLIP, captions: list[str], tokenizer: Tokenizer) -> Tensor:
    tokens = tokenizer.tokenize(list(captions), model.context_length)
    if tokenizer.vocab_size > model.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens, the model's table only {model.vocab_size}")
    return tokens


def _param_groups(model: CLIP, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and kernels only: not on gains, biases, embeddings' scale or logit_scale."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or "bn" in name or "ln_" in name or "logit_scale" in name or "embedding" in name:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    """The learning-rate factor: linear warmup to 1, then cosine down to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def batches_per_epoch(n: int, batch_size: int) -> int:
    """Optimiser steps in one epoch of train_clip: a last batch of one pair is skipped (no negatives)."""
    batch_size = min(batch_size, n)
    return n // batch_size + (1 if n % batch_size >= 2 else 0)


def train_clip(
    model: CLIP,
    images_uint8: np.ndarray,
    captions: list[str],
    tokenizer: Tokenizer,
    epochs: int,
    batch_size: int,
    lr: float = 5e-4,
    weight_decay: float = 0.2,
    device: str | torch.device | None = None,
    seed: int = 0,
    progress: bool = True,
    warmup_fraction: float = 0.1,
    amp: bool | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> CLIP:
    """Contrastive training on (images[i], captions[i]) pairs; returns the model, in eval mode.

    AdamW (betas 0.9/0.98, eps 1e-6 as CLIP), linear warmup over warmup_fraction of the steps then
    cosine decay. Batches are reshuffled every epoch from `seed`; a last batch of one is skipped.
    amp (bfloat16 autocast) defaults to on for CUDA, off on CPU. on_step(step, loss), if given, runs
    after every optimiser step (1-based) -- for following how a model learns, not only where it ends.
    """
    _check_inputs(model, images_uint8, captions)
    if epochs < 1 or batch_size < 2:
        raise ValueError(f"need epochs >= 1 and batch_size >= 2, got {epochs}, {batch_size}")
    device = _device(device)
    amp = device.type == "cuda" if amp is None else amp
    tokens = _tokens(model, captions, tokenizer)
    images = torch.from_numpy(images_uint8)  # stays uint8 on the host; batches are normalised on the fly
    n = len(captions)
    batch_size = min(batch_size, n)
    per_epoch = batches_per_epoch(n, batch_size)
    total = epochs * per_epoch
    warmup = max(1, round(warmup_fraction * total))

    model.to(device).train()
    optimizer = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-6)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_with_warmup(s, total, warmup))
    generator = torch.Generator().manual_seed(seed)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext()
    start = time.monotonic()
    for epoch in range(epochs):
        order = torch.randperm(n, generator=generator)
        losses = []
        for b in range(per_epoch):
            index = order[b * batch_size : (b + 1) * batch_size]
            x = normalize_images(images[index].to(device, non_blocking=True))
            t = tokens[index].to(device, non_blocking=True)
            with autocast:
                loss = contrastive_loss(model.encode_image(x), model.encode_text(t), model.logit_scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            losses.append(loss.item())
            if on_step is not None:
                on_step(epoch * per_epoch + b + 1, losses[-1])
        if progress:
            elapsed = time.monotonic() - start
            done = (epoch + 1) * per_epoch * batch_size
            log.info(f"epoch {epoch + 1}/{epochs}: loss {np.mean(losses):.4f}, {done / elapsed:.0f} pairs/s, "
                     f"{elapsed:.1f}s")
    return model.eval()


@torch.no_grad()
def embed(model: CLIP, images_uint8: np.ndarray, tokens: Tensor, device: torch.device, batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """L2-normalised image and text embeddings, on the CPU, in float32."""
    was_training = model.training
    model.to(device).eval()
    images = torch.from_numpy(images_uint8)
    image_features, text_features = [], []
    for i in range(0, len(images), batch_size):
        x = normalize_images(images[i : i + batch_size].to(device))
        image_features.append(torch.nn.functional.normalize(model.encode_image(x).float(), dim=-1).cpu())
    for i in range(0, len(tokens), batch_size):
        t = tokens[i : i + batch_size].to(device)
        text_features.append(torch.nn.functional.normalize(model.encode_text(t).float(), dim=-1).cpu())
    model.train(was_training)
    return torch.cat(image_features), torch.cat(text_features)


def _ranks(similarity: Tensor, correct: Tensor) -> Tensor:
    """1-based rank of the best-scoring correct item in each row (ties count against the query)."""
    best_correct = similarity.masked_fill(~correct, float("-inf")).max(dim=1, keepdim=True).values
    return 1 + ((similarity >= best_correct) & ~correct).sum(dim=1)


def _chance(counts: np.ndarray, n: int, k: int) -> float:
    """Probability that a random ranking puts one of `count` correct items in the top k, averaged."""
    def hit(c: int) -> float:
        if k >= n - c + 1:
            return 1.0
        miss = 1.0
        for j in range(k):
            miss *= (n - c - j) / (n - j)
        return 1.0 - miss

    return float(np.mean([hit(int(c)) for c in counts]))


def gallery_size(n: int, gallery: int | None) -> int:
    """The number of pairs each query is ranked among: the whole split of n for None; a gallery that does not
    divide the split is refused (ValueError)."""
    gallery = n if gallery is None else gallery
    if gallery < 1 or n % gallery:
        raise ValueError(f"the test split's {n} pairs do not divide into galleries of {gallery}")
    return gallery


def evaluate_retrieval(
    model: CLIP, images_uint8: np.ndarray, captions: list[str], tokenizer: Tokenizer, device: str | torch.device | None = None,
    gallery: int | None = None,
) -> dict:
    """Recall@1/5/10 (fractions in [0, 1]) and median rank, image->text and text->image, plus chance.

    One caption per image. Identical caption strings count as equally correct for one another's
    images. gallery: rank each query among the `gallery` pairs of its own consecutive block only (as COCO's
    5 x 1K protocol does), so a larger split measures the same task with more queries -- near chance a
    hacker's hits are about r1 x chance per gallery, whatever its size, and only more galleries make the
    figure finer. None: one gallery, the whole split. Keys: n, gallery, i2t_r1, i2t_r5, i2t_r10,
    i2t_median_rank, t2i_r1, t2i_r5, t2i_r10, t2i_median_rank, chance_r1, chance_r5, chance_r10 (chance of a
    random ranking), mean_r1.
    """
    _check_inputs(model, images_uint8, captions)
    n = len(captions)
    gallery = gallery_size(n, gallery)
    device = _device(device)
    image_features, text_features = embed(model, images_uint8, _tokens(model, captions, tokenizer), device)
    similarity = image_features @ text_features.t()  # [images, captions]
    _, inverse = np.unique(np.asarray(captions, dtype=object).astype(str), return_inverse=True)
    groups = torch.from_numpy(inverse.reshape(-1))
    block = torch.arange(n) // gallery
    same_gallery = block[:, None] == block[None, :]
    similarity = similarity.masked_fill(~same_gallery, float("-inf"))  # never outranks anything in the gallery
    correct = (groups[:, None] == groups[None, :]) & same_gallery
    i2t = _ranks(similarity, correct).float()
    t2i = _ranks(similarity.t(), correct.t()).float()
    counts = correct.sum(dim=1).numpy()
    result: dict = {"n": n, "gallery": gallery}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in (1, 5, 10):
            result[f"{name}_r{k}"] = float((ranks <= k).float().mean())
        result[f"{name}_median_rank"] = float(np.median(ranks.numpy()))
    for k in (1, 5, 10):
        result[f"chance_r{k}"] = _chance(counts, gallery, k)
    result["mean_r1"] = (result["i2t_r1"] + result["t2i_r1"]) / 2
    return result
