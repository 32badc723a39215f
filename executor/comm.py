"""torch.distributed in one place: process-group setup and collectives that differ between torch
versions (2.13 on CPU here, 2.11 on the GPU machine). Everything else calls these.

World size 1 is the trivially correct path: collectives on a group of one rank return at once.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from typing import Optional

import torch
import torch.distributed as dist

#: Collective timeout: a crashed peer must end the job in about a minute, never 30 minutes.
DEFAULT_TIMEOUT_S = 60.0


def init(rank: int, world_size: int, backend: str, init_method: Optional[str] = None,
         timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    kwargs = {}
    if backend == "nccl":
        kwargs["device_id"] = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
    dist.init_process_group(backend=backend, init_method=init_method or "env://", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)


class Group:
    """A set of global ranks and its torch process group (None for a single rank)."""

    def __init__(self, ranks: Sequence[int], pg):
        self.ranks = tuple(ranks)
        self.pg = pg

    @property
    def size(self) -> int:
        return len(self.ranks)

    def index(self, rank: int) -> int:
        return self.ranks.index(rank)

    def __repr__(self) -> str:
        return f"Group{self.ranks}"


def all_reduce(t: torch.Tensor, g: Group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if g.size > 1:
        dist.all_reduce(t, op=op, group=g.pg)
    return t


def broadcast(t: torch.Tensor, src: int, g: Group) -> torch.Tensor:
    if g.size > 1:
        dist.broadcast(t, src=src, group=g.pg)
    return t


def all_gather_objects(obj, g: Group) -> list:
    if g.size == 1:
        return [obj]
    out = [None] * g.size
    dist.all_gather_object(out, obj, group=g.pg)
    return out


def all_gather_cat(t: torch.Tensor, g: Group, dim: int = 0) -> torch.Tensor:
    """Concatenate equal-shaped tensors of every member along ``dim``."""
    if g.size == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(g.size)]
    dist.all_gather(parts, t.contiguous(), group=g.pg)
    return torch.cat(parts, dim=dim)


def reduce_scatter_dim0(t: torch.Tensor, g: Group) -> torch.Tensor:
    """Sum over members, each keeping its 1/size slice of dim 0 (dim 0 divisible by size)."""
    if g.size == 1:
        return t
    chunks = [c.contiguous() for c in t.chunk(g.size, dim=0)]
    out = torch.empty_like(chunks[0])
    dist.reduce_scatter(out, chunks, group=g.pg)
    return out


def exchange(sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]]) -> None:
    """Post every point-to-point send and receive of one schedule op, then wait for all of them.
    Both sides list their ops in the same (global) order, so no pair can deadlock."""
    ops = [dist.P2POp(dist.isend, t, peer) for t, peer in sends]
    ops += [dist.P2POp(dist.irecv, t, peer) for t, peer in recvs]
    if not ops:
        return
    for w in dist.batch_isend_irecv(ops):
        w.wait()


# -- added for reallm.parallel (tensor / pipeline / data parallelism) ----------------------------------


def new_group(ranks: Sequence[int]) -> Group:
    """Create the process group of ``ranks`` (every rank of the world must call this, member or not, in one
    canonical order). Sorted like torch orders a group's members; a single rank needs no process group."""
    ranks = tuple(sorted(int(r) for r in ranks))
    if len(ranks) == 1 or not dist.is_initialized():
        return Group(ranks, None)
    return Group(ranks, dist.new_group(list(ranks)))


def all_reduce_max(t: torch.Tensor, g: Group) -> torch.Tensor:
    """Element-wise maximum over members, in place."""
    if g.size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=g.pg)
    return t


def all_gather_list(t: torch.Tensor, g: Group) -> list[torch.Tensor]:
    """Equal-shaped tensors of every member, in the group's member order (``g.ranks``)."""
    if g.size == 1:
        return [t]
    parts = [torch.empty_like(t) for _ in range(g.size)]
    dist.all_gather(parts, t.contiguous(), group=g.pg)
    return parts


def barrier(g: Group) -> None:
    """Wait until every member got here (an all-reduce of one element: works the same on gloo and NCCL)."""
    if g.size > 1:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(g.pg) == "nccl" else "cpu"
        dist.all_reduce(torch.zeros(1, device=device), group=g.pg)


# -- added for recovery (reallm.algorithms.recovery) -------------------------------------------------------------


def world() -> Group:
    """Every rank of the job (torch's default group); one rank without a process group when not distributed."""
    if not dist.is_initialized():
        return Group((0,), None)
    n = dist.get_world_size()
    return Group(tuple(range(n)), dist.group.WORLD if n > 1 else None)


def world_barrier() -> None:
    """Wait until every rank of the job got here."""
    barrier(world())
