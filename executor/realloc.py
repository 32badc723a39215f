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

from typing import Optional

import torch

from executor import comm
from reallm.kernels.intervals import gather_intervals, scatter_intervals


def run_realloc(plan, rank: int, src_flat: Optional[torch.Tensor], dst_flat: Optional[torch.Tensor]) -> dict:
    """Execute this rank's part of ``plan``. ``src_flat`` is this rank's buffer under A (None if it holds
    nothing there), ``dst_flat`` its buffer under B, filled in place. Returns bytes sent/received."""
    sends, recvs, scatters = [], [], []
    sent = received = 0
    for m in plan.messages:
        if rank not in (m.src, m.dst):
            continue
        if m.is_local:
            s_st, s_ln = m.src_intervals()
            d_st, d_ln = m.dst_intervals()
            scatter_intervals(dst_flat, d_st, d_ln, gather_intervals(src_flat, s_st, s_ln))
        elif rank == m.src:
            s_st, s_ln = m.src_intervals()
            payload = gather_intervals(src_flat, s_st, s_ln)
            sends.append((payload, m.dst))
            sent += payload.numel() * payload.element_size()
        else:
            buf = torch.empty(m.num_elements, dtype=dst_flat.dtype, device=dst_flat.device)
            recvs.append((buf, m.src))
            scatters.append((m, buf))
            received += buf.numel() * buf.element_size()
    comm.exchange(sends, recvs)
    for m, buf in scatters:
        d_st, d_ln = m.dst_intervals()
        scatter_intervals(dst_flat, d_st, d_ln, buf)
    return {"sent_bytes": sent, "received_bytes": received}
