"""Reallocation plan A → B: which device sends which flat intervals of its A buffer to whom.

Pieces. Under placement A the real elements of parameter p are cut into disjoint *parts* P_k (the
distinct tp-slice boxes); part k is held by the holder set H_k (every dp replica of every tp rank with
that part, on the stage owning p, plus the last stage's tied copy of the embedding). A destination
device d with B-shard box S (``shards.shards_of``) receives the piece S ∩ P_k from exactly one
member of H_k for every k where it is non-empty. The P_k partition p, so each element d needs arrives
exactly once, replicated copies under B included.

Source choice (deterministic):
  d ∈ H_k                 → d itself: a local copy;
  |H_k| = 1               → forced;
  otherwise, pieces in decreasing size (ties in destination order), greedily
                            src = argmin over H_k of (node(src) != node(d), elements sent so far, src),
                            node(x) = x // devices_per_node: same node first, then the least-loaded replica.

Messages. The pieces of one (src, dst) pair form one message, ordered as they sit in dst's buffer under
B; its payload is each piece's elements in row-major order of the piece box. Gathering the message's
src intervals, in order, from src's flat buffer under A (``shards`` module: flat-buffer convention)
yields exactly the payload; scattering the payload over its dst intervals, in order, fills dst's flat
buffer under B. The two interval lists are coalesced independently, so they need not pair up one to one.

Runs. Parameters are at most 2-D, so a piece box is, on either side, a strided block of
``(start, num_runs, run_length, run_stride)`` in the flat buffer: one run if it spans whole local rows,
else one run per row (a row-split part intersected with a column-split shard gives one run per row).
Messages keep these blocks ([k, 4] int64 arrays); ``*_intervals()`` expands them with numpy.

Cost. Elements per (src, dst) times ``dtype_bytes``; send/recv bytes per device exclude local copies.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import NamedTuple, Optional

import numpy as np

from reallm.layout.params import Box, check_tp, param_table
from reallm.layout.shards import Shard, _stage_tp_shards, resolve_partition, shards_of
from reallm.layout.stages import StagePartition, partition_stages
from reallm.placement import Placement
from reallm.spec import ModelSpec

#: ``(start, num_runs, run_length, run_stride)`` in elements of a flat buffer.
Runs = tuple[int, int, int, int]


# -- intervals -------------------------------------------------------------------------------------


def coalesce_intervals(starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Merge each interval into its predecessor when it starts where that one stops (order kept)."""
    if len(starts) == 0:
        return starts, lengths
    new = np.ones(len(starts), dtype=bool)
    new[1:] = starts[1:] != starts[:-1] + lengths[:-1]
    idx = np.flatnonzero(new)
    return starts[idx], np.add.reduceat(lengths, idx)


def runs_to_intervals(runs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Expand ``[k, 4]`` strided blocks into coalesced ``(starts, lengths)`` int64 arrays."""
    start, num, length, stride = (runs[:, j] for j in range(4))
    i = np.arange(int(num.sum()), dtype=np.int64) - np.repeat(np.cumsum(num) - num, num)
    return coalesce_intervals(np.repeat(start, num) + i * np.repeat(stride, num), np.repeat(length, num))


def interval_indices(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Element indices covered by the intervals, in order (for gathering with numpy)."""
    first = np.cumsum(lengths) - lengths  # payload position of each interval's first element
    return np.repeat(starts - first, lengths) + np.arange(int(lengths.sum()), dtype=np.int64)


def _runs(offset: int, local_shape: tuple[int, ...], origin: tuple[int, ...], box: Box) -> Runs:
    """Strided block of full-coordinate ``box`` inside a shard at ``offset`` whose local (0, ..) is ``origin``."""
    if len(local_shape) == 1:
        ((lo, hi),) = box
        return (offset + lo - origin[0], 1, hi - lo, 0)
    cols = local_shape[1]
    (r0, r1), (c0, c1) = box
    r0, r1, c0, c1 = r0 - origin[0], r1 - origin[0], c0 - origin[1], c1 - origin[1]
    if c1 - c0 == cols:  # whole local rows: one contiguous run
        return (offset + r0 * cols, 1, (r1 - r0) * cols, 0)
    return (offset + r0 * cols + c0, r1 - r0, c1 - c0, cols)


def _intersect(x: Box, y: Box) -> Optional[Box]:
    box = tuple((max(a0, b0), min(a1, b1)) for (a0, a1), (b0, b1) in zip(x, y, strict=True))
    return box if all(lo < hi for lo, hi in box) else None


# -- who holds what under A ------------------------------------------------------------------------


class _Part(NamedTuple):
    box: Box
    local_shape: tuple[int, ...]
    #: ``(device, shard offset)`` of every holder, in mesh order.
    holders: tuple[tuple[int, int], ...]


@functools.lru_cache(maxsize=64)
def _parts(spec: ModelSpec, placement: Placement, partition: StagePartition) -> dict[str, tuple[_Part, ...]]:
    """Per parameter name, its distinct non-empty boxes under ``placement`` and their holders."""
    found: dict[str, dict[Box, tuple[tuple[int, ...], list[tuple[int, int]]]]] = defaultdict(dict)
    for device in placement.devices:
        for s in shards_of(spec, placement, device, partition).shards:
            if s.num_real_elements:
                found[s.name].setdefault(s.box, (s.local_shape, []))[1].append((device, s.offset))
    return {
        name: tuple(_Part(box, shape, tuple(h)) for box, (shape, h) in boxes.items()) for name, boxes in found.items()
    }


class _Piece(NamedTuple):
    dst: int
    dst_shard: Shard
    part: _Part
    box: Box
    num_elements: int


def _assign(
    spec: ModelSpec, a: Placement, pa: StagePartition, b: Placement, pb: StagePartition, devices_per_node: int
) -> list[tuple[int, int, _Piece]]:
    """``(src, src shard offset, piece)`` for every piece every B device needs (module docstring)."""
    parts = _parts(spec, a, pa)
    out: list[tuple[int, int, _Piece]] = []
    open_pieces: list[_Piece] = []
    sent: dict[int, int] = defaultdict(int)
    for dst in b.devices:
        for s in shards_of(spec, b, dst, pb).shards:
            for part in parts.get(s.name, ()):
                box = _intersect(s.box, part.box)
                if box is None:
                    continue
                piece = _Piece(dst, s, part, box, math.prod(hi - lo for lo, hi in box))
                local = [h for h in part.holders if h[0] == dst]
                if local or len(part.holders) == 1:
                    src, offset = (local or part.holders)[0]
                    out.append((src, offset, piece))
                    if src != dst:
                        sent[src] += piece.num_elements
                else:
                    open_pieces.append(piece)
    # Largest first (LPT) balances the greedy; sort is stable, so ties keep destination order.
    open_pieces.sort(key=lambda p: -p.num_elements)
    for piece in open_pieces:
        node = piece.dst // devices_per_node
        src, offset = min(piece.part.holders, key=lambda h: (h[0] // devices_per_node != node, sent[h[0]], h[0]))
        sent[src] += piece.num_elements
        out.append((src, offset, piece))
    return out


# -- the plan --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReallocTraffic:
    """Elements moved per (src, dst) pair (read-only, sorted); ``src == dst`` entries are local copies."""

    elements_by_pair: Mapping[tuple[int, int], int]

    def bytes_by_pair(self, dtype_bytes: int = 2) -> dict[tuple[int, int], int]:
        return {k: n * dtype_bytes for k, n in self.elements_by_pair.items()}

    def send_bytes(self, dtype_bytes: int = 2) -> dict[int, int]:
        """Bytes each device sends to other devices."""
        out: dict[int, int] = defaultdict(int)
        for (src, dst), n in self.elements_by_pair.items():
            if src != dst:
                out[src] += n * dtype_bytes
        return dict(out)

    def recv_bytes(self, dtype_bytes: int = 2) -> dict[int, int]:
        """Bytes each device receives from other devices."""
        out: dict[int, int] = defaultdict(int)
        for (src, dst), n in self.elements_by_pair.items():
            if src != dst:
                out[dst] += n * dtype_bytes
        return dict(out)

    def moved_bytes(self, dtype_bytes: int = 2) -> int:
        """Total bytes crossing between devices (local copies excluded)."""
        return sum(n for (s, d), n in self.elements_by_pair.items() if s != d) * dtype_bytes

    def local_bytes(self, dtype_bytes: int = 2) -> int:
        return sum(n for (s, d), n in self.elements_by_pair.items() if s == d) * dtype_bytes


@dataclass(frozen=True, eq=False)
class Message:
    """One coalesced transfer: ``src``'s A-buffer intervals → ``dst``'s B-buffer intervals (equal totals)."""

    src: int
    dst: int
    num_elements: int
    #: ``[k, 4]`` int64 strided blocks ``(start, num_runs, run_length, run_stride)`` in src's A buffer.
    src_runs: np.ndarray
    #: The same pieces, same order, in dst's B buffer.
    dst_runs: np.ndarray

    @property
    def is_local(self) -> bool:
        return self.src == self.dst

    def src_intervals(self) -> tuple[np.ndarray, np.ndarray]:
        """``(starts, lengths)`` in src's flat buffer under A; gathered in order they are the payload."""
        return runs_to_intervals(self.src_runs)

    def dst_intervals(self) -> tuple[np.ndarray, np.ndarray]:
        """``(starts, lengths)`` in dst's flat buffer under B; the payload scatters over them in order."""
        return runs_to_intervals(self.dst_runs)


@dataclass(frozen=True, eq=False)
class ReallocPlan:
    """All messages of a reallocation A → B, sorted by (src, dst)."""

    spec: ModelSpec
    a: Placement
    b: Placement
    partition_a: StagePartition
    partition_b: StagePartition
    devices_per_node: int
    messages: tuple[Message, ...]
    traffic: ReallocTraffic


def _resolve(
    spec: ModelSpec, a: Placement, b: Placement, pa: Optional[StagePartition], pb: Optional[StagePartition]
) -> tuple[Placement, Placement, StagePartition, StagePartition]:
    """Check tp, fill in default partitions, and key the caches on the mesh and degrees only."""
    check_tp(spec, a.tp)
    check_tp(spec, b.tp)
    pa, pb = resolve_partition(spec, a, pa), resolve_partition(spec, b, pb)
    # Micro-batches and sequence parallelism do not change who holds what: plans are shared across them.
    a, b = (Placement(p.devices, dp=p.dp, tp=p.tp, pp=p.pp) for p in (a, b))
    return a, b, pa, pb


def realloc_traffic(
    spec: ModelSpec,
    a: Placement,
    b: Placement,
    devices_per_node: int = 8,
    partition_a: Optional[StagePartition] = None,
    partition_b: Optional[StagePartition] = None,
) -> ReallocTraffic:
    """Bytes-only path: the traffic of ``plan_realloc`` without building intervals (for the cost model)."""
    a, b, pa, pb = _resolve(spec, a, b, partition_a, partition_b)
    return _traffic(spec, a, b, devices_per_node, pa, pb)


@functools.lru_cache(maxsize=256)
def _traffic(
    spec: ModelSpec, a: Placement, b: Placement, devices_per_node: int, pa: StagePartition, pb: StagePartition
) -> ReallocTraffic:
    counts: dict[tuple[int, int], int] = defaultdict(int)
    for src, _, piece in _assign(spec, a, pa, b, pb, devices_per_node):
        counts[src, piece.dst] += piece.num_elements
    return ReallocTraffic(MappingProxyType(dict(sorted(counts.items()))))


def plan_realloc(
    spec: ModelSpec,
    a: Placement,
    b: Placement,
    devices_per_node: int = 8,
    partition_a: Optional[StagePartition] = None,
    partition_b: Optional[StagePartition] = None,
) -> ReallocPlan:
    """The reallocation plan A → B (cached; default partitions balance parameters)."""
    a, b, pa, pb = _resolve(spec, a, b, partition_a, partition_b)
    return _plan(spec, a, b, devices_per_node, pa, pb)


@functools.lru_cache(maxsize=32)
def _plan(
    spec: ModelSpec, a: Placement, b: Placement, devices_per_node: int, pa: StagePartition, pb: StagePartition
) -> ReallocPlan:
    by_pair: dict[tuple[int, int], list[tuple[int, Runs, Runs, int]]] = defaultdict(list)
    for src, src_offset, p in _assign(spec, a, pa, b, pb, devices_per_node):
        s = p.dst_shard
        src_runs = _runs(src_offset, p.part.local_shape, tuple(lo for lo, _ in p.part.box), p.box)
        dst_runs = _runs(s.offset, s.local_shape, tuple(lo for lo, _ in s.box), p.box)
        by_pair[src, p.dst].append((dst_runs[0], src_runs, dst_runs, p.num_elements))
    messages = []
    for (src, dst), pieces in sorted(by_pair.items()):
        pieces.sort(key=lambda x: x[0])  # dst buffer order: receives land front to back
        src_runs = np.array([x[1] for x in pieces], dtype=np.int64).reshape(-1, 4)
        dst_runs = np.array([x[2] for x in pieces], dtype=np.int64).reshape(-1, 4)
        src_runs.flags.writeable = dst_runs.flags.writeable = False
        messages.append(Message(src, dst, sum(x[3] for x in pieces), src_runs, dst_runs))
    traffic = ReallocTraffic(MappingProxyType({(m.src, m.dst): m.num_elements for m in messages}))
    return ReallocPlan(spec, a, b, pa, pb, devices_per_node, tuple(messages), traffic)


def clear_caches() -> None:
    """Drop every cached table, partition, shard list and plan (memory, or honest cold timings)."""
    for fn in (param_table, partition_stages, _stage_tp_shards, _parts, _traffic, _plan):
        fn.cache_clear()


def apply_plan(plan: ReallocPlan, buffers_a: Mapping[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Simulate the plan in one process: flat buffers under A → flat buffers under B (padding zero)."""
    dtype = np.result_type(*buffers_a.values())
    out = {
        d: np.zeros(shards_of(plan.spec, plan.b, d, plan.partition_b).num_elements, dtype=dtype) for d in plan.b.devices
    }
    for m in plan.messages:
        payload = buffers_a[m.src][interval_indices(*m.src_intervals())]
        out[m.dst][interval_indices(*m.dst_intervals())] = payload
    return out
