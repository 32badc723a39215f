"""A plain LLaMA-family decoder (LLaMA 2/3, Mistral, Qwen2) on packed sequences, buildable as a pipeline stage.

One block (pre-norm, RMSNorm, SwiGLU, RoPE, GQA; Qwen2 adds a bias to q/k/v)::

    a   = x + o_proj(attn(rope(q_proj(n1)), rope(k_proj(n1)), v_proj(n1)))     n1 = rmsnorm(x) * w_in
    out = a + down_proj(silu(gate_proj(n2)) * up_proj(n2))                     n2 = rmsnorm(a) * w_post
    rmsnorm(x) = x / sqrt(mean(x^2) + eps)    (computed in fp32, cast back, then times the weight, as HF)

Packed input: tokens ``[T]`` (or hidden states ``[T, h]`` after the first stage) plus ``cu_seqlens``
(int32 ``[B+1]``); position ids restart at 0 in every sequence; attention never crosses sequences and
nothing is padded.

Module paths equal HF parameter names (``model.embed_tokens``, ``model.layers.{i}.self_attn.q_proj``,
``model.norm``, ``lm_head``; the critic's ``score`` = Linear(h, 1, bias) like ``*ForTokenClassification``),
so the layout table maps 1:1. Layers live in an ``nn.ModuleDict`` keyed by the global block index, so a
pipeline stage is "the blocks it owns" (``StageSpec``). Every linear is a plain ``nn.Linear`` attribute
and head counts are read off the projections' output sizes, so ``reallm.parallel`` can swap in
column/row-parallel linears and a vocab-parallel embedding/head without touching this file.

Tied embeddings: on a single stage ``lm_head.weight`` *is* ``model.embed_tokens.weight``; on a last stage
without the embedding, ``lm_head.weight`` is a separate copy whose HF name is
``model.embed_tokens.weight`` (``hf_name_of``); the executor all-reduces its gradient with stage 0's.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from reallm.kernels import decode_attention as decode_kernel
from reallm.kernels import decode_gemm
from reallm.kernels.decode_attention import decode_attention_append
from reallm.model.arch import ArchConfig, arch_from_spec
from reallm.model.attention import AttnBackend, PackedSeqs, decode_attention, packed_causal_attention
from reallm.spec import ModelSpec
from reallm.working_set import PREFILL_CHUNK_TOKENS_MAX, prefill_chunk_tokens


@dataclass(frozen=True)
class StageSpec:
    """What one pipeline stage holds: the blocks (global indices), and whether it has the embedding / head."""

    layers: tuple[int, ...]
    has_embedding: bool = True
    has_head: bool = True

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        if list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"stage layers must be distinct and increasing, got {list(self.layers)}")

    @staticmethod
    def full(num_layers: int) -> StageSpec:
        """The whole model on one stage."""
        return StageSpec(tuple(range(num_layers)), True, True)

    @staticmethod
    def from_partition(partition, stage: int) -> StageSpec:
        """Stage ``stage`` of a ``reallm.layout.stages.StagePartition``."""
        return StageSpec(tuple(partition.blocks(stage)), stage == 0, stage == partition.num_stages - 1)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 statistics, cast back before the weight: exactly transformers' order of roundings.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x_TnD: torch.Tensor, cos_TD: torch.Tensor, sin_TD: torch.Tensor) -> torch.Tensor:
    return x_TnD * cos_TD[:, None, :] + rotate_half(x_TnD) * sin_TD[:, None, :]


class KVCache:
    """Preallocated keys and values per held block, ``[B, num_kv_heads_local, max_len, head_dim]`` each.

    Static shapes (never resized), so a decode step can be captured in a CUDA graph: new entries are
    written in place at tensor-valued positions.
    """

    def __init__(self, k: dict[int, torch.Tensor], v: dict[int, torch.Tensor]):
        self.k = k
        self.v = v

    @property
    def batch_size(self) -> int:
        return next(iter(self.k.values())).shape[0] if self.k else 0

    @property
    def max_len(self) -> int:
        return next(iter(self.k.values())).shape[2] if self.k else 0

    def write(self, layer: int, k_NkD: torch.Tensor, v_NkD: torch.Tensor, rows_N: torch.Tensor,
              cols_N: torch.Tensor) -> None:
        """Store entry n at (sequence ``rows_N[n]``, position ``cols_N[n]``)."""
        self.k[layer][rows_N, :, cols_N] = k_NkD
        self.v[layer][rows_N, :, cols_N] = v_NkD

    def valid_mask(self, positions_B: torch.Tensor, window: Optional[int] = None) -> torch.Tensor:
        """[B, S] bool: slots a query at ``positions_B`` may read (causal, and within the sliding window)."""
        s = torch.arange(self.max_len, device=positions_B.device)
        valid = s[None, :] <= positions_B[:, None]
        if window is not None:
            valid = valid & (s[None, :] > positions_B[:, None] - window)
        return valid


@dataclass
class _Ctx:
    """Per-forward metadata shared by every block of a stage."""

    cos: torch.Tensor
    sin: torch.Tensor
    seqs: Optional[PackedSeqs] = None
    kv_cache: Optional[KVCache] = None
    #: Where each token's k/v goes in the cache: sequence index and position (prefill and decode).
    cache_rows: Optional[torch.Tensor] = None
    cache_cols: Optional[torch.Tensor] = None
    decode: bool = False
    #: Decode only: valid-slot masks per sliding window (None key = full causal).
    valid: dict = field(default_factory=dict)
    #: Decode only: append and attend in one Triton kernel (``reallm.kernels.decode_attention``).
    decode_kernel: bool = False
    #: Run each block as compiled regions around the attention (``Transformer.compile``).
    compiled: bool = False
    #: Decode only: each block as 5 kernels (``_fused_decode_block``; ``Transformer.fused_decode_usable``).
    fused_decode: bool = False
    #: Compiled decode: the previous block's MLP output, not yet added to the residual stream.
    pending: Optional[torch.Tensor] = None


class Attention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, qkv_bias: bool,
                 sliding_window: Optional[int], backend: AttnBackend, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=qkv_bias, **kw)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias, **kw)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias, **kw)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False, **kw)
        self.head_dim = head_dim
        self.scale = head_dim ** -0.5
        self.sliding_window = sliding_window
        self.backend = backend

    def project(self, x_TH: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                w_qkv: Optional[torch.Tensor] = None,
                rotate: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k (rotated unless ``rotate`` is false: the decode kernel rotates them) and v: ``[T, heads, D]``
        each (local head counts under tp). ``w_qkv``: the three weights as one matrix (``adjacent_rows``), for
        one matrix product instead of three."""
        T, D = x_TH.shape[0], self.head_dim
        if w_qkv is not None:
            nq, nk = self.q_proj.weight.shape[0], self.k_proj.weight.shape[0]
            q, k, v = F.linear(x_TH, w_qkv).split((nq, nk, nk), dim=-1)
        else:
            q, k, v = self.q_proj(x_TH), self.k_proj(x_TH), self.v_proj(x_TH)
        q, k = q.reshape(T, -1, D), k.reshape(T, -1, D)
        if rotate:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v.reshape(T, -1, D)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: _Ctx, layer: int,
               rotate: bool = False) -> torch.Tensor:
        """Store k/v in the cache when there is one, then attention: ``[T, heads, D]``. ``rotate`` (decode kernel
        only): q and k come unrotated and the kernel applies rope."""
        if ctx.decode:
            assert ctx.kv_cache is not None
            cache_k, cache_v = ctx.kv_cache.k[layer], ctx.kv_cache.v[layer]
            if ctx.decode_kernel:
                return decode_attention_append(q, k, v, cache_k, cache_v, ctx.cache_cols, self.scale,
                                               self.sliding_window, rope=(ctx.cos, ctx.sin) if rotate else None)
            ctx.kv_cache.write(layer, k, v, ctx.cache_rows, ctx.cache_cols)
            return decode_attention(q, cache_k, cache_v, ctx.valid[self.sliding_window], self.scale)
        if ctx.kv_cache is not None:
            ctx.kv_cache.write(layer, k, v, ctx.cache_rows, ctx.cache_cols)
        assert ctx.seqs is not None
        return packed_causal_attention(q, k, v, ctx.seqs, self.scale, self.sliding_window, self.backend)

    def fused_qkv(self) -> Optional[torch.Tensor]:
        """q/k/v weights as one matrix, without gradients or copies (inference only; ``adjacent_rows``)."""
        if torch.is_grad_enabled() or self.q_proj.bias is not None:
            return None
        return adjacent_rows(self.q_proj.weight, self.k_proj.weight, self.v_proj.weight)

    def forward(self, x_TH: torch.Tensor, ctx: _Ctx, layer: int) -> torch.Tensor:
        q, k, v = self.project(x_TH, ctx.cos, ctx.sin, self.fused_qkv())
        o = self.attend(q, k, v, ctx, layer)
        return self.o_proj(o.reshape(x_TH.shape[0], -1))


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, device=None, dtype=None):
        super().__init__()
        kw = dict(bias=False, device=device, dtype=dtype)
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, **kw)

    def fused_gate_up(self) -> Optional[torch.Tensor]:
        """gate/up weights as one matrix, without gradients or copies (inference only; ``adjacent_rows``)."""
        if torch.is_grad_enabled():
            return None
        return adjacent_rows(self.gate_proj.weight, self.up_proj.weight)

    def forward(self, x: torch.Tensor, w_gate_up: Optional[torch.Tensor] = None) -> torch.Tensor:
        if w_gate_up is None and not torch.compiler.is_compiling():
            w_gate_up = self.fused_gate_up()
        if w_gate_up is not None:
            gate, up = F.linear(x, w_gate_up).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def adjacent_rows(*weights: torch.Tensor) -> Optional[torch.Tensor]:
    """``torch.cat(weights)`` as a view, when the matrices lie back to back in one storage (as in the
    executor's flat parameter buffer, where q/k/v and gate/up are stored in this order); else None.
    The view carries no autograd history: for inference only."""
    w0 = weights[0]
    if not all(w.dim() == 2 and w.is_contiguous() and w.dtype == w0.dtype and w.shape[1] == w0.shape[1]
               for w in weights):
        return None
    storage, offset = w0.untyped_storage(), w0.storage_offset()
    for w in weights:
        if w.untyped_storage().data_ptr() != storage.data_ptr() or w.storage_offset() != offset:
            return None
        offset += w.numel()
    rows = sum(w.shape[0] for w in weights)
    return torch.empty(0, dtype=w0.dtype, device=w0.device).set_(storage, w0.storage_offset(), (rows, w0.shape[1]))


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, index: int, sliding_window: Optional[int], backend: AttnBackend,
                 device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.index = index
        self.self_attn = Attention(spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.qkv_bias,
                                   sliding_window, backend, **kw)
        self.mlp = MLP(spec.hidden_size, spec.intermediate_size, **kw)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, **kw)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, **kw)

    def forward(self, x_TH: torch.Tensor, ctx: _Ctx) -> torch.Tensor:
        if ctx.fused_decode:
            return _fused_decode_block(self, x_TH, ctx)
        if ctx.compiled and ctx.decode and ctx.decode_kernel:
            return self._compiled_decode(x_TH, ctx)
        if ctx.compiled:
            # Same arithmetic in three regions: two compiled (norms, projections, rope, residuals, SwiGLU
            # fused by Inductor) around the eager attention kernel. Only without tp hooks (tp = 1).
            q, k, v = _compiled(_pre_attention)(self, x_TH, ctx.cos, ctx.sin, self.self_attn.fused_qkv())
            o = self.self_attn.attend(q, k, v, ctx, self.index)
            return _compiled(_post_attention)(self, x_TH, o, self.mlp.fused_gate_up())
        h = x_TH + self.self_attn(self.input_layernorm(x_TH), ctx, self.index)
        return h + self.mlp(self.post_attention_layernorm(h))

    def _compiled_decode(self, x_TH: torch.Tensor, ctx: _Ctx) -> torch.Tensor:
        """A decode step of the block as two compiled regions around the decode kernel, which applies rope.
        Each residual add is fused into the RMSNorm kernel that follows it, the MLP's into the next block's
        region (``ctx.pending``, added by ``Transformer._blocks`` after the last block): an add of a product
        is otherwise compiled into cuBLAS's accumulate-into-C product, whose C is a copy of the residual —
        a device copy and a slower product per add. Arithmetic of the eager block (each add rounded once)."""
        h, q, k, v = _compiled(_decode_pre_attention)(self, x_TH, ctx.pending, ctx.cos, ctx.sin,
                                                      self.self_attn.fused_qkv())
        o = self.self_attn.attend(q, k, v, ctx, self.index, rotate=True)
        h, ctx.pending = _compiled(_decode_post_attention)(self, h, o, self.mlp.fused_gate_up())
        return h


def _pre_attention(layer: DecoderLayer, x_TH: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   w_qkv: Optional[torch.Tensor]):
    return layer.self_attn.project(layer.input_layernorm(x_TH), cos, sin, w_qkv)


def _decode_pre_attention(layer: DecoderLayer, x_TH: torch.Tensor, pending: Optional[torch.Tensor],
                          cos: torch.Tensor, sin: torch.Tensor, w_qkv: Optional[torch.Tensor]):
    h = x_TH if pending is None else x_TH + pending
    return (h, *layer.self_attn.project(layer.input_layernorm(h), cos, sin, w_qkv, rotate=False))


def _decode_post_attention(layer: DecoderLayer, h: torch.Tensor, o_TnD: torch.Tensor,
                           w_gate_up: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    a = layer.self_attn.o_proj(o_TnD.reshape(h.shape[0], -1))
    # (in fp32 and rounded: the same value as h + a, but not the pattern Inductor turns into addmm)
    h = (h.float() + a.float()).to(h.dtype)
    return h, layer.mlp(layer.post_attention_layernorm(h), w_gate_up)


def _post_attention(layer: DecoderLayer, x_TH: torch.Tensor, o_TnD: torch.Tensor,
                    w_gate_up: Optional[torch.Tensor]) -> torch.Tensor:
    h = x_TH + layer.self_attn.o_proj(o_TnD.reshape(x_TH.shape[0], -1))
    return h + layer.mlp(layer.post_attention_layernorm(h), w_gate_up)


def _fused_decode_block(layer: DecoderLayer, x_BH: torch.Tensor, ctx: _Ctx) -> torch.Tensor:
    """One decode step of a block in 5 kernels, the same arithmetic as ``DecoderLayer.forward``: input norm +
    q/k/v product; rope + append + attention; o-product + residual; post-attention norm + gate/up product +
    SwiGLU; down product + residual (``reallm.kernels.decode_gemm``, ``decode_attention``)."""
    att, mlp, B = layer.self_attn, layer.mlp, x_BH.shape[0]
    n1, n2 = layer.input_layernorm, layer.post_attention_layernorm
    nq, nk = att.q_proj.weight.shape[0], att.k_proj.weight.shape[0]
    qkv = decode_gemm.decode_linear(x_BH, att.fused_qkv(), norm_weight=n1.weight, eps=n1.eps)
    q, k, v = (t.view(B, -1, att.head_dim) for t in qkv.split((nq, nk, nk), dim=-1))
    assert ctx.kv_cache is not None
    o = decode_kernel.decode_attention_append(q, k, v, ctx.kv_cache.k[layer.index], ctx.kv_cache.v[layer.index],
                                              ctx.cache_cols, att.scale, att.sliding_window, rope=(ctx.cos, ctx.sin))
    h = decode_gemm.decode_linear(o.view(B, -1), att.o_proj.weight, residual=x_BH)
    a = decode_gemm.decode_linear(h, mlp.fused_gate_up(), norm_weight=n2.weight, eps=n2.eps, glu=True)
    return decode_gemm.decode_linear(a, mlp.down_proj.weight, residual=h)


_COMPILED: dict = {}


def _compiled(fn):
    """``torch.compile(fn)``, made once per function and shared by every layer (parameters are graph
    inputs, so identical layers reuse one graph; token counts become dynamic after the first change).
    Without gradients, ``REALLM_INFERENCE_AUTOTUNE=1`` compiles with Inductor's GEMM autotuning
    (slower to build; picks its own kernels for the small-batch products of decoding)."""
    autotune = not torch.is_grad_enabled() and os.environ.get("REALLM_INFERENCE_AUTOTUNE", "") == "1"
    c = _COMPILED.get((fn, autotune))
    if c is None:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        c = _COMPILED[(fn, autotune)] = torch.compile(fn, mode="max-autotune-no-cudagraphs" if autotune else None)
    return c


def checkpointed(layer: nn.Module, h: torch.Tensor, ctx: _Ctx) -> torch.Tensor:
    """``layer(h, ctx)`` under gradient checkpointing (non-reentrant; backward recomputes the forward). The
    RNG state is not saved and restored around the recomputation: a block draws no random numbers (no
    dropout), and saving it reads and sets the CUDA generator's state, which a CUDA-graph capture of the
    backward (``reallm.model.graphs.TrainGraphs``) must not do."""
    return torch.utils.checkpoint.checkpoint(layer, h, ctx, use_reentrant=False, preserve_rng_state=False)


class DecoderTrunk(nn.Module):
    """HF's ``model.`` prefix: embedding (first stage), blocks, final norm (last stage)."""

    def __init__(self, spec: ModelSpec, arch: ArchConfig, stage: StageSpec, backend: AttnBackend,
                 device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size, **kw) if stage.has_embedding else None
        self.layers = nn.ModuleDict({str(i): DecoderLayer(spec, i, arch.sliding_window(i), backend, **kw)
                                     for i in stage.layers})
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, **kw) if stage.has_head else None


class Transformer(nn.Module):
    """One pipeline stage (by default the whole model) of an actor (``lm_head``) or critic (``score``).

    ``forward(x, cu_seqlens)``: x is tokens ``[T]`` (int64) on the first stage, else hidden ``[T, h]``;
    returns hidden ``[T, h]`` unless this is the last stage, which returns logits ``[T, V]`` (actor) or
    values ``[T]`` (critic).
    """

    def __init__(self, spec: ModelSpec, stage: Optional[StageSpec] = None, *, arch: Optional[ArchConfig] = None,
                 attn_backend: AttnBackend = AttnBackend.AUTO, device=None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        stage = stage or StageSpec.full(spec.num_layers)
        if stage.layers and stage.layers[-1] >= spec.num_layers:
            raise ValueError(f"stage holds block {stage.layers[-1]} but the model has {spec.num_layers}")
        self.spec = spec
        self.stage = stage
        self.arch = arch or arch_from_spec(spec)
        kw = dict(device=device, dtype=dtype)
        self.model = DecoderTrunk(spec, self.arch, stage, attn_backend, **kw)
        self.lm_head: Optional[nn.Linear] = None
        self.score: Optional[nn.Linear] = None
        #: True when ``lm_head.weight`` is this stage's own copy of the tied embedding (pp > 1).
        self.lm_head_is_tied_copy = False
        if stage.has_head:
            if spec.is_critic:
                self.score = nn.Linear(spec.hidden_size, 1, bias=True, **kw)
            else:
                self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False, **kw)
                self.lm_head_is_tied_copy = spec.tie_word_embeddings and self.model.embed_tokens is None
                self.tie_weights()
        #: Recompute each block in backward (torch.utils.checkpoint, non-reentrant) to save activations.
        self.gradient_checkpointing = False
        #: Blocks run as torch.compile'd regions around the attention (``compile``).
        self.compiled = False
        #: Decode steps append + attend with the Triton kernel (CUDA; ``decode_kernel_usable``).
        self.use_decode_kernel = True
        #: Decode steps run each block as 5 fused kernels where they can (``fused_decode_usable``). Off by
        #: default: on an H100 its split-K products are slower than cuBLAS's for the short inner sizes
        #: (BENCHMARKS.md, decode), so the step is slower as a whole.
        self.use_fused_decode = False
        #: Generation's decode steps run as one persistent kernel launch where it fits (CUDA sm_90, a
        #: LLaMA-shaped bf16 actor, ≤ 64 sequences: ``reallm.model.stream_decode``).
        self.use_stream_decode = True
        self._inv_freq: Optional[torch.Tensor] = None

    def tie_weights(self) -> None:
        """Make ``lm_head.weight`` the embedding's parameter when tied and both live here (again after
        ``to_empty`` / ``to``, which may allocate them separately)."""
        if self.spec.tie_word_embeddings and self.lm_head is not None and self.model.embed_tokens is not None:
            self.lm_head.weight = self.model.embed_tokens.weight

    @staticmethod
    def empty(spec: ModelSpec, stage: Optional[StageSpec] = None, *, device=None,
              dtype: Optional[torch.dtype] = None, **kwargs) -> Transformer:
        """A model with uninitialised storage (no random init: built on the meta device, then allocated),
        for loading weights into."""
        model = Transformer(spec, stage, device="meta", dtype=dtype, **kwargs)
        model.to_empty(device=device or "cpu")
        model.tie_weights()
        return model

    # -- names -----------------------------------------------------------------------------------------
    @property
    def is_critic(self) -> bool:
        return self.spec.is_critic

    def hf_name_of(self, name: str) -> str:
        """HF checkpoint name of the parameter called ``name`` here (differs only for a tied copy)."""
        if self.lm_head_is_tied_copy and name == "lm_head.weight":
            return "model.embed_tokens.weight"
        return name

    def hf_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(HF name, parameter) for every parameter this stage holds, each once."""
        for name, p in self.named_parameters():
            yield self.hf_name_of(name), p

    def compile(self, enabled: bool = True) -> Transformer:
        """Run every block as two ``torch.compile``'d regions (norm/projections/rope; o-proj/residual/MLP)
        around the eager attention. CUDA only, and only for a stage without tensor-parallel hooks (tp = 1):
        the tp collectives live in module hooks that the regions do not call."""
        if enabled:
            if self.has_tp_hooks():
                raise ValueError("compiled blocks need a stage without tensor-parallel hooks (tp = 1)")
        self.compiled = enabled
        return self

    def has_tp_hooks(self) -> bool:
        """Whether tensor-parallel collectives hang on the blocks' modules (tp > 1): code that runs the blocks
        other than through their modules would skip them."""
        return any(layer.self_attn._forward_pre_hooks or layer.self_attn.o_proj._forward_hooks
                   or layer.mlp._forward_pre_hooks for layer in self.model.layers.values())

    def decode_kernel_usable(self, x: torch.Tensor) -> bool:
        w = next(iter(self.model.layers.values())).self_attn.q_proj.weight if self.model.layers else None
        return (self.use_decode_kernel and decode_kernel.available() and x.is_cuda and w is not None
                and w.dtype in (torch.float16, torch.bfloat16, torch.float32))

    def fused_decode_usable(self, h: torch.Tensor) -> bool:
        """Can this decode step run its blocks (and head) as fused kernels (``_fused_decode_block``)? With Triton on
        CUDA (or its interpreter), ≤ ``decode_gemm.MAX_ROWS`` sequences, no tp hooks (tp = 1), and q/k/v and
        gate/up stored back to back without biases (the executor's flat buffer), outside autograd."""
        if not (self.use_fused_decode and decode_gemm.available() and decode_kernel.available() and self.model.layers):
            return False
        if not (h.is_cuda or decode_gemm._INTERPRETED) or h.shape[0] > decode_gemm.MAX_ROWS:
            return False
        if h.is_cuda and h.dtype not in (torch.float16, torch.bfloat16):
            return False
        if torch.is_grad_enabled() or self.score is not None:
            return False
        return not self.has_tp_hooks() and all(
            layer.self_attn.fused_qkv() is not None and layer.mlp.fused_gate_up() is not None
            for layer in self.model.layers.values())

    # -- rope ------------------------------------------------------------------------------------------
    def _rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # Kept out of the module's buffers so that .to(bfloat16) cannot round the frequencies.
        if self._inv_freq is None or self._inv_freq.device != positions.device:
            self._inv_freq = self.arch.rope.inv_freq(self.spec.head_dim, device=positions.device)
        freqs = positions.float()[:, None] * self._inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    # -- forward ---------------------------------------------------------------------------------------
    def _blocks(self, h: torch.Tensor, ctx: _Ctx) -> torch.Tensor:
        ckpt = self.gradient_checkpointing and torch.is_grad_enabled() and not ctx.decode
        for layer in self.model.layers.values():
            if ckpt:
                h = checkpointed(layer, h, ctx)
            else:
                h = layer(h, ctx)
        if ctx.pending is not None:  # the last block's MLP output (``DecoderLayer._compiled_decode``)
            h, ctx.pending = h + ctx.pending, None
        return h

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.model.embed_tokens is not None:
            if x.is_floating_point():
                raise ValueError("the first stage takes token ids, got a floating-point tensor")
            return self.model.embed_tokens(x)
        if not x.is_floating_point():
            raise ValueError("a stage without the embedding takes hidden states [T, h], got integer ids")
        return x

    def _head(self, h: torch.Tensor, select_rows: Optional[torch.Tensor], logits: bool = True) -> torch.Tensor:
        """The last stage's output of the blocks' ``h``: logits or values; with ``logits`` false an actor's
        normed hidden states, for the caller to multiply by ``lm_head`` a chunk of rows at a time."""
        if self.model.norm is None:
            return h
        h = self.model.norm(h)
        if select_rows is not None:
            h = h[select_rows]
        if self.score is not None:
            return self.score(h).squeeze(-1)
        assert self.lm_head is not None
        return self.lm_head(h) if logits else h

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, *, max_seqlen: Optional[int] = None,
                position_ids: Optional[torch.Tensor] = None, kv_cache: Optional[KVCache] = None,
                select_rows: Optional[torch.Tensor] = None, cache_row_offset: int = 0,
                logits: bool = True) -> torch.Tensor:
        """Packed forward. ``kv_cache``: also store every token's k/v (prefill), sequence b in cache row
        ``cache_row_offset + b``; ``select_rows``: apply the head only to these rows (e.g. each prompt's last
        token), returning ``[len(select_rows), ...]``; ``logits`` false: an actor's last stage returns its
        normed hidden states instead of logits (``_head``)."""
        seqs = PackedSeqs.from_cu_seqlens(cu_seqlens.to(x.device), max_seqlen)
        if seqs.num_tokens != x.shape[0]:
            raise ValueError(f"cu_seqlens ends at {seqs.num_tokens} but the input has {x.shape[0]} tokens")
        h = self._embed(x)
        seq_idx = None
        if position_ids is None or kv_cache is not None:
            seq_idx, pos = packed_positions(seqs, x.device)
            seq_idx = seq_idx + cache_row_offset
            position_ids = pos if position_ids is None else position_ids
        cos, sin = self._rope(position_ids, h.dtype)
        ctx = _Ctx(cos, sin, seqs=seqs, kv_cache=kv_cache, cache_rows=seq_idx, cache_cols=position_ids,
                   compiled=self.compiled)
        return self._head(self._blocks(h, ctx), select_rows, logits)

    def trunk(self, x: torch.Tensor, seqs: PackedSeqs, position_ids: torch.Tensor) -> torch.Tensor:
        """Embedding (first stage) and blocks of a packed micro-batch, no head and no KV cache: the part of an
        inference forward that ``reallm.model.graphs`` replays from a CUDA graph (no host syncs)."""
        h = self._embed(x)
        cos, sin = self._rope(position_ids, h.dtype)
        return self._blocks(h, _Ctx(cos, sin, seqs=seqs, compiled=self.compiled))

    def prefill(self, tokens: torch.Tensor, cu_seqlens: torch.Tensor, kv_cache: KVCache,
                max_tokens: Optional[int] = None) -> torch.Tensor:
        """Fill ``kv_cache`` with the packed prompts and return the head's output at each prompt's last
        token, ``[B, ...]``: the same as ``forward(..., kv_cache=, select_rows=last rows)``, run over groups
        of whole prompts of at most ``max_tokens`` tokens (one prompt at least; default
        ``prefill_chunk_tokens`` of this rank's shapes), so the activations of a large batch never exist at once."""
        if max_tokens is None:
            max_tokens = self.prefill_chunk_tokens()
        bounds = [int(b) for b in cu_seqlens.tolist()]
        B = len(bounds) - 1
        outs, first = [], 0
        while first < B:
            last = first + 1
            while last < B and bounds[last + 1] - bounds[first] <= max_tokens:
                last += 1
            a, z = bounds[first], bounds[last]
            cu = cu_seqlens[first:last + 1] - a
            outs.append(self(tokens[a:z], cu, kv_cache=kv_cache, select_rows=(cu[1:] - 1).long(),
                             cache_row_offset=first))
            first = last
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def prefill_chunk_tokens(self, lean_memory: bool = False) -> int:
        """``reallm.working_set.prefill_chunk_tokens`` of the blocks held here (their tp shard of the MLP)."""
        for layer in self.model.layers.values():
            w = layer.mlp.gate_proj.weight
            return prefill_chunk_tokens(w.shape[1], w.shape[0], w.element_size(), lean_memory)
        return PREFILL_CHUNK_TOKENS_MAX

    def decode(self, x: torch.Tensor, positions_B: torch.Tensor, kv_cache: KVCache) -> torch.Tensor:
        """One new token per cached sequence: x is tokens ``[B]`` (or hidden ``[B, h]``) at ``positions_B``;
        writes their k/v into ``kv_cache`` and returns logits ``[B, V]`` / values ``[B]`` / hidden ``[B, h]``.
        Static shapes throughout, so the call can be captured in a CUDA graph."""
        h = self._embed(x)
        cos, sin = self._rope(positions_B, h.dtype)
        if self.fused_decode_usable(h):
            ctx = _Ctx(cos, sin, kv_cache=kv_cache, cache_cols=positions_B, decode=True, fused_decode=True)
            h = self._blocks(h, ctx)
            if self.model.norm is None:
                return h
            assert self.lm_head is not None
            return decode_gemm.decode_linear(h, self.lm_head.weight, norm_weight=self.model.norm.weight,
                                             eps=self.model.norm.eps)
        kernel = self.decode_kernel_usable(h)
        valid, rows = {}, None
        if not kernel:
            windows = {layer.self_attn.sliding_window for layer in self.model.layers.values()}
            valid = {w: kv_cache.valid_mask(positions_B, w) for w in windows}
            rows = torch.arange(x.shape[0], device=x.device)
        ctx = _Ctx(cos, sin, kv_cache=kv_cache, cache_rows=rows, cache_cols=positions_B, decode=True, valid=valid,
                   decode_kernel=kernel, compiled=self.compiled)
        return self._head(self._blocks(h, ctx), None)

    # -- caches and init -------------------------------------------------------------------------------
    def new_kv_cache(self, batch_size: int, max_len: int, dtype: Optional[torch.dtype] = None,
                     device=None) -> KVCache:
        """Zeroed cache for ``batch_size`` sequences of up to ``max_len`` tokens, for the blocks held here."""
        k, v = {}, {}
        for key, layer in self.model.layers.items():
            w = layer.self_attn.k_proj.weight
            num_kv = w.shape[0] // self.spec.head_dim
            shape = (batch_size, num_kv, max_len, self.spec.head_dim)
            kw = dict(dtype=dtype or w.dtype, device=device or w.device)
            k[int(key)] = torch.zeros(shape, **kw)
            v[int(key)] = torch.zeros(shape, **kw)
        return KVCache(k, v)

    @torch.no_grad()
    def init_weights(self, seed: int, std: float = 0.02) -> None:
        """Deterministic random init (norms 1, biases 0, matrices N(0, std)), keyed by (seed, HF name)."""
        for name, p in self.hf_named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
                p.copy_(torch.randn(p.shape, generator=g) * std)


def packed_positions(seqs: PackedSeqs, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence index, position within its sequence) of every packed token, int64 [T] each."""
    lengths = [b - a for a, b in zip(seqs.bounds, seqs.bounds[1:], strict=False)]
    T = seqs.num_tokens
    lens = torch.tensor(lengths, dtype=torch.int64, device=device)
    seq_idx = torch.repeat_interleave(torch.arange(len(lengths), device=device), lens, output_size=T)
    starts = torch.tensor(seqs.bounds[:-1], dtype=torch.int64, device=device)
    return seq_idx, torch.arange(T, device=device) - starts[seq_idx]


def pack_sequences(seqs: Sequence[Sequence[int]], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists → (tokens int64 [T], cu_seqlens int32 [B+1])."""
    lengths = [len(s) for s in seqs]
    cu = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0)
    flat = [t for s in seqs for t in s]
    return torch.tensor(flat, dtype=torch.int64, device=device), cu.to(device)
