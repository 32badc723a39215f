"""What each device holds under a placement, and its canonical flat buffer.

A device at (stage s, dp replica, tp rank r) of a placement holds, for every parameter of the layers
that stage s owns (``stages.StagePartition``), the tp slice ``params.tp_slice(param, tp, r)``; dp
replicas hold identical shards. With tied embeddings (and not a critic) and pp > 1 the last stage also
holds a *copy* of ``model.embed_tokens.weight`` (its tp slice) as its output head: a non-primary shard
flagged ``tied_copy``, whose gradient the executor all-reduces with stage 0's.

Primary holders: within each dp replica every real element of every parameter has exactly one primary
holder: the holder whose tp slice is primary (tp rank 0 for replicated parameters, the first rank of a
kv-head replica group), never a tied copy.

Flat buffer convention (shared by loading, saving, reallocation and the executor): a device's shards
are laid out back to back in table order (``params.param_table``), the tied copy last where
``lm_head.weight`` would be, each shard contiguous in row-major order of its *local* shape (vocabulary
padding included), with no alignment gaps. Full element x of a shard with box start b sits at flat
index ``offset + ravel(x - b, local_shape)``; padding rows are at the end of the shard and belong to no
parameter element. "Flat interval [i, j) on this device" means elements i..j-1 of that buffer.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional

import numpy as np

from reallm.layout.params import Box, ParamInfo, check_tp, param_table, tp_slice
from reallm.layout.stages import StagePartition, partition_stages
from reallm.placement import Coord, Placement
from reallm.spec import ModelSpec


@dataclass(frozen=True)
class Shard:
    """One parameter's slice on one device, and where it sits in the device's flat buffer."""

    name: str
    #: Real elements held, per dim ``(start, stop)`` in full coordinates; local index = full - start.
    box: Box
    #: Local tensor shape, vocabulary padding included.
    local_shape: tuple[int, ...]
    #: Element offset of the shard in the device's flat buffer.
    offset: int
    #: The one holder per element per dp replica whose copy counts (saving, dedup).
    primary: bool
    #: The last stage's copy of the tied embedding (its output head) when pp > 1.
    tied_copy: bool = False

    @property
    def num_elements(self) -> int:
        """Elements in the flat buffer, padding included."""
        return math.prod(self.local_shape)

    @property
    def num_real_elements(self) -> int:
        return math.prod(hi - lo for lo, hi in self.box)

    @property
    def full_slices(self) -> tuple[slice, ...]:
        """Index into the full parameter selecting this shard's real elements."""
        return tuple(slice(lo, hi) for lo, hi in self.box)

    @property
    def local_slices(self) -> tuple[slice, ...]:
        """Index into the local tensor selecting the real (non-padding) elements."""
        return tuple(slice(0, hi - lo) for lo, hi in self.box)


@dataclass(frozen=True)
class DeviceShards:
    """Everything one device holds under one placement, in flat-buffer order."""

    device: int
    coord: Coord
    shards: tuple[Shard, ...]
    num_elements: int

    def get(self, name: str) -> Optional[Shard]:
        return next((s for s in self.shards if s.name == name), None)


def resolve_partition(spec: ModelSpec, placement: Placement, partition: Optional[StagePartition]) -> StagePartition:
    """The given partition after checking it fits, or the default parameter-balanced one."""
    if partition is None:
        return partition_stages(spec, placement.pp)
    if partition.num_layers != spec.num_layers or partition.num_stages != placement.pp:
        raise ValueError(f"partition {partition.bounds} does not fit {spec.num_layers} layers on pp={placement.pp}")
    return partition


def held_params(spec: ModelSpec, partition: StagePartition, stage: int) -> list[tuple[ParamInfo, bool]]:
    """``(param, is_tied_copy)`` stage ``stage`` holds, in flat-buffer order."""
    table = param_table(spec)
    out = [(p, False) for p in table if partition.stage_of_layer(p.layer) == stage]
    last = partition.num_stages - 1
    if stage == last and last > 0 and spec.tie_word_embeddings and not spec.is_critic:
        out.append((table[0], True))
    return out


@functools.lru_cache(maxsize=4096)
def _stage_tp_shards(
    spec: ModelSpec, tp: int, partition: StagePartition, stage: int, tp_rank: int
) -> tuple[tuple[Shard, ...], int]:
    # Shards depend only on (stage, tp rank): dp replicas are identical, so cache per pair.
    shards, offset = [], 0
    for param, copy in held_params(spec, partition, stage):
        sl = tp_slice(param, tp, tp_rank)
        shards.append(Shard(param.name, sl.box, sl.local_shape, offset, sl.primary and not copy, copy))
        offset += math.prod(sl.local_shape)
    return tuple(shards), offset


def shards_of(
    spec: ModelSpec, placement: Placement, device: int, partition: Optional[StagePartition] = None
) -> DeviceShards:
    """What ``device`` holds under ``placement`` (the default partition balances parameters)."""
    check_tp(spec, placement.tp)
    part = resolve_partition(spec, placement, partition)
    c = placement.coord(device)
    shards, n = _stage_tp_shards(spec, placement.tp, part, c.pp, c.tp)
    return DeviceShards(device, c, shards, n)


# -- numpy helpers: one process simulating every rank -------------------------------------------------


def cut_flat(
    spec: ModelSpec,
    placement: Placement,
    device: int,
    params: Mapping[str, np.ndarray],
    partition: Optional[StagePartition] = None,
) -> np.ndarray:
    """``device``'s flat buffer under ``placement`` cut from full parameters (padding zero-filled)."""
    ds = shards_of(spec, placement, device, partition)
    dtype = np.result_type(*params.values()) if params else np.float32
    flat = np.zeros(ds.num_elements, dtype=dtype)
    for s in ds.shards:
        _local(flat, s)[...] = params[s.name][s.full_slices]
    return flat


def assemble_full(
    spec: ModelSpec,
    placement: Placement,
    buffers: Mapping[int, np.ndarray],
    partition: Optional[StagePartition] = None,
    check_replicas: bool = False,
) -> dict[str, np.ndarray]:
    """Full parameters from the flat buffers of every device of ``placement``.

    Reads dp replica 0's primary shards. With ``check_replicas`` every other holder (dp replicas, tp
    replicas of replicated parameters and kv heads, tied copies) must agree, else ``ValueError``.
    """
    dtype = np.result_type(*buffers.values())
    full = {p.name: np.zeros(p.shape, dtype=dtype) for p in param_table(spec)}
    held = [(device, c, shards_of(spec, placement, device, partition).shards) for device, c in placement.coords()]
    for device, c, shards in held:
        for s in shards:
            if c.dp == 0 and s.primary:
                full[s.name][s.full_slices] = _local(buffers[device], s)
    if check_replicas:
        # Second pass, so every copy is compared with the primary one.
        for device, c, shards in held:
            for s in shards:
                if not np.array_equal(full[s.name][s.full_slices], _local(buffers[device], s)):
                    raise ValueError(f"device {device} {c} disagrees with the primary copy of {s.name}{list(s.box)}")
    return full


def _local(flat: np.ndarray, s: Shard) -> np.ndarray:
    """The real (non-padding) elements of shard ``s`` as a view into ``flat``."""
    return flat[s.offset : s.offset + s.num_elements].reshape(s.local_shape)[s.local_slices]
