"""The word code (WordCodeSettings): a small texture per frequent caption word, shared by every image, so a
caption word means one pattern across a job's images and every later upload. Drawing the code, its error
minimisation over the textures (a pass moves the textures, not each image's pixels), and protecting uploads
with it (no search, no surrogate: the code is applied)."""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
from torch import Tensor

from aigis import distributed

from . import parallel
from .attack import _autocast, _images_for_model, _with_triggers, attack_mode, encode_text_trimmed, pair_losses
from .clip import CLIP
from .search import _candidate_table
from .method import Protected, Protection, crop_grid
from .settings import WordCodeSettings
from .state import CaptionsPerImage, MEMState, _batches
from .tokenizer import Tokenizer, apply_trigger_text
from .upload import _check_upload_batch


def texture_owners(tokenizer: Tokenizer, captions: list[str], models: Sequence[CLIP], count: int) -> Tensor:
    """Token ids [<= count] of the trigger candidates the captions use most (ties: the lower id first)."""
    candidates = set(_candidate_table(tokenizer, models, torch.device("cpu")).tolist())
    counts = Counter(i for caption in captions for i in tokenizer.encode(caption) if i in candidates)
    return torch.tensor(sorted(counts, key=lambda i: (-counts[i], i))[:count], dtype=torch.long)


def init_word_code(state: MEMState, tokenizer: Tokenizer, captions: list[str], settings: WordCodeSettings,
                   groups: CaptionsPerImage | None = None) -> None:
    """Pick the words that own textures, draw every image's words (a set no other image has; with
    foreign_triggers, none of them a word of the image's own captions) and its trigger (those words cycled in a
    random order), and start every texture, hence every noise, at zero."""
    n, m, length = state.noise.shape[0], settings.words_per_image, settings.trigger_length
    words = texture_owners(tokenizer, captions, state.models, settings.word_textures)
    k = len(words)
    if k < m or math.comb(k, m) < n:
        raise ValueError(f"word textures: the captions use {k} distinct words that can be triggers, which give "
                         f"{math.comb(k, m) if k >= m else 0} sets of {m} for {n} images; lower words_per_image "
                         f"or give the captions more words")
    rng = np.random.default_rng(settings.seed)
    if settings.foreign_triggers:
        word_sets = _foreign_word_sets(words, tokenizer, captions, groups or CaptionsPerImage.single(n), m, rng)
    else:
        sets: set[tuple[int, ...]] = set()
        while len(sets) < n:
            sets.add(tuple(sorted(rng.choice(k, size=m, replace=False).tolist())))
        word_sets = np.array(sorted(sets), dtype=np.int64)[rng.permutation(n)]
    for i, chosen in enumerate(word_sets):
        order = rng.permutation(chosen)
        state.triggers[i] = words[[int(order[j % m]) for j in range(length)]].numpy()
    state.word_sets = word_sets
    state.texture_words = words
    channels = 1 if settings.texture_gray else 3
    state.textures = torch.zeros(k, settings.texture_tile, settings.texture_tile, channels)
    state.noise[...] = 0


def _foreign_word_sets(words: Tensor, tokenizer: Tokenizer, captions: list[str], groups: CaptionsPerImage, m: int,
                       rng: np.random.Generator, tries: int = 1000) -> np.ndarray:
    """[N, m] indices into words: per image, m words none of its captions uses, a set no other image has. A
    caption word then names another image's texture more often than its own content, so a hacker that reads
    it as content gains less (the reasoning of foreign_triggers)."""
    own: list[set[int]] = [set() for _ in range(groups.n_images)]
    for c, caption in enumerate(captions):
        own[int(groups.image_of[c])].update(tokenizer.encode(caption))
    ids = words.tolist()
    taken: set[tuple[int, ...]] = set()
    word_sets = np.empty((groups.n_images, m), dtype=np.int64)
    for i, mine in enumerate(own):
        allowed = np.array([j for j, w in enumerate(ids) if w not in mine], dtype=np.int64)
        if len(allowed) < m:
            raise ValueError(f"word textures with foreign_triggers: image {i}'s captions use all but "
                             f"{len(allowed)} of the {len(ids)} texture words, fewer than words_per_image ({m})")
        for _ in range(tries):
            chosen = tuple(sorted(rng.choice(allowed, size=m, replace=False).tolist()))
            if chosen not in taken:
                break
        else:
            raise ValueError(f"word textures with foreign_triggers: no unused set of {m} words left for image {i}; "
                             f"lower words_per_image or give the captions more words")
        taken.add(chosen)
        word_sets[i] = chosen
    return word_sets


def word_code_noise(textures: Tensor, word_sets: Tensor, height: int, width: int, levels: int,
                    sign: bool = False) -> Tensor:
    """float [B, H, W, C] in +-levels: each image's textures (word_sets [B, m]) summed, clipped to [-1, 1]
    (sign: the sum's sign, its gradient passed straight through), repeated over the image. C is the textures'
    channels: 3, or 1 for gray textures (it broadcasts over R, G and B when added to an image)."""
    tile = textures.shape[1]
    total = textures[word_sets].sum(1).clamp(-1, 1)
    if sign:
        total = total + (torch.sign(total) - total).detach()
    return levels * total.repeat(1, -(-height // tile), -(-width // tile), 1)[:, :height, :width]


def _write_word_noise(state: MEMState, images: np.ndarray, settings: WordCodeSettings,
                      rows: np.ndarray | None = None) -> None:
    """state.noise <- the textures' noise on the uint8 grid, kept inside [0, 255] once added (of the images at
    `rows`, a contiguous range; default every image)."""
    n, h, w, _ = images.shape
    start, stop = (0, n) if rows is None else ((int(rows[0]), int(rows[-1]) + 1) if len(rows) else (0, 0))
    for i in range(start, stop, 256):
        end = min(i + 256, stop)
        sets = torch.from_numpy(state.word_sets[i:end])
        noise = word_code_noise(state.textures, sets, h, w, settings.epsilon_levels, settings.texture_sign)
        noise = noise.round().to(torch.int16)
        pixels = torch.from_numpy(images[i:end]).to(torch.int16)
        state.noise[i:end] = ((pixels + noise).clamp(0, 255) - pixels).to(torch.int8).numpy()


@dataclass
class WordCode:
    """A word-texture job's code over its whole data set: textures[k] (float [K, t, t, C]) is the pattern that
    token id words[k] names. Saved with the surrogate, it lets protect-on-upload give new images the SAME code,
    so each word still means one pattern across the job's images and every upload."""

    textures: Tensor
    words: Tensor


def texture_pass(state: MEMState, images: np.ndarray, tokens: Tensor, settings: WordCodeSettings, device: torch.device,
                 groups: CaptionsPerImage) -> float:
    """One pass of error minimisation over the SHARED textures: per batch, pgd_steps signed-gradient steps of one
    noise level (step_levels / epsilon_levels of the textures' range; with texture_sign the published noise is
    their sum's sign, so a step may flip a sub-pixel -- with texture_gray a whole pixel -- across the whole range),
    each image against shuffled captions carrying its own trigger (as pgd_noise); then every image's noise is
    rewritten from the textures.

    Under torchrun with several processes each batch is split over the ranks: each encodes its block, the loss is
    the whole batch's over the gathered features, and the textures' gradient is summed over the ranks (the
    one-process gradient), so every rank takes the same step; each rank then writes its block's noise."""
    models = state.models
    h, w = images.shape[1:3]
    step = settings.step_levels / settings.epsilon_levels
    table = state.textures.to(device)
    split = parallel.split()
    losses = []
    with attack_mode(models, batch_statistics=settings.norm_stats == "batch"):
        for index in _batches(images.shape[0], settings.batch_size, state.generator):
            block = parallel.batch_block(len(index)) if split else slice(None)
            pixels = torch.from_numpy(images[index[block]]).to(device).float()
            sets = torch.from_numpy(state.word_sets[index[block]]).to(device)
            t = tokens[groups.pick(index, state.generator)].to(device)
            trig = torch.from_numpy(state.triggers[index]).to(device)
            for _ in range(settings.pgd_steps):
                order = torch.randperm(len(index), generator=state.generator).to(device)
                with torch.no_grad(), _autocast(settings, device):
                    shuffled = _with_triggers(t[order], trig)[block]
                    text_features = [encode_text_trimmed(m, shuffled) for m in models]
                if split:
                    text_features = [distributed.gather_rows(f.float(), len(index)) for f in text_features]
                table.requires_grad_(True)
                noise = word_code_noise(table, sets, h, w, settings.epsilon_levels, settings.texture_sign)
                noisy = (pixels + noise).clamp(0, 255) / 255.0
                with _autocast(settings, device):
                    image_features = [m.encode_image(_images_for_model(m, noisy)) for m in models]
                    if split:
                        image_features = [distributed.gather_rows_live(f, len(index)) for f in image_features]
                    loss = sum(pair_losses(i, f, m.logit_scale).mean()
                               for m, i, f in zip(models, image_features, text_features)) / len(models)
                (grad,) = torch.autograd.grad(loss, table)
                if split:
                    distributed.all_reduce_gradients([_with_grad(table, grad)])
                table = (table.detach() - step * grad.sign()).clamp(-1, 1)
                losses.append(float(loss.detach()))
    if split:
        distributed.broadcast_tensors([table])  # rank 0's textures everywhere, to the last bit
    state.textures = table.cpu()
    _write_word_noise(state, images, settings, parallel.noise_rows(images.shape[0]) if split else None)
    parallel.share_noise(state.noise)
    loss = float(np.mean(losses)) if losses else float("nan")
    return distributed.broadcast_object(loss) if split else loss


def _with_grad(table: Tensor, grad: Tensor) -> Tensor:
    """A stand-in parameter whose .grad is `grad` (the tensor itself, reduced in place by all_reduce_gradients)."""
    holder = table.detach().requires_grad_(True)
    holder.grad = grad
    return holder


def upload_size_error(height: int, width: int, code_size: int) -> str | None:
    """Why an upload cannot carry a word code made at code_size px (None: it can)."""
    if min(height, width) < code_size:
        return (f"a {height}x{width} upload is smaller than the {code_size} px the word code was made at: its "
                f"texture tiles cannot be drawn")
    return None


def _tiled(period: Tensor, height: int, width: int, code_size: int) -> Tensor:
    """One tile of each image's code noise ([B, t, t, C]) laid over a height x width image as the job's code lies
    over its centre crop: pixel y takes code pixel crop_grid(y) modulo the tile, so outside the crop the pattern
    continues."""
    rows, cols = crop_grid(height, width, code_size)
    tile = period.shape[1]
    return period[:, torch.from_numpy(rows % tile)][:, :, torch.from_numpy(cols % tile)]


def _ranked_words(allowed: np.ndarray, key: bytes) -> np.ndarray:
    """allowed, ordered by a hash of (key, word index): a draw that depends on nothing but its inputs."""
    scores = [hashlib.sha256(key + int(j).to_bytes(4, "little")).digest() for j in allowed]
    return allowed[np.argsort(scores, kind="stable")]


def protect_with_word_code(
    code: WordCode, tokenizer: Tokenizer, images_uint8: np.ndarray, captions: list[str], settings: WordCodeSettings,
    code_size: int,
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Protect uploads with a job's word code: no search, no surrogate. Returns what protect_batch returns.

    Each image gets words_per_image of the code's words -- with foreign_triggers none of its caption's words,
    unless the caption uses so many that too few are left -- chosen by a hash of its pixels and caption (the
    same upload is protected the same way every time, on any machine). Its noise is those words' textures as the
    job draws them, in blocks of (short side / code_size) px aligned with the centre crop a model takes (the job
    published short-side-resized, centre-cropped images), so a model resizing the upload reads the job's code;
    its trigger names the words, cycled to trigger_length. Uploads under code_size px are refused.
    """
    if not isinstance(settings, WordCodeSettings):
        raise TypeError(f"protect_with_word_code needs WordCodeSettings, got {type(settings).__name__}")
    settings.validate()
    _check_upload_batch(images_uint8, captions)
    n, h, w, _ = images_uint8.shape
    problem = upload_size_error(h, w, code_size)
    if problem:
        raise ValueError(problem)
    m, k = settings.words_per_image, settings.trigger_length
    ids = code.words.tolist()
    if len(ids) < m:
        raise ValueError(f"a word code of {len(ids)} words cannot give {m} words per image")
    word_sets = np.empty((n, m), dtype=np.int64)
    trigger_ids = np.empty((n, k), dtype=np.int64)
    for i, caption in enumerate(captions):
        own = set(tokenizer.encode(caption)) if settings.foreign_triggers else set()
        is_own = np.array([word in own for word in ids])
        key = hashlib.sha256(images_uint8[i].tobytes() + caption.encode("utf-8")).digest()
        chosen = np.concatenate([_ranked_words(np.flatnonzero(~is_own), key),
                                 _ranked_words(np.flatnonzero(is_own), key)])[:m]
        word_sets[i] = np.sort(chosen)
        trigger_ids[i] = [ids[int(chosen[j % m])] for j in range(k)]
    tile = code.textures.shape[1]
    period = word_code_noise(code.textures, torch.from_numpy(word_sets), tile, tile, settings.epsilon_levels,
                             settings.texture_sign).round().to(torch.int16)  # one tile of each image's noise
    noise = _tiled(period, h, w, code_size)
    pixels = torch.from_numpy(np.ascontiguousarray(images_uint8)).to(torch.int16)
    protected = (pixels + noise).clamp(0, 255)
    delta = (protected - pixels).to(torch.int8).numpy()
    texts = [apply_trigger_text(trigger_ids[i], c, tokenizer) for i, c in enumerate(captions)]
    return protected.to(torch.uint8).numpy(), texts, delta


class WordCodeMEM(Protection):
    """The word code as a protection method: fitted, it holds the code (textures and their words) that uploads
    get, at the size the job's images had (code_size, default the surrogate's resolution)."""

    settings_class: ClassVar = WordCodeSettings
    protects_with: ClassVar[str] = "word code"
    triggers_from_caption_words: ClassVar[bool] = True

    def __init__(self, settings: WordCodeSettings, surrogates: CLIP | Sequence[CLIP], tokenizer: Tokenizer,
                 code: WordCode | None = None, code_size: int | None = None):
        super().__init__(settings, surrogates, tokenizer)
        self.code = code
        self.code_size = int(code_size or self.surrogates[0].image_resolution)

    def _begin(self, state: MEMState, captions: list[str], groups: CaptionsPerImage) -> None:
        if state.textures is None:  # a resumed state keeps its code
            init_word_code(state, self.tokenizer, captions, self.settings, groups)

    def _pass(self, state: MEMState, images: np.ndarray, tokens: Tensor, device: torch.device,
              groups: CaptionsPerImage) -> tuple[float, bool]:
        return texture_pass(state, images, tokens, self.settings, device, groups), False

    def _fitted(self, state: MEMState) -> None:
        self.code = WordCode(state.textures, state.texture_words)
        self.code_size = int(state.noise.shape[1])

    def report(self, state: MEMState) -> dict[str, Any]:
        return {"texture_words": [self.tokenizer.decode([int(i)]) for i in state.texture_words]}

    def noise_at(self, state: MEMState, index: int, height: int, width: int) -> np.ndarray:
        """The image's words' code over its whole source (the pattern continues outside the job's crop)."""
        tile = state.textures.shape[1]
        period = word_code_noise(state.textures, torch.from_numpy(state.word_sets[index : index + 1]), tile, tile,
                                 self.settings.epsilon_levels, self.settings.texture_sign).round().to(torch.int16)
        noise = _tiled(period, height, width, state.noise.shape[1])[0]
        return noise.expand(height, width, 3).numpy().copy()

    def protect(self, images_uint8: np.ndarray, captions: list[str], *,
                device: str | torch.device | None = None) -> Protected:
        if self.code is None:
            raise ValueError("this word code is not fitted yet: fit it to a data set or load a job's artefact")
        return Protected(*protect_with_word_code(self.code, self.tokenizer, images_uint8, captions, self.settings,
                                                 self.code_size))

    def upload_problem(self, height: int, width: int) -> str | None:
        return upload_size_error(height, width, self.code_size)

    def _artefact_parts(self) -> dict[str, Any]:
        if self.code is None:
            raise ValueError("a word code is saved once fitted (its textures are what uploads get)")
        return {"word_code": self.code}

    @classmethod
    def from_artefact(cls, directory: Path, meta: dict, settings: WordCodeSettings, models: list[CLIP],
                      tokenizer: Tokenizer) -> "WordCodeMEM":
        from .artefact import load_word_code

        return cls(settings, models, tokenizer, code=load_word_code(directory, meta, settings))
