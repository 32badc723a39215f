"""Greedy token choice and its log-probability in one pass over the logits (a Triton kernel).

``generate``'s greedy step took four kernels a step (an fp32 copy of the logits, ``argmax``,
``log_softmax``, ``gather``; ~27 µs at batch 64 × 32,000 on an H100). One program per row reads the row
once, keeping per lane a running maximum, the first index that reached it and the sum of exp(x − max), and
combines the lanes at the end:

    token = first index of max(x),   log p(token) = x[token] − max − log Σ exp(x − max) = −log Σ exp(x − max)

which is ``log_softmax(x.float())[argmax(x)]`` (the sum in another order: equal to rounding; a row of −inf
gives NaN, as torch does). A row holding NaN gets a NaN log-probability here too, but its token is the
argmax of the other entries where torch's argmax returns the NaN's index. CPU tensors, and CUDA without
Triton, take the torch ops.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None


def reference(logits_BV: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(token [B] int64, its log-prob [B] fp32) with torch ops: the definition."""
    z = logits_BV.float()
    tok = z.argmax(-1)
    return tok, torch.log_softmax(z, -1).gather(-1, tok[:, None]).squeeze(-1)


if triton is not None:

    @triton.jit
    def _greedy_kernel(x_ptr, stride, V, tok_ptr, lp_ptr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # (row * stride past 2^31 elements: large vocabularies)
        lanes = tl.arange(0, BLOCK)
        m = tl.full([BLOCK], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK], tl.float32)
        idx = tl.zeros([BLOCK], tl.int32)
        for start in range(0, V, BLOCK):
            cols = start + lanes
            x = tl.load(x_ptr + row * stride + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            new = tl.maximum(m, x)
            finite = new > float("-inf")  # a lane that has seen only -inf keeps s = 0 (no -inf - -inf)
            s = tl.where(finite, s * tl.exp(m - new) + tl.exp(x - new), 0.0)
            idx = tl.where(x > m, cols, idx)  # strict: a lane keeps the first index of its maximum
            m = new
        top = tl.max(m, 0)
        total = tl.sum(tl.where(m > float("-inf"), s * tl.exp(m - top), 0.0), 0)
        first = tl.min(tl.where(m == top, idx, V), 0)
        tl.store(tok_ptr + row, first.to(tl.int64))
        tl.store(lp_ptr + row, tl.where(total > 0, -tl.log(total), float("nan")))  # all -inf: NaN, as torch


def pick(logits_BV: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(first argmax [B] int64, its log-softmax [B] fp32) of each row of ``logits_BV`` [B, V]."""
    if triton is None or not logits_BV.is_cuda or logits_BV.dim() != 2 or logits_BV.stride(-1) != 1:
        return reference(logits_BV)
    B, V = logits_BV.shape
    tok = torch.empty(B, dtype=torch.int64, device=logits_BV.device)
    lp = torch.empty(B, dtype=torch.float32, device=logits_BV.device)
    if B:
        block = min(triton.next_power_of_2(V), 16384)
        _greedy_kernel[(B,)](logits_BV, logits_BV.stride(0), V, tok, lp, BLOCK=block, num_warps=16)
    return tok, lp
