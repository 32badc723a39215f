"""Device memory of a call, and the executor's memory policy that decides what is resident when.

Per device of the largest stage (max over stages). P = parameter elements on the device, T tokens per
micro-batch, L blocks on the stage, V' = ⌈V/tp⌉ vocabulary rows, d = bytes per element (2: bf16 on GPU;
4: fp32, the CPU runs), h / q / kv_r / I the hidden, query, per-rank kv and intermediate widths,
c = min(T, 1024) rows of one log-prob chunk (``reallm.parallel.vocab``): 3 fp32 copies of it, 12·c·V'
bytes, or with compiled blocks (fused chunks) one chunk in the logits' dtype, d·c·V'. Each term is what the executor
(``reallm.parallel``) allocates, as ``torch.cuda.max_memory_allocated`` sees it:

  weights_bytes         = d·P                                   the flat parameter buffer
  train_state_bytes     = d·P weights + 4·P fp32 gradients (``FlatAdamW.grads``: accumulated in fp32)
                          + 4·P fp32 master (none for fp32 weights without ZeRO: they are their own master)
                          + 8·P Adam moments; master and moments /dp with ZeRO-1      (bf16: 18·P)
  optimizer step        no temporaries: on CUDA ``FlatAdamW`` runs torch's fused AdamW in place and casts
                          the master into the weights while copying. (Measured on an H100, 2026-11-24:
                          its global-norm ``vector_norm(g, dtype=float64)`` still materialises an fp64
                          copy of the gradients, 8·P bytes, which a chunked norm removes; not modelled.
                          The CPU path's unfused update holds 8·P fp32 temporaries; CPU runs are tiny.)
  layer_activation      = T·( 2·(4 + 2·d)·h/(tp if sp else 1) + d·(4·q + 4·I)/tp )       (eager)
                          one block's tensors saved for backward: per RMSNorm an fp32 copy of its input,
                          the normalised input and its output (the next matmul's input); attention's q,
                          k and v expanded to every query head (the batched cuDNN path takes no GQA, and
                          torch 2.11's varlen attention no ``enable_gqa``) and its output (no s² term);
                          the MLP's gate, SiLU, up and their product
                        = T·d·(2·h + 4·q + 3·I)              (compiled blocks: ``shapes.blocks_compiled``)
                          the compiled regions' partitioner keeps each norm's bf16 input (the rest is
                          recomputed in backward), q/k/v and the attention output, the fused gate-up
                          output and the SwiGLU product. Measured on an H100 (1.1B, 2026-11-24): 58.7 and
                          59.1 kB per token and block at T = 4608 and 12800; the formula gives 58.4
  layer_backward_bytes  = d·T·2·I/tp: a block's gradient temporaries while its saved tensors still live
  head_train            = T·V'·2·d (logits saved for the log-probs' backward, and their gradient)
                          + the log-prob chunk (12·c·V', or d·c·V' fused: the gradient of one chunk)
                          + d·V'·h (the LM head's weight gradient, before its hook adds it to the fp32
                          buffer) + (4 + 2·d)·T·h (the final norm); a critic: the final norm only
  train graphed         (``shapes.train_graphed``) + d·P: the backward graph hands every parameter's gradient
                          over at once, as static tensors kept in its pool (eager: one block's at a time).
                          The search's tables state train calls eager (``tables.cost_candidate``): the pool
                          exists only where the call has its devices to itself, and ``TrainGraphs``
                          captures only with d·P + 10 % of the device free
  train activations     = in_flight·L·d·T·h/(tp if sp) + max(layer_activation + layer_backward,
                          head_train)                                                   (checkpointing)
                        = in_flight·L·layer_activation + max(layer_backward, head_train) (without)
                          in_flight = min(m, pp − stage) (1F1B); head_train on the last stage only. The
                          head's backward runs first, with every block's saved tensors alive; a block's
                          recomputation and gradients come after the head's memory is freed.
  inference             = weights + max(block_working, head_working)   (no_grad: one block at a time)
                          block_working = d·T·(4·I/tp + 3·h)   inside the MLP: the fused gate-up output,
                          SiLU and product; the block's input, the residual and the norm output
                          head_working  = d·T·h + d·c·V' + chunk  (actor: normed hidden states, one
                          chunk's logits made from them and its log-prob temporaries, c = min(T, 1024);
                          critic: d·T·h), + with pp > 1 the m micro-batches' T·h boundary activations
  generation            = weights + max(KV cache ⌈n/dp⌉·(P+N)·2·L·kv_r·d (every micro-batch of the dp rank
                          is allocated up front) + the prefill's block_working(T_g) + sampling (the
                          selected rows' logits d·b·V' and 16·r·V bytes of fp32 full-vocabulary temporaries)
                          + one copy of the logits mask (recorded step by step), the logits mask's copies at
                          the end, when the caches are already freed); T_g = the largest prefill group's
                          tokens (pp = 1; ``shapes.prefill_groups``) or b·P (pp > 1), r = min(b, sampling
                          chunk rows). Where decode steps run as the one-launch stream kernel (an sm_90
                          profile, tp = pp = 1, shapes that fit: ``working_set.stream_decode_unfit``), P+N is
                          rounded up to whole slots of 128 and the kernel's packed weights (one copy) and
                          each micro-batch runner's buffers (``working_set.stream_decode_bytes``) join the
                          caches
  logits mask           (PPO's default: a call with ``packed_logits_mask`` among its outputs or inputs) one
                          byte per token and vocabulary entry: generation records ⌈n/dp⌉·N·V of them step
                          by step, and at its end, when the KV caches are freed, (3·⌈n/dp⌉ + b)·N·V are
                          alive (``reallm.parallel.generate._assemble``: the per-step lists, the padded
                          per-micro-batch stacks, their concatenation, and the last micro-batch's stack);
                          an inference or train call holds the ⌈n/dp⌉·s·V input masks of its
                          micro-batches during the call

The executor's memory policy (DESIGN §4), which the simulator applies per device and call:
- A train call's state (weights, grads, Adam) lives on its train placement for the whole step, except
  that during a generation/inference call of the same model whose placement shares devices with it but
  is not identical, the state is in host memory (so it does not count on those devices then).
- An inference/generation replica exists only during its call; with an identical placement it reuses
  the training weights (no copy).
- A frozen model (no train call) is held in host memory between its calls when its devices are shared
  with other calls (and pays a host→device load before each call); its weights count only during them.
  One kept on its own devices replays its inference forward from CUDA graphs (``reallm.model.graphs``):
  the graphs' memory pool keeps one forward's working set (block_working at the padded token count)
  reserved between its calls, on devices where nothing else runs; ``max_memory_allocated`` sees it only
  while a graph is captured, the replays allocate nothing.
- Usable memory is ``USABLE_MEMORY_FRACTION`` of the device (CUDA context, NCCL buffers, fragmentation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from planner.cost_model.analytic_profile import kv_width_per_rank
from planner.cost_model.shapes import (
    DTYPE_BYTES,
    ModelOptions,
    Stage,
    blocks_compiled,
    max_params_per_device,
    prefill_chunk_tokens,
    prefill_groups,
    prompt_len,
    sampling_chunk_rows,
    seqs_per_micro_batch,
    seqs_per_rank,
    stages_of,
    train_graphed,
)
from reallm import working_set
from reallm.dataflow import Call
from reallm.placement import Placement
from reallm.spec import ModelSpec

USABLE_MEMORY_FRACTION = 0.92
#: ``FlatAdamW`` accumulates gradients in fp32 whatever the weights' dtype.
GRAD_BYTES_PER_PARAM = 4
#: fp32 master copy (bf16 weights, or any weights under ZeRO-1).
MASTER_BYTES_PER_PARAM = 4
#: fp32 Adam exp_avg and exp_avg_sq.
ADAM_MOMENT_BYTES_PER_PARAM = 8
#: Rows of one chunk of the vocab-parallel log-softmax (``reallm.parallel.vocab.DEFAULT_CHUNK_ROWS``).
LOGPROB_CHUNK_ROWS = 1024
#: fp32 [chunk, V'] tensors alive together in a log-prob chunk (z, z − max, exp).
LOGPROB_CHUNK_FP32_COPIES = 3
#: fp32 full-vocabulary temporaries of one sampling step per sequence (logits, log-softmax, ...), bytes/logit.
SAMPLING_BYTES_PER_LOGIT = 16
#: The data key of the sampling-support mask (bool [tokens, V]) that PPO's generation returns by default.
LOGITS_MASK_KEY = "packed_logits_mask"
#: Copies of the generated logits mask alive at the end of generation, besides the last micro-batch's stack
#: (module docstring).
GENERATED_MASK_COPIES = 3


def usable_memory_bytes(cluster) -> float:
    return USABLE_MEMORY_FRACTION * cluster.device_memory_bytes


def weights_bytes(params: int, dtype_bytes: int = DTYPE_BYTES) -> float:
    return dtype_bytes * params


def owned_params(params: int, dp: int, opts: ModelOptions) -> float:
    """Elements whose Adam state this device keeps (all, or 1/dp under ZeRO-1)."""
    return params / (dp if opts.zero_stage >= 1 and dp > 1 else 1)


def train_state_bytes(params: int, dp: int, opts: ModelOptions) -> float:
    """Weights in the compute dtype, fp32 gradients, fp32 master (unless the weights are fp32 and not
    sharded: then they are the master) and Adam moments (module docstring)."""
    d = opts.dtype_bytes
    sharded = opts.zero_stage >= 1 and dp > 1
    master = MASTER_BYTES_PER_PARAM if (d < 4 or sharded) else 0
    optimizer = (master + ADAM_MOMENT_BYTES_PER_PARAM) * owned_params(params, dp, opts)
    return weights_bytes(params, d) + GRAD_BYTES_PER_PARAM * params + optimizer


def layer_activation_bytes(spec: ModelSpec, tp: int, sp: bool, tokens: float, dtype_bytes: int = DTYPE_BYTES,
                           compiled: bool = False) -> float:
    """One block's tensors saved for backward, eager or compiled (module docstring)."""
    if compiled:
        return tokens * dtype_bytes * (2 * spec.hidden_size + (4 * spec.q_size + 3 * spec.intermediate_size) / tp)
    sharded = 4 * spec.q_size + 4 * spec.intermediate_size
    return tokens * (2 * norm_saved_bytes_per_token(spec, dtype_bytes) / (tp if sp else 1)
                     + dtype_bytes * sharded / tp)


def norm_saved_bytes_per_token(spec: ModelSpec, dtype_bytes: int = DTYPE_BYTES) -> float:
    """One RMSNorm in training: fp32 input copy, normalised input, output."""
    return (4 + 2 * dtype_bytes) * spec.hidden_size


def layer_backward_bytes(spec: ModelSpec, tp: int, tokens: float, dtype_bytes: int = DTYPE_BYTES) -> float:
    return dtype_bytes * tokens * 2 * spec.intermediate_size / tp


def block_working_bytes(spec: ModelSpec, tp: int, sp: bool, tokens: float, dtype_bytes: int = DTYPE_BYTES) -> float:
    """Peak of one block's forward without autograd (inference, prefill): inside its MLP."""
    return dtype_bytes * tokens * (4 * spec.intermediate_size / tp + 3 * spec.hidden_size / (tp if sp else 1))


def logprob_chunk_bytes(spec: ModelSpec, tp: int, tokens: float, dtype_bytes: int = DTYPE_BYTES,
                        fused: bool = False) -> float:
    """Temporaries of one chunk of the vocab-parallel log-softmax: fp32 copies, or fused one chunk in the
    logits' dtype (module docstring)."""
    rows = min(tokens, LOGPROB_CHUNK_ROWS)
    per_logit = dtype_bytes if fused else LOGPROB_CHUNK_FP32_COPIES * 4
    return per_logit * rows * vocab_rows(spec, tp)


def vocab_rows(spec: ModelSpec, tp: int) -> int:
    return -(-spec.vocab_size // tp)


def logits_bytes(spec: ModelSpec, tp: int, tokens: float, bytes_per_logit: float) -> float:
    if spec.is_critic:
        return 0.0
    return tokens * vocab_rows(spec, tp) * bytes_per_logit


def head_train_bytes(spec: ModelSpec, tp: int, sp: bool, tokens: float, dtype_bytes: int = DTYPE_BYTES,
                     fused: bool = False) -> float:
    """Last stage in training: the final norm; an actor's logits and their gradient, a log-prob chunk and
    the LM head's weight gradient."""
    norm = tokens * norm_saved_bytes_per_token(spec, dtype_bytes) / (tp if sp else 1)
    if spec.is_critic:
        return norm
    return (norm + logits_bytes(spec, tp, tokens, 2 * dtype_bytes)
            + logprob_chunk_bytes(spec, tp, tokens, dtype_bytes, fused)
            + dtype_bytes * vocab_rows(spec, tp) * spec.hidden_size)


def head_working_bytes(spec: ModelSpec, tp: int, tokens: float, dtype_bytes: int = DTYPE_BYTES,
                       fused: bool = False) -> float:
    """Last stage without autograd: the normed hidden states (all tokens); a critic's values, or an actor's
    logits one chunk of rows at a time (``LogitsShard`` without logits) and that chunk's log-prob temporaries."""
    hidden = dtype_bytes * tokens * spec.hidden_size
    if spec.is_critic:
        return hidden
    return (hidden + logits_bytes(spec, tp, min(tokens, LOGPROB_CHUNK_ROWS), dtype_bytes)
            + logprob_chunk_bytes(spec, tp, tokens, dtype_bytes, fused))


def train_activation_bytes(spec: ModelSpec, p: Placement, st: Stage, stage_index: int, tokens: float,
                           checkpointing: bool, dtype_bytes: int = DTYPE_BYTES, compiled: bool = False) -> float:
    """``compiled``: blocks compiled and log-probs fused (``shapes.blocks_compiled``)."""
    in_flight = min(p.num_micro_batches, p.pp - stage_index)
    layer = layer_activation_bytes(spec, p.tp, p.sequence_parallel, tokens, dtype_bytes, compiled)
    backward = layer_backward_bytes(spec, p.tp, tokens, dtype_bytes)
    head = head_train_bytes(spec, p.tp, p.sequence_parallel, tokens, dtype_bytes, compiled) if st.has_head else 0.0
    if checkpointing:
        saved = in_flight * st.num_blocks * dtype_bytes * tokens * spec.hidden_size / (p.tp if p.sequence_parallel else 1)
        return saved + max(layer + backward, head)
    return in_flight * st.num_blocks * layer + max(backward, head)


def kv_cache_bytes(spec: ModelSpec, tp: int, num_blocks: int, num_seqs: float, kv_len: float,
                   dtype_bytes: int = DTYPE_BYTES) -> float:
    return num_seqs * kv_len * 2 * num_blocks * kv_width_per_rank(spec, tp) * dtype_bytes


def logits_mask_bytes(call: Call, spec: ModelSpec, dp: int) -> float:
    """The logits masks a call holds on one device (module docstring; generation: one copy); 0 without them."""
    n_rank = math.ceil(call.n_seqs / dp)
    if call.kind == "generate":
        if LOGITS_MASK_KEY not in call.outputs:
            return 0.0
        return n_rank * call.max_new_tokens * spec.vocab_size  # one copy (module docstring)
    if LOGITS_MASK_KEY not in call.inputs or spec.is_critic:
        return 0.0
    return n_rank * call.max_seqlen * spec.vocab_size


@dataclass(frozen=True)
class CallMemory:
    """Per device (largest stage), bytes.

    ``transient_bytes``: what exists only during the call, including its own weight replica for
    inference/generation; ``shared_transient_bytes``: the same when the placement is identical to the
    model's train placement (no replica: the training weights are used in place); ``state_bytes``: the
    resident train state (train calls only)."""

    transient_bytes: float
    shared_transient_bytes: float
    state_bytes: float
    weights_bytes: float

    @property
    def standalone_bytes(self) -> float:
        """Peak of the call alone on its devices."""
        return self.transient_bytes + self.state_bytes


def call_memory(call: Call, p: Placement, spec: ModelSpec, opts: ModelOptions = ModelOptions()) -> CallMemory:
    d = opts.dtype_bytes
    sts = stages_of(spec, p.tp, p.pp)
    params = max_params_per_device(spec, p.tp, p.pp)
    w = weights_bytes(params, d)
    b = seqs_per_micro_batch(call, p)
    mask = logits_mask_bytes(call, spec, p.dp)
    compiled = blocks_compiled(opts, p.tp)
    if call.kind == "train":
        tok = b * call.max_seqlen
        act = max(train_activation_bytes(spec, p, st, i, tok, opts.gradient_checkpointing, d, compiled)
                  for i, st in enumerate(sts))
        act += mask
        if train_graphed(opts, p.tp, p.pp):
            act += d * params  # TrainGraphs: every parameter's gradient at once, as the graph's static output
        return CallMemory(act, act, train_state_bytes(params, p.dp, opts), w)
    if call.kind == "inference":
        tok = b * call.max_seqlen
        act = max(max(block_working_bytes(spec, p.tp, p.sequence_parallel, tok, d),
                      head_working_bytes(spec, p.tp, tok, d, compiled) if st.has_head else 0.0)
                  + (p.num_micro_batches * d * tok * spec.hidden_size if p.pp > 1 else 0.0)
                  for st in sts)
        act += mask
        return CallMemory(w + act, act, 0.0, w)
    # generate
    P, N = prompt_len(call), call.max_new_tokens
    n_rank = seqs_per_rank(call, p.dp)
    groups = prefill_groups(b, P, prefill_chunk_tokens(spec, p.tp, d, opts.lean_memory)) if p.pp == 1 else [(b * P, 1)]
    prefill_tokens = max(t for t, _ in groups)
    rows = min(b, sampling_chunk_rows(vocab_rows(spec, p.tp) * p.tp, opts, b))
    end_mask = GENERATED_MASK_COPIES * mask + (mask / n_rank * b if mask else 0.0)
    # the one-launch decode step (working_set): its packed weights and buffers, a cache of whole slots
    stream = opts.stream_decode and d == 2 and working_set.stream_decode_unfit(spec, b, p.tp, p.pp) is None
    kv_len = working_set.stream_cache_len(P + N) if stream else P + N
    extra = working_set.stream_decode_bytes(spec, runners=math.ceil(n_rank / b)) if stream else 0.0

    def stage_bytes(st: Stage) -> float:
        working = block_working_bytes(spec, p.tp, False, prefill_tokens, d)
        if not st.has_head:
            return kv_cache_bytes(spec, p.tp, st.num_blocks, n_rank, P + N, d) + working
        working += logits_bytes(spec, p.tp, b, d) + logits_bytes(spec, 1, rows, SAMPLING_BYTES_PER_LOGIT)
        # while decoding: the caches, the working set and the mask recorded so far; at the end (caches freed):
        # the mask's copies
        return max(kv_cache_bytes(spec, p.tp, st.num_blocks, n_rank, kv_len, d) + working + mask + extra, end_mask)

    act = max(stage_bytes(st) for st in sts)
    return CallMemory(w + act, act, 0.0, w)
