"""The process-group facts of a job launched by torchrun, for training and protection to import.

    torchrun --nproc-per-node 4 $(which aigis) train ...        # or --nnodes N --rdzv-endpoint HOST:PORT
    with process_group(device):                                 # reads torchrun's environment, joins the group
        if is_main(): ...                                       # rank 0 alone writes outputs
        part = shard(n)                                         # this rank's block of n items

Without torchrun (no RANK / WORLD_SIZE in the environment) nothing is initialised and every answer here is the
one-process answer: rank 0 of 1, is_main() true, barrier() returns at once, on_main(fn) is fn(), gather_rows
returns its argument. A job run that way behaves exactly as it did before this module existed.

The group uses NCCL when the job runs on CUDA (each process on the GPU of its LOCAL_RANK) and gloo on the CPU.
Every collective has a timeout (AIGIS_DIST_TIMEOUT_S, default 1800 s): a rank that dies is noticed by torchrun,
which stops the others; a rank that hangs is given up on after the timeout rather than waited for forever.
"""

from __future__ import annotations

import datetime
import logging
import os
import pickle
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, TypeVar

import numpy as np

log = logging.getLogger(__name__)

TIMEOUT_ENV = "AIGIS_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 1800.0

T = TypeVar("T")


@dataclass(frozen=True)
class Launch:
    """What torchrun tells each process it starts (torch.distributed.run's environment variables)."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master: str  # MASTER_ADDR:MASTER_PORT, for messages
    machine: int = 0  # GROUP_RANK: which machine (torchrun's node rank)

    @property
    def spans_machines(self) -> bool:
        return self.local_world_size != self.world_size


def launch_from_env(environ: Mapping[str, str] | None = None) -> Launch | None:
    """The launch this process is part of, or None when no launcher set RANK and WORLD_SIZE."""
    environ = os.environ if environ is None else environ
    if "RANK" not in environ or "WORLD_SIZE" not in environ:
        return None
    try:
        rank, world = int(environ["RANK"]), int(environ["WORLD_SIZE"])
        local_rank = int(environ.get("LOCAL_RANK", rank))
        local_world = int(environ.get("LOCAL_WORLD_SIZE", world))
    except ValueError as exc:
        raise ValueError(f"torchrun's environment is not numbers: {exc}") from None
    if not (world >= 1 and 0 <= rank < world and 0 <= local_rank < local_world <= world):
        raise ValueError(f"torchrun's environment is inconsistent: RANK={rank} WORLD_SIZE={world} "
                         f"LOCAL_RANK={local_rank} LOCAL_WORLD_SIZE={local_world}")
    master = f"{environ.get('MASTER_ADDR', '?')}:{environ.get('MASTER_PORT', '?')}"
    machine = int(environ.get("GROUP_RANK", rank // local_world))
    return Launch(rank, world, local_rank, local_world, master, machine)


def timeout_s(environ: Mapping[str, str] | None = None) -> float:
    """Seconds a collective may wait for the other ranks (AIGIS_DIST_TIMEOUT_S, default 1800)."""
    environ = os.environ if environ is None else environ
    text = environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise ValueError(f"{TIMEOUT_ENV}={text!r} must be a positive number of seconds")
    return value


def backend_for(device: str) -> str:
    """nccl for a job on CUDA, gloo for one on the CPU."""
    return "nccl" if str(device).startswith("cuda") else "gloo"


def local_device(device: str, launch: Launch | None = None) -> str:
    """The device this process uses for a job asked to run on `device`: under torchrun, "cuda" means the GPU of
    this process's LOCAL_RANK; an explicit cuda:N is refused when several processes share the machine (they would
    all land on one GPU)."""
    launch = launch if launch is not None else current_launch()
    device = str(device)
    if launch is None or not device.startswith("cuda"):
        return device
    if device == "cuda":
        return f"cuda:{launch.local_rank}"
    if launch.local_world_size > 1:
        raise ValueError(f"device {device!r}: under torchrun each process takes the GPU of its LOCAL_RANK; ask for "
                         f"\"cuda\" (or pick GPUs with CUDA_VISIBLE_DEVICES)")
    return device


# ------------------------------------------------------------------------------------------------------------
# Joining and leaving the group

_launch: Launch | None = None  # set while process_group() holds the group this module initialised


def _dist():
    import torch.distributed as dist

    return dist


def active() -> bool:
    """Whether a process group is up (even of one process: then the collectives run, with nobody to wait for)."""
    try:
        dist = _dist()
    except ImportError:
        return False
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return _dist().get_rank() if active() else 0


def world_size() -> int:
    return _dist().get_world_size() if active() else 1


def is_main() -> bool:
    """Whether this process is rank 0: the one that writes outputs, checkpoints and manifests, and shows progress."""
    return rank() == 0


def current_launch() -> Launch | None:
    """The launch of the group that is up (None without one)."""
    if _launch is not None:
        return _launch
    if not active():
        return None
    found = launch_from_env()
    return found if found is not None else Launch(rank(), world_size(), rank(), world_size(), "?")


def spans_machines() -> bool:
    launch = current_launch()
    return launch is not None and launch.spans_machines


@contextmanager
def process_group(device: str, environ: Mapping[str, str] | None = None, quiet: bool = False
                  ) -> Iterator[Launch | None]:
    """Join torchrun's process group for a job on `device` (nccl on CUDA, gloo on the CPU), and leave it after.

    Yields the Launch, or None when the process was not started by torchrun (then nothing is initialised). Ranks
    other than 0 log warnings only, so a job's progress is shown once; quiet: not even rank 0 says it joined."""
    global _launch
    launch = launch_from_env(environ)
    if launch is None or active():
        yield launch if launch is not None else None
        return
    import torch

    dist = _dist()
    backend = backend_for(device)
    options: dict[str, Any] = {}
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ValueError("a job on CUDA under torchrun needs CUDA, which this process does not see")
        torch.cuda.set_device(launch.local_rank)
        options["device_id"] = torch.device("cuda", launch.local_rank)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s(environ)), **options)
    _launch = launch
    logger = logging.getLogger("aigis")
    level = logger.level
    if launch.rank != 0:
        logger.setLevel(logging.WARNING)
    (log.debug if quiet else log.info)(f"process group: {launch.world_size} process(es) over {backend} "
             f"({launch.local_world_size} on this machine), rendezvous {launch.master}")
    finished = False
    try:
        yield launch
        finished = True
    finally:
        logger.setLevel(level)
        _launch = None
        try:
            if finished:
                # Leave together: a rank tearing its connections down while another is still in its last
                # collective can make gloo's transport thread abort the other process (SIGABRT at exit).
                dist.barrier()
            dist.destroy_process_group()
        except Exception as exc:  # noqa: BLE001 - leaving a broken group must not hide the job's own error
            log.warning(f"leaving the process group: {exc}")


# ------------------------------------------------------------------------------------------------------------
# Work split


def block_bounds(n: int, world: int | None = None) -> list[tuple[int, int]]:
    """[start, stop) of each rank's block of n items: contiguous, in rank order, sizes differing by at most one
    (the first n % world blocks one longer), as numpy's array_split cuts."""
    world = world_size() if world is None else int(world)
    base, extra = divmod(int(n), world)
    bounds, start = [], 0
    for r in range(world):
        stop = start + base + (1 if r < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def shard(n: int, rank_: int | None = None, world: int | None = None) -> np.ndarray:
    """Indices of this rank's block of n items (all of them without a group)."""
    world = world_size() if world is None else int(world)
    rank_ = rank() if rank_ is None else int(rank_)
    start, stop = block_bounds(n, world)[rank_]
    return np.arange(start, stop, dtype=np.int64)


def seed_for_rank(seed: int, *keys: int) -> int:
    """A 63-bit seed for a stream keyed by (seed, *keys) -- e.g. (seed, task, rank): every rank's draws are
    defined, so a job is reproducible for a given world size."""
    state = np.random.SeedSequence([int(seed), *map(int, keys), 0xD157]).generate_state(2, dtype=np.uint64)
    return int(state[0] >> np.uint64(1))


# ------------------------------------------------------------------------------------------------------------
# Collectives (each a no-op, or the identity, without a group)


def comm_device():
    """Where tensors must be for the group's collectives: this rank's GPU under nccl, else the CPU."""
    import torch

    if active() and _dist().get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait until every rank arrives here."""
    if not active():
        return
    dist = _dist()
    if dist.get_backend() == "nccl":
        import torch

        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank src's `obj` on every rank (pickled; for small things: manifests, metrics, exemplar lists)."""
    if not active():
        return obj
    holder = [obj]
    _dist().broadcast_object_list(holder, src=src, device=comm_device())
    return holder[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not active():
        return [obj]
    gathered: list[Any] = [None] * world_size()
    _dist().all_gather_object(gathered, obj)
    return gathered


def on_main(fn: Callable[[], T]) -> T:
    """Run fn on rank 0 alone and hand its result to every rank; an exception it raises is raised on every rank
    (so a refused resume or a bad file stops the whole job with the same message, not rank 0 alone while the
    others wait). Also a barrier: nobody returns before rank 0 has finished fn."""
    if not active():
        return fn()
    result, error = None, None
    if is_main():
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - handed to every rank, then raised here too
            error = exc
    sent = None
    if is_main():
        sent = (result, _picklable(error)) if error is not None else (result, None)
    result, remote_error = broadcast_object(sent)
    if error is not None:
        raise error
    if remote_error is not None:
        remote_error.aigis_from_main = True  # the CLI prints it once, on rank 0
        raise remote_error
    return result


def _picklable(error: BaseException) -> BaseException:
    try:
        return pickle.loads(pickle.dumps(error))
    except Exception:  # noqa: BLE001 - an exception that does not survive pickling is sent as its text
        return RuntimeError(f"{type(error).__name__}: {error}")


def all_reduce_mean(value: float) -> float:
    """The mean over ranks of a float."""
    if not active():
        return float(value)
    import torch

    tensor = torch.tensor([float(value)], dtype=torch.float64, device=comm_device())
    _dist().all_reduce(tensor)
    return float(tensor.item()) / world_size()


def gather_rows(local, n: int):
    """The whole [n, ...] tensor on every rank, from each rank's rows of its block (block_bounds(n)). Without a
    group, `local` itself."""
    if not active():
        return local
    import torch

    bounds = block_bounds(n)
    start, stop = bounds[rank()]
    if local.shape[0] != stop - start:
        raise ValueError(f"rank {rank()} holds {local.shape[0]} rows of its block [{start}, {stop})")
    comm = comm_device()
    longest = max(b - a for a, b in bounds)
    padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=comm)
    padded[: local.shape[0]] = local.detach().to(comm)
    parts = [torch.empty_like(padded) for _ in bounds]
    _dist().all_gather(parts, padded)
    return torch.cat([part[: b - a] for part, (a, b) in zip(parts, bounds)]).to(local.device)


def gather_rows_live(local, n: int):
    """gather_rows as float32, with this rank's own rows the live (differentiable) tensor: a loss over the whole
    batch then backpropagates into what this rank computed, and the ranks' gradients sum to the one-process
    gradient of that loss."""
    if not active():
        return local
    start, stop = block_bounds(n)[rank()]
    whole = gather_rows(local.detach().float(), n)
    import torch

    return torch.cat([whole[:start], local.float(), whole[stop:]])


def all_reduce_gradients(parameters: Iterable, average: bool = False) -> None:
    """Sum (or average) the gradients of `parameters` over the ranks, in place. A parameter without a gradient on
    some rank counts as zero there; one without a gradient on every rank keeps none (as one process would)."""
    if not active():
        return
    import torch
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    dist = _dist()
    params = [p for p in parameters if p.requires_grad]
    if not params:
        return
    comm = comm_device()
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=comm)
    dist.all_reduce(has, op=dist.ReduceOp.MAX)
    chosen = [p for p, h in zip(params, has.tolist()) if h]
    for p in chosen:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    for group in _by_kind([p.grad for p in chosen]):
        flat = _flatten_dense_tensors(group).to(comm)
        dist.all_reduce(flat)
        if average:
            flat /= world_size()
        for grad, reduced in zip(group, _unflatten_dense_tensors(flat, group)):
            grad.copy_(reduced)


def broadcast_tensors(tensors: Iterable, src: int = 0) -> None:
    """Overwrite every tensor in place with rank src's (e.g. a module's parameters and buffers)."""
    if not active():
        return
    import torch
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    comm = comm_device()
    with torch.no_grad():
        for group in _by_kind([t.data for t in tensors]):
            flat = _flatten_dense_tensors(group).to(comm)
            _dist().broadcast(flat, src=src)
            for tensor, value in zip(group, _unflatten_dense_tensors(flat, group)):
                tensor.copy_(value)


def broadcast_module(module, src: int = 0) -> None:
    """Every parameter and buffer of `module` set to rank src's."""
    if not active():
        return
    broadcast_tensors([*module.parameters(), *module.buffers()], src=src)


def _by_kind(tensors: list) -> list[list]:
    """Tensors grouped by (device, dtype), order kept within a group: one flat buffer each."""
    groups: dict[tuple, list] = {}
    for t in tensors:
        groups.setdefault((str(t.device), t.dtype), []).append(t)
    return list(groups.values())
