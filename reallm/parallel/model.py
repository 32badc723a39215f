"""``ParallelModel``: one rank's part of a model under a placement (dp x tp x pp, sequence parallel), and
everything a runtime does with it: load, inference, a training step, generation, save, reallocation views.

Build (``ParallelModel.build``): read the checkpoint's config; cut the blocks into stages
(``reallm.layout.partition_stages``); build this stage of the plain ``Transformer`` on the meta device;
apply tensor parallelism (``reallm.parallel.tensor``); allocate *one* flat buffer in the layout's
flat-buffer convention (``reallm.layout.shards``: shards in table order, local shapes with vocabulary
padding, the tied copy last) and make every parameter a view of it; read only this rank's slices of the
HF checkpoint into it (``load_hf_weights`` with the shards' boxes as slice rule).

Micro-batches: every rank of a dp replica (its tp x pp ranks) is called with the same list of packed
micro-batch dicts (``tokens`` int64 [T], ``cu_seqlens`` int32 [B+1], and whatever the loss reads); the
executor broadcasts them inside the replica. Only activations and their gradients move between stages.

Outputs of the last stage: an actor returns a ``LogitsShard`` (this tp rank's vocabulary columns; log-probs
and losses computed vocab-parallel), a critic its values [T] (replicated over tp).

Train step: 1F1B over the micro-batches (``reallm.parallel.pipeline``) with ``loss_fn(out, mb) ->
(loss, stats)``; losses are normalised by global counts, so gradients are sums. Then, in this order on
every rank: (1) over tp, the gradients of sequence-parallel replicated parameters and of replicated kv
heads (each replica group sums its copies: all ranks add their copy into the slot of their kv part of
one buffer, one all-reduce); (2) the tied embedding's copies on the first and last stage; (3) dp, bucketed
(all-reduce, or ZeRO-1 reduce-scatter); (4) the global norm over primary elements (replica, or the whole
mesh under ZeRO-1), clipping and AdamW (``reallm.parallel.optim``); (5) stats from the last stage,
summed over dp.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import nn

from executor import comm
from reallm.layout.params import TpSplit, padded_vocab_size, param_table, tp_slice
from reallm.layout.shards import DeviceShards, resolve_partition, shards_of
from reallm.layout.stages import StagePartition
from reallm.model.arch import ArchConfig, arch_from_spec
from reallm.model.attention import AttnBackend, PackedSeqs
from reallm.model.graphs import InferenceGraphs, TrainGraphs
from reallm.model.hf_io import load_hf_weights, read_hf_model, save_hf_checkpoint
from reallm.model.optim import OptimizerSettings
from reallm.model.transformer import StageSpec, Transformer, _Ctx, packed_positions
from reallm.parallel.groups import ParallelGroups
from reallm.parallel.optim import DEFAULT_BUCKET_NUMEL, FlatAdamW, host_copy, make_buckets, reduce_in_one
from reallm.parallel.pipeline import Msg, StageProgram, forward_schedule, one_f_one_b_schedule, run_schedule
from reallm.parallel.tensor import TpState, enter_tp, pad_for_sp, parallelize
from reallm.parallel.vocab import LogitsShard
from reallm.spec import ModelSpec

LossFn = Callable[[Any, Mapping[str, torch.Tensor]], tuple[torch.Tensor, Mapping[str, Any]]]
Output = Union[LogitsShard, torch.Tensor]


@dataclass(frozen=True)
class _Prepared:
    """A micro-batch as this stage sees it: (padded) tokens and boundaries, and the activation shape."""

    tokens: Optional[torch.Tensor]
    cu_seqlens: torch.Tensor
    #: ``cu_seqlens`` as host ints (before sequence-parallel padding), read only where graphs run (a host
    #: sync per micro-batch when the boundaries live on the device).
    bounds: Optional[tuple[int, ...]]
    num_tokens: int  # before sequence-parallel padding
    act_rows: int  # rows of the hidden states passed between stages


def inference_graphs_usable(model: Transformer, placement, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether an inference replica replays its forward from CUDA graphs: on CUDA, half precision (the
    varlen attention kernel reads the boundaries on the device), compiled blocks (what the profile's
    ``prefill_graphed`` table times), tp = 1 (no collectives inside the graph), and
    ``REALLM_INFERENCE_GRAPHS`` not ``0``."""
    return (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and model.compiled
            and placement.tp == 1 and os.environ.get("REALLM_INFERENCE_GRAPHS", "1") != "0")


def train_graphs_usable(pm: ParallelModel) -> bool:
    """Whether a trained replica may replay its micro-batches from CUDA graphs (``use_train_graphs``): the
    inference rule (CUDA, half precision, compiled blocks, tp = 1) and pp = 1. The planner's
    ``shapes.train_graphed`` is the same rule."""
    return (pm.optimizer is not None and pm.placement.pp == 1
            and inference_graphs_usable(pm.model, pm.placement, pm.device, pm.dtype))


class ParallelModel:
    """One rank's stage and tp shard of a model (module docstring). Build with ``ParallelModel.build``."""

    def __init__(self, model: Transformer, info_path: Optional[str], arch: ArchConfig, groups: ParallelGroups,
                 partition: StagePartition, shards: DeviceShards, flat: torch.Tensor, tp_state: TpState,
                 dtype: torch.dtype, device: torch.device):
        self.model, self.path, self.arch, self.groups = model, info_path, arch, groups
        self.spec: ModelSpec = model.spec
        self.partition, self.shards, self.flat = partition, shards, flat
        self.tp_state, self.dtype, self.device = tp_state, dtype, device
        self.optimizer: Optional[FlatAdamW] = None
        #: CUDA-graphed inference forward (``use_inference_graphs``); None: eager.
        self.graphs: Optional[InferenceGraphs] = None
        #: CUDA-graphed train micro-batches (``use_train_graphs``); None: eager.
        self.train_graphs: Optional[TrainGraphs] = None
        #: KV caches and captured decode steps kept between ``generate`` calls (``keep_decode_graphs``).
        self.decode_pool = None
        self._hooks: list = []
        #: part ("params" / "state") -> name -> (device tensor, host copy), while offloaded.
        self._offloaded: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}

    # -- construction ----------------------------------------------------------------------------------------
    @classmethod
    def build(cls, ckpt_path: Optional[str], groups: ParallelGroups, *, is_critic: bool = False,
              dtype: torch.dtype = torch.float32, device: Union[str, torch.device] = "cpu",
              optimizer: Optional[OptimizerSettings] = None, total_steps: int = 1, zero1: bool = False,
              offload_optimizer: bool = False, bucket_numel: int = DEFAULT_BUCKET_NUMEL,
              gradient_checkpointing: bool = False, partition: Optional[StagePartition] = None,
              critic_init_seed: int = 1, attn_backend: AttnBackend = AttnBackend.AUTO,
              load_weights: bool = True, spec: Optional[ModelSpec] = None,
              init_seed: Optional[int] = None, compile_blocks: bool = False,
              inference_graphs: bool = True) -> ParallelModel:
        """This rank's part of the HF checkpoint at ``ckpt_path`` under ``groups.placement``.

        ``optimizer`` None builds an inference-only replica (no gradients, no optimizer state).
        ``load_weights=False`` leaves the flat buffer zero (a reallocation destination). Without a checkpoint
        (``ckpt_path`` None) the shapes come from ``spec``, and the weights are zero, or with ``init_seed``
        drawn per local shard (profiling only: such draws depend on the layout). ``compile_blocks``: run the
        blocks as torch.compile'd regions (``Transformer.compile``); honoured on CUDA with tp = 1 only.
        ``inference_graphs``: an inference-only replica replays its forward from CUDA graphs where
        ``inference_graphs_usable`` (``use_inference_graphs``)."""
        device = torch.device(device)
        placement, c = groups.placement, groups.coord
        if ckpt_path is not None:
            info = read_hf_model(ckpt_path, is_critic)
            spec, arch = info.spec, info.arch
        elif spec is None:
            raise ValueError("give ckpt_path (an HF checkpoint directory) or spec")
        else:
            spec = spec.with_critic(is_critic)
            arch = arch_from_spec(spec)
        part = resolve_partition(spec, placement, partition)
        stage = StageSpec.from_partition(part, c.pp)
        model = Transformer(spec, stage, arch=arch, attn_backend=attn_backend, device="meta", dtype=dtype)
        rows = padded_vocab_size(spec.vocab_size, placement.tp) // placement.tp
        tp_state = parallelize(model, groups.tp, c.tp * rows, rows, placement.sequence_parallel)
        shards = shards_of(spec, placement, groups.rank, part)
        dp_for_buckets = placement.dp if (zero1 and optimizer is not None) else 1
        _, n_padded = make_buckets(shards.num_elements, bucket_numel, dp_for_buckets)
        flat = torch.zeros(n_padded, dtype=dtype, device=device)
        _install_flat_parameters(model, shards, flat)
        if ckpt_path is not None and load_weights:
            load_hf_weights(model, ckpt_path, slices={s.name: s.full_slices for s in shards.shards},
                            critic_init_seed=critic_init_seed)
        elif init_seed is not None:
            model.init_weights(init_seed)
            with torch.no_grad():
                for s in shards.shards:  # vocabulary padding rows stay zero
                    local = flat[s.offset:s.offset + s.num_elements].view(s.local_shape)
                    local[s.box[0][1] - s.box[0][0]:].zero_()
        model.gradient_checkpointing = gradient_checkpointing
        if compile_blocks and device.type == "cuda" and placement.tp == 1:
            model.compile()
        self = cls(model, ckpt_path, arch, groups, part, shards, flat, tp_state, dtype, device)
        if optimizer is None:
            model.requires_grad_(False)
            if inference_graphs and inference_graphs_usable(model, placement, device, dtype):
                self.use_inference_graphs()
        else:
            self.optimizer = FlatAdamW(flat, shards, optimizer, total_steps, groups.dp, zero1=zero1,
                                       offload=offload_optimizer, bucket_numel=bucket_numel)
            self._register_grad_hooks()
        return self

    def keep_decode_graphs(self, keep: bool = True) -> None:
        """Keep KV caches and captured decode steps from one ``generate`` call to the next
        (``reallm.parallel.generate.DecodePool``): for a generation replica whose devices serve no other call
        (the memory stays reserved between calls)."""
        from reallm.parallel.generate import DecodePool

        self.decode_pool = DecodePool() if keep else None

    def use_inference_graphs(self, capture: Optional[bool] = None) -> None:
        """Run inference micro-batches' embedding and blocks as replayed CUDA graphs, one per token bucket
        (``reallm.model.graphs``); the head stays eager. ``capture=False`` runs the same padded buffers
        eagerly (CPU tests). Dropped for good when the parameters are offloaded (``offload``): a model that
        moves between host and device would capture anew every call, which costs more than it saves."""
        m = self.model
        self.graphs = InferenceGraphs(m.trunk, self.device, capture=capture)

    def use_train_graphs(self, capture: Optional[bool] = None) -> None:
        """Run train micro-batches' embedding and blocks, forward and backward, from CUDA graphs per token
        bucket (``reallm.model.graphs.TrainGraphs``; the head and loss eager). ``capture=False`` runs the same
        padded buffers eagerly (CPU tests). Dropped when anything is offloaded (their pools hold gradients
        and activations). Chosen by a model config's ``train_cuda_graphs`` where the training state stays on its
        devices (``ModelHandle.build(train_resident=...)``); the planner prices it from the profile's
        ``train_graphed[_ckpt]`` tables."""
        if self.optimizer is None:
            raise ValueError("train graphs need a model built with an optimizer")
        if self.tp_state.sp_active or self.placement.tp > 1 or self.placement.pp > 1:
            raise ValueError("train graphs need tp = 1 (no collectives inside a graph) and, for now, pp = 1")
        self.train_graphs = TrainGraphs(self.model.trunk, self.model, self.device, capture=capture)

    def _register_grad_hooks(self) -> None:
        assert self.optimizer is not None
        params = dict(self.model.hf_named_parameters())
        for s in self.shards.shards:
            p = params[s.name]
            accumulate = self.optimizer.grad_accumulator(s.offset, s.num_elements, s.local_shape)

            def hook(p: torch.Tensor, accumulate=accumulate) -> None:
                if p.grad is not None:  # (a graphed backward, ``TrainGraphs``, can report a parameter it did not reach)
                    accumulate(p.grad)
                p.grad = None

            self._hooks.append(p.register_post_accumulate_grad_hook(hook))

    # -- facts -----------------------------------------------------------------------------------------------
    @property
    def placement(self):
        return self.groups.placement

    @property
    def is_first_stage(self) -> bool:
        return self.groups.is_first_stage

    @property
    def is_last_stage(self) -> bool:
        return self.groups.is_last_stage

    @property
    def is_head(self) -> bool:
        """Last stage, tp rank 0: the rank that holds this dp replica's outputs for the executor."""
        return self.is_last_stage and self.groups.coord.tp == 0

    @property
    def num_elements(self) -> int:
        """Length of this rank's flat buffer in the layout convention."""
        return self.shards.num_elements

    def hf_named_parameters(self):
        return self.model.hf_named_parameters()

    # -- micro-batches ---------------------------------------------------------------------------------------
    def _sp_active(self) -> bool:
        return self.tp_state.sp_active

    def _prepare(self, mb: Mapping[str, torch.Tensor]) -> _Prepared:
        tokens = mb["tokens"].to(self.device)
        graphed = self.graphs is not None or self.train_graphs is not None
        bounds = tuple(int(v) for v in mb["cu_seqlens"].tolist()) if graphed else None
        cu = mb["cu_seqlens"].to(self.device, torch.int32)
        T = tokens.shape[0]
        if self._sp_active():
            tp = self.placement.tp
            tokens, cu, Tp = pad_for_sp(tokens, cu, T, tp)
            return _Prepared(tokens if self.is_first_stage else None, cu, bounds, T, Tp // tp)
        return _Prepared(tokens if self.is_first_stage else None, cu, bounds, T, T)

    def _stage_forward(self, x: torch.Tensor, prep: _Prepared) -> torch.Tensor:
        """This stage on one micro-batch: tokens (first stage) or hidden states in, hidden states or the head's
        output out (padding rows stripped on the last stage). Without autograd an actor's last stage returns
        its normed hidden states, all tokens on every tp rank (``_lazy_head``): ``_wrap`` multiplies them by
        the LM head a chunk of rows at a time, so the [T, V/tp] logits never exist at once."""
        m = self.model
        lazy = self._lazy_head()
        h = None
        if prep.bounds is not None and x.shape[0] == prep.bounds[-1]:
            graphs = self.train_graphs if torch.is_grad_enabled() else self.graphs
            if graphs is not None:
                h = graphs(x, prep.bounds, self.flat.untyped_storage().data_ptr())
        if h is not None:
            if torch.is_grad_enabled():  # the graphed autograd Function's output: the head reads it, or it goes on
                return m._head(h, None) if self.is_last_stage else h
            # The graph's static output is overwritten by the next replay: the head reads it now; hidden
            # states for the next stage leave as a copy.
            return self._last_rows(m._head(h, None, not lazy), prep) if self.is_last_stage else h.clone()
        if x.shape[0] == int(prep.cu_seqlens[-1]):
            y = m(x, prep.cu_seqlens, logits=not lazy)
        else:
            # Sequence-parallel hidden states: [T/tp, h] while cu_seqlens describes all T tokens, which
            # Transformer.forward's token-count check refuses; the same steps, with the check left out.
            seqs = PackedSeqs.from_cu_seqlens(prep.cu_seqlens)
            seq_idx, pos = packed_positions(seqs, x.device)
            h = m._embed(x)
            cos, sin = m._rope(pos, h.dtype)
            y = m._head(m._blocks(h, _Ctx(cos, sin, seqs=seqs, cache_rows=seq_idx, cache_cols=pos)), None, not lazy)
        return self._last_rows(y, prep) if self.is_last_stage else y

    def _lazy_head(self) -> bool:
        """Does the last stage hand out normed hidden states instead of logits (an actor, without autograd)?"""
        return self.is_last_stage and not self.spec.is_critic and not torch.is_grad_enabled()

    def _last_rows(self, y: torch.Tensor, prep: _Prepared) -> torch.Tensor:
        """The last stage's output without padding rows; lazy-head hidden states first gathered over tp (what
        the LM head's tp pre-hook does to its input)."""
        if self._lazy_head():
            y = enter_tp(y, self.groups.tp, self.tp_state.sp_active)
        return y[:prep.num_tokens]

    def _wrap(self, y: torch.Tensor) -> Output:
        if self.spec.is_critic:
            return y
        fused = bool(self.model.compiled) and y.is_cuda
        if self._lazy_head():
            assert self.model.lm_head is not None
            return LogitsShard(None, self.tp_state.vocab_start, self.spec.vocab_size, self.groups.tp, fused=fused,
                               hidden=y, head_weight=self.model.lm_head.weight)
        return LogitsShard(y, self.tp_state.vocab_start, self.spec.vocab_size, self.groups.tp, fused=fused)

    def _act_buffer(self, prep: _Prepared) -> torch.Tensor:
        return torch.empty(prep.act_rows, self.spec.hidden_size, dtype=self.dtype, device=self.device)

    # -- inference -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, micro_batches: Sequence[Mapping[str, torch.Tensor]],
                post: Optional[Callable[[Output, Mapping[str, torch.Tensor]], Any]] = None) -> Optional[list]:
        """Pipelined inference. On the last stage, per micro-batch ``post(out, mb)`` (default: ``out`` itself, a
        ``LogitsShard`` or values [T]); None on other stages. ``post`` runs inside the pipeline, so it can
        reduce the logits (e.g. to log-probs) before the next micro-batch's are computed."""
        self.model.eval()
        self._check_loaded()
        preps = [self._prepare(mb) for mb in micro_batches]
        results: dict[int, Any] = {}
        outputs: dict[int, torch.Tensor] = {}
        prog = StageProgram(forward=None, backward=None, outgoing=lambda m: [outputs.pop(m.mb)],
                            incoming=lambda m: [self._act_buffer(preps[m.mb])], peer_rank=self.groups.stage_rank)

        def fwd(k: int) -> None:
            x = preps[k].tokens if self.is_first_stage else prog.inbox.pop(("act", k))[0]
            y = self._stage_forward(x, preps[k])
            if self.is_last_stage:
                out = self._wrap(y)
                results[k] = out if post is None else post(out, micro_batches[k])
            else:
                outputs[k] = y.contiguous()

        prog.forward = fwd
        try:
            run_schedule(forward_schedule(self.placement.pp, len(preps))[self.groups.stage], prog)
        finally:
            prog.forward = prog.backward = None  # break the prog <-> closure cycle: activations go now, not at gc
        return [results[k] for k in range(len(preps))] if self.is_last_stage else None

    def logprobs(self, micro_batches: Sequence[Mapping[str, torch.Tensor]], *, temperature: float = 1.0,
                 logits_mask_key: Optional[str] = None) -> Optional[list[torch.Tensor]]:
        """Per micro-batch, shifted-layout log-probs [T - B] of the next tokens (vocab-parallel), last stage."""
        def post(out: LogitsShard, mb):
            mask = mb.get(logits_mask_key) if logits_mask_key else None
            return out.logprobs(mb["tokens"].to(self.device), mb["cu_seqlens"], temperature=temperature,
                                logits_mask=None if mask is None else mask.to(self.device))

        return self.forward(micro_batches, post)

    # -- training --------------------------------------------------------------------------------------------
    def forward_backward(self, micro_batches: Sequence[Mapping[str, torch.Tensor]], loss_fn: LossFn) -> dict:
        """1F1B over the micro-batches; gradients accumulate (fp32) in the optimizer's flat buffer. Returns the
        summed stats of this rank's last stage (empty elsewhere)."""
        if self.optimizer is None:
            raise ValueError("this model was built without an optimizer (inference only)")
        self._check_loaded()
        self.model.train()
        preps = [self._prepare(mb) for mb in micro_batches]
        first, last = self.is_first_stage, self.is_last_stage
        inputs: dict[int, torch.Tensor] = {}
        outputs: dict[int, torch.Tensor] = {}
        grads_out: dict[int, torch.Tensor] = {}
        totals: dict[str, float] = defaultdict(float)

        def outgoing(m: Msg) -> list[torch.Tensor]:
            if m.kind == "act":
                return [outputs[m.mb].detach().contiguous()]
            return [grads_out.pop(m.mb).contiguous()]

        prog = StageProgram(forward=None, backward=None, outgoing=outgoing,
                            incoming=lambda m: [self._act_buffer(preps[m.mb])], peer_rank=self.groups.stage_rank)

        def fwd(k: int) -> None:
            if first:
                x = preps[k].tokens
            else:
                x = prog.inbox.pop(("act", k))[0].requires_grad_(True)
            inputs[k] = x
            y = self._stage_forward(x, preps[k])
            if last:
                loss, stats = loss_fn(self._wrap(y), micro_batches[k])
                totals["loss"] += float(loss.detach())
                for key, v in stats.items():
                    totals[key] += float(v)
                outputs[k] = loss
            else:
                outputs[k] = y

        def bwd(k: int) -> None:
            y, x = outputs.pop(k), inputs.pop(k)
            if last:
                y.backward()
            else:
                torch.autograd.backward(y, prog.inbox.pop(("grad", k))[0])
            if not first:
                grads_out[k] = x.grad if x.grad is not None else torch.zeros_like(x)

        prog.forward, prog.backward = fwd, bwd
        try:
            run_schedule(one_f_one_b_schedule(self.placement.pp, len(preps))[self.groups.stage], prog)
        finally:
            prog.forward = prog.backward = None  # break the prog <-> closure cycle: activations go now, not at gc
        return dict(totals)

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """Steps (1)-(3) of the module docstring: tp, tied embedding, dp."""
        assert self.optimizer is not None
        grads = self.optimizer.grads
        g = self.groups
        tp = g.placement.tp
        table = {p.name: p for p in param_table(self.spec)}
        views = {s.name if not s.tied_copy else "tied_copy": grads[s.offset:s.offset + s.num_elements]
                 for s in self.shards.shards}
        # (1) tp: sequence-parallel replicated parameters, and kv heads replicated in groups of tp / num_parts.
        if tp > 1:
            sp_parts = [views[s.name] for s in self.shards.shards
                        if not s.tied_copy and self._sp_active() and table[s.name].split is TpSplit.REPLICATED]
            kv = [s for s in self.shards.shards
                  if table[s.name].split is TpSplit.KV_HEADS and tp_slice(table[s.name], tp, 0).num_parts < tp]
            slots = None
            if kv:
                sl = tp_slice(table[kv[0].name], tp, g.coord.tp)
                width = sum(s.num_elements for s in kv)
                slots = torch.zeros(sl.num_parts, width, dtype=grads.dtype, device=grads.device)
                slots[sl.part] = torch.cat([views[s.name] for s in kv])
            reduce_in_one(sp_parts + ([slots] if slots is not None else []), g.tp.all_reduce)
            if slots is not None:
                off = 0
                for s in kv:
                    views[s.name].copy_(slots[sl.part, off:off + s.num_elements])
                    off += s.num_elements
        # (2) the tied embedding: stage 0's weight and the last stage's copy.
        if self.spec.tie_word_embeddings and not self.spec.is_critic and g.num_stages > 1:
            if g.is_first_stage:
                buf = views["model.embed_tokens.weight"]
            elif g.is_last_stage:
                buf = views["tied_copy"]
            else:
                buf = None
            if g.tied is not None or g.num_stages == 2:
                if buf is not None:
                    comm.all_reduce(buf, g.tied if g.tied is not None else g.pp.group)
            else:  # pp > 2 without a {first, last} group: the whole pp group, middle stages adding zeros
                emb = table["model.embed_tokens.weight"]
                n = tp_slice(emb, tp, g.coord.tp).local_shape
                comm.all_reduce(buf if buf is not None else torch.zeros(n[0] * n[1], dtype=grads.dtype,
                                                                        device=grads.device), g.pp.group)
        # (3) dp
        self.optimizer.reduce_dp()

    def optimizer_step(self) -> dict[str, float]:
        """Step (4): global norm, clip, AdamW, parameters updated (and all-gathered under ZeRO-1)."""
        assert self.optimizer is not None
        reduce_group = self.groups.mesh if self.optimizer.zero1 else self.groups.replica
        stats = self.optimizer.step(lambda t: comm.all_reduce(t, reduce_group))
        self.optimizer.zero_grad()
        return stats

    def train_step(self, micro_batches: Sequence[Mapping[str, torch.Tensor]], loss_fn: LossFn) -> dict[str, float]:
        """One optimizer step (module docstring); every rank returns the same stats: the last stages' loss
        stats summed over micro-batches and dp ranks, plus lr, grad_norm, skipped."""
        assert self.optimizer is not None
        self.optimizer.zero_grad()
        local = self.forward_backward(micro_batches, loss_fn)
        self.reduce_gradients()
        opt_stats = self.optimizer_step()
        return {**self.gather_stats(local), **opt_stats}

    def gather_stats(self, local: Mapping[str, float]) -> dict[str, float]:
        """The last stage's stats, summed over the dp replicas; the same on every rank."""
        g = self.groups
        per_stage = comm.all_gather_objects(dict(local) if g.is_last_stage else None, g.pp.group)
        mine = next(s for s in per_stage if s is not None)
        total: dict[str, float] = defaultdict(float)
        for s in comm.all_gather_objects(mine, g.dp.group):
            for k, v in s.items():
                total[k] += v
        return dict(total)

    # -- generation ------------------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], cfg, *, eos_token_id, pad_token_id: int, seed: int = 0,
                 step: int = 0, seq_ids: Optional[Sequence[int]] = None, num_micro_batches: Optional[int] = None):
        """Generate continuations of ``prompts`` (token lists; every rank of the replica passes the same
        ones). Returns a ``GenerationOutput`` on the last stage (every tp rank), None elsewhere. Identical to
        ``reallm.model.generate.generate`` on one process: same sampling, randomness keyed by
        (seed, step, seq id)."""
        from reallm.parallel.generate import pipelined_generate

        self._check_loaded()
        return pipelined_generate(self, prompts, cfg, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                                  seed=seed, step=step, seq_ids=seq_ids,
                                  num_micro_batches=num_micro_batches or self.placement.num_micro_batches)

    # -- parameters: views, saving, reallocation, offload ----------------------------------------------------
    def flat_parameters(self) -> torch.Tensor:
        """This rank's flat buffer in the layout convention (a live view: writing it writes the parameters)."""
        return self.flat[:self.shards.num_elements]

    def state_for_reallocation(self) -> tuple[DeviceShards, torch.Tensor]:
        """(what this rank holds, its flat buffer) for ``reallm.layout.realloc`` plans."""
        return self.shards, self.flat_parameters()

    def local_tensor(self, hf_name: str, tied_copy: bool = False) -> torch.Tensor:
        """The local (padded) shard of parameter ``hf_name`` as stored here."""
        s = next(s for s in self.shards.shards if s.name == hf_name and s.tied_copy == tied_copy)
        return self.flat[s.offset:s.offset + s.num_elements].view(s.local_shape)

    def local_grad(self, hf_name: str, tied_copy: bool = False) -> torch.Tensor:
        """The accumulated fp32 gradient of ``hf_name``'s local shard (before the optimizer step)."""
        assert self.optimizer is not None
        s = next(s for s in self.shards.shards if s.name == hf_name and s.tied_copy == tied_copy)
        return self.optimizer.grads[s.offset:s.offset + s.num_elements].view(s.local_shape)

    @torch.no_grad()
    def full_state(self, writer: Optional[int] = None) -> Optional[dict[str, torch.Tensor]]:
        """Full HF tensors on ``writer`` (default: stage 0, dp 0, tp 0), gathered from dp replica 0's primary
        shards (replicas deduplicated, padding dropped, no ``lm_head`` when tied); None on other ranks.
        Every rank of the placement must call it."""
        p, g = self.placement, self.groups
        writer = p.device_at(0, 0, 0) if writer is None else writer
        n = self.shards.num_elements
        if g.coord.dp == 0 and g.rank != writer:
            comm.exchange([(self.flat[:n].contiguous(), writer)], [])
        if g.rank != writer:
            return None
        full = {q.name: torch.zeros(q.shape, dtype=self.dtype, device=self.device) for q in param_table(self.spec)}
        for dev, c in p.coords():
            if c.dp != 0:
                continue
            ds = shards_of(self.spec, p, dev, self.partition)
            if dev == g.rank:
                buf = self.flat
            else:
                buf = torch.empty(ds.num_elements, dtype=self.dtype, device=self.device)
                comm.exchange([], [(buf, dev)])
            for s in ds.shards:
                if s.primary:
                    local = buf[s.offset:s.offset + s.num_elements].view(s.local_shape)[s.local_slices]
                    full[s.name][s.full_slices] = local
        return full

    def save_hf(self, out_dir: str, dtype: Optional[torch.dtype] = None, writer: Optional[int] = None) -> None:
        """Write an HF checkpoint transformers loads (``full_state`` on one rank, then a barrier over the mesh,
        so every rank may read it when this returns)."""
        full = self.full_state(writer)
        if full is not None:
            save_hf_checkpoint(out_dir, self.spec, full, arch=self.arch, source_path=self.path, dtype=dtype)
        comm.barrier(self.groups.mesh)

    def _offload_parts(self) -> dict[str, dict[str, torch.Tensor]]:
        parts: dict[str, dict[str, torch.Tensor]] = {"params": {"params": self.flat}, "state": {}}
        if self.optimizer is not None:
            parts["state"]["grads"] = self.optimizer.grads
            # States already on the host (offload_optimizer) stay; a master aliasing the parameters is not listed.
            parts["state"].update({k: v for k, v in self.optimizer.state_tensors().items()
                                   if v.device == self.device and v is not self.flat})
        return parts

    def offload(self, state_only: bool = False) -> None:
        """Move parameters, gradients and optimizer states (only the latter two with ``state_only``: a
        generation or inference call on the weights of record) to host memory, pinned on GPU, and free the
        device copies; tensors keep their identity (their storage is resized), so hooks and views survive."""
        if not state_only and self.graphs is not None:
            self.graphs.clear()
            self.graphs = None
        if not state_only and self.decode_pool is not None:
            self.decode_pool.clear()
        if self.train_graphs is not None:
            self.train_graphs.clear()
        for part, tensors in self._offload_parts().items():
            if part in self._offloaded or (state_only and part == "params"):
                continue
            self._offloaded[part] = {k: (t, host_copy(t)) for k, t in tensors.items()}
            for t in tensors.values():
                t.untyped_storage().resize_(0)

    def reload(self, params_only: bool = False) -> None:
        """Bring back what ``offload`` moved (only the parameters with ``params_only``)."""
        for part in [p for p in ("params", "state") if p in self._offloaded and not (params_only and p == "state")]:
            for t, host in self._offloaded.pop(part).values():
                t.untyped_storage().resize_(t.numel() * t.element_size())
                t.copy_(host, non_blocking=True)
        if self.device.type == "cuda":
            torch.cuda.current_stream().synchronize()

    @property
    def offloaded(self) -> bool:
        """Whether anything (parameters or training state) waits in host memory."""
        return bool(self._offloaded)

    @property
    def params_offloaded(self) -> bool:
        return "params" in self._offloaded

    def _check_loaded(self) -> None:
        if self.params_offloaded:
            raise RuntimeError("parameters are offloaded to host memory: call reload() first")


def _install_flat_parameters(model: Transformer, shards: DeviceShards, flat: torch.Tensor) -> None:
    """Replace every (meta) parameter of ``model`` by a view of ``flat`` at its shard's offset and local shape."""
    owners: dict[int, list[tuple[nn.Module, str]]] = defaultdict(list)
    for mod in model.modules():
        for attr, p in mod._parameters.items():
            if p is not None:
                owners[id(p)].append((mod, attr))
    named = dict(model.hf_named_parameters())
    expected = {s.name for s in shards.shards}
    if set(named) != expected:
        raise RuntimeError(f"stage parameters {sorted(set(named) ^ expected)} disagree with the layout table")
    for s in shards.shards:
        old = named[s.name]
        if old.dim() != len(s.local_shape):
            raise RuntimeError(f"{s.name}: model has {old.dim()} dims, the layout {len(s.local_shape)}")
        new = nn.Parameter(flat[s.offset:s.offset + s.num_elements].view(s.local_shape))
        for mod, attr in owners[id(old)]:
            setattr(mod, attr, new)
            if isinstance(mod, nn.Linear) and attr == "weight":
                mod.out_features, mod.in_features = s.local_shape
    model.tie_weights()
