"""Running a reallocation plan between ranks: flat buffer under placement A → flat buffer under B.

The plan (``reallm.layout.realloc.plan_realloc``) is pure data, identical on every rank: one message per
(src, dst) device pair, with the flat intervals on both sides. This module executes the part of it
that involves this rank: local copies, then every send and receive posted at once (the messages are
listed in the same order everywhere, so the point-to-point pairs match), then the scatter into the
destination buffer. Gathering many intervals into one contiguous message and scattering it back uses
the CUDA interval kernels on GPU (``reallm.kernels.intervals``), a vectorised index on CPU.

Cost: ``ReallocTraffic`` of the plan gives bytes per (src, dst) pair; the runtime logs it per step.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch

from executor import comm
from reallm.kernels.intervals import IntervalArgs, gather_intervals, prepare_intervals, scatter_intervals

#: Kernel arguments per (message, side, dtype size, device), built on a message's first use on CUDA: a plan
#: lives as long as its two layouts, and every later step launches its kernels with no host work.
_PREPARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _intervals(m, side: str, t: torch.Tensor) -> tuple:
    """``(starts, lengths, prepared or None)`` of message ``m`` on ``side`` ('src' or 'dst')."""
    st, ln = m.src_intervals() if side == "src" else m.dst_intervals()
    if t.device.type != "cuda":
        return st, ln, None
    per_msg = _PREPARED.setdefault(m, {})
    key = (side, t.element_size(), t.device)
    if key not in per_msg:
        per_msg[key] = prepare_intervals(st, ln, t.element_size(), t.device)
    prepared: IntervalArgs = per_msg[key]
    return st, ln, prepared


def _gather(m, flat: torch.Tensor) -> torch.Tensor:
    st, ln, prepared = _intervals(m, "src", flat)
    return gather_intervals(flat, st, ln, prepared=prepared)


def _scatter(m, flat: torch.Tensor, values: torch.Tensor) -> None:
    st, ln, prepared = _intervals(m, "dst", flat)
    scatter_intervals(flat, st, ln, values, prepared=prepared)


def run_realloc(plan, rank: int, src_flat: Optional[torch.Tensor], dst_flat: Optional[torch.Tensor]) -> dict:
    """Execute this rank's part of ``plan``. ``src_flat`` is this rank's buffer under A (None if it holds
    nothing there), ``dst_flat`` its buffer under B, filled in place. Returns bytes sent/received."""
    sends, recvs, scatters = [], [], []
    sent = received = 0
    for m in plan.messages:
        if rank not in (m.src, m.dst):
            continue
        if m.is_local:
            _scatter(m, dst_flat, _gather(m, src_flat))
        elif rank == m.src:
            payload = _gather(m, src_flat)
            sends.append((payload, m.dst))
            sent += payload.numel() * payload.element_size()
        else:
            buf = torch.empty(m.num_elements, dtype=dst_flat.dtype, device=dst_flat.device)
            recvs.append((buf, m.src))
            scatters.append((m, buf))
            received += buf.numel() * buf.element_size()
    comm.exchange(sends, recvs)
    for m, buf in scatters:
        _scatter(m, dst_flat, buf)
    return {"sent_bytes": sent, "received_bytes": received}
