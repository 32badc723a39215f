"""Packed GAE: the CUDA kernel ``csrc/cuda/gae.cu`` (JIT-built on first use) or the torch path.

``gae(rewards_N, values_T, cu_seqlens, bootstrap_B, gamma, lam)`` returns (advantages [N], returns [N]) in
the shifted layout of ``reallm.algorithms.functional`` (formula there). The kernel runs one warp per
sequence: lanes take 32 entries at a time from the end, compute δ, and a warp scan of the linear recurrence
A[k] = δ[k] + γλ A[k+1] (Kogge–Stone over shuffles, weights (γλ)^offset) plus the carry from the previous
32 entries. It computes in fp64 like ``gae_torch`` (in a different order), so fp32 results agree up to the
final rounding (checked ≤ 1e-6 relative by ``bench/bench_gae_gpu.py``).

The build goes to torch's extension cache (``TORCH_EXTENSIONS_DIR``, default ~/.cache/torch_extensions)
and took 75 s on the H100 machine (torch 2.11, nvcc 13.0); concurrent builders wait on torch's file lock,
so build once per node before the first PPO step (``gae_cuda_available()``). A failed build is reported
once as a warning and the torch path is used from then on. Measured there (bench/bench_gae_gpu.py): the
kernel call takes 40-60 µs up to 1.2 M entries, ``gae_torch`` on the GPU 1-3 ms, on the CPU 1.5-21 ms.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from reallm.kernels.jit import JitExtension

_EXT = JitExtension("reallm_gae_cuda", "gae.cu")


def _load(verbose: bool = False) -> Any:
    """The compiled extension, or None (no CUDA, no source, or the build failed: see ``build_error``)."""
    return _EXT.load(verbose)


def gae_cuda_available(verbose: bool = False) -> bool:
    """True when CUDA is available and the kernel builds (builds it on the first call)."""
    return _load(verbose) is not None


def build_error() -> Optional[str]:
    """Why the kernel is unavailable (None if it loaded or was never tried)."""
    return _EXT.error


def gae_cuda(
    rewards_N: torch.Tensor,
    values_T: torch.Tensor,
    cu_seqlens: torch.Tensor,
    bootstrap_B: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel (raises if it is unavailable). fp32 or fp64 inputs; outputs in the rewards' dtype."""
    mod = _load()
    if mod is None:
        raise RuntimeError(f"GAE CUDA kernel unavailable: {_EXT.error}")
    dtype = rewards_N.dtype if rewards_N.dtype in (torch.float32, torch.float64) else torch.float32
    dev = rewards_N.device
    ar = torch.arange(cu_seqlens.numel(), device=dev, dtype=torch.int32)
    short_cu = (cu_seqlens.to(device=dev, dtype=torch.int32) - ar).contiguous()
    adv, ret = mod.gae_packed(
        rewards_N.to(dtype).contiguous(),
        values_T.to(device=dev, dtype=dtype).contiguous(),
        short_cu,
        bootstrap_B.to(device=dev, dtype=torch.bool).contiguous(),
        float(gamma),
        float(lam),
    )
    return adv, ret


def gae(
    rewards_N: torch.Tensor,
    values_T: torch.Tensor,
    cu_seqlens: torch.Tensor,
    bootstrap_B: torch.Tensor,
    gamma: float,
    lam: float,
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``backend``: ``auto`` (kernel for CUDA tensors when it builds), ``torch`` or ``cuda`` (required)."""
    from reallm.algorithms.functional import gae_torch

    if backend not in ("auto", "torch", "cuda"):
        raise ValueError(f"unknown GAE backend {backend!r}: auto, torch or cuda")
    if backend == "cuda" or (backend == "auto" and rewards_N.is_cuda and gae_cuda_available()):
        return gae_cuda(rewards_N, values_T, cu_seqlens, bootstrap_B, gamma, lam)
    return gae_torch(rewards_N, values_T, cu_seqlens, bootstrap_B, gamma, lam)
