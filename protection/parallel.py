"""A protection job over several processes (torchrun; aigis.distributed): who does which part of the outer loop.

- Surrogate training (surrogate.train_surrogate): every rank draws the same batch from the shared generator and
  encodes its block of it; image and text features are gathered (batch_features) so that each rank computes the
  whole batch's contrastive loss, its own rows live; the gradients summed over the ranks are then the one-process
  gradient of that loss. Every rank steps its copy of the optimiser, and rank 0's weights and BatchNorm statistics
  are broadcast after the training steps.
- A per-image pass (per_image.perturb_pass): the pass's random batches are drawn from the shared generator on
  every rank and dealt out in turn (batch j to rank j mod world); each rank searches the triggers and moves the
  noise of the images of its own batches, drawing its caption shuffles from a generator of its own
  (rank_generator: keyed by seed, outer iteration and rank, so a resumed job draws what the killed one would
  have). Its noise rows go straight into the one memory-mapped noise file; triggers and losses are exchanged at
  the end of the pass (finish_pass).
- A word-code pass (word_code.texture_pass): the textures are shared by every image, so each batch is split over
  the ranks and the textures' gradient summed, as in surrogate training; each rank then writes the noise of its
  block of the images.

Without a process group every function here gives back what one process does, untouched.
On one machine the ranks share the noise file through the page cache: each flushes its rows, then a barrier. A job
spanning machines needs --out on a filesystem all of them mount (the tokenizer and checkpoints rank 0 writes are
read there); each machine keeps its own noise file in work/ (job._prepare_work), written by its own processes
alone: after each pass the rows are also sent over the process group and written by the machine's first process,
so no machine reads another's writes through that filesystem.
"""

from __future__ import annotations

import numpy as np
import torch

from aigis import distributed

from .state import MEMState


def world() -> int:
    """Ranks sharing a pass (1 without a process group)."""
    return distributed.world_size()


def rank_generator(state: MEMState, seed: int) -> torch.Generator:
    """The generator of this rank's draws during a pass of outer iteration state.iteration."""
    return torch.Generator().manual_seed(distributed.seed_for_rank(seed, state.iteration, distributed.rank()))


def my_batches(count: int) -> list[int]:
    """Which of a pass's `count` batches this rank takes: j = rank, rank + world, ..."""
    return list(range(distributed.rank(), count, world()))


def finish_pass(state: MEMState, batches: list[np.ndarray], losses: dict[int, float], triggers: bool) -> float:
    """After a per-image pass in which this rank wrote the noise (and, if `triggers`, the triggers) of the images
    of its batches: every rank gets every trigger and sees every noise row; returns the pass's mean loss, rank 0's
    (the same number everywhere, so every rank takes the same stop decision)."""
    if not distributed.active():
        return float(np.mean([losses[j] for j in sorted(losses)]))
    flush(state.noise)
    mine = [batches[j] for j in sorted(losses)]
    launch = distributed.current_launch()
    sending = {"losses": losses, "machine": launch.machine,
               "triggers": [(index, np.asarray(state.triggers[index])) for index in mine] if triggers else [],
               "noise": [(index, np.asarray(state.noise[index])) for index in mine] if launch.spans_machines
               else []}
    everyone = distributed.all_gather_object(sending)
    all_losses: dict[int, float] = {}
    for got in everyone:
        all_losses.update(got["losses"])
        for index, rows in got["triggers"]:
            state.triggers[index] = rows
    if launch.spans_machines:
        _write_remote_rows(state.noise, [item for got in everyone if got["machine"] != launch.machine
                                         for item in got["noise"]])
    return distributed.broadcast_object(float(np.mean([all_losses[j] for j in sorted(all_losses)])))


def noise_rows(n: int) -> np.ndarray:
    """Which images' noise this rank writes when every rank can compute every row (the word code): its block on
    one machine; on several, every row by each machine's first process and none by the others."""
    if not distributed.active():
        return np.arange(n)
    if distributed.spans_machines():
        launch = distributed.current_launch()
        return np.arange(n) if launch.local_rank == 0 else np.arange(0)
    return distributed.shard(n)


def share_noise(noise: np.ndarray) -> None:
    """Every rank's writes to the noise file done and visible before anyone reads it again."""
    if not distributed.active():
        return
    flush(noise)
    distributed.barrier()


def flush(noise: np.ndarray) -> None:
    if isinstance(noise, np.memmap):
        noise.flush()


def _write_remote_rows(noise: np.ndarray, items: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """On a job spanning machines: the first process of each machine writes the rows the other machines' ranks
    sent, then every process waits until its machine's copy is whole."""
    launch = distributed.current_launch()
    if launch.local_rank == 0:
        for index, rows in items:
            noise[index] = rows
        flush(noise)
    distributed.barrier()


def batch_block(batch: int) -> slice:
    """This rank's rows of a batch of `batch` items split over the ranks (all of them without a group)."""
    start, stop = distributed.block_bounds(batch)[distributed.rank()]
    return slice(start, stop)


def split() -> bool:
    """Whether batches are split over several ranks (a group of more than one process)."""
    return distributed.active() and world() > 1
