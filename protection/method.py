"""One interface for every protection method: fit it to a data set (a noise and a trigger for each image, and
an artefact that remembers how), protect uploads with the fitted artefact, save and load it.

    protection = protection_for(settings, surrogates, tokenizer)     # MEMSettings or WordCodeSettings
    state = protection.new_state(len(images), images.shape[1:3])
    protection.fit(state, images, captions)                           # error minimisation over the set
    protection.save("artefact/")
    protected = load_protection("artefact/").protect(new_images, new_captions)

The methods (per_image.PerImageMEM, word_code.WordCodeMEM) share the outer loop here: train the surrogate(s) on
the protected pairs, then one pass over the images that moves the noise (and triggers) to MINIMISE their
contrastive loss. They differ in what a pass moves, in how triggers are found, and in what protecting an upload
costs. The job (job.py), the served model (triton_model.py) and the CLI use this interface only.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import torch
from torch import Tensor

from .attack import Negatives, _device, surrogate_list
from .clip import CLIP
from .settings import SurrogateSettings, settings_from_dict
from .state import CaptionsPerImage, MEMState
from .surrogate import make_optimizer, restart_surrogates, train_surrogate
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class Protected:
    """A protected batch: what is published (images and captions) and the noise that was added."""

    images: np.ndarray  # uint8 [N, H, W, 3]
    captions: list[str]  # each with its trigger in front
    noise: np.ndarray  # int8 [N, H, W, 3]: images - originals


class Protection(ABC):
    """A protection method with its settings, surrogate(s) and tokenizer."""

    settings_class: ClassVar[type[SurrogateSettings]]
    # What a served version protects uploads with (mem_protect's settings.json "protects_with").
    protects_with: ClassVar[str]
    # Whether the triggers are words of the captions themselves (then the job adds no made-up words).
    triggers_from_caption_words: ClassVar[bool] = False

    def __init__(self, settings: SurrogateSettings, surrogates: CLIP | Sequence[CLIP], tokenizer: Tokenizer):
        if not isinstance(settings, self.settings_class):
            raise TypeError(f"{type(self).__name__} takes {self.settings_class.__name__}, "
                            f"got {type(settings).__name__}")
        settings.validate()
        self.settings = settings
        self.surrogates = surrogate_list(surrogates)
        self.tokenizer = tokenizer

    @property
    def method(self) -> str:
        return self.settings.method

    def with_settings(self, settings: SurrogateSettings) -> "Protection":
        """This protection (the same surrogates, tokenizer and what a fit gave it) under other settings of its
        method, e.g. the job's amp resolved to "on" or "off" for the fit and back for the artefact."""
        if type(settings) is not type(self.settings):
            raise TypeError(f"{type(self).__name__} takes {type(self.settings).__name__}, got {type(settings).__name__}")
        settings.validate()
        other = copy.copy(self)
        other.settings = settings
        return other

    # ------------------------------------------------------------------------------------------------
    # Fitting a data set

    def new_state(self, n: int, image_shape: tuple[int, int], noise: np.ndarray | None = None) -> MEMState:
        """A fresh state for n images: zero noise (or the given int8 array, e.g. a memmap, zeroed), placeholder
        triggers, an optimiser per surrogate."""
        models = self.surrogates
        if len({id(m) for m in models}) != len(models):
            raise ValueError("an ensemble names the same model twice (it would train twice per batch)")
        shape = (n, *image_shape, 3)
        if noise is None:
            noise = np.zeros(shape, dtype=np.int8)
        else:
            if noise.dtype != np.int8 or noise.shape != shape:
                raise ValueError(f"noise store must be int8 {list(shape)}, got {noise.dtype} {list(noise.shape)}")
            noise[...] = 0
        triggers = np.full((n, self.settings.trigger_length), self.tokenizer.placeholder_id, dtype=np.int64)
        return MEMState(models[0], make_optimizer(models[0], self.settings),
                        torch.Generator().manual_seed(self.settings.seed), noise, triggers,
                        extra_surrogates=[(m, make_optimizer(m, self.settings)) for m in models[1:]])

    def fit(
        self,
        state: MEMState,
        images: np.ndarray,
        captions: list[str],
        *,
        groups: CaptionsPerImage | None = None,
        device: str | torch.device | None = None,
        callback: Callable[[MEMState, dict], None] | None = None,
        progress: bool = True,
    ) -> MEMState:
        """The outer loop from state.iteration to outer_iterations (or stop_loss): train the surrogate(s)
        (surrogate_steps batches), then one pass over the images. callback(state, stats) runs after each
        iteration (checkpointing); stats has iteration, surrogate_loss, pass_loss, images_per_s, pairs_per_s
        (image-caption pairs protected per second of the pass), seconds.

        images: uint8 [N, H, W, 3] decoded once, at the surrogates' resolution. groups: which captions describe
        which image when an image has several (default: caption i describes image i).
        """
        settings = self.settings
        groups = _checked_groups(state, images, captions, groups)
        device = _device(device)
        for model in state.models:
            model.to(device)
        tokens = self.tokenizer.tokenize(list(captions), state.model.context_length, settings.trigger_length)
        self._begin(state, captions, groups)
        n = images.shape[0]
        while not settings.finished(state.iteration, state.history[-1]["pass_loss"] if state.history else math.inf):
            started = time.monotonic()
            redrawn = restart_surrogates(state, settings)
            surrogate_loss = train_surrogate(state, images, tokens, settings, device, groups)
            trained = time.monotonic()
            pass_loss, searched = self._pass(state, images, tokens, device, groups)
            done = time.monotonic()
            state.iteration += 1
            stats = {
                "iteration": state.iteration,
                "surrogate_loss": surrogate_loss,
                "pass_loss": pass_loss,
                "triggers_updated": searched,
                "surrogates_redrawn": redrawn,
                "surrogate_pairs_per_s": settings.surrogate_steps * min(settings.batch_size, n)
                / max(trained - started, 1e-9),
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
            log.info(f"{settings.method} stopped after {state.iteration} outer iterations: pass loss "
                     f"{state.history[-1]['pass_loss']:.4f} <= stop_loss {settings.stop_loss}")
        self._fitted(state)
        return state

    @abstractmethod
    def _begin(self, state: MEMState, captions: list[str], groups: CaptionsPerImage) -> None:
        """Set up what the passes need before the first one (run again on a resumed state: keep what it holds)."""

    @abstractmethod
    def _pass(self, state: MEMState, images: np.ndarray, tokens: Tensor, device: torch.device,
              groups: CaptionsPerImage) -> tuple[float, bool]:
        """One pass over the images: (its mean loss, whether it searched the triggers)."""

    def _fitted(self, state: MEMState) -> None:
        """Keep from a finished fit what protecting uploads needs besides the surrogates."""

    def report(self, state: MEMState) -> dict[str, Any]:
        """What protection.json records about a fit beyond the settings."""
        return {}

    def noise_at(self, state: MEMState, index: int, height: int, width: int) -> np.ndarray:
        """Image `index`'s fitted noise (int16 [height, width, 3]) for its source at height x width: each source
        pixel takes the noise of the pixel of the job's centre crop it falls in (the job fitted the noise to the
        short side resized to its size, centre-cropped); per-image noise stops at the crop's edges."""
        size = state.noise.shape[1]
        rows, cols = crop_grid(height, width, size)
        noise = np.zeros((height, width, 3), dtype=np.int16)
        inside_rows, inside_cols = np.flatnonzero((rows >= 0) & (rows < size)), np.flatnonzero((cols >= 0) & (cols < size))
        noise[np.ix_(inside_rows, inside_cols)] = np.asarray(state.noise[index], dtype=np.int16)[
            np.ix_(rows[inside_rows], cols[inside_cols])]
        return noise

    # ------------------------------------------------------------------------------------------------
    # Protecting uploads

    @abstractmethod
    def protect(self, images_uint8: np.ndarray, captions: list[str], *,
                device: str | torch.device | None = None) -> Protected:
        """Protect a batch of uploads (uint8 [N, H, W, 3], any size) as the fitted data set was protected."""

    def upload_problem(self, height: int, width: int) -> str | None:
        """Why an upload of this size cannot be protected (None: it can)."""
        return None

    # ------------------------------------------------------------------------------------------------
    # The artefact

    def save(self, directory: str | Path, extra: dict[str, Any] | None = None,
             negatives: Negatives | list[Negatives | None] | None = None) -> dict:
        """Write the artefact (artefact.save_surrogate: the surrogates, tokenizer, negatives, settings and
        whatever else the method protects uploads with); returns its meta."""
        from .artefact import save_surrogate

        return save_surrogate(directory, self.surrogates, self.tokenizer, self.settings, extra=extra,
                              negatives=negatives, **self._artefact_parts())

    def _artefact_parts(self) -> dict[str, Any]:
        """save_surrogate's keyword arguments for what this method adds to the artefact."""
        return {}

    @classmethod
    def from_artefact(cls, directory: Path, meta: dict, settings: SurrogateSettings, models: list[CLIP],
                      tokenizer: Tokenizer) -> "Protection":
        """The fitted protection an artefact holds (load_protection has read and checked its files)."""
        return cls(settings, models, tokenizer)


def crop_grid(height: int, width: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Which row and column of the size x size centre crop (short side resized to size, as the job's images are)
    each pixel of a height x width image falls in: floor((y - top) * size / short). Outside the crop the values
    run below 0 or from size up."""
    short = min(height, width)
    rows = np.floor((np.arange(height) - (height - short) // 2) * size / short).astype(np.int64)
    cols = np.floor((np.arange(width) - (width - short) // 2) * size / short).astype(np.int64)
    return rows, cols


def protection_class(method: str) -> type[Protection]:
    """The implementation of a method ("mem" or "word-code")."""
    from .per_image import PerImageMEM
    from .word_code import WordCodeMEM

    classes = {cls.settings_class.method: cls for cls in (PerImageMEM, WordCodeMEM)}
    if method not in classes:
        raise ValueError(f"unknown protection method {method!r} (known: {', '.join(classes)})")
    return classes[method]


def protection_for(settings: SurrogateSettings, surrogates: CLIP | Sequence[CLIP], tokenizer: Tokenizer) -> Protection:
    """The method the settings belong to, on these surrogates."""
    return protection_class(settings.method)(settings, surrogates, tokenizer)


def load_protection(directory: str | Path, settings: SurrogateSettings | dict | None = None) -> Protection:
    """A fitted protection from its artefact (sha256 of every file checked), with the artefact's settings or
    `settings` (e.g. what a served version protects with)."""
    from .artefact import load_surrogates, served_settings

    models, tokenizer, meta = load_surrogates(directory)
    if isinstance(settings, dict):
        settings = settings_from_dict(settings)
    settings = served_settings(meta, settings)
    cls = protection_class(settings.method)
    return cls.from_artefact(Path(directory), meta, settings, models, tokenizer)


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
        raise ValueError("protection needs at least 2 distinct images (a contrastive loss needs negatives)")
    return groups


def _log_iteration(stats: dict, settings: SurrogateSettings, groups: CaptionsPerImage) -> None:
    """One progress line for an outer iteration's stats."""
    rate = f"{stats['images_per_s']:.1f} images/s"
    if not groups.one_each:
        rate += f" = {stats['pairs_per_s']:.1f} pairs/s"
    redrawn = stats["surrogates_redrawn"]
    log.info(
        f"{settings.method} {stats['iteration']}/{settings.outer_iterations}: surrogate loss "
        f"{stats['surrogate_loss']:.4f} ({stats['surrogate_pairs_per_s']:.0f} pairs/s), pass loss "
        f"{stats['pass_loss']:.4f} ({rate}{', triggers' if stats['triggers_updated'] else ''}"
        f"{', surrogate ' + '+'.join(map(str, redrawn)) + ' re-drawn' if redrawn else ''}), "
        f"{stats['seconds']:.1f}s"
    )
