"""Gather / scatter of many flat intervals (reallocation messages): the CUDA kernel
``csrc/cuda/intervals.cu`` on CUDA tensors when it builds, else torch ``index_select`` / ``index_copy_``.

The kernel maps each message element to its interval by binary search over the intervals' prefix
offsets, so no int64 index per element is materialised (the torch path's index is 4x a bf16 payload).
"""

from __future__ import annotations

import numpy as np
import torch

from reallm.kernels.jit import JitExtension

_EXT = JitExtension("reallm_intervals_cuda", "intervals.cu")


def intervals_cuda_available(verbose: bool = False) -> bool:
    return _EXT.load(verbose) is not None


def interval_index(starts: np.ndarray, lengths: np.ndarray, device: torch.device) -> torch.Tensor:
    """int64 indices of the concatenated intervals [s, s + n) in order (the torch path)."""
    if len(starts) == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    lengths_t = torch.as_tensor(lengths, dtype=torch.int64)
    starts_t = torch.as_tensor(starts, dtype=torch.int64)
    total = int(lengths_t.sum())
    # position within the concatenation minus the start of its interval, plus the interval's start
    seg_start = torch.cumsum(lengths_t, 0) - lengths_t
    idx = torch.arange(total, dtype=torch.int64) + torch.repeat_interleave(starts_t - seg_start, lengths_t)
    return idx.to(device)


def _kernel_args(starts: np.ndarray, lengths: np.ndarray, device: torch.device):
    off = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=off[1:])
    return (torch.as_tensor(np.asarray(starts, dtype=np.int64), device=device),
            torch.as_tensor(off, device=device), int(off[-1]))


def _use_kernel(t: torch.Tensor, use_kernel) -> bool:
    if use_kernel is False or t.device.type != "cuda" or t.element_size() not in (2, 4, 8):
        return False
    return _EXT.load() is not None


def gather_intervals(flat: torch.Tensor, starts: np.ndarray, lengths: np.ndarray, use_kernel=None) -> torch.Tensor:
    if _use_kernel(flat, use_kernel):
        start_t, off_t, total = _kernel_args(starts, lengths, flat.device)
        msg = torch.empty(total, dtype=flat.dtype, device=flat.device)
        _EXT.load().gather(flat, msg, start_t, off_t)
        return msg
    return flat.index_select(0, interval_index(starts, lengths, flat.device))


def scatter_intervals(flat: torch.Tensor, starts: np.ndarray, lengths: np.ndarray, values: torch.Tensor,
                      use_kernel=None) -> None:
    if _use_kernel(flat, use_kernel):
        start_t, off_t, _ = _kernel_args(starts, lengths, flat.device)
        _EXT.load().scatter(flat, values.contiguous(), start_t, off_t)
        return
    flat.index_copy_(0, interval_index(starts, lengths, flat.device), values)
