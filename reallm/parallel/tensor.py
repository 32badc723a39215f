"""Tensor and sequence parallelism applied to the plain ``reallm.model.Transformer`` from outside.

The model file has no parallelism. ``parallelize`` makes one tp rank's stage out of a plain stage:

* Linear weights become this rank's slices (``reallm.layout`` table): q/k/v, gate/up are cut along their
  output rows (column parallel), o/down along their input columns (row parallel); kv heads are split, or
  replicated in groups when tp > kv heads. The modules stay ``nn.Linear``; only their weights are smaller
  (the weights themselves are installed by ``reallm.parallel.model``, as views of one flat buffer).
* The tp region of a block is entered once per sub-module, at the *input* of ``self_attn`` and ``mlp``
  (one collective for q, k and v together), and left at the output of ``o_proj`` and ``down_proj``
  (Megatron's f and g operators, registered as forward hooks)::

                          forward                backward
    enter (no SP)   f:    identity               all-reduce            x  [T, h] replicated
    leave (no SP)   g:    all-reduce             identity
    enter (SP)      g~:   all-gather tokens      reduce-scatter        x  [T/tp, h] -> [T, h]
    leave (SP)      f~:   reduce-scatter         all-gather            out [T, h] partial -> [T/tp, h]

  With sequence parallelism (SP) the residual stream between these regions holds T/tp tokens per rank,
  so the norms see only their tokens and their weight gradients are partial: ``tp_sync_gradients`` sums
  them over tp (as it sums the gradients of replicated kv heads among their replicas).
* The embedding becomes ``VocabParallelEmbedding``: rank r holds rows ``[r V'/tp, (r+1) V'/tp)`` of the
  vocabulary padded to V' (a multiple of tp); a token outside the range contributes zeros, and the partial
  outputs are summed (all-reduce, or reduce-scatter under SP).
* The LM head is a column-parallel linear over the padded vocabulary: its input enters the tp region and
  its output stays a logits *shard* ``[T, V'/tp]``; log-probs and losses are computed on shards
  (``reallm.parallel.vocab``). The critic's one-output score head is replicated: without SP it runs on the
  replicated hidden states; under SP on the local tokens, then the values are all-gathered (backward:
  each rank keeps its tokens' gradient, since every tp rank computes the same loss).

Sequence parallelism needs the token count to be a multiple of tp: ``pad_for_sp`` appends a dummy
sequence of (-T mod tp) tokens, stripped again from the head's output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from reallm.parallel.groups import AxisGroup

# -- autograd functions over a tp AxisGroup --------------------------------------------------------------


class _EnterTp(torch.autograd.Function):
    """f: identity forward, all-reduce of the input gradient backward."""

    @staticmethod
    def forward(ctx, x, tp: AxisGroup):
        ctx.tp = tp
        return x

    @staticmethod
    def backward(ctx, g):
        return ctx.tp.all_reduce(g.contiguous().clone()), None


class _LeaveTp(torch.autograd.Function):
    """g: all-reduce forward, identity backward."""

    @staticmethod
    def forward(ctx, x, tp: AxisGroup):
        return tp.all_reduce(x.contiguous().clone())

    @staticmethod
    def backward(ctx, g):
        return g, None


class _GatherTokens(torch.autograd.Function):
    """All-gather dim 0 forward; reduce-scatter backward (the consumer's gradients are partial sums)."""

    @staticmethod
    def forward(ctx, x, tp: AxisGroup):
        ctx.tp = tp
        return tp.all_gather(x.contiguous(), dim=0)

    @staticmethod
    def backward(ctx, g):
        return ctx.tp.reduce_scatter(g.contiguous()), None


class _ScatterTokens(torch.autograd.Function):
    """Reduce-scatter dim 0 forward; all-gather backward."""

    @staticmethod
    def forward(ctx, x, tp: AxisGroup):
        ctx.tp = tp
        return tp.reduce_scatter(x.contiguous())

    @staticmethod
    def backward(ctx, g):
        return ctx.tp.all_gather(g.contiguous(), dim=0), None


class _GatherReplicatedGrad(torch.autograd.Function):
    """All-gather dim 0 forward; backward keeps this rank's rows of a gradient every rank holds in full."""

    @staticmethod
    def forward(ctx, x, tp: AxisGroup):
        ctx.tp, ctx.n = tp, x.shape[0]
        return tp.all_gather(x.contiguous(), dim=0)

    @staticmethod
    def backward(ctx, g):
        a = ctx.tp.index * ctx.n
        return g[a:a + ctx.n].contiguous(), None


def enter_tp(x: torch.Tensor, tp: AxisGroup, sequence_parallel: bool) -> torch.Tensor:
    if tp.size == 1:
        return x
    return _GatherTokens.apply(x, tp) if sequence_parallel else _EnterTp.apply(x, tp)


def leave_tp(x: torch.Tensor, tp: AxisGroup, sequence_parallel: bool) -> torch.Tensor:
    if tp.size == 1:
        return x
    return _ScatterTokens.apply(x, tp) if sequence_parallel else _LeaveTp.apply(x, tp)


def gather_tokens_replicated_grad(x: torch.Tensor, tp: AxisGroup) -> torch.Tensor:
    return x if tp.size == 1 else _GatherReplicatedGrad.apply(x, tp)


# -- state shared by the hooks of one model ---------------------------------------------------------------


@dataclass
class TpState:
    """The tp group of a parallelised stage and whether sequence parallelism is on right now.

    ``sequence_parallel`` is the placement's setting; ``sp_active`` can switch it off for a call
    (generation runs without SP: a decode step has one token per sequence)."""

    tp: AxisGroup
    #: Real vocabulary size V, and this rank's first row of the padded vocabulary.
    vocab_size: int
    vocab_start: int
    vocab_rows: int
    sequence_parallel: bool = False
    sp_active: bool = False


class VocabParallelEmbedding(nn.Module):
    """Rows ``[vocab_start, vocab_start + rows)`` of the (padded) embedding table; outputs summed over tp."""

    def __init__(self, rows: int, hidden_size: int, state: TpState, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, hidden_size, device=device, dtype=dtype))
        self.state = state

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        st = self.state
        if st.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - st.vocab_start
        outside = (local < 0) | (local >= st.vocab_rows)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside[:, None], 0.0)
        if st.sp_active:
            return _ScatterTokens.apply(out, st.tp)
        return _LeaveTp.apply(out, st.tp)


def parallelize(model: nn.Module, tp: AxisGroup, vocab_start: int, vocab_rows: int,
                sequence_parallel: bool) -> TpState:
    """Make ``model`` (a ``Transformer`` stage, still on the meta device) a tp rank's stage (module docstring).

    Swaps the embedding for ``VocabParallelEmbedding`` and registers the tp-region hooks; weights keep their
    full shapes until ``reallm.parallel.model`` installs the local slices. With tp = 1 only the state."""
    spec = model.spec
    sp = sequence_parallel and tp.size > 1
    state = TpState(tp, spec.vocab_size, vocab_start, vocab_rows, sequence_parallel=sp, sp_active=sp)
    if tp.size == 1:
        return state
    trunk = model.model
    if trunk.embed_tokens is not None:
        old = trunk.embed_tokens.weight
        trunk.embed_tokens = VocabParallelEmbedding(vocab_rows, spec.hidden_size, state, device=old.device,
                                                    dtype=old.dtype)
        model.tie_weights()  # a single stage's tied lm_head must share the new embedding's weight

    def enter(module, args):
        return (enter_tp(args[0], tp, state.sp_active),) + tuple(args[1:])

    def leave(module, args, out):
        return leave_tp(out, tp, state.sp_active)

    for layer in trunk.layers.values():
        layer.self_attn.register_forward_pre_hook(enter)
        layer.self_attn.o_proj.register_forward_hook(leave)
        layer.mlp.register_forward_pre_hook(enter)
        layer.mlp.down_proj.register_forward_hook(leave)
    if getattr(model, "lm_head", None) is not None:
        model.lm_head.register_forward_pre_hook(enter)
    if getattr(model, "score", None) is not None:
        def gather_values(module, args, out):
            # Under SP the score ran on this rank's tokens: [T/tp, 1] -> [T, 1].
            return gather_tokens_replicated_grad(out, tp) if state.sp_active else out

        model.score.register_forward_hook(gather_values)
    return state


# -- sequence-parallel padding ----------------------------------------------------------------------------


def pad_for_sp(tokens: Optional[torch.Tensor], cu_seqlens: torch.Tensor, num_tokens: int,
               multiple: int) -> tuple[Optional[torch.Tensor], torch.Tensor, int]:
    """Append a dummy sequence of ``(-num_tokens) % multiple`` tokens (id 0) so the count divides ``multiple``.

    Returns (tokens or None, cu_seqlens, padded token count)."""
    pad = (-num_tokens) % multiple
    if pad == 0:
        return tokens, cu_seqlens, num_tokens
    cu = torch.cat([cu_seqlens, cu_seqlens[-1:] + pad])
    if tokens is not None:
        tokens = torch.cat([tokens, tokens.new_zeros(pad)])
    return tokens, cu, num_tokens + pad
