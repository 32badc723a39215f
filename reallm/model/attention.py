"""Causal attention on packed variable-length sequences, and single-token decode against a KV cache.

Packed layout: the tokens of B sequences are concatenated into one axis of T tokens, sequence b holding
rows ``[cu_seqlens[b], cu_seqlens[b+1])``. Token i of a sequence attends to tokens j of the *same*
sequence with ``j <= i`` (and ``i - j < window`` under a sliding window)::

    o_i = sum_j softmax_j(q_i . k_j * scale) v_j,     scale = head_dim ** -0.5

GQA: query head h reads kv head ``h // (num_q_heads / num_kv_heads)``. Head counts are never stored:
they are read off the tensors, so a tensor-parallel shard holding ``num_heads / tp`` heads works as is.

Backends (``AttnBackend``):
  SDPA_LOOP  exact reference on any device: one ``scaled_dot_product_attention(is_causal=True)`` per
             sequence (no T x T mask, no padding compute). CPU where PADDED does not pay off; the CUDA fallback.
  VARLEN     CUDA, half precision: ``torch.nn.attention.varlen.varlen_attn`` (flash-attention varlen,
             torch >= 2.10), one kernel for the whole packed batch. Its signature changed between
             releases, so the keyword arguments are chosen by inspecting it.
  BATCHED    CUDA, half precision, every sequence of the pack equally long (fixed-length training
             batches): the pack viewed as [B, S, heads, D] and one causal SDPA call restricted to the
             cuDNN and flash kernels (cuDNN's fused attention is the fastest on Hopper).
  PADDED     exact up to rounding, any device (AUTO picks it on CPU only): the pack scattered into
             [B, heads, S, D] (S the longest sequence, zeros after each sequence's end), one SDPA call for
             the whole batch, the real rows gathered back. Row b of the padded batch holds sequence b alone,
             so the mask is the causal band only (``is_causal`` without a window): a real query i < L_b
             reads keys j <= i < L_b, all of its own sequence; a padding query reads padding keys (at least
             itself, so no row is empty and nothing is NaN), and its output and gradient are discarded.
             Cost: B * S query rows instead of T. Deterministic, but not batch-invariant to the last bit:
             the CPU kernel's blocking follows S, so with long sequences one sequence's output can move by
             an ulp with the longest sequence of its micro-batch (the loop's cannot).
  AUTO       BATCHED when the lengths are equal and ``REALLM_ATTN`` is not ``varlen``; else VARLEN when
             usable (CUDA, fp16/bf16, importable); else PADDED on CPU when ``padded_pays_off``; else
             SDPA_LOOP.

CPU choice between SDPA_LOOP and PADDED (``padded_pays_off``). The loop pays a fixed cost per sequence and
layer (an SDPA call forward and one backward: tens to hundreds of microseconds on CPU, above the arithmetic of
a 32-token sequence); PADDED pays one call, plus the attention of the padding::

    extra_macs = (B * S**2 - sum_b L_b**2) * heads * D          (padded_extra_pairs * heads * head dim)
    PADDED  iff  B >= 2  and  extra_macs <= PADDED_CALL_MACS * (B - 1)

``PADDED_CALL_MACS`` (the cost of one saved call, in padded multiply-adds) was fitted on one thread of a
2-core CPU, torch 2.13, fp32, forward + backward (2026-11-24), over 4 query / 2 kv heads of D 16 (the tiny
models) and 8 / 2 heads of D 64, B in {4, 16, 64}, S_max in {16, ..., 256}, lengths equal or uniform in
[S/2, S]. PADDED took 0.13-0.91 of the loop's time for S_max <= 32 and 0.13-0.95 with equal lengths up
to S = 256; with ragged lengths it lost (1.07-1.44x) once extra_macs / (B - 1) passed ~0.6M, and won below
~0.45M. The rule picks none of the losing cases and leaves to the loop two that PADDED wins (0.75x, 0.67x,
both B = 64 with 8 heads of 64).
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Optional

import torch
import torch.nn.functional as F


class AttnBackend(Enum):
    """How packed causal attention is computed (module docstring)."""

    AUTO = "auto"
    SDPA_LOOP = "sdpa_loop"
    VARLEN = "varlen"
    BATCHED = "batched"
    PADDED = "padded"


@dataclass(frozen=True)
class PackedSeqs:
    """Sequence boundaries of a packed batch, on device and on host (the host copy drives the CPU loop)."""

    #: int32 [B+1] on the activations' device.
    cu_seqlens: torch.Tensor
    #: The same boundaries as Python ints (one host sync per forward, not per layer).
    bounds: tuple[int, ...]
    max_seqlen: int
    #: Inside a CUDA graph (``reallm.model.graphs``): ``bounds`` describe the capture's micro-batch only, so
    #: the kernel must read the boundaries from ``cu_seqlens`` on the device (VARLEN), never choose by them.
    graph_static: bool = False

    @staticmethod
    def from_cu_seqlens(cu_seqlens: torch.Tensor, max_seqlen: Optional[int] = None) -> PackedSeqs:
        bounds = tuple(int(x) for x in cu_seqlens.tolist())
        if max_seqlen is None:
            max_seqlen = max((b - a for a, b in zip(bounds, bounds[1:], strict=False)), default=0)
        return PackedSeqs(cu_seqlens.to(torch.int32), bounds, int(max_seqlen))

    @property
    def num_seqs(self) -> int:
        return len(self.bounds) - 1

    @property
    def num_tokens(self) -> int:
        return self.bounds[-1]

    @functools.cached_property
    def lengths(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in zip(self.bounds, self.bounds[1:], strict=False))

    @functools.cached_property
    def padded_extra_pairs(self) -> int:
        """Query-key pairs the padded layout computes beyond the loop's: ``B * S**2 - sum_b L_b**2``."""
        S = max(self.lengths, default=0)
        return self.num_seqs * S * S - sum(n * n for n in self.lengths)

    @functools.cached_property
    def padded_slots(self) -> tuple[int, torch.Tensor]:
        """(S, int64 [T]): the padded length (the longest sequence; ``max_seqlen`` may be larger) and every
        packed token's row ``b * S + position`` in the padded [B * S] layout. Computed once per forward, every
        layer reusing it, on ``cu_seqlens``' device."""
        S = max(self.lengths, default=0)
        device = self.cu_seqlens.device
        T = self.num_tokens
        lens = torch.tensor(self.lengths, dtype=torch.int64, device=device)
        starts = torch.tensor(self.bounds[:-1], dtype=torch.int64, device=device)
        seq_idx = torch.repeat_interleave(torch.arange(self.num_seqs, device=device), lens, output_size=T)
        # b * S + (t - start_b) for token t of sequence b
        return S, torch.arange(T, device=device) + (seq_idx * S - starts[seq_idx])


def _sdpa_one(q_LnD: torch.Tensor, k_LkD: torch.Tensor, v_LkD: torch.Tensor, scale: float,
              window: Optional[int]) -> torch.Tensor:
    """Causal attention of one sequence; [L, heads, D] in and out."""
    q = q_LnD.transpose(0, 1).unsqueeze(0)  # [1, nh, L, D]
    k = k_LkD.transpose(0, 1).unsqueeze(0)  # [1, nkv, L, D]
    v = v_LkD.transpose(0, 1).unsqueeze(0)
    return _causal_sdpa(q, k, v, scale, window).squeeze(0).transpose(0, 1)


def _causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                 window: Optional[int]) -> torch.Tensor:
    """Causal (optionally sliding-window) SDPA on ``[B, heads, L, D]``; GQA by head counts."""
    L = q.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if window is None or L <= window:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    # A band of width `window` under the diagonal, L x L.
    i = torch.arange(L, device=q.device)
    diff = i[:, None] - i[None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=(diff >= 0) & (diff < window), scale=scale,
                                          enable_gqa=gqa)


def sdpa_loop_attention(q_TnD: torch.Tensor, k_TkD: torch.Tensor, v_TkD: torch.Tensor, seqs: PackedSeqs,
                        scale: float, window: Optional[int] = None) -> torch.Tensor:
    """Exact packed causal attention, one SDPA call per sequence. Returns [T, nh, D]."""
    if seqs.num_seqs == 1:
        return _sdpa_one(q_TnD, k_TkD, v_TkD, scale, window)
    outs = []
    for a, b in zip(seqs.bounds, seqs.bounds[1:], strict=False):
        if b > a:
            outs.append(_sdpa_one(q_TnD[a:b], k_TkD[a:b], v_TkD[a:b], scale, window))
    return torch.cat(outs, 0) if outs else q_TnD.new_empty(q_TnD.shape)


@functools.lru_cache(maxsize=1)
def _varlen_impl() -> Optional[tuple[Callable, frozenset]]:
    """``varlen_attn`` and its keyword names, or None when this torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def varlen_usable(q: torch.Tensor, window: Optional[int]) -> bool:
    impl = _varlen_impl()
    if impl is None or q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16):
        return False
    params = impl[1]
    if window is not None and "window_size" not in params:
        return False
    return "window_size" in params or "is_causal" in params


def varlen_attention(q_TnD: torch.Tensor, k_TkD: torch.Tensor, v_TkD: torch.Tensor, seqs: PackedSeqs,
                     scale: float, window: Optional[int] = None) -> torch.Tensor:
    """Packed causal attention with flash-attention varlen (CUDA, half precision)."""
    impl = _varlen_impl()
    assert impl is not None
    fn, params = impl
    kwargs: dict = {"scale": scale}
    if "window_size" in params:
        # (left, right): a query sees `left` earlier keys; HF's window W keeps i - j < W, i.e. left = W - 1.
        kwargs["window_size"] = (-1 if window is None else window - 1, 0)
    else:
        kwargs["is_causal"] = True
    if q_TnD.shape[1] != k_TkD.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            rep = q_TnD.shape[1] // k_TkD.shape[1]
            k_TkD = k_TkD.repeat_interleave(rep, dim=1)
            v_TkD = v_TkD.repeat_interleave(rep, dim=1)
    cu = seqs.cu_seqlens
    return fn(q_TnD, k_TkD, v_TkD, cu, cu, seqs.max_seqlen, seqs.max_seqlen, **kwargs)


def equal_lengths(seqs: PackedSeqs) -> bool:
    n = seqs.num_seqs
    return n >= 1 and seqs.num_tokens == n * seqs.max_seqlen


def batched_usable(q: torch.Tensor, seqs: PackedSeqs, window: Optional[int]) -> bool:
    return (not seqs.graph_static and q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16) and window is None
            and equal_lengths(seqs) and os.environ.get("REALLM_ATTN", "") != "varlen")


def batched_attention(q_TnD: torch.Tensor, k_TkD: torch.Tensor, v_TkD: torch.Tensor, seqs: PackedSeqs,
                      scale: float) -> torch.Tensor:
    """Equal-length packs as one batched causal SDPA call on the cuDNN / flash kernels."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B, S = seqs.num_seqs, seqs.max_seqlen
    q = q_TnD.view(B, S, *q_TnD.shape[1:]).transpose(1, 2)
    k = k_TkD.view(B, S, *k_TkD.shape[1:]).transpose(1, 2)
    v = v_TkD.view(B, S, *v_TkD.shape[1:]).transpose(1, 2)
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION], set_priority=True):
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return o.transpose(1, 2).reshape(q_TnD.shape)


#: One sequence's SDPA calls (forward and backward) on CPU cost about this many multiply-adds of padded
#: attention (module docstring). Halving or doubling it only moves cases within ~20% of break-even.
PADDED_CALL_MACS = 500_000


def padded_pays_off(q: torch.Tensor, seqs: PackedSeqs) -> bool:
    """AUTO's choice of PADDED over SDPA_LOOP on CPU (module docstring)."""
    if q.device.type != "cpu" or seqs.num_seqs < 2:
        return False
    extra_macs = seqs.padded_extra_pairs * q.shape[1] * q.shape[2]
    return extra_macs <= PADDED_CALL_MACS * (seqs.num_seqs - 1)


def padded_attention(q_TnD: torch.Tensor, k_TkD: torch.Tensor, v_TkD: torch.Tensor, seqs: PackedSeqs,
                     scale: float, window: Optional[int] = None) -> torch.Tensor:
    """Packed causal attention as one SDPA call on the zero-padded [B, heads, S, D] batch (module docstring).
    Differentiable: ``index_copy`` / ``index_select`` route the gradients of the real rows only."""
    B = seqs.num_seqs
    S, slot_T = seqs.padded_slots
    T = q_TnD.shape[0]
    if T == 0:
        return q_TnD.new_empty(q_TnD.shape)
    if B * S == T:  # equal lengths: the pack already is the padded batch
        def to_padded(x_TnD: torch.Tensor) -> torch.Tensor:
            return x_TnD.reshape(B, S, *x_TnD.shape[1:]).transpose(1, 2)
    else:
        def to_padded(x_TnD: torch.Tensor) -> torch.Tensor:
            x_pad = x_TnD.new_zeros(B * S, *x_TnD.shape[1:]).index_copy(0, slot_T, x_TnD)
            return x_pad.view(B, S, *x_TnD.shape[1:]).transpose(1, 2)
    q, k, v = to_padded(q_TnD), to_padded(k_TkD), to_padded(v_TkD)  # [B, heads, S, D]
    o = _causal_sdpa(q, k, v, scale, window)
    o_TnD = o.transpose(1, 2).reshape(B * S, *q_TnD.shape[1:])
    return o_TnD if B * S == T else o_TnD.index_select(0, slot_T)


def packed_causal_attention(q_TnD: torch.Tensor, k_TkD: torch.Tensor, v_TkD: torch.Tensor, seqs: PackedSeqs,
                            scale: float, window: Optional[int] = None,
                            backend: AttnBackend = AttnBackend.AUTO) -> torch.Tensor:
    """Causal attention within each packed sequence: [T, nh, D], [T, nkv, D] x2 → [T, nh, D]."""
    if backend is AttnBackend.BATCHED or (backend is AttnBackend.AUTO and batched_usable(q_TnD, seqs, window)):
        return batched_attention(q_TnD, k_TkD, v_TkD, seqs, scale)
    if backend is AttnBackend.VARLEN or (backend is AttnBackend.AUTO and varlen_usable(q_TnD, window)):
        return varlen_attention(q_TnD, k_TkD, v_TkD, seqs, scale, window)
    if backend is AttnBackend.PADDED or (backend is AttnBackend.AUTO and padded_pays_off(q_TnD, seqs)):
        return padded_attention(q_TnD, k_TkD, v_TkD, seqs, scale, window)
    return sdpa_loop_attention(q_TnD, k_TkD, v_TkD, seqs, scale, window)


def decode_attention(q_BnD: torch.Tensor, k_cache_BkSD: torch.Tensor, v_cache_BkSD: torch.Tensor,
                     valid_BS: torch.Tensor, scale: float) -> torch.Tensor:
    """One query token per sequence against its whole (static-size) cache; invalid slots masked.

    The query heads of one kv group are laid along SDPA's query-length axis, so GQA needs no copy of
    the cache: q [B, nkv, g, D] x k [B, nkv, S, D]. Shapes never change between steps (CUDA graphs).
    """
    B, nh, D = q_BnD.shape
    nkv = k_cache_BkSD.shape[1]
    q = q_BnD.view(B, nkv, nh // nkv, D)
    o = F.scaled_dot_product_attention(q, k_cache_BkSD, v_cache_BkSD, attn_mask=valid_BS[:, None, None, :],
                                       scale=scale)
    return o.reshape(B, nh, D)
