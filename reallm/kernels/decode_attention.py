"""Single-token decode attention with GQA that appends the new key/value to the cache (Triton).

One decode step of sequence b at position ``pos[b]`` (its cache holds positions ``0 .. pos[b]-1``)::

    cache_k[b, :, pos[b]] = k_new[b];  cache_v[b, :, pos[b]] = v_new[b]
    o[b, h] = sum_{j = lo .. pos[b]} softmax_j(q[b, h] . k_j * scale) v_j,    k_{pos[b]} = k_new[b]
    lo = 0, or max(0, pos[b] - window + 1) under a sliding window (i - j < window)

Why a kernel: the masked SDPA over the whole static cache reads all ``max_len`` slots of every sequence
and needs the append as separate scatter kernels. Here program (b, g) handles kv head g of sequence b and
the ``H / Hkv`` query heads that share it, so each key/value row is read once for the whole group, only
``pos[b]`` rows are read, and the append happens in the same kernel. The new token's own score comes
from registers, so the kernel never reads what it writes. Positions are read from device memory: the
launch has static arguments only and can be captured in a CUDA graph.

Numerics: scores and the running softmax in fp32 (online max / sum, one rescale per block of keys),
output rounded once to the input dtype — the same quantities as the masked-SDPA reference
(``reallm.model.attention.decode_attention``), up to summation order.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

try:  # Triton is present with CUDA builds of torch; on CPU-only installs the torch path is used.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None
    tl = None


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _decode_attn_kernel(q_ptr, kn_ptr, vn_ptr, kc_ptr, vc_ptr, pos_ptr, o_ptr, cos_ptr, sin_ptr, scale, window,
                            max_len, sq_b, sq_h, sn_b, sn_h, sv_b, sv_h, sc_b, sc_h, sc_s, so_b, so_h, sr_b,
                            GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                            HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr, HAS_ROPE: tl.constexpr):
        b = tl.program_id(0)
        g = tl.program_id(1)
        pos = tl.load(pos_ptr + b).to(tl.int32)
        rows = tl.arange(0, GROUP_PAD)
        dims = tl.arange(0, D)
        row_ok = rows < GROUP
        heads = g * GROUP + rows
        q = tl.load(q_ptr + b * sq_b + heads[:, None] * sq_h + dims[None, :], mask=row_ok[:, None], other=0.0)
        kn = tl.load(kn_ptr + b * sn_b + g * sn_h + dims)
        vn = tl.load(vn_ptr + b * sv_b + g * sv_h + dims)
        if HAS_ROPE:
            # x·cos + rotate_half(x)·sin, rotate_half(x)[d] = −x[d + D/2] (d < D/2), x[d − D/2] (d ≥ D/2);
            # in fp32, rounded once to the input dtype, as apply_rope's product of rounded factors is close to.
            half = (dims + D // 2) % D
            sign = tl.where(dims < D // 2, -1.0, 1.0)
            cos = tl.load(cos_ptr + b * sr_b + dims).to(tl.float32)
            sin = tl.load(sin_ptr + b * sr_b + dims).to(tl.float32)
            q2 = tl.load(q_ptr + b * sq_b + heads[:, None] * sq_h + half[None, :], mask=row_ok[:, None], other=0.0)
            q = (q.to(tl.float32) * cos[None, :] + sign[None, :] * q2.to(tl.float32) * sin[None, :]).to(q.dtype)
            kn2 = tl.load(kn_ptr + b * sn_b + g * sn_h + half)
            kn = (kn.to(tl.float32) * cos + sign * kn2.to(tl.float32) * sin).to(kn.dtype)
        cache_off = b * sc_b + g * sc_h
        tl.store(kc_ptr + cache_off + pos * sc_s + dims, kn)
        tl.store(vc_ptr + cache_off + pos * sc_s + dims, vn)

        qf = q.to(tl.float32) * scale
        # The new token first: it is always visible and seeds the running max (no -inf arithmetic).
        m_i = tl.sum(qf * kn.to(tl.float32)[None, :], axis=1)
        l_i = tl.full([GROUP_PAD], 1.0, tl.float32)
        acc = tl.zeros([GROUP_PAD, D], tl.float32) + vn.to(tl.float32)[None, :]
        lo = 0
        if HAS_WINDOW:
            lo = tl.maximum(pos - window + 1, 0)
        start = (lo // BLOCK_N) * BLOCK_N
        cols = tl.arange(0, BLOCK_N)
        for n0 in range(start, pos, BLOCK_N):
            idx = n0 + cols
            ok = (idx < pos) & (idx >= lo)
            k = tl.load(kc_ptr + cache_off + idx[:, None] * sc_s + dims[None, :], mask=ok[:, None], other=0.0)
            v = tl.load(vc_ptr + cache_off + idx[:, None] * sc_s + dims[None, :], mask=ok[:, None], other=0.0)
            s = tl.dot(qf.to(k.dtype), tl.trans(k), input_precision=PRECISION).to(tl.float32)  # [GROUP_PAD, BLOCK_N]
            s = tl.where(ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION).to(tl.float32)
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(o_ptr + b * so_b + heads[:, None] * so_h + dims[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=row_ok[:, None])

    # The block of keys per iteration and the warps: chosen per (head_dim, group, cache length) by timing
    # on first use (the launch only re-writes the same appended rows, so repeating it is harmless). The
    # interpreter (CPU tests) cannot time: one fixed block there.
    _INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
    _tuned_kernel = _decode_attn_kernel if _INTERPRETED else triton.autotune(
        configs=[triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=st)
                 for n, w, st in ((64, 4, 2), (128, 4, 2), (128, 8, 3), (256, 8, 2))],
        key=["D", "GROUP_PAD", "max_len"])(_decode_attn_kernel)


def decode_attention_append(q_BhD: torch.Tensor, k_new_BkD: torch.Tensor, v_new_BkD: torch.Tensor,
                            k_cache_BkSD: torch.Tensor, v_cache_BkSD: torch.Tensor, pos_B: torch.Tensor,
                            scale: float, window: Optional[int] = None,
                            rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """Append (k_new, v_new) at ``pos_B`` and attend (module docstring). Returns ``[B, H, D]``. ``rope``:
    (cos, sin) ``[B, D]``: q and k_new are rotated first (``apply_rope``), in the kernel."""
    if triton is None:
        raise RuntimeError("decode_attention_append needs Triton")
    B, H, D = q_BhD.shape
    Hkv = k_cache_BkSD.shape[1]
    if H % Hkv or D & (D - 1) or D < 16:
        raise ValueError(f"unsupported shape: {H} query heads, {Hkv} kv heads, head_dim {D}")
    q = q_BhD if q_BhD.stride(2) == 1 else q_BhD.contiguous()
    kn = k_new_BkD if k_new_BkD.stride(2) == 1 else k_new_BkD.contiguous()
    vn = v_new_BkD if v_new_BkD.stride(2) == 1 else v_new_BkD.contiguous()
    cos, sin = rope if rope is not None else (q, q)
    if rope is not None and (cos.stride() != sin.stride() or cos.stride(1) != 1):
        raise ValueError("rope cos and sin must share one layout with a contiguous last dim")
    if k_cache_BkSD.stride() != v_cache_BkSD.stride() or k_cache_BkSD.stride(3) != 1:
        raise ValueError("the k and v caches must share one contiguous-last-dim layout")
    group = H // Hkv
    o = torch.empty(B, H, D, dtype=q.dtype, device=q.device)
    extra = {"BLOCK_N": 64} if _INTERPRETED else {}
    _tuned_kernel[(B, Hkv)](
        q, kn, vn, k_cache_BkSD, v_cache_BkSD, pos_B, o, cos, sin, float(scale), int(window or 0),
        k_cache_BkSD.shape[2], q.stride(0), q.stride(1), kn.stride(0), kn.stride(1), vn.stride(0), vn.stride(1),
        k_cache_BkSD.stride(0), k_cache_BkSD.stride(1), k_cache_BkSD.stride(2), o.stride(0), o.stride(1),
        cos.stride(0), GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), D=D,
        HAS_WINDOW=window is not None, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        HAS_ROPE=rope is not None, **extra)
    return o
