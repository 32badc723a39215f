"""The parameter table of a LLaMA-family model: HF names, full shapes, owning layer, tensor-parallel rule.

This table is the one description that loading, saving and reallocation share. It lists, in HF
``named_parameters()`` order::

    model.embed_tokens.weight                        [V, h]        VOCAB       layer 0
    model.layers.{i}.self_attn.q_proj.weight         [nh*d, h]     COLUMN      layer 1+i   (units: nh heads)
    model.layers.{i}.self_attn.q_proj.bias           [nh*d]        COLUMN                  (qkv_bias only)
    model.layers.{i}.self_attn.{k,v}_proj.weight     [nkv*d, h]    KV_HEADS                (units: nkv heads)
    model.layers.{i}.self_attn.{k,v}_proj.bias       [nkv*d]       KV_HEADS                (qkv_bias only)
    model.layers.{i}.self_attn.o_proj.weight         [h, nh*d]     ROW                     (units: nh heads)
    model.layers.{i}.mlp.{gate,up}_proj.weight       [I, h]        COLUMN
    model.layers.{i}.mlp.down_proj.weight            [h, I]        ROW
    model.layers.{i}.{input,post_attention}_layernorm.weight [h]  REPLICATED
    model.norm.weight                                [h]           REPLICATED  layer L+1
    lm_head.weight                                   [V, h]        VOCAB       layer L+1   (absent when tied)
    score.weight [1, h], score.bias [1]              (critic)      REPLICATED  layer L+1   (instead of lm_head)

Layers are numbered as the pipeline sees them: 0 = embedding, 1+i = block i, L+1 = final norm + head.

Tensor-parallel slice of tp rank r out of tp. A rule cuts dimension ``split_dim`` into ``num_units``
indivisible units (a head's d rows, one row, one vocabulary entry); u = num_units, n = shape[split_dim]:

  COLUMN (dim 0), ROW (dim 1):  needs u % tp == 0; rank r holds rows/cols [r*n/tp, (r+1)*n/tp).
  KV_HEADS (dim 0):  u % tp == 0  → as COLUMN;
                     tp % u == 0  → replicated in groups of g = tp/u ranks: rank r holds head r // g,
                                    and the first rank of a group (r % g == 0) is its primary holder;
                     otherwise the placement is invalid.
  VOCAB (dim 0):     padded vocabulary V' = ceil(V/tp)*tp; rank r holds rows [r*V'/tp, (r+1)*V'/tp) of
                     the padded table. Rows >= V are padding: they exist in the local shard shape only
                     and belong to no element, so the box of real rows is clipped to V (maybe empty).
  REPLICATED:        every rank holds everything; tp rank 0 is the primary holder.

All cases are one formula: num_parts = tp if u % tp == 0 (or VOCAB) else u (KV_HEADS) else 1
(REPLICATED); replication g = tp / num_parts; rank r holds part r // g; primary iff r % g == 0.
Every parameter is 1-D or 2-D, and a shard's box starts where its local array starts, so full index x
sits at local index x - box_start (padding rows come after the real ones).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from enum import Enum
from typing import Optional

from reallm.errors import UserError
from reallm.spec import ModelSpec

#: Per dimension ``(start, stop)`` in full coordinates, half-open.
Box = tuple[tuple[int, int], ...]


class TpSplit(Enum):
    """How tensor parallelism cuts a parameter (see the module docstring for the math)."""

    REPLICATED = "replicated"
    COLUMN = "column"
    ROW = "row"
    VOCAB = "vocab"
    KV_HEADS = "kv_heads"

    @property
    def dim(self) -> Optional[int]:
        """The tensor dimension that is cut, or None for replicated parameters."""
        return {TpSplit.REPLICATED: None, TpSplit.ROW: 1}.get(self, 0)


@dataclass(frozen=True)
class ParamInfo:
    """One HF parameter: name, full shape, tp rule and owning layer (0 embed, 1+i block i, L+1 head)."""

    name: str
    shape: tuple[int, ...]
    split: TpSplit
    layer: int
    #: Indivisible units along ``split.dim`` (heads, rows, vocabulary entries); 1 when replicated.
    num_units: int = 1

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class TpSlice:
    """What one tp rank holds of one parameter."""

    #: Index of the distinct piece (0 .. num_parts-1); ranks with the same part hold the same elements.
    part: int
    num_parts: int
    #: Real elements held, in full coordinates (padding excluded; may be empty for a VOCAB tail rank).
    box: Box
    #: Shape of the local tensor, vocabulary padding included.
    local_shape: tuple[int, ...]
    #: The one holder among the tp ranks holding this part whose copy counts (saving, dedup).
    primary: bool


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """Vocabulary rounded up to a multiple of tp, so each tp rank holds the same number of rows."""
    return -(-vocab_size // tp) * tp


@functools.lru_cache(maxsize=64)
def param_table(spec: ModelSpec) -> tuple[ParamInfo, ...]:
    """Every parameter of ``spec`` in HF ``named_parameters()`` order (see module docstring)."""
    h, d, i_size, L = spec.hidden_size, spec.head_dim, spec.intermediate_size, spec.num_layers
    nh, nkv = spec.num_heads, spec.num_kv_heads
    out: list[ParamInfo] = [
        ParamInfo("model.embed_tokens.weight", (spec.vocab_size, h), TpSplit.VOCAB, 0, spec.vocab_size)
    ]
    for i in range(L):
        a, m, layer = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp.", 1 + i
        for proj, rows, split, units in (
            ("q", nh * d, TpSplit.COLUMN, nh),
            ("k", nkv * d, TpSplit.KV_HEADS, nkv),
            ("v", nkv * d, TpSplit.KV_HEADS, nkv),
        ):
            out.append(ParamInfo(f"{a}{proj}_proj.weight", (rows, h), split, layer, units))
            if spec.qkv_bias:
                out.append(ParamInfo(f"{a}{proj}_proj.bias", (rows,), split, layer, units))
        out += [
            ParamInfo(f"{a}o_proj.weight", (h, nh * d), TpSplit.ROW, layer, nh),
            ParamInfo(f"{m}gate_proj.weight", (i_size, h), TpSplit.COLUMN, layer, i_size),
            ParamInfo(f"{m}up_proj.weight", (i_size, h), TpSplit.COLUMN, layer, i_size),
            ParamInfo(f"{m}down_proj.weight", (h, i_size), TpSplit.ROW, layer, i_size),
            ParamInfo(f"model.layers.{i}.input_layernorm.weight", (h,), TpSplit.REPLICATED, layer),
            ParamInfo(f"model.layers.{i}.post_attention_layernorm.weight", (h,), TpSplit.REPLICATED, layer),
        ]
    out.append(ParamInfo("model.norm.weight", (h,), TpSplit.REPLICATED, L + 1))
    if spec.is_critic:
        # transformers' *ForTokenClassification head: nn.Linear(h, num_labels=1) with a bias.
        out += [
            ParamInfo("score.weight", (1, h), TpSplit.REPLICATED, L + 1),
            ParamInfo("score.bias", (1,), TpSplit.REPLICATED, L + 1),
        ]
    elif not spec.tie_word_embeddings:
        out.append(ParamInfo("lm_head.weight", (spec.vocab_size, h), TpSplit.VOCAB, L + 1, spec.vocab_size))
    return tuple(out)


def tp_problems(spec: ModelSpec, tp: int) -> list[str]:
    """Why ``tp`` cannot cut ``spec`` (empty when it can)."""
    problems = []
    if spec.num_heads % tp:
        problems.append(f"num_heads={spec.num_heads} is not a multiple of tp={tp}")
    if spec.intermediate_size % tp:
        problems.append(f"intermediate_size={spec.intermediate_size} is not a multiple of tp={tp}")
    kv = spec.num_kv_heads
    if kv % tp and tp % kv:
        problems.append(
            f"num_kv_heads={kv} and tp={tp}: need num_kv_heads % tp == 0 (split kv heads) or "
            f"tp % num_kv_heads == 0 (replicate each kv head on tp/num_kv_heads ranks)"
        )
    return problems


def check_tp(spec: ModelSpec, tp: int) -> None:
    """Raise ``UserError`` (a ``ValueError``) naming every reason ``tp`` cannot cut ``spec``."""
    problems = tp_problems(spec, tp)
    if problems:
        raise UserError(
            f"tensor parallelism tp={tp} does not fit model {spec.source or spec.family}: " + "; ".join(problems)
        )


def tp_slice(param: ParamInfo, tp: int, tp_rank: int) -> TpSlice:
    """The part of ``param`` held by ``tp_rank`` (module docstring formula). Assumes ``check_tp`` passed."""
    dim, u = param.split.dim, param.num_units
    if dim is None:
        return TpSlice(0, 1, tuple((0, n) for n in param.shape), param.shape, tp_rank == 0)
    if param.split is TpSplit.VOCAB:
        rows = padded_vocab_size(u, tp) // tp
        lo = min(tp_rank * rows, u)
        hi = min(lo + rows, u)
        return TpSlice(
            tp_rank, tp, ((lo, hi),) + tuple((0, n) for n in param.shape[1:]), (rows,) + param.shape[1:], True
        )
    if u % tp == 0:
        num_parts = tp
    elif param.split is TpSplit.KV_HEADS and tp % u == 0:
        num_parts = u
    else:
        raise UserError(f"{param.name}: {u} units along dim {dim} cannot be cut by tp={tp}")
    group = tp // num_parts
    part = tp_rank // group
    width = param.shape[dim] // num_parts
    box = tuple((part * width, (part + 1) * width) if k == dim else (0, n) for k, n in enumerate(param.shape))
    local = tuple(width if k == dim else n for k, n in enumerate(param.shape))
    return TpSlice(part, num_parts, box, local, tp_rank % group == 0)
