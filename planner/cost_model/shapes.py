"""Shapes the cost terms share: pipeline stages, parameters per device, batch split, model options.

Batch split of a call with n sequences, M minibatches (PPO's optimizer updates per step), dp replicas
and m micro-batches: each dp rank gets ⌈n/(M·dp)⌉ sequences per minibatch (the slowest rank sets the
pace when the split is uneven) and each micro-batch ⌈that/m⌉ sequences. Train and inference calls use
every sequence at its full ``max_seqlen`` tokens (RLHF batches run at the maximum length: min_new_tokens
= max_new_tokens in the settings we plan for); generation prefills ``max_seqlen − max_new_tokens``
prompt tokens and decodes ``max_new_tokens``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

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


def groups_span_nodes(cluster, groups) -> bool:
    """True when any of the groups has devices on two nodes."""
    return any(not cluster.same_node(g) for g in groups if len(g) > 1)


def pp_crosses_nodes(cluster, p: Placement) -> bool:
    """True when some consecutive pipeline stages sit on different nodes."""
    return p.pp > 1 and groups_span_nodes(cluster, [g for g in p.pp_groups()])
