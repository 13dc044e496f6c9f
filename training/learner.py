"""Training one task: the optimisation loop, evaluation, and herding features.

Every random choice of task k (adapter and head init, LoRA dropout, sample order, crops and flips)
comes from generators seeded by (seed, k) at the start of the task, so a run resumed after task k-1
reproduces an uninterrupted one exactly.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from aigis.training.config import TrainConfig


def task_seed(seed: int, task_index: int) -> int:
    """A 63-bit seed for task `task_index` of a run seeded with `seed` (independent streams per task)."""
    return int(np.random.SeedSequence([seed, task_index]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def seed_task(seed: int, task_index: int) -> np.random.Generator:
    """Seed torch's global generators for task `task_index` and return the task's numpy generator."""
    value = task_seed(seed, task_index)
    torch.manual_seed(value)
    return np.random.default_rng(value)


@dataclass
class FitStats:
    """What one task's training did, for the manifest and the summary."""

    images: int
    steps: int
    seconds: float
    final_loss: float

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def diversity_targets(labels: torch.Tensor, old_classes: int) -> torch.Tensor:
    """Diversity-head labels: every old class -> 0, new class c -> c - old_classes + 1."""
    return torch.where(labels < old_classes, torch.zeros_like(labels), labels - old_classes + 1)


class TaskTrainer:
    """Runs AdamW with a per-step cosine schedule over a task's training batches."""

    def __init__(self, config: TrainConfig, device: str, progress: bool = True) -> None:
        self.config = config
        self.device = device
        self.amp = config.use_amp(device)
        self.progress = progress

    def fit(self, model: nn.Module, batches, task_index: int, old_classes: int, description: str) -> FitStats:
        """Train `model` on `batches` (an epoch-aware loader) for config.epochs epochs.

        Under torchrun (aigis.distributed) the model trains data-parallel: every rank takes its part of each
        batch (Batches.epoch_parts) through DistributedDataParallel, whose gradient average is the whole
        batch's gradient, so config.batch_size stays the batch of one optimiser step whatever the world size."""
        from tqdm import tqdm

        from aigis import distributed

        config = self.config
        params = model.trainable_parameters()
        optimizer = torch.optim.AdamW(params, lr=config.learning_rate(task_index), weight_decay=config.weight_decay)
        steps = config.epochs * len(batches)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))
        scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        rank, world = distributed.rank(), distributed.world_size()
        forward = model.forward_train
        if distributed.active():
            forward = _data_parallel(model, config, self.device)
        model.train()
        seen, loss_value, start = 0, math.nan, time.perf_counter()
        last_loss = None
        bar = tqdm(total=batches.num_samples * config.epochs,
                   desc=description, unit="img", disable=not self.progress, dynamic_ncols=True, leave=False)
        try:
            for epoch in range(config.epochs):
                for images, labels, weight, batch_size in batches.epoch_parts(epoch, rank, world):
                    images = images.to(self.device, non_blocking=True)
                    labels = labels.to(self.device, non_blocking=True)
                    with torch.autocast("cuda", dtype=torch.float16, enabled=self.amp):
                        logits, diversity = forward(images)
                        loss = F.cross_entropy(logits.float(), labels)
                        if diversity is not None and config.diversity_weight > 0:
                            loss = loss + config.diversity_weight * F.cross_entropy(
                                diversity.float(), diversity_targets(labels, old_classes))
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"{description}: loss became {loss.item()} at epoch {epoch}; "
                                                 f"lower the learning rate")
                    if weight is not None:
                        loss = loss * weight  # this rank's share of the whole batch's mean
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                    schedule.step()
                    seen += batch_size
                    last_loss = loss.detach()
                    loss_value = float(last_loss)
                    bar.update(batch_size)
                    bar.set_postfix(epoch=f"{epoch + 1}/{config.epochs}", loss=f"{loss_value:.3f}")
        finally:
            bar.close()
            forward = None  # the DistributedDataParallel wrapper goes (and unhooks the parameters) here
        if distributed.active() and last_loss is not None:
            loss_value = distributed.all_reduce_mean(float(last_loss))  # the last batch's mean loss
        model.freeze()
        model.eval()
        return FitStats(images=seen, steps=steps, seconds=time.perf_counter() - start, final_loss=loss_value)


class _TrainForward(nn.Module):
    """forward = the model's forward_train, so that DistributedDataParallel (which hooks forward) can wrap it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor):
        return self.model.forward_train(images)


def _data_parallel(model: nn.Module, config: TrainConfig, device: str):
    """model.forward_train through DistributedDataParallel over the parameters trainable now.

    DDP waits for a gradient of every parameter it holds. A diversity head that the loss does not use
    (diversity_weight 0) is frozen first (one process leaves it without a gradient too). A LoRAX step uses every
    other trainable parameter; a whole backbone (the baselines) may hold some that its features skip (e.g. a
    classification head), which DDP then looks for on every step and leaves without a gradient, as one process
    does."""
    from torch.nn.parallel import DistributedDataParallel

    head = getattr(model, "diversity_head", None)
    if head is not None and not config.diversity_weight > 0:
        head.requires_grad_(False)
    index = torch.device(device).index if str(device).startswith("cuda") else None
    return DistributedDataParallel(_TrainForward(model), device_ids=None if index is None else [index],
                                   find_unused_parameters=not hasattr(model, "adapter_parameters"))


@torch.no_grad()
def extract_features(model: nn.Module, batches, extractors: list[int], device: str, amp: bool,
                     progress: bool = False, description: str = "features") -> list[torch.Tensor]:
    """Features of `batches` (in order) from each extractor in `extractors`: one float32 [N, D] CPU tensor each."""
    from tqdm import tqdm

    model.eval()
    outputs: list[list[torch.Tensor]] = [[] for _ in extractors]
    if not extractors:
        return []
    if batches.num_samples == 0:  # a rank's empty block of a set smaller than the world
        return [torch.zeros(0, model.feature_dim) for _ in extractors]
    with tqdm(total=batches.num_samples, desc=description, unit="img", disable=not progress, leave=False,
              dynamic_ncols=True) as bar:
        for images, _ in batches.epoch(0):
            pixels = model.image_input(images.to(device, non_blocking=True))
            with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
                trunk = model.trunk_features(pixels)
                for slot, k in enumerate(extractors):
                    outputs[slot].append(model.task_features(trunk, k).float().cpu())
            bar.update(len(images))
    return [torch.cat(parts) for parts in outputs]


def balance_classifier(classifier: nn.Module, features: list[torch.Tensor], labels: np.ndarray, epochs: int,
                       lr: float, batch_size: int, seed: int) -> float:
    """Fine-tune the unified classifier alone on features of the class-balanced exemplar memory (DER's
    classifier-learning stage); returns the last epoch's mean loss.

    The classifier trained with the newest task sees far more images of the new classes than of the old ones
    (whose only trace is the memory), so its decisions drift toward the newest generator; a few epochs on equal
    numbers of every class pull them back. The extractors stay frozen: only the classifier's weights move.
    """
    inputs = torch.cat(features, dim=1)
    target = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    device = next(classifier.parameters()).device
    params = list(classifier.parameters())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    order = torch.Generator().manual_seed(seed)
    loss_sum = math.nan
    with torch.enable_grad():
        for _ in range(epochs):
            loss_sum, count = 0.0, 0
            for rows in torch.randperm(len(target), generator=order).split(batch_size):
                logits = classifier.linear(inputs[rows].to(device))
                loss = F.cross_entropy(logits, target[rows].to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += float(loss.detach()) * len(rows)
                count += len(rows)
            loss_sum /= max(count, 1)
    for p in params:
        p.requires_grad_(False)
    return loss_sum
