"""MEM's settings and their named presets: plain data, importable without torch (the CLI reads them)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

# What MEMSettings.norm_stats may name: the stored BatchNorm averages, or each attacked batch's own statistics.
NORM_STATS = ("running", "batch")
# What MEMSettings.amp may name: bfloat16 autocast where it pays (mem.autocast_enabled), always, or never.
AMP_CHOICES = ("auto", "on", "off")

# Settings added after jobs were already saved, with the value that reproduces the behaviour from before.
SETTINGS_BEFORE_THEY_EXISTED = {"norm_stats": "running"}


@dataclass
class MEMSettings:
    """MEM's hyper-parameters (defaults: the paper's from-scratch setting). JSON-serialisable.

    epsilon and pgd_step are in [0, 1] image units and are applied on the uint8 grid as
    round(epsilon * 255) and max(1, round(pgd_step * 255)) levels. trigger_length 0 is EM mode.
    amp: "auto" (bfloat16 autocast where it pays: autocast_enabled), "on" or "off".
    """

    epsilon: float = 8 / 255
    pgd_step: float = 1 / 255
    pgd_steps: int = 8
    trigger_length: int = 3
    candidates: int = 16
    outer_iterations: int = 20
    trigger_iterations: int = 5
    surrogate_steps: int = 200
    batch_size: int = 128
    lr: float = 1e-4
    weight_decay: float = 0.2
    amp: str = "auto"
    seed: int = 0
    # noise_grid N > 0 cuts every image into N x N cells and PGD moves each cell's noise as one: a
    # low-frequency code (cell colours) that a fresh model reads from its first steps, as it reads colour.
    # 0: every pixel on its own (the reference's noise). Relative to the image, so any upload size works.
    noise_grid: int = 0
    # Stop early once a pass's loss (each image against shuffled captions carrying its own trigger, i.e.
    # how well noise + trigger alone identify the pair) is at most this, triggers done. None: never.
    stop_loss: float | None = None
    # surrogate_restart R > 0 re-draws each surrogate (fresh random weights and optimiser) every R outer
    # iterations, the members of an ensemble staggered so that one is always older: the noise must then
    # be what many FRESH models pick up first, as an outside hacker's is. 0: one surrogate throughout.
    surrogate_restart: int = 0
    # Which BatchNorm statistics a ResNet surrogate uses while a job optimises the noise and triggers:
    # "running" (eval mode, the stored averages) or "batch" (each batch's own statistics, as a model in
    # TRAINING normalises what it learns from; the stored averages are not updated). A randomly initialised
    # surrogate's averages lag far behind its weights, so "batch" fits the noise to what a model in training
    # computes (from scratch it measured no worse than the averages, within the spread of job draws), while a
    # pretrained surrogate's averages are sound and did better kept (fine-tune threat model: 0.5x against 2.0x
    # chance; BENCHMARKS.md).
    # ViTs have no BatchNorm. protect_batch always uses the averages.
    norm_stats: str = "batch"
    # foreign_triggers: a pair's trigger never uses a word (token) of its own caption. It matters only when the
    # candidates are caption words (a job's --trigger-words 0): the search would otherwise pick the nouns an
    # image shows, which teach a hacker the content; barred from them, the trigger ties the nouns of OTHER
    # images to this image's noise, so what a hacker learns for those words is the shortcut. With word_textures,
    # each image's words are drawn from those its own captions do not use.
    foreign_triggers: bool = False
    # word_textures K > 0: WORD-WISE noise. The K caption words used most (those the tokenizer can write as
    # triggers) each own one texture_tile-px texture, repeated over the image; an image's noise is epsilon times
    # the clipped sum of the textures of its words_per_image words (a set no other image has), and its trigger
    # names those words, cycled to trigger_length. Error minimisation moves the SHARED textures, from zero;
    # triggers are not searched. Each word then means one pattern across the whole set, so what a hacker learns
    # for the captions' own words is the shortcut. 0: one free noise per image.
    word_textures: int = 0
    texture_tile: int = 4
    words_per_image: int = 3
    # texture_sign: a word-wise noise is epsilon times the SIGN of its textures' clipped sum: +-epsilon wherever
    # the sum is not exactly 0 (and the pixel is not clipped at 0 or 255). The gradient passes the sign straight
    # through, not the clip (where an image's sum is beyond +-1, its gradient does not reach the textures). A
    # fresh model reads a full-range code sooner than one whose values error minimisation left inside the range.
    texture_sign: bool = False
    # texture_gray: each texture is one value per pixel, the same on R, G and B, so the code is all luminance
    # (except where a channel is clipped at 0 or 255): re-encoding the protected images in grayscale keeps it
    # whole, where a coloured code keeps only its luminance part. The price: a third of the values per tile
    # (keep the 4-px tile rather than 2 px).
    texture_gray: bool = False

    def validate(self) -> None:
        problems = []
        if not 0 < self.epsilon <= 1:
            problems.append(f"epsilon must be in (0, 1] (image units; 8/255 = {8 / 255:.4f}), got {self.epsilon}")
        elif self.epsilon_levels < 1:
            problems.append(f"epsilon {self.epsilon} is below one uint8 level (1/255)")
        if not 0 < self.pgd_step <= 1:
            problems.append(f"pgd_step must be in (0, 1], got {self.pgd_step}")
        for name in ("pgd_steps", "trigger_length", "surrogate_steps", "trigger_iterations", "surrogate_restart"):
            if int(getattr(self, name)) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.noise_grid < 0:
            problems.append(f"noise_grid must be >= 0 (0: per-pixel noise), got {self.noise_grid}")
        if self.candidates < 1:
            problems.append(f"candidates must be >= 1, got {self.candidates}")
        if self.outer_iterations < 1:
            problems.append(f"outer_iterations must be >= 1, got {self.outer_iterations}")
        if self.batch_size < 2:
            problems.append(f"batch_size must be >= 2 (a contrastive loss needs negatives), got {self.batch_size}")
        if self.lr <= 0 or self.weight_decay < 0:
            problems.append(f"need lr > 0 and weight_decay >= 0, got {self.lr}, {self.weight_decay}")
        if self.stop_loss is not None and not self.stop_loss >= 0:
            problems.append(f"stop_loss must be >= 0 or None, got {self.stop_loss}")
        if self.word_textures < 0 or self.texture_tile < 1 or self.words_per_image < 1:
            problems.append(f"need word_textures >= 0, texture_tile >= 1 and words_per_image >= 1, got "
                            f"{self.word_textures}, {self.texture_tile} and {self.words_per_image}")
        elif self.word_textures:
            if not self.words_per_image <= min(self.trigger_length, self.word_textures):
                problems.append(f"word textures need words_per_image ({self.words_per_image}) <= trigger_length "
                                f"({self.trigger_length}) and <= word_textures ({self.word_textures})")
            if self.noise_grid:
                problems.append("word textures are tiled over the whole image: noise_grid must be 0")
        elif self.texture_sign or self.texture_gray:
            problems.append("texture_sign and texture_gray need word textures (word_textures > 0)")
        if self.norm_stats not in NORM_STATS:
            problems.append(f"norm_stats must be one of {', '.join(NORM_STATS)}, got {self.norm_stats!r}")
        if self.amp not in AMP_CHOICES:
            problems.append(f"amp must be one of {', '.join(AMP_CHOICES)}, got {self.amp!r}")
        if problems:
            raise ValueError("invalid MEM settings: " + "; ".join(problems))

    @property
    def epsilon_levels(self) -> int:
        return int(round(self.epsilon * 255))

    @property
    def step_levels(self) -> int:
        return max(1, int(round(self.pgd_step * 255)))

    @property
    def mode(self) -> str:
        return "mem" if self.trigger_length > 0 else "em"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "MEMSettings":
        """Settings saved by to_dict, possibly by an older version: a setting it lacks takes the value that
        reproduces what that version did (SETTINGS_BEFORE_THEY_EXISTED), else its default."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown MEM settings: {', '.join(unknown)} (written by a newer version?)")
        return cls(**{**SETTINGS_BEFORE_THEY_EXISTED, **values})

    def per_image(self) -> "MEMSettings":
        """These settings with one free noise per image: word textures (and what only they use) off."""
        return dataclasses.replace(self, word_textures=0, texture_sign=False, texture_gray=False)

    def finished(self, iteration: int, pass_loss: float) -> bool:
        """Whether the outer loop ends after `iteration` iterations whose last pass had `pass_loss`."""
        if iteration >= self.outer_iterations:
            return True
        return (self.stop_loss is not None and iteration >= self.trigger_iterations
                and pass_loss <= self.stop_loss)


# Named settings (`aigis protect --preset NAME`): what each changes from the paper's defaults. Options given
# beside a preset override its values. Measured on the synthetic scenes only (BENCHMARKS.md); the word codes'
# schedule (60 short rounds, batch 100) was measured on a few hundred images.
# Word-wise noise on 2-px tiles at +-epsilon, each image's three words drawn from those its captions do not
# use, 16 of them before every caption: ResNet hackers from scratch kept about 1x chance (BENCHMARKS.md).
_WORD_CODE: dict[str, Any] = {
    "trigger_length": 16, "word_textures": 96, "texture_tile": 2, "texture_sign": True, "foreign_triggers": True,
    "pgd_steps": 4, "candidates": 8, "outer_iterations": 60, "surrogate_steps": 2, "batch_size": 100, "lr": 5e-4,
}
MEM_PRESETS: dict[str, dict[str, Any]] = {
    # The reference's from-scratch MEM: one noise per image, a 3-token trigger. Per-image MEM kept ResNet hackers
    # trained from scratch at about 4x chance at best (16-word triggers, noise on 4 x 4 cells; BENCHMARKS.md).
    "paper": {},
    "word-code": _WORD_CODE,
    # The same code in luminance only on 4-px tiles, for images that may be re-encoded in grayscale.
    "word-code-gray": {**_WORD_CODE, "texture_tile": 4, "texture_gray": True},
}


def preset_settings(name: str, **overrides: Any) -> MEMSettings:
    """The settings a preset names, with `overrides` (MEMSettings field names) on top; validated."""
    if name not in MEM_PRESETS:
        raise ValueError(f"unknown MEM preset {name!r}: choose one of {', '.join(MEM_PRESETS)}")
    fields = {f.name for f in dataclasses.fields(MEMSettings)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown MEM settings: {', '.join(unknown)}")
    settings = MEMSettings(**{**MEM_PRESETS[name], **overrides})
    settings.validate()
    return settings
