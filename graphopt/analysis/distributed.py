"""Calibration spread over processes with ``torch.distributed`` (``torchrun``: gloo on CPU, NCCL on GPU).

When a process group is initialised, each process runs its share of the calibration batches (every
``world``-th, from its rank) and statistics that are sums are all-reduced, so every process ends with the
statistic of all the batches and makes the same decisions: the same GPTQ codes, the same refits. Work whose
results every process needs, and that splits by item (GPTQ's layers), is computed by one owner per item and
sent to the others. With no
process group (the default), the share is every batch and a reduction does nothing. Nothing here starts or
ends a process group: ``torchrun`` and the caller do (``torch.distributed.init_process_group``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes (0, 1 without a process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def my_share(items: Sequence[T]) -> list[T]:
    """The items this process handles: every ``world``-th from its rank (all of them in one process)."""
    rank, world = rank_and_world()
    return list(items[rank::world])


def all_reduce_sum(*tensors: torch.Tensor) -> None:
    """Sum each tensor over the processes, in place (nothing in one process). CPU tensors travel on gloo; a
    backend that needs them on the GPU (NCCL) gets them there and back."""
    if rank_and_world()[1] == 1:
        return
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    for t in tensors:
        moved = t.to(device) if device is not None else t
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        if moved is not t:
            t.copy_(moved)


def owners(costs: Sequence[float]) -> list[int]:
    """The rank that computes each item: the costliest first, each to the least loaded rank (every process
    computes the same assignment; all rank 0 in one process)."""
    world = rank_and_world()[1]
    load = [0.0] * world
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        owner[i] = min(range(world), key=lambda r: (load[r], r))
        load[owner[i]] += costs[i]
    return owner


def computed_by_owners(costs: Sequence[float], compute: Callable[[int], T]) -> list[T]:
    """``[compute(i) for i in range(len(costs))]``, each item computed by one process (:func:`owners`) and sent
    to the others (``broadcast_object_list``): weight-parallel work whose results every process needs."""
    rank, world = rank_and_world()
    if world == 1:
        return [compute(i) for i in range(len(costs))]
    owner = owners(costs)
    mine = {i: compute(i) for i, who in enumerate(owner) if who == rank}  # every process at once, then shared
    out: list[T] = []
    for i, who in enumerate(owner):
        box = [mine.get(i)]
        dist.broadcast_object_list(box, src=who)
        out.append(box[0])  # type: ignore[arg-type]
    return out


@contextlib.contextmanager
def one_writer() -> Iterator[bool]:
    """Whether this process writes a result every process holds (rank 0 does; one process always does), and,
    on leaving, a wait until it has: a save to one path under ``torchrun`` is written once, and is there when
    every process goes on."""
    rank, world = rank_and_world()
    try:
        yield rank == 0
    finally:
        if world > 1:
            dist.barrier()
