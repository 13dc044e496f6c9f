"""The paper's MEM: one free noise per image and a trigger searched per image (EM when the trigger is empty).

A pass (perturb_pass) takes the images in random batches, each with one of its captions: the trigger search
(search.py) during the first trigger_iterations, then PGD on the noise (pgd.py). An upload gets the same against
the frozen surrogate(s): a search and PGD per request (upload.py).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from . import parallel
from .attack import attack_mode
from .method import Protected, Protection
from .pgd import pgd_noise
from .search import _candidate_table, search_triggers
from .settings import MEMSettings
from .state import CaptionsPerImage, MEMState, _batches
from .tokenizer import Tokenizer
from .upload import protect_batch


class PerImageMEM(Protection):
    """Per-image MEM: fitting searches each image's trigger and moves its noise; an upload gets its own search and
    upload_steps of PGD against the frozen surrogate(s)."""

    settings_class: ClassVar = MEMSettings
    protects_with: ClassVar[str] = "search + PGD"

    def _begin(self, state: MEMState, captions: list[str], groups: CaptionsPerImage) -> None:
        pass  # the noise starts at zero and the triggers as placeholders (new_state)

    def _pass(self, state: MEMState, images: np.ndarray, tokens: Tensor, device: torch.device,
              groups: CaptionsPerImage) -> tuple[float, bool]:
        search = bool(self.settings.trigger_length) and state.iteration < self.settings.trigger_iterations
        return perturb_pass(state, self.tokenizer, images, tokens, self.settings, device, search, groups), search

    def protect(self, images_uint8: np.ndarray, captions: list[str], *,
                device: str | torch.device | None = None) -> Protected:
        return Protected(*protect_batch(self.surrogates, self.tokenizer, images_uint8, captions, self.settings,
                                        steps=self.settings.upload_steps, device=device))


def perturb_pass(state: MEMState, tokenizer: Tokenizer, images: np.ndarray, tokens: Tensor, settings: MEMSettings,
                 device: torch.device, update_triggers: bool, groups: CaptionsPerImage | None = None) -> float:
    """One pass over the images in batches, each with one of its captions: trigger search (if
    update_triggers), then PGD on the noise.

    Under torchrun the batches are dealt out to the ranks, each drawing from a generator of its own (parallel.py);
    with one process every draw comes from state.generator, as without torchrun."""
    models = state.models
    groups = groups or CaptionsPerImage.single(images.shape[0])
    candidate_ids = _candidate_table(tokenizer, models, device) if settings.trigger_length else None
    batches = _batches(images.shape[0], settings.batch_size, state.generator)
    generator = parallel.rank_generator(state, settings.seed) if parallel.world() > 1 else state.generator
    losses: dict[int, float] = {}
    with attack_mode(models, batch_statistics=settings.norm_stats == "batch"):
        for j in parallel.my_batches(len(batches)):
            index = batches[j]
            x = torch.from_numpy(images[index]).to(device)
            delta = torch.from_numpy(np.asarray(state.noise[index])).to(device).to(torch.int16)
            t = tokens[groups.pick(index, generator)].to(device)
            trig = torch.from_numpy(state.triggers[index]).to(device)
            if update_triggers and settings.trigger_length:
                trig, _ = search_triggers(models, tokenizer, x, delta, t, trig, settings, candidate_ids=candidate_ids)
                state.triggers[index] = trig.cpu().numpy()
            delta, loss = pgd_noise(models, x, delta, t, trig, settings, settings.pgd_steps, generator)
            state.noise[index] = delta.to(torch.int8).cpu().numpy()
            losses[j] = loss
    return parallel.finish_pass(state, batches, losses, triggers=bool(update_triggers and settings.trigger_length))
