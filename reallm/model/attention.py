"""Causal attention on packed variable-length sequences, and single-token decode against a KV cache.

Packed layout: the tokens of B sequences are concatenated into one axis of T tokens, sequence b holding
rows ``[cu_seqlens[b], cu_seqlens[b+1])``. Token i of a sequence attends to tokens j of the *same*
sequence with ``j <= i`` (and ``i - j < window`` under a sliding window)::

    o_i = sum_j softmax_j(q_i . k_j * scale) v_j,     scale = head_dim ** -0.5

GQA: query head h reads kv head ``h // (num_q_heads / num_kv_heads)``. Head counts are never stored:
they are read off the tensors, so a tensor-parallel shard holding ``num_heads / tp`` heads works as is.

Backends (``AttnBackend``):
  SDPA_LOOP  exact reference on any device: one ``scaled_dot_product_attention(is_causal=True)`` per
             sequence (no T x T mask, no padding compute). The CPU path, and the CUDA fallback.
  VARLEN     CUDA, half precision: ``torch.nn.attention.varlen.varlen_attn`` (flash-attention varlen,
             torch >= 2.10), one kernel for the whole packed batch. Its signature changed between
             releases, so the keyword arguments are chosen by inspecting it.
  BATCHED    CUDA, half precision, every sequence of the pack equally long (fixed-length training
             batches): the pack viewed as [B, S, heads, D] and one causal SDPA call restricted to the
             cuDNN and flash kernels (cuDNN's fused attention is the fastest on Hopper).
  AUTO       BATCHED when the lengths are equal and ``REALLM_ATTN`` is not ``varlen``; else VARLEN when
             usable (CUDA, fp16/bf16, importable); else SDPA_LOOP.
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


@dataclass(frozen=True)
class PackedSeqs:
    """Sequence boundaries of a packed batch, on device and on host (the host copy drives the CPU loop)."""

    #: int32 [B+1] on the activations' device.
    cu_seqlens: torch.Tensor
    #: The same boundaries as Python ints (one host sync per forward, not per layer).
    bounds: tuple[int, ...]
    max_seqlen: int

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


def _sdpa_one(q_LnD: torch.Tensor, k_LkD: torch.Tensor, v_LkD: torch.Tensor, scale: float,
              window: Optional[int]) -> torch.Tensor:
    """Causal attention of one sequence; [L, heads, D] in and out."""
    L = q_LnD.shape[0]
    q = q_LnD.transpose(0, 1).unsqueeze(0)  # [1, nh, L, D]
    k = k_LkD.transpose(0, 1).unsqueeze(0)  # [1, nkv, L, D]
    v = v_LkD.transpose(0, 1).unsqueeze(0)
    gqa = q.shape[1] != k.shape[1]
    if window is None or L <= window:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        # A band of width `window` under the diagonal; L x L for this sequence only.
        i = torch.arange(L, device=q.device)
        diff = i[:, None] - i[None, :]
        mask_LL = (diff >= 0) & (diff < window)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_LL, scale=scale, enable_gqa=gqa)
    return o.squeeze(0).transpose(0, 1)


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
    return (q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16) and window is None
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


def packed_causal_attention(q_TnD: torch.Tensor, k_TkD: torch.Tensor, v_TkD: torch.Tensor, seqs: PackedSeqs,
                            scale: float, window: Optional[int] = None,
                            backend: AttnBackend = AttnBackend.AUTO) -> torch.Tensor:
    """Causal attention within each packed sequence: [T, nh, D], [T, nkv, D] x2 → [T, nh, D]."""
    if backend is AttnBackend.BATCHED or (backend is AttnBackend.AUTO and batched_usable(q_TnD, seqs, window)):
        return batched_attention(q_TnD, k_TkD, v_TkD, seqs, scale)
    if backend is AttnBackend.VARLEN or (backend is AttnBackend.AUTO and varlen_usable(q_TnD, window)):
        return varlen_attention(q_TnD, k_TkD, v_TkD, seqs, scale, window)
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
