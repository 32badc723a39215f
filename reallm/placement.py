"""Placement of one model function call, and its rank layout.

The rank layout is written once, here: the call's device mesh (a tuple of global device ids) is
viewed as a ``(pp, dp, tp)`` array in C order, so tp is the fastest axis and a tp group is a run of
neighbouring devices (inside one node whenever tp divides the GPUs per node)::

    devices[(pp_rank * dp + dp_rank) * tp + tp_rank]  is the device at (pp_rank, dp_rank, tp_rank)

Everything else (process groups, shards, reallocation, the cost model) asks this class.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

from reallm.errors import UserError


class Coord(NamedTuple):
    """Position of a device inside a placement: pipeline stage, data-parallel replica, tp rank."""

    pp: int
    dp: int
    tp: int


@dataclass(frozen=True)
class Placement:
    """Device mesh and parallel degrees of one call. ``len(devices) == dp * tp * pp`` always."""

    devices: tuple[int, ...]
    dp: int = 1
    tp: int = 1
    pp: int = 1
    sequence_parallel: bool = False
    num_micro_batches: int = 1

    def __post_init__(self):
        object.__setattr__(self, "devices", tuple(int(d) for d in self.devices))
        problems = []
        for f in ("dp", "tp", "pp", "num_micro_batches"):
            v = getattr(self, f)
            if not isinstance(v, int) or v < 1:
                problems.append(f"{f} must be a positive integer, got {v!r}")
        if not problems and len(self.devices) != self.dp * self.tp * self.pp:
            problems.append(f"dp*tp*pp = {self.dp}*{self.tp}*{self.pp} = {self.dp * self.tp * self.pp} "
                            f"but the device mesh has {len(self.devices)} devices {list(self.devices)}")
        if len(set(self.devices)) != len(self.devices):
            problems.append(f"device mesh {list(self.devices)} lists a device twice")
        if any(d < 0 for d in self.devices):
            problems.append(f"device mesh {list(self.devices)} has a negative device id")
        if self.sequence_parallel and self.tp == 1:
            # Harmless but meaningless; normalise so equal layouts compare equal.
            object.__setattr__(self, "sequence_parallel", False)
        if problems:
            raise UserError("; ".join(problems))

    # -- the layout --------------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return len(self.devices)

    def device_at(self, pp: int, dp: int, tp: int) -> int:
        return self.devices[(pp * self.dp + dp) * self.tp + tp]

    def coord(self, device: int) -> Coord:
        """(pp, dp, tp) of a global device id in this placement; KeyError if absent."""
        i = self.devices.index(device) if device in self.devices else None
        if i is None:
            raise KeyError(f"device {device} is not in placement {list(self.devices)}")
        return Coord(i // (self.dp * self.tp), (i // self.tp) % self.dp, i % self.tp)

    def coords(self) -> Iterator[tuple[int, Coord]]:
        for i, d in enumerate(self.devices):
            yield d, Coord(i // (self.dp * self.tp), (i // self.tp) % self.dp, i % self.tp)

    def tp_group(self, device: int) -> tuple[int, ...]:
        c = self.coord(device)
        return tuple(self.device_at(c.pp, c.dp, t) for t in range(self.tp))

    def pp_group(self, device: int) -> tuple[int, ...]:
        c = self.coord(device)
        return tuple(self.device_at(p, c.dp, c.tp) for p in range(self.pp))

    def dp_group(self, device: int) -> tuple[int, ...]:
        c = self.coord(device)
        return tuple(self.device_at(c.pp, d, c.tp) for d in range(self.dp))

    def tp_groups(self) -> list[tuple[int, ...]]:
        return [tuple(self.device_at(p, d, t) for t in range(self.tp)) for p in range(self.pp) for d in range(self.dp)]

    def pp_groups(self) -> list[tuple[int, ...]]:
        return [tuple(self.device_at(p, d, t) for p in range(self.pp)) for d in range(self.dp) for t in range(self.tp)]

    def dp_groups(self) -> list[tuple[int, ...]]:
        return [tuple(self.device_at(p, d, t) for d in range(self.dp)) for p in range(self.pp) for t in range(self.tp)]

    def dp_heads(self) -> tuple[int, ...]:
        """Per dp replica, the device holding its outputs: last pipeline stage, tp rank 0."""
        return tuple(self.device_at(self.pp - 1, d, 0) for d in range(self.dp))

    def same_layout(self, other: Placement) -> bool:
        """Same devices and degrees: every device holds the same parameter shards (micro-batches and
        sequence parallelism change how a call runs, not what is resident)."""
        return (self.devices, self.dp, self.tp, self.pp) == (other.devices, other.dp, other.tp, other.pp)

    @property
    def layout_str(self) -> str:
        sp = "+sp" if self.sequence_parallel else ""
        return f"d{self.dp}p{self.pp}m{self.tp}{sp}"

    # -- (de)serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"devices": list(self.devices), "dp": self.dp, "tp": self.tp, "pp": self.pp,
                "sequence_parallel": self.sequence_parallel, "num_micro_batches": self.num_micro_batches}

    @classmethod
    def from_dict(cls, d: dict) -> Placement:
        known = {"devices", "dp", "tp", "pp", "sequence_parallel", "num_micro_batches"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"unknown placement field(s) {unknown}")
        missing = sorted({"devices", "dp", "tp", "pp"} - set(d))
        if missing:
            raise UserError(f"missing placement field(s) {missing}")
        if not isinstance(d["devices"], list) or not all(isinstance(x, int) for x in d["devices"]):
            raise UserError(f"devices must be a list of integers, got {d['devices']!r}")
        return cls(devices=tuple(d["devices"]), dp=d["dp"], tp=d["tp"], pp=d["pp"],
                   sequence_parallel=bool(d.get("sequence_parallel", False)),
                   num_micro_batches=d.get("num_micro_batches", 1))
