"""Time of one model function call on one placement: ``t_call(call, placement, spec, profile, cluster)``.

Notation: placement (dp, tp, pp, m micro-batches, sp sequence parallel); per-stage layer times come from
the profile (``profile.layer_time_s`` / ``decode_time_s``, one tp rank, bilinear tables); T = tokens of
one micro-batch on one dp rank (``shapes.py``); h hidden size, V vocabulary, 2 bytes per element.

Per micro-batch stage times (``stage_forward_s`` etc.), for the slowest stage (max over stages):

  F = Σ_blocks fwd(T) + [embedding fwd] + [head fwd] + tp_comm_fwd
      (train calls; an inference call runs without autograd, so its blocks and embedding take the
      profile's no-grad ``prefill`` times — the same work, the KV-cache write aside — and its head the
      ``forward`` time: log-probs of every row, which the prefill's head does not compute)
  B = Σ_blocks (bwd(T) + fwd(T) if gradient checkpointing) + [embedding, head bwd] + tp_comm_bwd
      (with gradient checkpointing and a profile that has the checkpointed block ops, F takes
      ``forward_ckpt`` and B ``backward_ckpt`` for the blocks: the wrapped forward, and the backward that
      recomputes it, as measured; ``ckpt_block_ops``)
  tp_comm per block, forward and backward alike (``tp_block_comm_s``): 2 all-reduces of T·h·2 bytes
      over the tp group, or with sp 2 all-gathers + 2 reduce-scatters of the same buffer (the same
      bytes, twice the latency terms). The analytic profile's layer times exclude tp collectives
      (``includes_tp_comm: false``), so they are added here; a profile with ``includes_tp_comm: true``
      already contains them and this term is 0. Embedding: 1 all-reduce forward (vocab parallel);
      head: with sp an all-gather of its input, 2 small all-reduces (vocab-parallel log-softmax), and
      in decode an all-gather of the b·V/tp logits for sampling.
  p2p = α + T·h·2/(tp if sp else 1) / β  between neighbouring stages (ib when stages cross nodes).

Calls (``t_call``):

  train      = M · [ (pp + m − 1)·(F + B + 2·p2p) + dp_grad_allreduce + optimizer ]     M minibatches
               dp_grad_allreduce = all_reduce(4 bytes · params/(tp·pp) of the largest stage, dp group):
               ``FlatAdamW`` accumulates and reduces gradients in fp32, one collective per bucket of
               2^24 elements (+ α per extra bucket); ZeRO-1: reduce-scatter of the fp32 gradients, then
               all-gather of the updated weights in the compute dtype (d bytes, ``ModelOptions``);
               optimizer = params/device · profile.optimizer.time_s_per_param (/dp with ZeRO-1)
  train, graphed (``train_graphed``: the model config's ``train_cuda_graphs``, default on, tp = pp = 1,
               compiled blocks, and a profile with the ``train_graphed[_ckpt]`` tables): F + B = L·block
               train_graphed(T) (device time of forward + backward, replayed) + embedding and head
               forward and backward (eager tables)
  inference  = (pp + m − 1)·(F + p2p)
               graphed (``graphed=True``: a frozen model kept on its devices replays its embedding and
               blocks from CUDA graphs, ``reallm.model.graphs``; where ``inference_graphed``): the blocks
               take the profile's ``prefill_graphed`` device time at T (the calls here are b sequences of
               s tokens: equal lengths, which graphs run unpadded; ragged ones pad to ≤ 1/8 more
               rows, within the b·s this assumes of them); embedding and head as above. The
               planner charges the difference to the eager time as the model's host load
               (``tables.cost_candidate``): a model offloaded between calls runs eager.
  generate   = prefill + capture + Σ_{k=0}^{N−2} decode_round(P + k)
               prefill = (pp + m − 1)·(F_prefill(b, P) + p2p) + m·draw(b), b = sequences per micro-batch;
               F_prefill(b, P) = Σ_groups F_prefill(T = group tokens): with pp = 1 the prompts go through
               in groups (``shapes.prefill_groups``), with pp > 1 in one pass of T = b·P tokens;
               the prefill's head computes each prompt's last logits and the last stage draws
               token 0 from them (draw = max(S, S_host) below), so N new tokens take N − 1 decode steps,
               step k feeding token k at position P + k (``reallm.parallel.generate``)
               decode_round(K) = max(m, pp)·(slot(b, K) + p2p(b·h·2)) — the ring pipeline of
               generation: a token of micro-batch j needs all pp stages, so one decoding round of all
               m micro-batches takes max(m, pp) stage slots
               slot(b, K): one decode step of a stage (``stage_decode_s``), from its device time D and the
               host time H of the step loop (``profile.py``: a layer's ``decode`` and ``decode_host``):
                 D = Σ_blocks decode(b, K) + launch(b) + [head decode(b) + S(b)] + tp_decode_comm
                 H = Σ_blocks decode_host(b, K) + launch_host(b) + [head decode_host(b) + S_host(b)]
                 ([…]: last stage; S, S_host: the ``decode_step`` sampling tables, ``greedy`` or ``sample``
                 after ``ModelOptions.greedy``)
                 slot = max(D, H) with pp = 1: the host launches each step (one graph replay where
                 generation captures one) and its sampling without waiting for the device, except for the
                 end-of-batch check every 8 steps, so the slower of the two sets the pace (``slot_s``);
                 slot = D + H with pp > 1: a stage reads each input's control flag on the host, which
                 waits for the device, so host and device take turns
               capture = m·max over stages of [Σ_blocks decode_capture(b, P) + capture(b)
                 + head decode_capture(b)]: per micro-batch, the eager first step and the CUDA-graph capture
                 of the step beyond two ordinary steps (0 where nothing is captured, or N < 3)
               stream step (``stream_decode_priced``: an sm_90 profile with the stream tables, tp = pp = 1,
                 shapes that fit): the whole step is one replayed launch, so
                 D = Σ_blocks stream_decode(b, K) + stream_launch(b) + S(b), H = stream_launch_host + S_host,
                 and capture = m·[Σ_blocks stream_capture + decode_step stream_capture] (the runner made, the
                 weights packed, the cache permuted, the eager step and the capture)
               Σ decode_round is integrated over K ∈ [P, P+N−2] with the trapezoid rule on 9 points
               (exact where the table is linear in K, as decode is between grid points).

Not modelled: overlap of the dp all-reduce with backward (counted serial), kernel-level overlap of
tp collectives with compute, the host's launch of decode-time tp collectives, the idle device after
generation's end-of-batch check (every 8 steps, about one launch), stragglers, and data loading.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from planner.cost_model.collectives import all_gather_time_s, all_reduce_time_s, p2p_time_s, reduce_scatter_time_s
from planner.cost_model.profile import PLAIN_SAMPLING_MODE, STREAM_BLOCK_OPS, STREAM_STEP_OPS, LinkRate, Profile
from planner.cost_model.shapes import (
    DTYPE_BYTES,
    ModelOptions,
    Stage,
    groups_span_nodes,
    head_kind,
    max_params_per_device,
    pp_crosses_nodes,
    prefill_chunk_tokens,
    prefill_groups,
    prompt_len,
    seqs_per_micro_batch,
    stages_of,
    train_graphed,
)
from reallm import working_set
from reallm.dataflow import Call
from reallm.placement import Placement
from reallm.spec import ModelSpec

DECODE_INTEGRATION_POINTS = 9
#: ``FlatAdamW`` accumulates and reduces gradients in fp32.
GRAD_BYTES = 4
#: Elements per dp gradient bucket, one collective each (``reallm.parallel.optim.DEFAULT_BUCKET_NUMEL``).
DP_BUCKET_NUMEL = 1 << 24


@dataclass
class CallTime:
    """A call's estimated time and where it goes (all seconds)."""

    time_s: float
    terms: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class _Links:
    tp: LinkRate
    pp: LinkRate
    dp: LinkRate


def _links(p: Placement, profile: Profile, cluster) -> _Links:
    tp_link = "ib" if groups_span_nodes(cluster, p.tp_groups()[:1]) else "nvlink"
    pp_link = "ib" if pp_crosses_nodes(cluster, p) else "nvlink"
    dp_link = "ib" if groups_span_nodes(cluster, p.dp_groups()) else "nvlink"
    return _Links(profile.link(tp_link, p.tp), profile.link(pp_link, 2), profile.link(dp_link, p.dp))


# -- tensor-parallel collectives -----------------------------------------------------------------
def tp_block_comm_s(tokens: float, spec: ModelSpec, p: Placement, rate: LinkRate) -> float:
    """One block, one direction (forward or backward): 2 all-reduces, or 2 AG + 2 RS with sp."""
    if p.tp == 1:
        return 0.0
    buf = tokens * spec.hidden_size * DTYPE_BYTES
    if p.sequence_parallel:
        return 2 * (all_gather_time_s(buf, p.tp, rate) + reduce_scatter_time_s(buf, p.tp, rate))
    return 2 * all_reduce_time_s(buf, p.tp, rate)


def tp_embedding_comm_s(tokens: float, spec: ModelSpec, p: Placement, rate: LinkRate) -> float:
    """Vocab-parallel embedding forward: partial rows summed (reduce-scatter with sp)."""
    buf = tokens * spec.hidden_size * DTYPE_BYTES
    return (reduce_scatter_time_s if p.sequence_parallel else all_reduce_time_s)(buf, p.tp, rate)


def tp_head_comm_s(tokens: float, spec: ModelSpec, p: Placement, rate: LinkRate) -> float:
    """Head forward or backward: sp input all-gather, vocab-parallel log-softmax max/sum all-reduces."""
    if p.tp == 1 or spec.is_critic:
        return 0.0
    t = 2 * all_reduce_time_s(tokens * 4, p.tp, rate)
    if p.sequence_parallel:
        t += all_gather_time_s(tokens * spec.hidden_size * DTYPE_BYTES, p.tp, rate)
    return t


def tp_decode_comm_s(batch: float, num_blocks: int, has_head: bool, spec: ModelSpec, p: Placement,
                     rate: LinkRate) -> float:
    """One decode step of a stage: 2 all-reduces of b·h·2 per block; the head gathers b·V/tp logits."""
    if p.tp == 1:
        return 0.0
    t = num_blocks * 2 * all_reduce_time_s(batch * spec.hidden_size * DTYPE_BYTES, p.tp, rate)
    if has_head and not spec.is_critic:
        t += all_gather_time_s(batch * spec.vocab_size * DTYPE_BYTES, p.tp, rate)
    return t


# -- per-stage times ------------------------------------------------------------------------------
def ckpt_block_ops(spec: ModelSpec, p: Placement, profile: Profile, checkpointing: bool) -> bool:
    """Whether a train call's blocks take the profile's checkpointed ops (module docstring)."""
    return checkpointing and profile.has_op(spec, "block", "backward_ckpt", p.tp) and profile.has_op(
        spec, "block", "forward_ckpt", p.tp)


def stage_forward_s(st: Stage, spec: ModelSpec, p: Placement, profile: Profile, op: str, tokens: float,
                    seqlen: float, rate: LinkRate, head_op: Optional[str] = None,
                    block_op: Optional[str] = None) -> float:
    """Forward (op = forward) or prefill of one micro-batch on one stage, tp collectives included; the head
    takes ``head_op`` and the blocks ``block_op`` (default ``op``)."""
    comm = not profile.includes_tp_comm
    t = st.num_blocks * (profile.layer_time_s(spec, "block", block_op or op, p.tp, tokens, seqlen)
                         + (tp_block_comm_s(tokens, spec, p, rate) if comm else 0.0))
    if st.has_embedding:
        t += profile.layer_time_s(spec, "embedding", op, p.tp, tokens, seqlen)
        t += tp_embedding_comm_s(tokens, spec, p, rate) if comm and p.tp > 1 else 0.0
    if st.has_head:
        t += profile.layer_time_s(spec, head_kind(spec), head_op or op, p.tp, tokens, seqlen)
        t += tp_head_comm_s(tokens, spec, p, rate) if comm else 0.0
    return t


def stage_backward_s(st: Stage, spec: ModelSpec, p: Placement, profile: Profile, tokens: float, seqlen: float,
                     rate: LinkRate, checkpointing: bool) -> float:
    """Backward of one micro-batch on one stage; recomputes the blocks' forward under checkpointing."""
    comm = not profile.includes_tp_comm
    if ckpt_block_ops(spec, p, profile, checkpointing):
        blk = profile.layer_time_s(spec, "block", "backward_ckpt", p.tp, tokens, seqlen)
    else:
        blk = profile.layer_time_s(spec, "block", "backward", p.tp, tokens, seqlen)
        if checkpointing:
            blk += profile.layer_time_s(spec, "block", "forward", p.tp, tokens, seqlen)
    blk_comm = tp_block_comm_s(tokens, spec, p, rate) * (2 if checkpointing else 1) if comm else 0.0
    t = st.num_blocks * (blk + blk_comm)
    if st.has_embedding:
        t += profile.layer_time_s(spec, "embedding", "backward", p.tp, tokens, seqlen)
    if st.has_head:
        t += profile.layer_time_s(spec, head_kind(spec), "backward", p.tp, tokens, seqlen)
        t += tp_head_comm_s(tokens, spec, p, rate) if comm else 0.0
    return t


def sampling_mode(opts: ModelOptions, profile: Optional[Profile] = None, spec: Optional[ModelSpec] = None,
                  tp: int = 1) -> str:
    """Which ``decode_step`` sampling tables a generate call reads: ``greedy``, ``sample_plain`` (no top-k /
    top-p filter, where ``profile`` has those tables for ``spec`` at ``tp``) or ``sample``."""
    if opts.greedy:
        return "greedy"
    if (not opts.filtered_sampling and profile is not None
            and profile.has_op(spec, "decode_step", PLAIN_SAMPLING_MODE, tp)):
        return PLAIN_SAMPLING_MODE
    return "sample"


def stream_decode_priced(spec: ModelSpec, p: Placement, profile: Profile, opts: ModelOptions, batch: float) -> bool:
    """Do this generate call's decode steps run as the one-launch stream step, priced by the profile's
    stream tables? Where generation would choose it (``ModelOptions.stream_decode``: an sm_90 profile device;
    tp = pp = 1 and shapes that fit, ``working_set.stream_decode_unfit``) and the profile measured it."""
    return (opts.stream_decode and working_set.stream_decode_unfit(spec, batch, p.tp, p.pp) is None
            and all(profile.has_op(spec, "block", op, 1) for op in STREAM_BLOCK_OPS)
            and all(profile.has_op(spec, "decode_step", op, 1) for op in STREAM_STEP_OPS))


def stage_decode_s(st: Stage, spec: ModelSpec, p: Placement, profile: Profile, batch: float, kv_len: float,
                   rate: LinkRate, mode: str = "sample", stream: bool = False) -> tuple[float, float]:
    """(device s D, host s H) of one decode step of a stage (module docstring); ``mode``: greedy | sample;
    ``stream``: the whole model's step as the one-launch stream kernel (``stream_decode_priced``)."""
    def dec(kind: str, op: str) -> float:
        return profile.decode_time_s(spec, kind, p.tp, batch, kv_len, op)

    if stream:
        dev = st.num_blocks * dec("block", "stream_decode") + dec("decode_step", "stream_launch")
        host = dec("decode_step", "stream_launch_host")
        return dev + dec("decode_step", mode), host + dec("decode_step", f"{mode}_host")
    dev = st.num_blocks * dec("block", "decode") + dec("decode_step", "launch")
    host = st.num_blocks * dec("block", "decode_host") + dec("decode_step", "launch_host")
    if st.has_head and spec.is_critic:
        dev += dec("score_head", "decode")
    elif st.has_head:
        dev += dec("head", "decode") + dec("decode_step", mode)
        host += dec("head", "decode_host") + dec("decode_step", f"{mode}_host")
    if not profile.includes_tp_comm:
        dev += tp_decode_comm_s(batch, st.num_blocks, st.has_head, spec, p, rate)
    return dev, host


def slot_s(device_s: float, host_s: float, pp: int) -> float:
    """A decode slot from its device and host time: they overlap with pp = 1, take turns with pp > 1."""
    return max(device_s, host_s) if pp == 1 else device_s + host_s


def stage_capture_s(st: Stage, spec: ModelSpec, p: Placement, profile: Profile, batch: float,
                    kv_len: float, stream: bool = False) -> float:
    """One micro-batch's one-off eager first step and graph capture on a stage, beyond two ordinary steps
    (``stream``: the stream step's runner made, weights packed, cache permuted, first step and capture)."""
    if spec.is_critic:
        return 0.0
    if stream:
        return (st.num_blocks * profile.decode_time_s(spec, "block", p.tp, batch, kv_len, "stream_capture")
                + profile.decode_time_s(spec, "decode_step", p.tp, batch, kv_len, "stream_capture"))
    t = (st.num_blocks * profile.decode_time_s(spec, "block", p.tp, batch, kv_len, "decode_capture")
         + profile.decode_time_s(spec, "decode_step", p.tp, batch, kv_len, "capture"))
    if st.has_head:
        t += profile.decode_time_s(spec, "head", p.tp, batch, kv_len, "decode_capture")
    return t


def draw_s(spec: ModelSpec, p: Placement, profile: Profile, batch: float, mode: str) -> float:
    """The last stage's draw of one token for ``batch`` sequences (device and host overlap)."""
    if spec.is_critic:
        return 0.0
    return max(profile.decode_time_s(spec, "decode_step", p.tp, batch, 0.0, mode),
               profile.decode_time_s(spec, "decode_step", p.tp, batch, 0.0, f"{mode}_host"))


def pipeline_p2p_s(tokens: float, spec: ModelSpec, p: Placement, rate: LinkRate) -> float:
    """Send one micro-batch's activations to the next stage (scattered over tp ranks with sp)."""
    if p.pp == 1:
        return 0.0
    return p2p_time_s(tokens * spec.hidden_size * DTYPE_BYTES / (p.tp if p.sequence_parallel else 1), rate)


def pipeline_slots(p: Placement) -> int:
    """Stage slots a pipelined pass over m micro-batches takes: fill (pp − 1) + m."""
    return p.pp + p.num_micro_batches - 1


def dp_grad_allreduce_s(spec: ModelSpec, p: Placement, rate: LinkRate, opts: ModelOptions = ModelOptions()) -> float:
    """The dp gradient sum of the largest stage (fp32, bucketed), and with ZeRO-1 the weights' all-gather."""
    if p.dp == 1:
        return 0.0
    n = max_params_per_device(spec, p.tp, p.pp)
    extra_latency_s = (math.ceil(n / DP_BUCKET_NUMEL) - 1) * rate.latency_s
    if opts.zero_stage >= 1:
        return (reduce_scatter_time_s(GRAD_BYTES * n, p.dp, rate) + all_gather_time_s(opts.dtype_bytes * n, p.dp, rate)
                + 2 * extra_latency_s)
    return all_reduce_time_s(GRAD_BYTES * n, p.dp, rate) + extra_latency_s


def optimizer_s(spec: ModelSpec, p: Placement, profile: Profile, opts: ModelOptions) -> float:
    n = max_params_per_device(spec, p.tp, p.pp)
    return n * profile.optimizer_time_s_per_param / (p.dp if opts.zero_stage >= 1 else 1)


def sum_over_steps_s(f, k0: float, n: int, points: int = DECODE_INTEGRATION_POINTS) -> float:
    """Σ_{k=0}^{n−1} f(k0 + k) by the trapezoid rule on ``points`` evenly spaced K (exact for linear f)."""
    if n <= 0:
        return 0.0
    if n <= points:
        return sum(f(k0 + k) for k in range(n))
    ks = [k0 + (n - 1) * j / (points - 1) for j in range(points)]
    vals = [f(k) for k in ks]
    mean = (sum(vals) - 0.5 * (vals[0] + vals[-1])) / (points - 1)
    return n * mean


# -- calls ----------------------------------------------------------------------------------------
def inference_graphed(spec: ModelSpec, p: Placement, profile: Profile, opts: ModelOptions) -> bool:
    """Can an inference call of a frozen model replay its blocks from CUDA graphs? The executor's rule
    (``reallm.parallel.model.inference_graphs_usable``: tp = 1, compiled blocks, on CUDA), read off the
    profile: only a CUDA profile has the ``prefill_graphed`` table."""
    return p.tp == 1 and opts.compile_blocks and profile.has_op(spec, "block", "prefill_graphed", 1)


def t_call(call: Call, placement: Placement, spec: ModelSpec, profile: Profile, cluster,
           opts: ModelOptions = ModelOptions(), *, graphed: bool = False) -> CallTime:
    """Estimated wall time of ``call`` on ``placement`` (module docstring has the formulas). ``graphed``: an
    inference call replayed from CUDA graphs (where ``inference_graphed``; ignored elsewhere)."""
    p = placement
    links = _links(p, profile, cluster)
    sts = stages_of(spec, p.tp, p.pp)
    b = seqs_per_micro_batch(call, p)
    slots = pipeline_slots(p)
    if call.kind == "generate":
        P, N = prompt_len(call), call.max_new_tokens
        mode = sampling_mode(opts, profile, spec, p.tp)
        tok = b * P
        p2p = pipeline_p2p_s(tok, spec, p, links.pp)
        groups = prefill_groups(b, P, prefill_chunk_tokens(spec, p.tp, opts.dtype_bytes, opts.lean_memory)) if p.pp == 1 else [(tok, 1)]
        fwd = max(sum(n * stage_forward_s(st, spec, p, profile, "prefill", t, P, links.tp) for t, n in groups)
                  for st in sts)
        prefill = slots * (fwd + p2p) + p.num_micro_batches * draw_s(spec, p, profile, b, mode)
        p2p_dec = pipeline_p2p_s(b, spec, p, links.pp)
        ring = max(p.num_micro_batches, p.pp)
        stream = stream_decode_priced(spec, p, profile, opts, b)

        def round_s(kv: float) -> float:
            return ring * (max(slot_s(*stage_decode_s(st, spec, p, profile, b, kv, links.tp, mode, stream), p.pp)
                               for st in sts) + p2p_dec)

        capture = 0.0
        if N >= 3 or (stream and N >= 2):  # DecodeRunner: step 1 eager, step 2 captured (and replayed), then
            # replays; the stream step packs its weights and permutes the cache at step 1 (a cache of P + N)
            kv = working_set.stream_cache_len(P + N) if stream else P
            capture = p.num_micro_batches * max(stage_capture_s(st, spec, p, profile, b, kv, stream) for st in sts)
        decode = sum_over_steps_s(round_s, P, N - 1)
        return CallTime(prefill + capture + decode, {"prefill_s": prefill, "capture_s": capture, "decode_s": decode})
    tok, s = b * call.max_seqlen, call.max_seqlen
    p2p = pipeline_p2p_s(tok, spec, p, links.pp)
    if call.kind == "inference":
        blocks = {}
        if graphed and inference_graphed(spec, p, profile, opts):
            blocks = {"block_op": "prefill_graphed"}
        fwd = max(stage_forward_s(st, spec, p, profile, "prefill", tok, s, links.tp, head_op="forward", **blocks)
                  for st in sts)
        return CallTime(slots * (fwd + p2p), {"compute_s": slots * fwd, "pp_comm_s": slots * p2p})
    graph_op = "train_graphed_ckpt" if opts.gradient_checkpointing else "train_graphed"
    if train_graphed(opts, p.tp, p.pp) and profile.has_op(spec, "block", graph_op, p.tp):
        # TrainGraphs: the blocks' forward + backward as one replayed pair (device time); embedding and
        # head as eager (their tables), the embedding's inside the graph too but small.
        st = sts[0]
        fwd = (profile.layer_time_s(spec, "embedding", "forward", p.tp, tok, s)
               + profile.layer_time_s(spec, head_kind(spec), "forward", p.tp, tok, s))
        bwd = (st.num_blocks * profile.layer_time_s(spec, "block", graph_op, p.tp, tok, s)
               + profile.layer_time_s(spec, "embedding", "backward", p.tp, tok, s)
               + profile.layer_time_s(spec, head_kind(spec), "backward", p.tp, tok, s))
    else:
        blk_op = "forward_ckpt" if ckpt_block_ops(spec, p, profile, opts.gradient_checkpointing) else "forward"
        fwd = max(stage_forward_s(st, spec, p, profile, "forward", tok, s, links.tp, block_op=blk_op) for st in sts)
        bwd = max(stage_backward_s(st, spec, p, profile, tok, s, links.tp, opts.gradient_checkpointing)
                  for st in sts)
    dp_s = dp_grad_allreduce_s(spec, p, links.dp, opts)
    opt_s = optimizer_s(spec, p, profile, opts)
    M = call.n_minibatches
    compute = M * slots * (fwd + bwd)
    pp_comm = M * slots * 2 * p2p
    return CallTime(compute + pp_comm + M * (dp_s + opt_s),
                    {"compute_s": compute, "pp_comm_s": pp_comm, "dp_comm_s": M * dp_s, "optimizer_s": M * opt_s})
