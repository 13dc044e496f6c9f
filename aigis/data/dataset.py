"""Torch datasets over CDDB samples: the training view (random crop + flip) and the evaluation view.

Crops are drawn from a generator seeded by (seed, epoch, index), never from global state, so a resumed
run, a different worker count or a different batch order sees exactly the same pixels for an item.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from aigis.data.cddb import CDDB, BadImageLog, OnBad, Sample
from aigis.preprocess import MAX_PIXELS, BadImageError, center_crop, load_image, random_crop

log = logging.getLogger("aigis.data")


class ImageCache:
    """Decoded images kept in memory by path, so small sets are decoded once for all epochs and datasets."""

    def __init__(self) -> None:
        self._images: dict[str, np.ndarray] = {}

    def get(self, path: str) -> np.ndarray | None:
        return self._images.get(path)

    def put(self, path: str, image: np.ndarray) -> None:
        image.setflags(write=False)        # shared between datasets: nobody may change it in place
        self._images[path] = image

    def __len__(self) -> int:
        return len(self._images)

    @property
    def nbytes(self) -> int:
        return sum(image.nbytes for image in self._images.values())


class ImageDataset(Dataset):
    """Items are (uint8 tensor [crop, crop, 3], label, task).

    train=True gives the training view (random crop, then a horizontal flip half of the time);
    train=False gives aigis.preprocess.center_crop. cache=True (or a shared ImageCache) decodes every image
    now, which also finds every undecodable file before training; cache=False decodes on each access.
    """

    def __init__(self, samples: Sequence[Sample], crop: int, *, train: bool, seed: int = 0, flip: bool = True,
                 cache: bool | ImageCache = False, on_bad: OnBad | BadImageLog = "stop",
                 max_pixels: int = MAX_PIXELS, progress: bool = True) -> None:
        if crop < 1:
            raise ValueError(f"crop must be at least 1 pixel, got {crop}")
        self.crop = crop
        self.train = train
        self.seed = seed
        self.flip = flip
        self.max_pixels = max_pixels
        self.bad = on_bad if isinstance(on_bad, BadImageLog) else BadImageLog(on_bad)
        self.epoch = 0
        self.cache = cache if isinstance(cache, ImageCache) else (ImageCache() if cache else None)
        self.samples = list(samples)
        if self.cache is not None:
            self.samples = self._decode_all(progress)
        if not self.samples:
            raise ValueError("the dataset has no usable images")

    def _decode_all(self, progress: bool) -> list[Sample]:
        from tqdm import tqdm

        kept = []
        for sample in tqdm(self.samples, desc="decode", unit="img", disable=not progress, leave=False,
                           dynamic_ncols=True):
            key = str(sample.path)
            if self.cache.get(key) is None:
                try:
                    self.cache.put(key, load_image(sample.path, self.max_pixels))
                except BadImageError as exc:
                    self.bad.handle(sample.path, _reason(exc, sample))
                    continue
            kept.append(sample)
        return kept

    # ---- what the trainer reads -----------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Choose the crops of `epoch`; call before iterating (worker processes copy this value)."""
        self.epoch = int(epoch)

    @property
    def labels(self) -> np.ndarray:
        return np.asarray([s.label for s in self.samples], dtype=np.int64)

    @property
    def tasks(self) -> np.ndarray:
        return np.asarray([s.task for s in self.samples], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        sample = self.samples[index]
        return torch.from_numpy(self.view(index)), sample.label, sample.task

    def view(self, index: int) -> np.ndarray:
        """The uint8 [crop, crop, 3] array of item `index` for the current epoch."""
        image = self._image(index)
        if not self.train:
            return center_crop(image, self.crop)
        rng = np.random.default_rng([self.seed, self.epoch, index])
        view = random_crop(image, self.crop, rng)
        if self.flip and rng.random() < 0.5:
            view = np.ascontiguousarray(view[:, ::-1])
        return view

    def _image(self, index: int) -> np.ndarray:
        """Decoded image of item `index`; under "skip", a file that fails here is replaced by the next one."""
        for offset in range(len(self.samples)):
            sample = self.samples[(index + offset) % len(self.samples)]
            if self.cache is not None and (image := self.cache.get(str(sample.path))) is not None:
                return image
            try:
                return load_image(sample.path, self.max_pixels)
            except BadImageError as exc:
                self.bad.handle(sample.path, _reason(exc, sample))   # raises under "stop"
        raise BadImageError("no image of the dataset can be decoded")


def _reason(exc: BadImageError, sample: Sample) -> str:
    return str(exc).removeprefix(f"{sample.path}: ")


def build_dataset(data: CDDB, tasks: Iterable[int | str], split: str, *, crop: int, train: bool,
                  exemplars: Iterable[Any] = (), seed: int = 0, cache: bool | ImageCache = False,
                  flip: bool = True, progress: bool = True) -> ImageDataset:
    """One dataset over several tasks' `split` plus remembered exemplars ((relpath, label) or .path/.label).

    Unusable files follow `data`'s on_bad policy and end up in `data.bad` with the scan's findings.
    """
    samples: list[Sample] = []
    for task in tasks:
        samples += data.samples(task, split)
    samples += data.exemplar_samples(exemplars)
    return ImageDataset(samples, crop, train=train, seed=seed, flip=flip, cache=cache, on_bad=data.bad,
                        max_pixels=data.max_pixels, progress=progress)
