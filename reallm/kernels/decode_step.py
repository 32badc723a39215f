"""A whole decode step of a LLaMA-shaped model as one persistent kernel launch (``decode_stream``).

Per layer, five operations of one :class:`~reallm.kernels.decode_stream.StreamProgram`::

    qkv   = rope(rms(h) @ [Wq; Wk; Wv]ᵀ)      q to rows, k and v into the layer's caches at each row's position
    a     = attention(q, caches)               the query heads of a kv head share its keys and values
    h'    = h + a @ Woᵀ                        rows' sums of squares kept for the next norm
    act   = swiglu(rms(h') @ [Wg; Wu]ᵀ)
    h''   = h' + act @ Wdᵀ

then ``logits = rms(h) @ Wheadᵀ``. Each RMSNorm's weight is folded into the columns of the matrix that
reads it (``W · diag(γ)``), and its 1/rms scales the product's rows in the epilogue, from sums of squares the
producing residual epilogue added up: no separate norm, rope, append, residual or SwiGLU kernels, and every
SM streams weights (and keys and values) across all of them.

The model's numbers in :meth:`DecodeStep.reference` (fp32 products of the bf16 operands, one rounding per
operation) are what the kernel is tested against; ``tests/test_decode_step.py`` checks that definition
against HF transformers.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from reallm.kernels import decode_stream
from reallm.kernels.decode_stream import HEAD, ROWS, StreamProgram, chunked_buffer, to_chunks


class DecodeStep:
    """One decode step for up to 64 rows (sequences) over the given caches.

    ``weights``: HF LLaMA names (``model.layers.{i}.self_attn.q_proj.weight`` …, ``model.norm.weight``,
    ``lm_head.weight``; no biases); ``k_caches``/``v_caches``: per layer ``[rows, kv_heads, max_len, 64]``
    bf16 in the stream layout (:func:`~reallm.kernels.decode_stream.stream_cache` of what
    :class:`reallm.model.transformer.KVCache` holds; max_len a multiple of 128; the entries past a row's
    position finite — the kernel reads whole slots of 128 positions and masks the rest: zero a new cache,
    never ``torch.empty``). ``inv_freq``: rope's [32] inverse
    frequencies. Shapes: hidden, heads × 64 and the MLP width multiples of 128; an even number of query heads
    (at most 8) per kv head. ``keep_plain=False`` keeps only the packed weights the kernel reads (half the
    memory; :meth:`reference` then refuses); ``packed`` reuses another step's (:meth:`packed`: steps over
    several caches of one model share one copy). :meth:`load` packs new weights in place; ``pack=False``
    (with ``keep_plain=False``) only allocates the packed weights, for a :meth:`load` before the first run.
    """

    @torch.no_grad()
    def __init__(self, weights: dict[str, torch.Tensor], *, layers: int, heads: int, kv_heads: int, eps: float,
                 inv_freq: torch.Tensor, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor],
                 keep_plain: bool = True, packed: Optional[list[torch.Tensor]] = None, pack: bool = True):
        dev = weights["model.norm.weight"].device
        hidden = weights["model.norm.weight"].numel()
        self.hidden, self.vocab = hidden, weights["lm_head.weight"].shape[0]
        self.layers, self.heads, self.kv_heads = layers, heads, kv_heads
        self.cache_rows, self.max_len = (k_caches[0].shape[0], k_caches[0].shape[2]) if k_caches else (0, 0)
        q_cols = heads * HEAD
        if len(k_caches) != layers or len(v_caches) != layers:
            raise ValueError(f"DecodeStep: {layers} layers but {len(k_caches)} k / {len(v_caches)} v caches")
        if not pack and keep_plain:
            raise ValueError("DecodeStep: pack=False keeps no plain weights (keep_plain=False)")
        if keep_plain or (pack and packed is None):
            mats = self._matrices(weights)
        else:  # only the shapes: the packed weights are shared, or filled by load()
            shapes = [(sum(t.shape[0] for t in srcs), srcs[0].shape[1]) for srcs, _, _ in self._sources(weights)]
            mats = (torch.empty(n, k, dtype=torch.bfloat16, device="meta") for n, k in shapes)
            if packed is None:
                packed = [torch.empty(n * k, dtype=torch.bfloat16, device=dev) for n, k in shapes]
        packs = iter(packed) if packed is not None else None

        def pk():
            return next(packs) if packs is not None else None

        bf = torch.bfloat16
        self.positions = torch.full((ROWS,), -1, dtype=torch.int64, device=dev)
        self.h0 = chunked_buffer(hidden, dev)
        self.ss0 = torch.zeros(ROWS, dtype=torch.float32, device=dev)
        self.logits = torch.zeros(ROWS, self.vocab, dtype=bf, device=dev)
        self.inv_freq = inv_freq.float().to(dev).contiguous()
        self.buffers = []
        prog = StreamProgram(keep_plain=keep_plain)
        h, norm_src, dep = self.h0, self.ss0, None
        for i in range(layers):
            qkv_w, o_w, gu_w, down_w = (next(mats) for _ in range(4))
            inter = gu_w.shape[0] // 2
            a, h_mid, act, h_next = (chunked_buffer(c, dev) for c in (q_cols, hidden, inter, hidden))
            q = torch.zeros(ROWS, q_cols, dtype=bf, device=dev)  # a buffer per layer: every output its own
            self.buffers += [q, a, h_mid, act, h_next]
            qkv = prog.add_qkv(qkv_w, h, q, k_caches[i], v_caches[i], self.positions, self.inv_freq, q_cols=q_cols,
                               dep=dep, norm=(norm_src, eps), packed=pk())
            att = prog.add_attention(qkv, a, scale=1.0 / math.sqrt(HEAD))
            o = prog.add(o_w, a, h_mid, out="residual", residual=h, dep=att, packed=pk())
            g = prog.add(gu_w, h_mid, act, out="swiglu", dep=o, norm=(o, eps), packed=pk())
            dep = prog.add(down_w, act, h_next, out="residual", residual=h_mid, dep=g, packed=pk())
            h, norm_src = h_next, dep
        self.head = prog.add(next(mats), h, self.logits, dep=dep, norm=(norm_src, eps), packed=pk())
        self.program = prog
        self.weight_bytes = sum(p.packed.numel() * 2 for p in prog.products if p.packed is not None)

    def packed(self) -> list[torch.Tensor]:
        """The packed weights, in product order: ``packed=`` of another step over the same model shares them."""
        return [p.packed for p in self.program.products if p.packed is not None]

    def _sources(self, weights: dict[str, torch.Tensor]):
        """Per product, in program order: (the parameters stacked along N, the norm weight folded into its
        columns or None, whether it is [gate; up]) — per layer [Wq; Wk; Wv] with the input norm, Wo,
        [Wg; Wu] with the post-attention norm, Wd; then the LM head with the final norm."""
        biased = sorted(name for name in weights if name.endswith(".bias"))
        if biased:
            raise ValueError(f"DecodeStep: the stream step has no biases; the weights have {biased[:3]}"
                             f"{' …' if len(biased) > 3 else ''}")
        hidden, q_cols, kv_cols = self.hidden, self.heads * HEAD, self.kv_heads * HEAD
        for i in range(self.layers):
            pre = f"model.layers.{i}."
            for p, rows in (("q", q_cols), ("k", kv_cols), ("v", kv_cols)):
                got = weights[pre + f"self_attn.{p}_proj.weight"].shape
                if got != (rows, hidden):
                    raise ValueError(f"DecodeStep: {pre}self_attn.{p}_proj.weight is {list(got)}, expected "
                                     f"[{rows}, {hidden}] ({self.heads} heads, {self.kv_heads} kv heads of {HEAD})")
            yield ([weights[pre + f"self_attn.{p}_proj.weight"] for p in "qkv"], weights[pre + "input_layernorm.weight"],
                   False)
            yield [weights[pre + "self_attn.o_proj.weight"]], None, False
            yield ([weights[pre + "mlp.gate_proj.weight"], weights[pre + "mlp.up_proj.weight"]],
                   weights[pre + "post_attention_layernorm.weight"], True)
            yield [weights[pre + "mlp.down_proj.weight"]], None, False
        yield [weights["lm_head.weight"]], weights["model.norm.weight"], False

    def _matrices(self, weights: dict[str, torch.Tensor]):
        """The products' matrices in program order (:meth:`_sources` stacked, W · diag(γ) where a norm reads
        the input), each made when asked for: one folded copy alive at a time."""
        for srcs, gamma, _ in self._sources(weights):
            mat = torch.cat([t.to(torch.bfloat16) for t in srcs]) if len(srcs) > 1 else srcs[0].to(torch.bfloat16)
            if gamma is not None:  # the norm's weight applied to the columns it scales
                mat = (mat.float() * gamma.float()[None, :]).to(torch.bfloat16)
            yield mat

    @torch.no_grad()
    def load(self, weights: dict[str, torch.Tensor]) -> None:
        """New weights of the same shapes (HF names), packed in place: launches captured earlier read them.
        Without plain copies to update (``keep_plain=False``), on CUDA: one launch (``pack_many``)."""
        products = [p for p in self.program.products if p.packed is not None]
        jobs = [(p.packed, srcs, gamma, glu) for p, (srcs, gamma, glu) in zip(products, self._sources(weights))]
        for p, (_, srcs, _, _) in zip(products, jobs):
            got = (sum(t.shape[0] for t in srcs), srcs[0].shape[1])
            if got != tuple(p.w.shape):
                raise ValueError(f"DecodeStep.load: a {list(got)} matrix for a product of {list(p.w.shape)}")
        if all(p.w.device.type == "meta" for p in products) and decode_stream.pack_many(jobs):
            return
        mats = self._matrices(weights)
        for i, p in enumerate(self.program.products):
            if p.packed is not None:
                self.program.reload(i, next(mats))

    @classmethod
    def from_hf(cls, model, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor]) -> DecodeStep:
        """From a ``transformers`` LLaMA-style causal LM (its state dict, config and rotary frequencies)."""
        cfg = model.config
        rotary = model.model.rotary_emb
        if getattr(rotary, "attention_scaling", 1.0) != 1.0:
            raise ValueError("DecodeStep: rope with attention scaling is not supported")
        state = dict(model.state_dict())
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
        return cls(state, layers=cfg.num_hidden_layers, heads=cfg.num_attention_heads,
                   kv_heads=cfg.num_key_value_heads, eps=cfg.rms_norm_eps, inv_freq=rotary.inv_freq,
                   k_caches=k_caches, v_caches=v_caches)

    def set_inputs(self, hidden: torch.Tensor, positions: torch.Tensor) -> None:
        """The step's input rows (embeddings, [B ≤ 64, hidden]) and their positions ([B]); rows past B are padding."""
        b = hidden.shape[0]
        self._check_rows(list(hidden.shape), positions)
        rows = torch.zeros(ROWS, self.hidden, dtype=torch.bfloat16, device=hidden.device)
        rows[:b] = hidden
        self.h0.copy_(to_chunks(rows))
        self.ss0.copy_(rows.float().pow(2).sum(-1))
        self.positions.fill_(-1)
        self.positions[:b] = positions

    def _check_rows(self, got: list, positions: torch.Tensor) -> None:
        """Input rows ``got`` (their shape; B first) with one position each, B ≤ 64 and ≤ the caches' rows, every
        position inside the caches (checked outside captures: it reads the device)."""
        b = got[0]
        if b > ROWS or positions.shape != (b,):
            raise ValueError(f"DecodeStep: up to {ROWS} rows with one position each, got {got} "
                             f"and positions {list(positions.shape)}")
        if b > self.cache_rows:
            raise ValueError(f"DecodeStep: {b} rows but the caches hold {self.cache_rows}")
        capturing = positions.is_cuda and torch.cuda.is_current_stream_capturing()
        if not capturing and b and not bool(((positions >= 0) & (positions < self.max_len)).all()):
            # (a write past max_len would land in another head's or row's entries)
            raise ValueError(f"DecodeStep: positions must be in [0, {self.max_len}), got "
                             f"{positions.min().item()} .. {positions.max().item()}")

    def set_tokens(self, tokens: torch.Tensor, positions: torch.Tensor, embed: torch.Tensor) -> None:
        """:meth:`set_inputs` of the embedding rows ``embed[tokens]`` ([B ≤ 64] token ids): on CUDA one launch
        (gather, chunked layout, sums of squares, positions), elsewhere the torch gather and :meth:`set_inputs`."""
        ext = decode_stream._EXT.load() if tokens.is_cuda else None
        if ext is not None and (tokens.dim() != 1 or tokens.dtype != torch.int64 or positions.dtype != torch.int64
                                or embed.device != tokens.device or positions.device != tokens.device):
            ext = None  # (the launch takes int64 ids and positions on the embedding's device)
        if ext is None or not hasattr(ext, "prepare"):
            self.set_inputs(torch.nn.functional.embedding(tokens, embed), positions)
            return
        if embed.shape[1] != self.hidden:
            raise ValueError(f"DecodeStep: embedding rows of {embed.shape[1]}, the model's hidden size is {self.hidden}")
        self._check_rows([tokens.shape[0], embed.shape[1]], positions)
        ext.prepare(tokens.contiguous(), positions.contiguous(), embed.contiguous(), self.h0, self.ss0,
                    self.positions)

    def run(self, **kw) -> torch.Tensor:
        """The kernel (capturable once it ran eagerly); returns the logits rows [64, vocab]."""
        self.program.run(**kw)
        return self.logits

    def reference(self) -> torch.Tensor:
        """The same step in torch (the kernel's definition); writes the caches and returns the logits rows."""
        self.program.reference()
        return self.logits


def available() -> bool:
    return decode_stream.available()


def floor_bytes(step: DecodeStep, positions: Optional[torch.Tensor] = None) -> int:
    """Bytes a step must read: the weights and every row's cached keys and values (positions 0 .. pos)."""
    pos = step.positions if positions is None else positions
    kv = sum(2 * p.attn["k"][0, :, 0].numel() * 2 * int((pos.clamp_min(-1) + 1).sum())
             for p in step.program.products if p.out == "attention")
    return step.weight_bytes + kv
