"""The host half of the CUDA interval kernels (``reallm.kernels.intervals.prepare_intervals``), checked on
CPU by running the kernel's own walk in Python: per chunk of message words, start at ``chunk_first``, advance
the interval index linearly, and the resulting (interval, offset) of every word must be the one the plain
concatenation of the intervals gives. The kernel itself is checked against the torch path on a GPU
(bench/bench_intervals_gpu.py)."""

import numpy as np
import pytest
import torch

from reallm.kernels.intervals import VECTOR_BYTES, interval_index, prepare_intervals


def kernel_walk(args, chunk_words: int) -> np.ndarray:
    """Buffer index (in words) of every message word, as csrc/cuda/intervals.cu computes it."""
    start = args.start_words.numpy()
    off = args.off_words.numpy()
    first = args.chunk_first.numpy()
    total, k_count = int(off[-1]), len(start)
    out = np.empty(total, dtype=np.int64)
    blocks = len(first)
    assert blocks == -(-total // chunk_words)
    for c in range(blocks):
        j0, j1 = c * chunk_words, min((c + 1) * chunk_words, total)
        k0 = first[c]
        k1 = first[c + 1] if c + 1 < blocks else k_count - 1
        k = 0
        for j in range(j0, j1):
            while off[k0 + k + 1] <= j:
                k += 1
            assert k0 + k <= k1, "a word past the chunk's last interval"
            out[j] = start[k0 + k] + (j - off[k0 + k])
    return out


def random_intervals(rng, n_flat, k, multiple):
    cuts = np.sort(rng.choice(n_flat // multiple, size=2 * k, replace=False)) * multiple
    starts, ends = cuts[0::2], cuts[1::2]
    order = rng.permutation(k)
    return starts[order].astype(np.int64), (ends - starts)[order].astype(np.int64)


@pytest.mark.parametrize("element_size", [2, 4, 8])
@pytest.mark.parametrize("multiple", [1, 8])
@pytest.mark.parametrize("k", [1, 3, 40])
@pytest.mark.parametrize("chunk_words", [1, 5, 64])
def test_kernel_walk_equals_concatenation(element_size, multiple, k, chunk_words):
    rng = np.random.default_rng(k * 1000 + multiple * 10 + element_size)
    starts, lengths = random_intervals(rng, 4000, k, multiple)
    if k > 3:  # empty intervals anywhere, the first and last included
        lengths[[0, k // 2, k - 1]] = 0
    args = prepare_intervals(starts, lengths, element_size, torch.device("cpu"), chunk_words=chunk_words)
    per_vec = VECTOR_BYTES // element_size
    vectorised = multiple % per_vec == 0
    assert args.word_bytes == (VECTOR_BYTES if vectorised else element_size)
    unit = per_vec if vectorised else 1
    assert args.num_elements == lengths.sum() and args.num_words == lengths.sum() // unit
    expect = interval_index(starts, lengths, torch.device("cpu")).numpy()
    words = kernel_walk(args, chunk_words)
    # expand word indices to element indices
    got = (words[:, None] * unit + np.arange(unit)[None, :]).reshape(-1)
    np.testing.assert_array_equal(got, expect)
