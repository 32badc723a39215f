"""Shapes the cost terms share: pipeline stages, parameters per device, batch split, model options.

Batch split of a call with n sequences, M minibatches (PPO's optimizer updates per step), dp replicas
and m micro-batches: each dp rank gets ⌈n/(M·dp)⌉ sequences per minibatch (the slowest rank sets the
pace when the split is uneven) and each micro-batch ⌈that/m⌉ sequences. Train and inference calls use
every sequence at its full ``max_seqlen`` tokens (RLHF batches run at the maximum length: min_new_tokens
= max_new_tokens in the settings we plan for); generation prefills ``max_seqlen − max_new_tokens``
prompt tokens and decodes ``max_new_tokens``.

Generation's bounded working set (the executor's rules, from the torch-free ``reallm.working_set``): with pp = 1 the prefill runs over groups of whole
prompts of at most C tokens (``reallm.working_set.prefill_chunk_tokens``),
C = clamp(512 MiB (lean: 32 MiB) / (d·(3·I/tp + 4·h)), 512, 8192), so b prompts of P tokens take ⌊b/g⌋ groups of g·P
tokens and one of (b mod g)·P, g = max(1, ⌊C/P⌋) (``prefill_groups``); sampling processes all b rows at
once, or under the lean memory policy chunks of max(1, ⌊2^20/V'⌋) rows (``working_set.sampling_chunk_rows``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from reallm import working_set
from reallm.dataflow import Call
from reallm.layout.params import tp_slice
from reallm.layout.shards import held_params
from reallm.layout.stages import partition_stages
from reallm.placement import Placement
from reallm.spec import ModelSpec

#: bf16 weights, activations and gradients.
DTYPE_BYTES = 2


@dataclass(frozen=True)
class ModelOptions:
    """Per model role settings the cost depends on (from the experiment config)."""

    gradient_checkpointing: bool = True
    #: 0: every dp rank keeps the optimizer state; 1: Adam states (and fp32 master) sharded over dp.
    zero_stage: int = 0
    #: Bytes per weight / activation element: 2 (bf16 on GPU) or 4 (fp32, the CPU runs).
    dtype_bytes: int = DTYPE_BYTES
    #: ``memory.offload_train_state``: during a generation / inference call on the training placement
    #: itself, gradients and Adam states wait in host memory (only the weights stay).
    offload_train_state: bool = True
    #: Generation draws greedily (argmax) rather than sampling (the PPO / gen config's ``greedy``): which
    #: ``decode_step`` sampling tables a generate call reads.
    greedy: bool = False
    #: Sampling filters the distribution (top-k > 0 or top-p < 1: a sort over the vocabulary per step);
    #: False: temperature only (the ``decode_step`` tables ``sample_plain`` where the profile has them).
    filtered_sampling: bool = True
    #: The model config's ``compile``: on a GPU with tp = 1 the executor runs the blocks as torch.compile'd
    #: regions and each chunk of the vocab-parallel log-softmax as one fused kernel (``blocks_compiled``).
    compile_blocks: bool = True
    #: ``memory.offload_idle_train_states`` (the lean policy): generation samples in bounded row chunks.
    lean_memory: bool = False
    #: The model config's ``train_cuda_graphs``: train micro-batches replayed from CUDA graphs where
    #: ``train_graphed`` (tp = pp = 1, compiled blocks, on a GPU).
    train_graphs: bool = True
    #: Generation's decode steps run as the one-launch stream kernel where the shapes fit (the profile's
    #: device is an sm_90 GPU: ``working_set.stream_decode_device``): the call holds its packed weights too.
    stream_decode: bool = False


@dataclass(frozen=True)
class Stage:
    """One pipeline stage of a placement: what it computes and holds per device."""

    num_blocks: int
    has_embedding: bool
    has_head: bool
    #: Parameter elements on one device of this stage (its tp slice, vocabulary padding included).
    params_per_device: int


@functools.lru_cache(maxsize=4096)
def stages_of(spec: ModelSpec, tp: int, pp: int) -> tuple[Stage, ...]:
    """The parameter-balanced partition the executor uses (``reallm.layout.stages``)."""
    part = partition_stages(spec, pp)
    out = []
    for s in range(pp):
        n = sum(math.prod(tp_slice(p, tp, 0).local_shape) for p, _ in held_params(spec, part, s))
        out.append(Stage(len(part.blocks(s)), s == 0, s == pp - 1, n))
    return tuple(out)


def blocks_compiled(opts: ModelOptions, tp: int) -> bool:
    """Does the executor compile this placement's blocks? ``compile_blocks`` on a GPU (bf16 elements) with
    tp = 1 (``ParallelModel.build``; the fused log-softmax follows, ``reallm.parallel.vocab``)."""
    return opts.compile_blocks and tp == 1 and opts.dtype_bytes == 2


def train_graphed(opts: ModelOptions, tp: int, pp: int) -> bool:
    """Does the executor replay this placement's train micro-batches from CUDA graphs? ``train_graphs`` with
    compiled blocks, tp = pp = 1 (``reallm.parallel.model.train_graphs_usable``)."""
    return opts.train_graphs and pp == 1 and blocks_compiled(opts, tp)


def max_params_per_device(spec: ModelSpec, tp: int, pp: int) -> int:
    return max(st.params_per_device for st in stages_of(spec, tp, pp))


def head_kind(spec: ModelSpec) -> str:
    return "score_head" if spec.is_critic else "head"


def seqs_per_rank(call: Call, dp: int) -> int:
    """Sequences one dp rank processes per minibatch."""
    return math.ceil(call.n_seqs / call.n_minibatches / dp)


def seqs_per_micro_batch(call: Call, p: Placement) -> int:
    return math.ceil(seqs_per_rank(call, p.dp) / p.num_micro_batches)


def prompt_len(call: Call) -> int:
    return max(call.max_seqlen - call.max_new_tokens, 1)


def prefill_chunk_tokens(spec: ModelSpec, tp: int, dtype_bytes: int = DTYPE_BYTES, lean_memory: bool = False) -> int:
    """Tokens per prefill group C (``reallm.working_set``) for one tp rank's shard."""
    return working_set.prefill_chunk_tokens(spec.hidden_size, spec.intermediate_size // tp, dtype_bytes, lean_memory)


def prefill_groups(num_prompts: int, prompt_tokens: int, chunk_tokens: int) -> list[tuple[int, int]]:
    """(tokens of a group, number of such groups) for ``num_prompts`` prompts of ``prompt_tokens`` each run in
    groups of whole prompts of at most ``chunk_tokens`` tokens (one prompt at least)."""
    per_group = max(1, chunk_tokens // max(prompt_tokens, 1))
    full, rest = divmod(num_prompts, per_group)
    out = [(per_group * prompt_tokens, full)] if full else []
    return out + ([(rest * prompt_tokens, 1)] if rest else [])


def sampling_chunk_rows(vocab: int, opts: ModelOptions, batch: int) -> int:
    """Rows of logits sampled at once (``reallm.working_set``); ``vocab``: the gathered (padded) width."""
    return working_set.sampling_chunk_rows(vocab, working_set.sampling_chunk_logits(opts.lean_memory), batch)


def groups_span_nodes(cluster, groups) -> bool:
    """True when any of the groups has devices on two nodes."""
    return any(not cluster.same_node(g) for g in groups if len(g) > 1)


def pp_crosses_nodes(cluster, p: Placement) -> bool:
    """True when some consecutive pipeline stages sit on different nodes."""
    return p.pp > 1 and groups_span_nodes(cluster, [g for g in p.pp_groups()])
