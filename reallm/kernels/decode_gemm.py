"""Small-batch matrix products of a decode step, with the block's other work fused in (Triton).

A decode step multiplies a few rows (one per sequence, M ≤ ``MAX_ROWS``) by every weight matrix of the
model: it reads the weights once and is bound by memory bandwidth. ``decode_linear`` computes::

    y = [residual +] epilogue( rms_norm(x; g, eps)? @ W^T [+ bias] )

    norm (``norm_weight`` g): each row of x scaled by rsqrt(mean(x²) + eps), then by g — folded into the
        product as rstd[m] · Σ_k x[m,k] g[k] W[n,k], the row statistics summed while x streams through;
    glu: W holds [gate; up] (2I rows): y[m, i] = silu(gate[m, i]) · up[m, i], an [M, I] output;
    residual: added to the product, in fp32, rounded once.

Why a kernel: the step's products are skinny (M = 64 against N, K of thousands), so a library GEMM runs
few thread blocks per matrix and the norms, the SwiGLU and the residual adds are separate kernels, each
with its own launch and pass over the activations. Here an (N tile, K slice) grid keeps every SM
streaming weights (split-K, ``SPLIT`` slices): each program writes its fp32 partial tile, then takes a
ticket from a per-tile counter (acquire-release atomic); the last program of a tile sums the partials
(read past L1), applies norm scale, bias, SwiGLU and residual, writes the output, and resets the counter
to 0 — so the kernel leaves its state clean and can be replayed from a CUDA graph. Partials and the
norm's per-slice sums of squares live in a workspace of the call.

Numerics: products and sums in fp32, one rounding at the end. Versus the unfused layer: the norm's
output is not rounded to the input dtype before the product, and x·g is rounded once instead (the same
quantities up to bf16 rounding of one factor).
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

#: Rows (sequences of a decode step) the kernel takes; more go through the ordinary layer.
MAX_ROWS = 128


def available() -> bool:
    return triton is not None


def reference(x: torch.Tensor, w: torch.Tensor, norm_weight: Optional[torch.Tensor] = None, eps: float = 0.0,
              bias: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None,
              glu: bool = False) -> torch.Tensor:
    """``decode_linear`` in fp32 torch (the definition the kernel is tested against), in x's dtype."""
    xf = x.float()
    if norm_weight is not None:
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.float()
    y = xf @ w.float().t()
    if bias is not None:
        y = y + bias.float()
    if glu:
        gate, up = y.chunk(2, dim=-1)
        y = torch.nn.functional.silu(gate) * up
    if residual is not None:
        y = y + residual.float()
    return y.to(x.dtype)


if triton is not None:

    @triton.jit
    def _decode_gemm_kernel(x_ptr, w_ptr, g_ptr, b_ptr, r_ptr, y_ptr, part_ptr, ss_ptr, cnt_ptr,
                            M, N_OUT, K, eps, sx_m, sw_n, sr_m, sy_m,
                            BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr,
                            HAS_NORM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
                            GLU: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rows = tl.arange(0, BM)
        cols = pid_n * BN + tl.arange(0, BN)
        row_ok = rows < M
        col_ok = cols < N_OUT
        k_len = tl.cdiv(tl.cdiv(K, SPLIT), BK) * BK
        k_lo = pid_k * k_len
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        acc2 = tl.zeros([BM, BN], dtype=tl.float32)
        ss = tl.zeros([BM], dtype=tl.float32)
        for k0 in range(k_lo, k_lo + k_len, BK):
            ks = k0 + tl.arange(0, BK)
            k_ok = ks < K
            a = tl.load(x_ptr + rows[:, None] * sx_m + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            if HAS_NORM:
                af = a.to(tl.float32)
                ss += tl.sum(af * af, axis=1)
                gk = tl.load(g_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
                a = (af * gk[None, :]).to(a.dtype)
            w = tl.load(w_ptr + cols[:, None] * sw_n + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            acc += tl.dot(a, tl.trans(w))
            if GLU:
                w2 = tl.load(w_ptr + (cols[:, None] + N_OUT) * sw_n + ks[None, :], mask=col_ok[:, None] & k_ok[None, :],
                             other=0.0)
                acc2 += tl.dot(a, tl.trans(w2))
        last = True
        if SPLIT > 1:
            # Partials of this (tile, slice); the last slice of the tile to finish sums them.
            base = (pid_n * SPLIT + pid_k) * BM * BN
            offs = rows[:, None] * BN + tl.arange(0, BN)[None, :]
            tl.store(part_ptr + base + offs, acc)
            if GLU:
                tl.store(part_ptr + base + tl.num_programs(0) * SPLIT * BM * BN + offs, acc2)
            if HAS_NORM:
                tl.store(ss_ptr + (pid_n * SPLIT + pid_k) * BM + rows, ss)
            tl.debug_barrier()  # every thread's partials written before the ticket is taken (release)
            ticket = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
            last = ticket == SPLIT - 1
            if last:
                acc = tl.zeros([BM, BN], dtype=tl.float32)
                acc2 = tl.zeros([BM, BN], dtype=tl.float32)
                ss = tl.zeros([BM], dtype=tl.float32)
                for j in range(SPLIT):
                    pb = (pid_n * SPLIT + j) * BM * BN
                    acc += tl.load(part_ptr + pb + offs, cache_modifier=".cg")
                    if GLU:
                        acc2 += tl.load(part_ptr + pb + tl.num_programs(0) * SPLIT * BM * BN + offs, cache_modifier=".cg")
                    if HAS_NORM:
                        ss += tl.load(ss_ptr + (pid_n * SPLIT + j) * BM + rows, cache_modifier=".cg")
                tl.atomic_xchg(cnt_ptr + pid_n, 0)
        if last:
            if HAS_NORM:
                rstd = 1.0 / tl.sqrt(ss / K + eps)
                acc = acc * rstd[:, None]
                acc2 = acc2 * rstd[:, None]
            if HAS_BIAS:
                acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
                if GLU:
                    acc2 += tl.load(b_ptr + N_OUT + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            if GLU:
                acc = acc / (1.0 + tl.exp(-acc)) * acc2
            mask = row_ok[:, None] & col_ok[None, :]
            if HAS_RES:
                acc += tl.load(r_ptr + rows[:, None] * sr_m + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(y_ptr + rows[:, None] * sy_m + cols[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)

    _INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

    def _configs():
        out = []
        for bn, bk, split, warps, stages in ((64, 128, 1, 4, 3), (64, 128, 2, 4, 3), (64, 128, 4, 4, 3),
                                             (128, 128, 2, 8, 3), (128, 128, 4, 8, 3), (64, 256, 4, 4, 3),
                                             (32, 256, 2, 4, 4), (64, 64, 8, 4, 4), (128, 64, 8, 8, 4)):
            out.append(triton.Config({"BN": bn, "BK": bk, "SPLIT": split}, num_warps=warps, num_stages=stages))
        return out

    # Tile, slices and warps per (rows, outputs, inner size), chosen by timing on first use (the kernel's
    # output depends only on its inputs, and its counters are back at 0 after every launch, so the trial
    # launches are harmless). The interpreter (CPU tests) cannot time: one configuration given per call.
    _tuned_kernel = _decode_gemm_kernel if _INTERPRETED else triton.autotune(
        configs=_configs(), key=["M", "N_OUT", "K", "HAS_NORM", "GLU"])(_decode_gemm_kernel)

_COUNTERS: dict = {}


def _counters(device: torch.device, n: int) -> torch.Tensor:
    """Per-tile tickets, zero and shared by every launch on ``device`` (each launch leaves them at 0)."""
    key = (device.type, device.index)
    c = _COUNTERS.get(key)
    if c is None or c.numel() < n:
        c = _COUNTERS[key] = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
    return c


def decode_linear(x: torch.Tensor, w: torch.Tensor, *, norm_weight: Optional[torch.Tensor] = None, eps: float = 0.0,
                  bias: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None, glu: bool = False,
                  config: Optional[dict] = None) -> torch.Tensor:
    """``y`` of the module docstring for ``x`` [M, K] and ``w`` [N, K] (last dims contiguous). ``config``
    (interpreter only): ``BN``, ``BK``, ``SPLIT`` instead of the tuned choice."""
    if triton is None:
        raise RuntimeError("decode_linear needs Triton")
    M, K = x.shape
    N = w.shape[0]
    if M > MAX_ROWS or w.shape[1] != K or x.stride(1) != 1 or w.stride(1) != 1:
        raise ValueError(f"unsupported shapes: x {tuple(x.shape)} (≤ {MAX_ROWS} rows), w {tuple(w.shape)}, "
                         "contiguous last dims")
    n_out = N // 2 if glu else N
    if residual is not None and (residual.shape != (M, n_out) or residual.stride(1) != 1):
        raise ValueError(f"residual must be [{M}, {n_out}] with a contiguous last dim")
    y = torch.empty(M, n_out, dtype=x.dtype, device=x.device)
    BM = max(16, triton.next_power_of_2(M))
    cnt = _counters(x.device, triton.cdiv(n_out, 16))
    dummy = y  # pointer arguments a configuration does not read

    def workspace(split: int) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 partial tiles and row sums for ``split`` slices, for any BN ≥ 16 dividing 128."""
        if split == 1:
            return dummy, dummy
        part = torch.empty(triton.cdiv(n_out, 128) * 128 * split * BM * (2 if glu else 1), dtype=torch.float32,
                           device=x.device)
        return part, torch.empty(triton.cdiv(n_out, 16) * split * BM, dtype=torch.float32, device=x.device)

    args = dict(M=M, N_OUT=n_out, K=K, eps=float(eps), sx_m=x.stride(0), sw_n=w.stride(0),
                sr_m=residual.stride(0) if residual is not None else 0, sy_m=y.stride(0), BM=BM,
                HAS_NORM=norm_weight is not None, HAS_BIAS=bias is not None, HAS_RES=residual is not None, GLU=glu)
    ptrs = [x, w, norm_weight if norm_weight is not None else dummy, bias if bias is not None else dummy,
            residual if residual is not None else dummy, y]
    if _INTERPRETED or config is not None:
        cfg = dict(config or {"BN": 32, "BK": 32, "SPLIT": 2})
        launch = {k: cfg.pop(k) for k in ("num_warps", "num_stages") if k in cfg}
        part, ss = workspace(cfg["SPLIT"])
        _decode_gemm_kernel[(triton.cdiv(n_out, cfg["BN"]), cfg["SPLIT"])](*ptrs, part, ss, cnt, **args, **cfg,
                                                                            **launch)
        return y
    part, ss = workspace(max(c.kwargs["SPLIT"] for c in _configs()))  # every configuration the tuner tries
    _tuned_kernel[lambda meta: (triton.cdiv(n_out, meta["BN"]), meta["SPLIT"])](*ptrs, part, ss, cnt, **args)
    return y
