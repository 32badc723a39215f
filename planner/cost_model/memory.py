"""Device memory of a call, and the executor's memory policy that decides what is resident when.

Per device of the largest stage (max over stages; P = parameter elements on the device, T tokens per
micro-batch, L blocks on the stage, V' = ⌈V/tp⌉ vocabulary rows, 2-byte bf16 elements):

  weights_bytes            = 2·P                       (d·P with d = ModelOptions.dtype_bytes: 4 for fp32 CPU runs)
  train_state_bytes        = 2·P weights + 2·P grads + 12·P fp32 master + Adam moments
                             (the 12·P term /dp with ZeRO-1; fp32: 4·P + 4·P + 8·P, no master copy)
  layer_activation_bytes   = 2·T·(4·h/(tp if sp else 1) + (2·q + 2·kv_r + 4·I)/tp)
                             one block's saved tensors: norm inputs/outputs and the residual (4·h,
                             sequence-sharded with sp); q, k, v, attention output, gate, up, SiLU, product
                             (tp-sharded). Flash attention: no s² term.
  train activations        = in_flight·L·(2·T·h/(tp if sp else 1))   + layer_activation   (checkpointing)
                           = in_flight·L·layer_activation                                  (without)
                             in_flight = min(m, pp − stage) (1F1B), + on the last stage the logits
                             T·V'·10 bytes (bf16 logits, fp32 log-softmax and its gradient)
  inference activations    = layer_activation + last stage: T·V'·6 bytes of logits (none for critics)
  generation               = weights + KV cache ⌈n/dp⌉·(P+N)·2·L·kv_r·2 bytes (every micro-batch of the
                             dp rank stays resident) + prefill working set + decode logits

The executor's memory policy (DESIGN §4), which the simulator applies per device and call:
- A train call's state (weights, grads, Adam) lives on its train placement for the whole step, except
  that during a generation/inference call of the same model whose placement shares devices with it but
  is not identical, the state is in host memory (so it does not count on those devices then).
- An inference/generation replica exists only during its call; with an identical placement it reuses
  the training weights (no copy).
- A frozen model (no train call) is held in host memory between its calls when its devices are shared
  with other calls (and pays a host→device load before each call); its weights count only during them.
- Usable memory is ``USABLE_MEMORY_FRACTION`` of the device (CUDA context, NCCL buffers, fragmentation).
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.cost_model.analytic_profile import kv_width_per_rank
from planner.cost_model.shapes import (
    DTYPE_BYTES,
    ModelOptions,
    Stage,
    max_params_per_device,
    prompt_len,
    seqs_per_micro_batch,
    seqs_per_rank,
    stages_of,
)
from reallm.dataflow import Call
from reallm.placement import Placement
from reallm.spec import ModelSpec

USABLE_MEMORY_FRACTION = 0.92
GRAD_BYTES_PER_PARAM = 2
MASTER_AND_ADAM_BYTES_PER_PARAM = 12


def usable_memory_bytes(cluster) -> float:
    return USABLE_MEMORY_FRACTION * cluster.device_memory_bytes


def weights_bytes(params: int, dtype_bytes: int = DTYPE_BYTES) -> float:
    return dtype_bytes * params


def train_state_bytes(params: int, dp: int, opts: ModelOptions) -> float:
    """Weights + grads in the compute dtype, Adam moments in fp32 (+ an fp32 master copy under bf16)."""
    d = opts.dtype_bytes
    optimizer = (MASTER_AND_ADAM_BYTES_PER_PARAM if d < 4 else 8) * params / (dp if opts.zero_stage >= 1 else 1)
    return weights_bytes(params, d) + d * params + optimizer


def layer_activation_bytes(spec: ModelSpec, tp: int, sp: bool, tokens: float, dtype_bytes: int = DTYPE_BYTES) -> float:
    h = spec.hidden_size
    sharded = 2 * spec.q_size + 2 * kv_width_per_rank(spec, tp) * tp + 4 * spec.intermediate_size
    return dtype_bytes * tokens * (4 * h / (tp if sp else 1) + sharded / tp)


def logits_bytes(spec: ModelSpec, tp: int, tokens: float, bytes_per_logit: float) -> float:
    if spec.is_critic:
        return 0.0
    return tokens * -(-spec.vocab_size // tp) * bytes_per_logit


def train_activation_bytes(spec: ModelSpec, p: Placement, st: Stage, stage_index: int, tokens: float,
                           checkpointing: bool, dtype_bytes: int = DTYPE_BYTES) -> float:
    in_flight = min(p.num_micro_batches, p.pp - stage_index)
    layer = layer_activation_bytes(spec, p.tp, p.sequence_parallel, tokens, dtype_bytes)
    if checkpointing:
        saved = in_flight * st.num_blocks * dtype_bytes * tokens * spec.hidden_size / (p.tp if p.sequence_parallel else 1)
        act = saved + layer
    else:
        act = in_flight * st.num_blocks * layer
    if st.has_head:
        act += logits_bytes(spec, p.tp, tokens, 10)
    return act


def kv_cache_bytes(spec: ModelSpec, tp: int, num_blocks: int, num_seqs: float, kv_len: float,
                   dtype_bytes: int = DTYPE_BYTES) -> float:
    return num_seqs * kv_len * 2 * num_blocks * kv_width_per_rank(spec, tp) * dtype_bytes


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
    if call.kind == "train":
        tok = b * call.max_seqlen
        act = max(train_activation_bytes(spec, p, st, i, tok, opts.gradient_checkpointing, d) for i, st in enumerate(sts))
        return CallMemory(act, act, train_state_bytes(params, p.dp, opts), w)
    if call.kind == "inference":
        tok = b * call.max_seqlen
        act = max(layer_activation_bytes(spec, p.tp, p.sequence_parallel, tok, d)
                  + (logits_bytes(spec, p.tp, tok, 6) if st.has_head else 0.0)
                  + (p.num_micro_batches * d * tok * spec.hidden_size if p.pp > 1 else 0.0)
                  for st in sts)
        return CallMemory(w + act, act, 0.0, w)
    # generate
    P, N = prompt_len(call), call.max_new_tokens
    n_rank = seqs_per_rank(call, p.dp)
    act = max(kv_cache_bytes(spec, p.tp, st.num_blocks, n_rank, P + N, d)
              + layer_activation_bytes(spec, p.tp, False, b * P, d)
              + (logits_bytes(spec, 1, b, 4) + logits_bytes(spec, p.tp, b, 4) if st.has_head else 0.0)
              for st in sts)
    return CallMemory(w + act, act, 0.0, w)
