"""Gather / scatter of many flat intervals (reallocation messages): the CUDA kernel
``csrc/cuda/intervals.cu`` on CUDA tensors when it builds, else torch ``index_select`` / ``index_copy_``.

The kernel needs, per message, the intervals' starts and prefix offsets in *word* units (16-byte vectors
when every start and length is a multiple of 16 bytes, else single elements) and, per chunk of
``CHUNK_WORDS`` message words, the interval holding the chunk's first word. ``prepare_intervals`` builds
these device tensors once; a reallocation plan is static, so the executor keeps them per message
(``IntervalArgs``) and each step launches one kernel per message with no host work. Passing plain
``(starts, lengths)`` arrays prepares them on the fly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from reallm.kernels.jit import JitExtension

_EXT = JitExtension("reallm_intervals_cuda_v2", "intervals.cu")
#: Message words per CUDA block (csrc/cuda/intervals.cu ``kChunk``).
CHUNK_WORDS = 8192
VECTOR_BYTES = 16


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


@dataclass(frozen=True)
class IntervalArgs:
    """One message's intervals, ready for the kernel (device tensors in word units)."""

    num_elements: int
    element_size: int
    #: 16 (vectors) or ``element_size``.
    word_bytes: int
    start_words: torch.Tensor
    off_words: torch.Tensor
    chunk_first: torch.Tensor

    @property
    def num_words(self) -> int:
        return self.num_elements * self.element_size // self.word_bytes


def prepare_intervals(starts: np.ndarray, lengths: np.ndarray, element_size: int,
                      device: torch.device, chunk_words: int = CHUNK_WORDS) -> IntervalArgs:
    starts = np.asarray(starts, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    per_vec = VECTOR_BYTES // element_size
    vectorised = bool(np.all(starts % per_vec == 0) and np.all(lengths % per_vec == 0))
    unit = per_vec if vectorised else 1
    off = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths // unit, out=off[1:])
    total_words = int(off[-1])
    chunk_starts = np.arange(0, total_words, chunk_words, dtype=np.int64)
    # the interval holding each chunk's first word: the largest k with off[k] <= j (skips empty intervals)
    chunk_first = np.minimum(np.searchsorted(off, chunk_starts, side="right") - 1, max(len(starts) - 1, 0))
    return IntervalArgs(
        num_elements=int(lengths.sum()), element_size=element_size,
        word_bytes=VECTOR_BYTES if vectorised else element_size,
        start_words=torch.as_tensor(starts // unit, device=device),
        off_words=torch.as_tensor(off, device=device),
        chunk_first=torch.as_tensor(chunk_first.astype(np.int64), device=device))


def _use_kernel(t: torch.Tensor, use_kernel) -> bool:
    if use_kernel is False or t.device.type != "cuda" or t.element_size() not in (2, 4, 8):
        return False
    ext = _EXT.load()
    if ext is not None and ext.CHUNK_WORDS != CHUNK_WORDS:
        raise RuntimeError(f"csrc/cuda/intervals.cu kChunk {ext.CHUNK_WORDS} != CHUNK_WORDS {CHUNK_WORDS}")
    return ext is not None


def _args_for(flat: torch.Tensor, msg: torch.Tensor, intervals: tuple,
              prepared: Optional[IntervalArgs]) -> IntervalArgs:
    args = prepared if prepared is not None else prepare_intervals(*intervals, flat.element_size(), flat.device)
    if args.word_bytes == VECTOR_BYTES and (flat.data_ptr() % VECTOR_BYTES or msg.data_ptr() % VECTOR_BYTES):
        args = _element_words(args)  # a sliced buffer off the 16-byte grid: element words instead
    return args


def _element_words(args: IntervalArgs) -> IntervalArgs:
    scale = args.word_bytes // args.element_size
    off = args.off_words.cpu().numpy() * scale
    chunk_starts = np.arange(0, int(off[-1]), CHUNK_WORDS, dtype=np.int64)
    chunk_first = np.minimum(np.searchsorted(off, chunk_starts, side="right") - 1, max(len(off) - 2, 0))
    dev = args.start_words.device
    return IntervalArgs(args.num_elements, args.element_size, args.element_size, args.start_words * scale,
                        torch.as_tensor(off, device=dev), torch.as_tensor(chunk_first.astype(np.int64), device=dev))


def gather_intervals(flat: torch.Tensor, starts, lengths=None, use_kernel=None,
                     prepared: Optional[IntervalArgs] = None) -> torch.Tensor:
    """The concatenation of ``flat[s:s + n]`` over the intervals, as one new contiguous tensor.
    ``prepared`` (from ``prepare_intervals`` on the same arrays) skips the per-call host work."""
    if _use_kernel(flat, use_kernel):
        n = prepared.num_elements if prepared is not None else int(np.sum(lengths))
        msg = torch.empty(n, dtype=flat.dtype, device=flat.device)
        if n:
            a = _args_for(flat, msg, (starts, lengths), prepared)
            _EXT.load().gather(flat, msg, a.start_words, a.off_words, a.chunk_first, a.word_bytes)
        return msg
    return flat.index_select(0, interval_index(starts, lengths, flat.device))


def scatter_intervals(flat: torch.Tensor, starts, lengths, values: torch.Tensor, use_kernel=None,
                      prepared: Optional[IntervalArgs] = None) -> None:
    """``flat[s:s + n] = `` the next n values, interval by interval (in place)."""
    if _use_kernel(flat, use_kernel):
        values = values.contiguous()
        if values.numel():
            a = _args_for(flat, values, (starts, lengths), prepared)
            _EXT.load().scatter(flat, values, a.start_words, a.off_words, a.chunk_first, a.word_bytes)
        return
    flat.index_copy_(0, interval_index(starts, lengths, flat.device), values)
