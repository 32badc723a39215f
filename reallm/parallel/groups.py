"""The process groups one rank of a placement uses, with each mesh axis's member order.

A placement's rank layout is ``devices.view(pp, dp, tp)`` (``reallm.placement``). torch orders the members
of a process group by global rank, which is the axis order only when the device mesh lists devices in
increasing order; a mesh such as ``(3, 2, 1, 0)`` reverses it. ``AxisGroup`` therefore keeps the members
in *axis* order and permutes gathered / scattered pieces, so tp shard r is always the one at tp rank r.

Groups used by ``reallm.parallel`` (all are rank sets of ``executor.schedule.placement_rank_sets``, except
``tied``, see ``tied_embedding_rank_sets``):

  tp       the tp ranks of my (pp, dp): tp collectives, kv-replica and sequence-parallel gradient sums
  pp       the pp ranks of my (dp, tp): point-to-point activations (through the world group) and stats
  dp       the dp ranks of my (pp, tp): gradient all-reduce / ZeRO reduce-scatter and all-gather
  replica  tp x pp ranks of my dp replica: the global gradient norm without ZeRO; saving
  mesh     every rank of the placement: the global gradient norm under ZeRO
  tied     {stage 0, last stage} of my (dp, tp): the tied embedding's gradient (pp > 1). With pp = 2 it is
           the pp group; with pp > 2, when the runtime has no such group, the pp group is used and the
           middle stages add zeros (correct, only wasteful).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional

import torch

from executor import comm
from executor.comm import Group
from reallm.placement import Coord, Placement


@dataclass(frozen=True)
class AxisGroup:
    """A group whose members are ordered by a mesh axis (tp, pp or dp); ``index`` is my axis coordinate."""

    group: Group
    #: Global ranks in axis order (axis coordinate 0, 1, ...).
    axis_ranks: tuple[int, ...]
    index: int

    def __post_init__(self):
        if tuple(sorted(self.axis_ranks)) != tuple(sorted(self.group.ranks)):
            raise ValueError(f"axis ranks {self.axis_ranks} are not the members of {self.group}")

    @property
    def size(self) -> int:
        return len(self.axis_ranks)

    @property
    def _member_of_axis(self) -> tuple[int, ...]:
        """Position in ``group.ranks`` (torch's member order) of axis coordinate a."""
        return tuple(self.group.ranks.index(r) for r in self.axis_ranks)

    @property
    def in_axis_order(self) -> bool:
        return self.group.ranks == self.axis_ranks

    def rank_at(self, axis_index: int) -> int:
        return self.axis_ranks[axis_index]

    # -- collectives (all short-circuit on one member) --------------------------------------------------
    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return comm.all_reduce(t, self.group)

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        return comm.all_reduce_max(t, self.group)

    def all_gather(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Every member's ``t`` concatenated along ``dim`` in axis order."""
        if self.size == 1:
            return t
        if self.in_axis_order:
            return comm.all_gather_cat(t, self.group, dim)
        parts = comm.all_gather_list(t, self.group)
        return torch.cat([parts[m] for m in self._member_of_axis], dim=dim)

    def reduce_scatter(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over members of ``t`` (dim 0 divisible by size); I keep chunk number ``index`` of dim 0."""
        if self.size == 1:
            return t
        if not self.in_axis_order:
            chunks = t.chunk(self.size, dim=0)
            axis_of_member = {m: a for a, m in enumerate(self._member_of_axis)}
            t = torch.cat([chunks[axis_of_member[m]] for m in range(self.size)], dim=0)
        return comm.reduce_scatter_dim0(t, self.group)


def tied_embedding_rank_sets(p: Placement) -> list[tuple[int, ...]]:
    """Per (dp, tp): {stage 0, last stage}, the ranks that sum the tied embedding's gradient (pp > 2 only:
    with pp = 2 these are the pp groups)."""
    if p.pp <= 2:
        return []
    return [(p.device_at(0, d, t), p.device_at(p.pp - 1, d, t)) for d in range(p.dp) for t in range(p.tp)]


@dataclass(frozen=True)
class ParallelGroups:
    """Where this rank sits in a placement, and the groups it talks through (module docstring)."""

    placement: Placement
    rank: int
    coord: Coord
    tp: AxisGroup
    pp: AxisGroup
    dp: AxisGroup
    replica: Group
    mesh: Group
    tied: Optional[Group] = None

    @staticmethod
    def build(placement: Placement, rank: int, group_of: Callable[[Sequence[int]], Group]) -> ParallelGroups:
        """From a lookup ``group_of(ranks) -> Group`` of already created groups (e.g. the worker's)."""
        p, c = placement, placement.coord(rank)

        def axis(ranks: tuple[int, ...], index: int) -> AxisGroup:
            return AxisGroup(group_of(ranks) if len(ranks) > 1 else Group(ranks, None), ranks, index)

        replica = tuple(p.device_at(s, c.dp, t) for s in range(p.pp) for t in range(p.tp))
        tied = None
        if p.pp > 2:
            pair = (p.device_at(0, c.dp, c.tp), p.device_at(p.pp - 1, c.dp, c.tp))
            try:
                tied = group_of(pair)
            except KeyError:
                tied = None
        return ParallelGroups(
            placement=p, rank=rank, coord=c,
            tp=axis(p.tp_group(rank), c.tp), pp=axis(p.pp_group(rank), c.pp), dp=axis(p.dp_group(rank), c.dp),
            replica=group_of(replica) if len(replica) > 1 else Group(replica, None),
            mesh=group_of(p.devices) if len(p.devices) > 1 else Group(p.devices, None), tied=tied)

    @staticmethod
    def from_context(ctx, tied: Optional[Group] = None) -> ParallelGroups:
        """From an executor ``CallContext`` (its tp, pp, dp, replica and mesh groups); ``tied`` (or
        ``ctx.tied`` when the context has one) is the {first, last stage} group for pp > 2."""
        p, c = ctx.placement, ctx.coord
        return ParallelGroups(
            placement=p, rank=ctx.rank, coord=c,
            tp=AxisGroup(ctx.tp, p.tp_group(ctx.rank), c.tp), pp=AxisGroup(ctx.pp, p.pp_group(ctx.rank), c.pp),
            dp=AxisGroup(ctx.dp, p.dp_group(ctx.rank), c.dp), replica=ctx.replica, mesh=ctx.mesh,
            tied=tied if tied is not None else getattr(ctx, "tied", None))

    # -- stage helpers ------------------------------------------------------------------------------------
    @property
    def num_stages(self) -> int:
        return self.placement.pp

    @property
    def stage(self) -> int:
        return self.coord.pp

    @property
    def is_first_stage(self) -> bool:
        return self.coord.pp == 0

    @property
    def is_last_stage(self) -> bool:
        return self.coord.pp == self.placement.pp - 1

    def stage_rank(self, stage: int) -> int:
        """Global rank of pipeline stage ``stage`` in my (dp, tp) column (point-to-point peer)."""
        return self.pp.rank_at(stage)


class GroupCache:
    """Creates groups on demand in a canonical order and reuses identical rank sets (tests, tools).

    Every rank of the world must request the same rank sets in the same order (``comm.new_group`` is
    collective over the world)."""

    def __init__(self):
        self.groups: dict[tuple[int, ...], Group] = {}

    def __call__(self, ranks: Sequence[int]) -> Group:
        key = tuple(sorted(int(r) for r in ranks))
        if len(key) == 1:
            return Group(key, None)
        if key not in self.groups:
            self.groups[key] = comm.new_group(key)
        return self.groups[key]

    def create_for(self, placement: Placement) -> None:
        """Every group ``placement`` needs, in ``placement_rank_sets`` order, then the tied pairs."""
        from executor.schedule import placement_rank_sets

        for ranks in placement_rank_sets(placement) + tied_embedding_rank_sets(placement):
            self(ranks)

    def groups_for(self, placement: Placement, rank: int) -> ParallelGroups:
        self.create_for(placement)
        return ParallelGroups.build(placement, rank, self._lookup)

    def _lookup(self, ranks: Sequence[int]) -> Group:
        key = tuple(sorted(int(r) for r in ranks))
        if len(key) == 1:
            return Group(key, None)
        return self.groups[key]
