"""Generation's bounded working set: the rules the executor follows and the planner's memory model reads
(torch-free, so the planner imports it as is).

* Prefill runs over groups of whole prompts of at most ``prefill_chunk_tokens`` tokens: a block's no-grad
  peak is about 3 intermediate-wide rows (fused gate-up output, SiLU, product) and 4 hidden-wide ones per
  token, kept within ``PREFILL_CHUNK_BYTES`` (``LEAN_PREFILL_CHUNK_BYTES`` under the lean policy), and
  between 512 and 8192 tokens. Each group is a full forward (on a GPU ~1 ms of host work per layer), so
  groups are as large as the budget allows.
* Sampling handles the rows of a step's logits in chunks of ``sampling_chunk_rows``: all rows at once by
  default (the host issues each chunk's dozen kernels every step), ``LEAN_SAMPLING_CHUNK_LOGITS`` logits a
  chunk under the lean policy: ~20 bytes of fp32/fp64 temporaries per logit.

The lean policy (``memory.offload_idle_train_states``; ``GenerationConfig.lean_memory``) trades those
launches for the least device memory.
"""

from __future__ import annotations

PREFILL_CHUNK_BYTES = 512 << 20
LEAN_PREFILL_CHUNK_BYTES = 32 << 20
PREFILL_CHUNK_TOKENS_MIN, PREFILL_CHUNK_TOKENS_MAX = 512, 8192
LEAN_SAMPLING_CHUNK_LOGITS = 1 << 20


def prefill_chunk_tokens(hidden: int, intermediate: int, dtype_bytes: int = 2, lean_memory: bool = False) -> int:
    """Tokens per prefill group (``intermediate``: this rank's shard of the MLP)."""
    per_token = dtype_bytes * (3 * intermediate + 4 * hidden)
    budget = LEAN_PREFILL_CHUNK_BYTES if lean_memory else PREFILL_CHUNK_BYTES
    return int(min(max(budget // per_token, PREFILL_CHUNK_TOKENS_MIN), PREFILL_CHUNK_TOKENS_MAX))


def sampling_chunk_logits(lean_memory: bool) -> int:
    """Logits per sampling chunk under a memory policy (0: all rows at once)."""
    return LEAN_SAMPLING_CHUNK_LOGITS if lean_memory else 0


def sampling_chunk_rows(vocab: int, chunk_logits: int, batch: int) -> int:
    """Rows per sampling chunk: all ``batch`` rows when ``chunk_logits`` is 0, else ``chunk_logits // vocab``
    (at least 1)."""
    if chunk_logits <= 0:
        return max(batch, 1)
    return max(1, chunk_logits // max(vocab, 1))


#: Smallest rounding step of token counts and of the longest sequence (``bucket``).
MIN_TOKEN_STEP = 128
MIN_SEQLEN_STEP = 64


def bucket(n: int, min_step: int = MIN_TOKEN_STEP) -> int:
    """n rounded up to a multiple of max(min_step, 2^(⌊log2 n⌋ − 3)): at most 1/8 more, 8 sizes per octave.
    The padded token count of a graphed inference micro-batch (``reallm.model.graphs``), which the cost model
    charges too."""
    if n <= 0:
        return min_step
    step = max(min_step, 1 << max(n.bit_length() - 4, 0))  # 2^(floor(log2 n) - 3)
    return -(-n // step) * step
