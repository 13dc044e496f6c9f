"""From a CDDB-layout root to the batches the trainer reads: tasks in order, and deterministic batches.

Built on `aigis.data`: `CDDB` lists and screens the files (and labels them by position in the task
order), `ImageDataset` makes the training view (random crop + flip, seeded per (seed, epoch, item)) or
the evaluation view (centre crop). This module only adds the batch order, which comes from
(seed, epoch) as well, so a run resumed after task k sees exactly the batches an uninterrupted one sees.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from aigis.data.cddb import CDDB, Sample
from aigis.distributed import block_bounds
from aigis.data.dataset import ImageCache, ImageDataset

# "auto" decodes every image once into memory when a run holds at most this many images
# (about 2 GB of 256x256 CDDB images; the synthetic benchmark is far smaller).
AUTO_CACHE_LIMIT = 10_000


@dataclass
class TaskData:
    """One task of the run: its name, position, and usable train / val (= test) samples."""

    name: str
    index: int
    train: list[Sample]
    val: list[Sample]


def load_tasks(data: CDDB) -> list[TaskData]:
    """Every task of `data` in its order, screened now so a bad file stops the run before training."""
    data.prepare()
    return [TaskData(name, i, data.samples(i, "train"), data.samples(i, "val")) for i, name in enumerate(data.tasks)]


def make_cache(setting: str | bool, tasks: Sequence[TaskData]) -> ImageCache | None:
    """An in-memory image cache, or None: `setting` is True/False or "auto" (cache small runs only)."""
    if setting == "auto":
        setting = sum(len(t.train) + len(t.val) for t in tasks) <= AUTO_CACHE_LIMIT
    return ImageCache() if setting else None


class Batches:
    """uint8 NHWC image batches with int64 labels over a fixed list of samples.

    train=True: the training view, in an order shuffled by (seed, epoch); train=False: the evaluation
    view in sample order (labels() lines up with what epoch() yields).
    """

    def __init__(self, data: CDDB, samples: Sequence[Sample], crop: int, batch_size: int, *, train: bool,
                 seed: int = 0, cache: ImageCache | None = None, num_workers: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.batch_size = batch_size
        self.train = train
        self.seed = seed
        self.num_workers = num_workers
        self.dataset = ImageDataset(list(samples), crop, train=train, seed=seed, flip=True,
                                    cache=cache if cache is not None else False, on_bad=data.bad,
                                    max_pixels=data.max_pixels, progress=False)

    @property
    def samples(self) -> list[Sample]:
        """The samples actually used (unreadable ones left out under on_bad="skip")."""
        return self.dataset.samples

    @property
    def num_samples(self) -> int:
        return len(self.dataset)

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def labels(self) -> np.ndarray:
        return self.dataset.labels

    def order(self, epoch: int) -> np.ndarray:
        if not self.train:
            return np.arange(len(self.dataset))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of `epoch`: (uint8 [B, crop, crop, 3], int64 [B])."""
        self.dataset.set_epoch(epoch)
        yield from self._load(self._chunks(epoch))

    def _chunks(self, epoch: int) -> list[list[int]]:
        order = self.order(epoch)
        return [order[i : i + self.batch_size].tolist() for i in range(0, len(order), self.batch_size)]

    def _load(self, chunks: list[list[int]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.num_workers == 0:
            for chunk in chunks:
                yield _collate([self.dataset[i] for i in chunk])
            return
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=chunks, num_workers=self.num_workers,
                                             collate_fn=_collate, persistent_workers=False)
        yield from loader

    def epoch_parts(self, epoch: int, rank: int = 0, world: int = 1
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, float | None, int]]:
        """Data parallelism: this rank's part of each batch of `epoch`, as (images, labels, weight, batch size).

        The batches are epoch()'s (the same order on every rank); each is cut into `world` near-equal
        contiguous parts and rank `rank` gets its part. weight = part size x world / batch size: a rank's mean
        loss times its weight, averaged over the ranks (what DistributedDataParallel does to gradients), is the
        whole batch's mean loss. A rank whose part is empty (a last batch smaller than world) gets the batch's
        first item at weight 0, so that it still takes part in the gradient exchange. With world = 1 the parts
        are epoch()'s batches and the weight is None (nothing to rescale)."""
        self.dataset.set_epoch(epoch)
        chunks = self._chunks(epoch)
        if world == 1:
            for (images, labels), chunk in zip(self._load(chunks), chunks):
                yield images, labels, None, len(chunk)
            return
        parts, weights = [], []
        for chunk in chunks:
            start, stop = block_bounds(len(chunk), world)[rank]
            parts.append(chunk[start:stop] if stop > start else chunk[:1])
            weights.append((stop - start) * world / len(chunk))
        for (images, labels), weight, chunk in zip(self._load(parts), weights, chunks):
            yield images, labels, weight, len(chunk)

    def subset(self, indices: Sequence[int]) -> "BatchSubset":
        """The items at `indices`, in that order, batched like this (evaluation view: a rank's block of a set)."""
        return BatchSubset(self, [int(i) for i in indices])


class BatchSubset:
    """Some items of a Batches, in a fixed order: what extract_features reads for one rank's block."""

    def __init__(self, parent: Batches, indices: list[int]) -> None:
        self.parent = parent
        self.indices = indices

    @property
    def num_samples(self) -> int:
        return len(self.indices)

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.parent.dataset.set_epoch(epoch)
        size = self.parent.batch_size
        yield from self.parent._load([self.indices[i : i + size] for i in range(0, len(self.indices), size)])



# ImageDataset hands out views of read-only cached images; _collate's torch.stack copies them, so
# PyTorch's warning about non-writable arrays does not apply here.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


def _collate(items: list[tuple[torch.Tensor, int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.stack([image for image, _, _ in items])
    labels = torch.tensor([label for _, label, _ in items], dtype=torch.int64)
    return images, labels
