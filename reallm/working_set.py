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

* Decode steps run as one persistent kernel launch (``reallm.model.stream_decode``) where the shapes fit
  (``stream_decode_unfit``) on an sm_90 GPU (``stream_decode_device``): the call then also holds the
  kernel's packed copy of the weights and its buffers (``stream_decode_bytes``), and its cache is rounded up
  to whole slots of 128 positions (``stream_cache_len``).
"""

from __future__ import annotations

from typing import Optional

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


#: The stream step's rows (sequences) per launch, cache slot (positions), weight tile (rows) and head width.
STREAM_ROWS, STREAM_SLOT, STREAM_TILE, STREAM_HEAD = 64, 128, 128, 64
#: fp32 sums of one spread weight tile (128 rows x 64 sequences).
STREAM_SUMS_TILE_BYTES = STREAM_TILE * STREAM_ROWS * 4


def stream_decode_unfit(spec, batch: int, tp: int = 1, pp: int = 1) -> Optional[str]:
    """Why the shapes rule the stream step out for ``batch`` sequences of ``spec`` on a (tp, pp) stage
    (None: they fit; the device and the model's own settings are checked where it runs)."""
    if tp != 1 or pp != 1:
        return f"tp {tp}, pp {pp} (the step is the whole model on one device)"
    if not 0 < batch <= STREAM_ROWS:
        return (f"{batch} sequences in a micro-batch (the kernel's step has {STREAM_ROWS} rows: split the "
                f"generation into micro-batches of at most {STREAM_ROWS})")
    if spec.is_critic:
        return "a critic (the step ends in the LM head)"
    if spec.head_dim != STREAM_HEAD or spec.qkv_bias:
        return f"head_dim {spec.head_dim}, qkv bias {spec.qkv_bias} (the kernel needs {STREAM_HEAD}, none)"
    group, rem = divmod(spec.num_heads, spec.num_kv_heads)
    if rem or group % 2 or group > 8:
        return f"{spec.num_heads} query heads over {spec.num_kv_heads} kv heads (an even number ≤ 8 per kv head)"
    if spec.hidden_size % STREAM_SLOT or spec.intermediate_size % STREAM_SLOT or spec.vocab_size % STREAM_TILE \
            or spec.num_heads * spec.head_dim % STREAM_SLOT:
        return (f"hidden {spec.hidden_size}, MLP {spec.intermediate_size}, vocab {spec.vocab_size} (multiples of "
                f"{STREAM_SLOT}, {STREAM_SLOT} and {STREAM_TILE} needed, and a multiple of {STREAM_SLOT} of query "
                f"columns)")
    return None


def stream_decode_device(name: str) -> bool:
    """Whether a device (by name, as a profile records it) runs the stream step: an sm_90 GPU."""
    return any(gpu in name for gpu in ("H100", "H200", "H800", "H20", "GH200"))


def stream_cache_len(tokens: int) -> int:
    """Cache length the stream step needs for ``tokens`` positions (whole slots)."""
    return -(-tokens // STREAM_SLOT) * STREAM_SLOT


def stream_decode_bytes(spec, runners: int = 1) -> int:
    """Device bytes the stream step holds besides the model and its caches: the packed weights (every matrix
    but the embedding table, the LM head included; bf16; one copy per model), and per runner (a micro-batch's
    cache) the per-layer activation buffers, the logits and the fp32 sums of spread weight tiles (at most one
    per tile)."""
    q, kv, h, inter, v = (spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim, spec.hidden_size,
                          spec.intermediate_size, spec.vocab_size)
    layer = h * (q + 2 * kv) + q * h + 2 * inter * h + inter * h
    packed = 2 * (spec.num_layers * layer + v * h)
    buffers = 2 * STREAM_ROWS * (spec.num_layers * (2 * q + 2 * h + inter) + v)
    tiles = spec.num_layers * (q + 2 * kv + h + 2 * inter + h) // STREAM_TILE + v // STREAM_TILE
    return packed + runners * (buffers + tiles * STREAM_SUMS_TILE_BYTES)
