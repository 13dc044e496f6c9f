"""The protection methods' settings and their named presets: plain data, importable without torch (the CLI
builds its options from the fields' help).

Two methods share the error-minimisation machinery (a surrogate CLIP, PGD on the uint8 grid, a caption
trigger) and differ in what the noise is:
- MEMSettings: the paper's MEM, one free noise per image and a trigger searched per image (EM with no trigger);
- WordCodeSettings: the word code, a small texture per frequent caption word shared by every image, an image's
  noise made of its words' textures, its trigger naming them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

# What norm_stats may name: the stored BatchNorm averages, or each attacked batch's own statistics.
NORM_STATS = ("running", "batch")
# What amp may name: bfloat16 autocast where it pays (attack.autocast_enabled), always, or never.
AMP_CHOICES = ("auto", "on", "off")

# Made-up words a job's tokenizer adds for searched triggers to use, as CLIP's vocabulary offers words no caption
# uses: a trigger then reads as a tag and does not add content words that change what the published caption
# says. Protection measured the same as with caption words, within the hackers' spread (BENCHMARKS.md).
DEFAULT_TRIGGER_WORDS = 400

# Settings added after jobs were already saved, with the value that reproduces the behaviour from before.
SETTINGS_BEFORE_THEY_EXISTED = {"norm_stats": "running"}


def _setting(default: Any, help: str, **extra: Any) -> Any:
    """A settings field whose help the CLI shows (extra: choices, metavar, the option's name)."""
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class SurrogateSettings:
    """What both methods share: the noise budget, the trigger, the outer loop and its surrogate. JSON-serialisable.

    epsilon and pgd_step are in [0, 1] image units and are applied on the uint8 grid as round(epsilon * 255)
    and max(1, round(pgd_step * 255)) levels.
    """

    method: ClassVar[str] = ""

    epsilon: float = _setting(8 / 255, "L-inf noise budget", option="epsilon", scale=255, units="/255")
    pgd_step: float = _setting(1 / 255, "signed-gradient step of the noise", option=None)
    pgd_steps: int = _setting(8, "noise steps per batch of a pass")
    trigger_length: int = _setting(3, "trigger words in front of every caption")
    outer_iterations: int = _setting(20, "outer iterations (surrogate training, then a pass over the images)",
                                     option="outer")
    surrogate_steps: int = _setting(200, "surrogate batches per outer iteration")
    batch_size: int = _setting(128, "batch size", option="batch")
    lr: float = _setting(1e-4, "surrogate learning rate")
    weight_decay: float = _setting(0.2, "surrogate AdamW weight decay", option=None)
    amp: str = _setting("auto", "bfloat16 autocast: auto = on CUDA and on CPUs with AMX, where it is faster",
                        choices=AMP_CHOICES)
    seed: int = _setting(0, "the job's random draws")
    stop_loss: float | None = _setting(
        None, "end early once a pass's loss (noise + trigger against shuffled captions, i.e. how well they alone "
              "identify the pair) is at most this (default: run every outer iteration)")
    surrogate_restart: int = _setting(
        0, "re-draw each surrogate from fresh random weights every R outer iterations (ensemble members staggered, "
           "so one is always older): the noise must be what many FRESH models pick up first, as an outside "
           "hacker's is; 0: never", metavar="R")
    norm_stats: str = _setting(
        "batch", "BatchNorm statistics a ResNet surrogate uses while the noise is optimised: each batch's own, as a "
                 "model in training sees them (a young surrogate's averages lag its weights), or the stored "
                 "averages (running: right for a pretrained surrogate, --init). ViTs have none", choices=NORM_STATS)
    foreign_triggers: bool = _setting(
        False, "a pair's trigger never uses a word of its own caption(s), so it ties OTHER images' words to this "
               "image's noise instead of naming its content")

    def validate(self) -> None:
        """Raise ValueError naming every setting out of range."""
        problems = self._problems()
        if problems:
            raise ValueError(f"invalid {self.method} settings: " + "; ".join(problems))

    def _problems(self) -> list[str]:
        problems = []
        if not 0 < self.epsilon <= 1:
            problems.append(f"epsilon must be in (0, 1] (image units; 8/255 = {8 / 255:.4f}), got {self.epsilon}")
        elif self.epsilon_levels < 1:
            problems.append(f"epsilon {self.epsilon} is below one uint8 level (1/255)")
        if not 0 < self.pgd_step <= 1:
            problems.append(f"pgd_step must be in (0, 1], got {self.pgd_step}")
        for name in ("pgd_steps", "trigger_length", "surrogate_steps", "surrogate_restart"):
            if int(getattr(self, name)) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.outer_iterations < 1:
            problems.append(f"outer_iterations must be >= 1, got {self.outer_iterations}")
        if self.batch_size < 2:
            problems.append(f"batch_size must be >= 2 (a contrastive loss needs negatives), got {self.batch_size}")
        if self.lr <= 0 or self.weight_decay < 0:
            problems.append(f"need lr > 0 and weight_decay >= 0, got {self.lr}, {self.weight_decay}")
        if self.stop_loss is not None and not self.stop_loss >= 0:
            problems.append(f"stop_loss must be >= 0 or None, got {self.stop_loss}")
        if self.norm_stats not in NORM_STATS:
            problems.append(f"norm_stats must be one of {', '.join(NORM_STATS)}, got {self.norm_stats!r}")
        if self.amp not in AMP_CHOICES:
            problems.append(f"amp must be one of {', '.join(AMP_CHOICES)}, got {self.amp!r}")
        return problems

    @property
    def epsilon_levels(self) -> int:
        return int(round(self.epsilon * 255))

    @property
    def step_levels(self) -> int:
        return max(1, int(round(self.pgd_step * 255)))

    @property
    def mode(self) -> str:
        """What protection.json and the job's summary call the method."""
        return self.method

    @property
    def searches_triggers_until(self) -> int:
        """Outer iterations that search triggers (the word code draws them instead)."""
        return 0

    def finished(self, iteration: int, pass_loss: float) -> bool:
        """Whether the outer loop ends after `iteration` iterations whose last pass had `pass_loss`."""
        if iteration >= self.outer_iterations:
            return True
        return (self.stop_loss is not None and iteration >= self.searches_triggers_until
                and pass_loss <= self.stop_loss)

    def to_dict(self) -> dict:
        """The fields and the method they belong to (settings_from_dict reads it back)."""
        return {"method": self.method, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, values: dict) -> "SurrogateSettings":
        """These settings from to_dict's output (settings_from_dict picks the class)."""
        settings = settings_from_dict(values)
        if not isinstance(settings, cls):
            raise ValueError(f"settings of method {settings.method!r}, not {cls.method!r}")
        return settings


@dataclass
class MEMSettings(SurrogateSettings):
    """The paper's MEM (defaults: its from-scratch setting): one noise per image, a trigger searched per image
    with HotFlip. trigger_length 0 is EM (the unimodal error-minimising baseline: noise only)."""

    method: ClassVar[str] = "mem"

    candidates: int = _setting(16, "HotFlip candidates per trigger slot")
    trigger_iterations: int = _setting(5, "outer iterations that search the triggers")
    noise_grid: int = _setting(
        0, "cut each image into N x N cells and move each cell's noise as one: a low-frequency code a fresh model "
           "reads from its first steps, as it reads colour; 0: every pixel on its own", metavar="N")
    upload_steps: int | None = _setting(None, "PGD steps per upload protected by the fitted surrogate (default "
                                              "pgd_steps)", option=None)

    def _problems(self) -> list[str]:
        problems = super()._problems()
        if self.candidates < 1:
            problems.append(f"candidates must be >= 1, got {self.candidates}")
        if self.trigger_iterations < 0:
            problems.append(f"trigger_iterations must be >= 0, got {self.trigger_iterations}")
        if self.noise_grid < 0:
            problems.append(f"noise_grid must be >= 0 (0: per-pixel noise), got {self.noise_grid}")
        if self.upload_steps is not None and self.upload_steps < 0:
            problems.append(f"upload_steps must be >= 0 or None, got {self.upload_steps}")
        return problems

    @property
    def mode(self) -> str:
        return "mem" if self.trigger_length > 0 else "em"

    @property
    def searches_triggers_until(self) -> int:
        return self.trigger_iterations if self.trigger_length else 0


@dataclass
class WordCodeSettings(SurrogateSettings):
    """The word code: the `word_textures` caption words used most each own a texture_tile-px texture, repeated
    over the image and SHARED by every image; an image's noise is epsilon times the clipped sum of its
    words_per_image words' textures (a set no other image has), its trigger names those words, cycled to
    trigger_length. Error minimisation moves the textures, from zero; triggers are drawn, not searched. Each word
    then means one pattern across the whole set, so what a hacker learns for the captions' own words is the
    shortcut. Defaults: the word-code preset."""

    method: ClassVar[str] = "word-code"

    trigger_length: int = _setting(16, "trigger words in front of every caption (the image's words, cycled)")
    pgd_steps: int = _setting(4, "texture steps per batch of a pass")
    outer_iterations: int = _setting(60, "outer iterations (surrogate training, then a pass over the textures)",
                                     option="outer")
    surrogate_steps: int = _setting(2, "surrogate batches per outer iteration")
    batch_size: int = _setting(100, "batch size", option="batch")
    lr: float = _setting(5e-4, "surrogate learning rate")
    foreign_triggers: bool = _setting(
        True, "each image's words are drawn from those its own captions do not use, so a caption word names "
              "another image's texture more often than its own content")
    word_textures: int = _setting(96, "caption words (the K used most) that own a shared texture", metavar="K")
    texture_tile: int = _setting(2, "px per side of a word texture's tile")
    words_per_image: int = _setting(3, "words (textures) per image")
    texture_sign: bool = _setting(
        True, "the noise at the range's ends: +-epsilon, the sign of the image's textures' sum (a fresh model "
              "reads a full-range code sooner)")
    texture_gray: bool = _setting(
        False, "textures in luminance only (the same on R, G and B): the code survives grayscale re-encoding; "
               "keep a 4-px tile (a gray tile has a third of the values)")

    def _problems(self) -> list[str]:
        problems = super()._problems()
        if self.word_textures < 1 or self.texture_tile < 1 or self.words_per_image < 1:
            problems.append(f"need word_textures, texture_tile and words_per_image >= 1, got {self.word_textures}, "
                            f"{self.texture_tile} and {self.words_per_image}")
        elif not self.words_per_image <= min(self.trigger_length, self.word_textures):
            problems.append(f"the word code needs words_per_image ({self.words_per_image}) <= trigger_length "
                            f"({self.trigger_length}) and <= word_textures ({self.word_textures})")
        return problems


SETTINGS_CLASSES: dict[str, type[SurrogateSettings]] = {cls.method: cls for cls in (MEMSettings, WordCodeSettings)}

# The MEM fields a one-class settings dict (saved before the word code had its own class) held for the other
# method, at the values that meant "unused".
_UNUSED_BY_MEM = {"word_textures": 0, "texture_tile": 4, "words_per_image": 3, "texture_sign": False,
                  "texture_gray": False}
_UNUSED_BY_WORD_CODE = ("candidates", "trigger_iterations", "noise_grid", "upload_steps")


def settings_from_dict(values: dict) -> SurrogateSettings:
    """Settings written by to_dict, possibly by an older version: the method is named, or (older files, one class
    for both) implied by word_textures > 0; a setting it lacks takes the value that reproduces what that version
    did (SETTINGS_BEFORE_THEY_EXISTED), else its default."""
    values = dict(values)
    method = values.pop("method", None)
    if method is None:  # one settings class for both methods
        if values.get("word_textures"):
            method = WordCodeSettings.method
            for name in _UNUSED_BY_WORD_CODE:
                values.pop(name, None)
            # what that one class's defaults were
            before = {f.name: f.default for f in dataclasses.fields(MEMSettings) if f.name not in _UNUSED_BY_WORD_CODE}
            values = {**before, **SETTINGS_BEFORE_THEY_EXISTED, **_UNUSED_BY_MEM, **values}
        else:
            method = MEMSettings.method
            for name in _UNUSED_BY_MEM:
                values.pop(name, None)
    if method not in SETTINGS_CLASSES:
        raise ValueError(f"unknown protection method {method!r} (known: {', '.join(SETTINGS_CLASSES)})")
    cls = SETTINGS_CLASSES[method]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {method} settings: {', '.join(unknown)} (written by a newer version?)")
    return cls(**{**SETTINGS_BEFORE_THEY_EXISTED, **values})


# Named settings (`aigis protect --preset NAME`): a method and what the preset changes from its defaults.
# Options given beside a preset override its values. Measured on synthetic scenes only (BENCHMARKS.md).
PRESETS: dict[str, tuple[type[SurrogateSettings], dict[str, Any]]] = {
    # The reference's from-scratch MEM: one noise per image, a 3-token trigger.
    "paper": (MEMSettings, {}),
    # Word-wise noise on 2-px tiles at +-epsilon, each image's three words drawn from those its captions do not
    # use, 16 of them before every caption (60 short rounds, batch 100).
    "word-code": (WordCodeSettings, {}),
    # The same code in luminance only on 4-px tiles, for images that may be re-encoded in grayscale.
    "word-code-gray": (WordCodeSettings, {"texture_tile": 4, "texture_gray": True}),
}


def preset_settings(name: str, **overrides: Any) -> SurrogateSettings:
    """The settings a preset names, with `overrides` (field names of its method's settings) on top; validated."""
    if name not in PRESETS:
        raise ValueError(f"unknown protection preset {name!r}: choose one of {', '.join(PRESETS)}")
    cls, values = PRESETS[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"{', '.join(unknown)}: not a setting of preset {name!r} (method {cls.method})")
    settings = cls(**{**values, **overrides})
    settings.validate()
    return settings
