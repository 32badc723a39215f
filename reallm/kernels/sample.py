"""The next token and its log-probability in a pass or three over the logits (Triton kernels).

``reallm.model.generate.sampling_step`` takes these where no top-k / top-p filter applies and no logits mask
is asked for; a tp vocabulary padding is left out by reading only the first ``vocab_size`` columns, and
the EOS ban before ``min_new_tokens`` by treating its few tokens as −inf (``ban``). One program per row;
where they cannot run (``usable``: no Triton, CPU logits) ``sampling_step`` takes its torch path.

**Greedy** (``greedy``): the torch step took four kernels (an fp32 copy of the logits, ``argmax``,
``log_softmax``, ``gather``; ~27 µs at batch 64 × 32,000 on an H100). One pass keeps per lane a running
maximum, the first index that reached it and the sum of exp(x − max), and combines the lanes at the end:

    token = first index of max(x),   log p(token) = −log Σ exp(x − max)

**Sampling at temperature T** (``plain``): the torch step (an fp32 copy, the division by T, a float64
softmax and its cumulative sum over the vocabulary, ``searchsorted``, ``log_softmax``, ``gather``) took
0.63 ms at batch 64 × 151,936 — more than half a Qwen2-0.5B decode step. Three passes: the maximum m of
z = x / T; the float64 total S = Σ exp(z − m) (each exp in fp32: float64 ones made the kernel 1.8× slower,
and the sums, not the terms, lose the tail); then the float64 running total, block by block, and inside the
block where it passes u · S the running sum for the first index whose sum exceeds u · S (u the row's
uniform, as ``draw``'s inverse CDF; never a token of zero probability), clamped to the last column if
rounding leaves none; log p = z[token] − m − log S.

Both equal the torch definitions (:func:`greedy_reference`, :func:`plain_reference`) up to the order of the
sums: a draw whose u falls within rounding of a boundary between two tokens may pick the neighbour. A row
of −inf gives NaN log-probabilities, as torch does; a row holding NaN gets a NaN log-probability too, but
its token is chosen among the other entries (torch's argmax returns the NaN's index).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None


def greedy_reference(logits_BV: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(first argmax [B] int64, its log-softmax [B] fp32) with torch ops: the definition."""
    z = logits_BV.float()
    tok = z.argmax(-1)
    return tok, torch.log_softmax(z, -1).gather(-1, tok[:, None]).squeeze(-1)


def plain_reference(logits_BV: torch.Tensor, u_B: torch.Tensor, temperature: float = 1.0
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(token [B] int64, its log-prob [B] fp32) drawn by inverse CDF of softmax(logits / T) at ``u_B``: the
    torch definition, ``reallm.model.generate.draw``."""
    from reallm.model.generate import draw  # (generate imports this module)

    z = logits_BV.float()
    if temperature != 1.0:
        z = z / temperature
    tok = draw(z, u_B)
    return tok, torch.log_softmax(z, -1).gather(-1, tok[:, None]).squeeze(-1)


def usable(logits_BV: torch.Tensor) -> bool:
    """Can :func:`greedy` / :func:`plain` run on these logits (Triton, CUDA, rows of unit stride)?"""
    return triton is not None and logits_BV.is_cuda and logits_BV.dim() == 2 and logits_BV.stride(-1) == 1


if triton is not None:

    @triton.jit
    def _banned(x, cols, ban_ptr, NBAN: tl.constexpr):
        for j in tl.static_range(NBAN):  # banned tokens (EOS before min_new_tokens) are -inf, as process_logits
            x = tl.where(cols == tl.load(ban_ptr + j), float("-inf"), x)
        return x

    @triton.jit
    def _greedy_kernel(x_ptr, stride, V, ban_ptr, tok_ptr, lp_ptr, NBAN: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # (row * stride past 2^31 elements: large vocabularies)
        lanes = tl.arange(0, BLOCK)
        m = tl.full([BLOCK], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK], tl.float32)
        idx = tl.zeros([BLOCK], tl.int32)
        for start in range(0, V, BLOCK):
            cols = start + lanes
            x = _banned(tl.load(x_ptr + row * stride + cols, mask=cols < V, other=float("-inf")).to(tl.float32),
                        cols, ban_ptr, NBAN)
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

    @triton.jit
    def _plain_kernel(x_ptr, stride, V, u_ptr, temperature, ban_ptr, tok_ptr, lp_ptr, NBAN: tl.constexpr,
                      BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        lanes = tl.arange(0, BLOCK)
        base = x_ptr + row * stride
        m = tl.full([BLOCK], float("-inf"), tl.float32)
        for start in range(0, V, BLOCK):  # pass 1: the maximum of z = x / T
            cols = start + lanes
            z = _banned(tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32),
                        cols, ban_ptr, NBAN) / temperature
            m = tl.maximum(m, z)
        top = tl.max(m, 0)
        acc = tl.zeros([BLOCK], tl.float64)
        for start in range(0, V, BLOCK):  # pass 2: S = Σ exp(z − m), float64 like the torch draw
            cols = start + lanes
            z = _banned(tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32),
                        cols, ban_ptr, NBAN) / temperature
            acc += tl.exp(z - top).to(tl.float64)
        total = tl.sum(acc, 0)
        threshold = tl.load(u_ptr + row).to(tl.float64) * total
        carry = total * 0.0
        found = V
        for start in range(0, V, BLOCK):  # pass 3: the first index whose running sum exceeds u · S
            cols = start + lanes
            z = _banned(tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32),
                        cols, ban_ptr, NBAN) / temperature
            p = tl.exp(z - top).to(tl.float64)
            block_sum = tl.sum(p, 0)
            if (found == V) & (carry + block_sum > threshold):  # the crossing is in this block: scan it
                run = tl.cumsum(p, 0) + carry
                here = tl.min(tl.where((run > threshold) & (p > 0) & (cols < V), cols, V), 0)
                found = tl.minimum(found, here)
            carry += block_sum
        tok = tl.minimum(found, V - 1)
        z_tok = tl.load(base + tok).to(tl.float32) / temperature
        lp = z_tok - top - tl.log(total.to(tl.float32))
        tl.store(tok_ptr + row, tok.to(tl.int64))
        tl.store(lp_ptr + row, tl.where(total > 0, lp, float("nan")))


def _block(V: int, cap: int) -> int:
    return min(triton.next_power_of_2(max(V, 16)), cap)


_BANS: dict = {}


def _ban_tensor(ban: Sequence[int], device) -> torch.Tensor:
    """The banned ids on the device, made once per (ids, device): no host-to-device copy per step."""
    key = (tuple(ban), str(device))
    if key not in _BANS:
        if len(_BANS) > 64:
            _BANS.clear()
        _BANS[key] = torch.tensor(list(ban) or [-1], dtype=torch.int64, device=device)
    return _BANS[key]


def greedy(logits_BV: torch.Tensor, ban: Sequence[int] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """(first argmax [B] int64, its log-softmax [B] fp32) of each row of ``logits_BV`` [B, V], the tokens in
    ``ban`` removed (-inf)."""
    if not usable(logits_BV):
        raise ValueError("sample.greedy: needs Triton and CUDA logits rows of unit stride (sample.usable)")
    B, V = logits_BV.shape
    tok = torch.empty(B, dtype=torch.int64, device=logits_BV.device)
    lp = torch.empty(B, dtype=torch.float32, device=logits_BV.device)
    if B:
        _greedy_kernel[(B,)](logits_BV, logits_BV.stride(0), V, _ban_tensor(ban, logits_BV.device), tok, lp,
                             NBAN=len(ban), BLOCK=_block(V, 16384), num_warps=16)
    return tok, lp


def plain(logits_BV: torch.Tensor, u_B: torch.Tensor, temperature: float = 1.0,
          vocab_size: Optional[int] = None, ban: Sequence[int] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """A token of each row drawn from softmax(logits / T) at uniform ``u_B`` [B] (inverse CDF, module
    docstring) and its log-probability; only the first ``vocab_size`` columns (a tp padding left out), the
    tokens in ``ban`` removed (-inf)."""
    V = logits_BV.shape[-1] if vocab_size is None else min(vocab_size, logits_BV.shape[-1])
    if not usable(logits_BV):
        raise ValueError("sample.plain: needs Triton and CUDA logits rows of unit stride (sample.usable)")
    B = logits_BV.shape[0]
    tok = torch.empty(B, dtype=torch.int64, device=logits_BV.device)
    lp = torch.empty(B, dtype=torch.float32, device=logits_BV.device)
    if B:
        u = u_B.to(device=logits_BV.device, dtype=torch.float64).contiguous()
        _plain_kernel[(B,)](logits_BV, logits_BV.stride(0), V, u, float(temperature),
                            _ban_tensor(ban, logits_BV.device), tok, lp, NBAN=len(ban), BLOCK=_block(V, 8192),
                            num_warps=16)
    return tok, lp
