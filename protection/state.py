"""What MEM's outer loop works on: which captions describe which image, the state a checkpoint holds, and
the random batches of a pass."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from .clip import CLIP


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


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[np.ndarray]:
    """A random partition into ceil(n / batch_size) batches of near-equal size (never a batch of one)."""
    order = torch.randperm(n, generator=generator).numpy()
    count = max(1, math.ceil(n / batch_size))
    return [np.sort(chunk) for chunk in np.array_split(order, count)]
