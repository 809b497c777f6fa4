"""Running under ``torchrun``: which process this is, one process group per command, rank-0 writes.

``torchrun`` starts one process per GPU (or per CPU worker), on one node or many, and tells each
who it is through environment variables: ``RANK`` (0..``WORLD_SIZE``-1 over all nodes),
``WORLD_SIZE``, ``LOCAL_RANK`` (its index on its node, i.e. its GPU) and the rendezvous address.
`World` reads them; a command started without ``torchrun`` is rank 0 of a world of 1 and never
creates a process group, so every command runs unchanged in one process.

`process_group` creates PyTorch's default process group for the duration of a command: NCCL
between GPUs, gloo between CPU processes (the backend follows ``--device``). Work is split with
`rank_range` (contiguous, balanced shares); files every rank would write the same are written by
rank 0 only (`World.is_main`), after a `barrier` when they depend on the others' work.

Example:
    >>> world = World.from_env({})          # no torchrun: one process
    >>> world.rank, world.world_size, world.is_main, world.distributed
    (0, 1, True, False)
    >>> [rank_range(10, r, 4) for r in range(4)]
    [(0, 2), (2, 5), (5, 7), (7, 10)]
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

__all__ = [
    "World", "rank_range", "rank_device", "process_group", "barrier", "on_main", "all_gather_objects", "all_reduce",
]  # fmt: skip


def rank_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """The items ``[begin, end)`` of ``n`` that ``rank`` owns: contiguous, in rank order, sizes differing by at most one."""
    return n * rank // world_size, n * (rank + 1) // world_size


def _env_int(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not a whole number; torchrun sets it, do not set it by hand") from None


@dataclass(frozen=True)
class World:
    """This process's place among the processes ``torchrun`` started.

    Attributes:
        rank: Global rank, ``0 .. world_size - 1``.
        world_size: Number of processes over all nodes.
        local_rank: Rank on this node (which GPU this process uses).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size or self.local_rank < 0:
            raise ValueError(
                f"inconsistent torchrun environment: RANK={self.rank}, WORLD_SIZE={self.world_size}, "
                f"LOCAL_RANK={self.local_rank}; need 0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> World:
        """Read ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (as ``torchrun`` sets them); absent: one process."""
        env = os.environ if environ is None else environ
        return cls(_env_int(env, "RANK", 0), _env_int(env, "WORLD_SIZE", 1), _env_int(env, "LOCAL_RANK", 0))

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes the files shared by all."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def rank_device(device: str | torch.device, world: World) -> torch.device:
    """The device this rank computes on: ``"cuda"`` means this node's GPU number ``LOCAL_RANK``.

    Raises:
        ValueError: a GPU index was given while several processes share the node (each would use
            the same GPU), or ``LOCAL_RANK`` has no GPU.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return device
    if device.index is not None:
        if world.distributed:
            raise ValueError(
                f"--device {device} names one GPU, but torchrun started {world.world_size} processes; "
                "pass --device cuda and each process takes the GPU of its LOCAL_RANK"
            )
        return device
    count = torch.cuda.device_count()
    if world.local_rank >= count:
        raise ValueError(
            f"LOCAL_RANK={world.local_rank} but this node has {count} GPUs; start at most {count} processes "
            "per node (torchrun --nproc-per-node)"
        )
    return torch.device("cuda", world.local_rank)


@contextmanager
def process_group(device: str | torch.device, environ: Mapping[str, str] | None = None) -> Iterator[World]:
    """Join the processes ``torchrun`` started, for the duration of the block.

    Creates the default process group (NCCL for a CUDA ``device``, gloo otherwise) when this process
    runs under ``torchrun`` with more than one process and no group exists yet, and destroys it on
    exit, also when the block raises. Without ``torchrun`` it only yields ``World()``.

    Args:
        device: The command's ``--device`` (selects the backend; ``"cuda"`` becomes ``cuda:LOCAL_RANK``).
        environ: The environment to read (default: ``os.environ``).
    """
    world = World.from_env(environ)
    created = False
    if world.distributed and not dist.is_initialized():
        target = rank_device(device, world)
        if target.type == "cuda":
            torch.cuda.set_device(target)
        dist.init_process_group("nccl" if target.type == "cuda" else "gloo")
        created = True
    try:
        yield world
    finally:
        if created:
            dist.destroy_process_group()


def barrier(world: World) -> None:
    """Wait until every rank gets here (no-op in one process)."""
    if world.distributed:
        dist.barrier()


def on_main(fn: Callable[[], T], world: World) -> T:
    """Run ``fn`` on rank 0 only; every rank returns its result, or raises the exception it raised.

    For work done once on behalf of all (preparing an output folder, writing a manifest): the other
    ranks wait for it, and an error stops every rank with the same message instead of leaving them
    waiting for rank 0 forever.
    """
    outcome: list[Any] = [None]
    if world.is_main:
        try:
            outcome = [(True, fn())]
        except Exception as err:  # handed to every rank, raised there
            outcome = [(False, err)]
    if world.distributed:
        dist.broadcast_object_list(outcome, src=0)
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


def all_gather_objects(value: Any, world: World) -> list[Any]:
    """Every rank's ``value`` (small, picklable Python objects), in rank order, on every rank."""
    if not world.distributed:
        return [value]
    gathered: list[Any] = [None] * world.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def all_reduce(tensor: torch.Tensor, world: World, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
    """Reduce ``tensor`` in place over all ranks (sum by default) and return it; no-op in one process."""
    if world.distributed:
        dist.all_reduce(tensor, op=op)
    return tensor
