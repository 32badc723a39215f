"""Measured cost profiles: the executor's own layer code timed on this device (``planner profile``).

For each model shape and tp degree t, one tp rank's part of a one-block model is built exactly as the
executor builds it (``ParallelModel.build``: per-rank shard shapes, vocabulary padding, kv heads split or
replicated, the tp hooks, the vocab-parallel embedding and log-probs, parameters as views of one flat
buffer, ``FlatAdamW`` and its fp32 gradient hooks) with a tp group of t members of which only rank 0
exists (``SoloTp``): every per-rank kernel of the tp code runs, the collectives move nothing. Their time
is the cost model's (``includes_tp_comm: false``), from the link rates.

What is timed (one call on one tp rank; ``T`` tokens packed in sequences of ``s``, ``b`` sequences
with ``K`` cached tokens)::

  embedding  forward   embed_tokens(ids)                 grad enabled (the first stage of a train call)
             backward  its backward: the dense weight gradient and the hook adding it to the fp32 buffer
             prefill   the same lookup without grad
  block      forward   DecoderLayer(x, ctx)              ctx: what Transformer.forward hands its blocks
             backward  backward of that output (input and weight gradients, fp32 accumulation hooks)
             forward_ckpt / backward_ckpt   the same under torch.utils.checkpoint, as gradient
                       checkpointing runs it (its backward recomputes the forward); optional tables
             prefill   DecoderLayer(x, ctx) without grad, writing the KV cache (ctx of a prefill call)
             prefill_graphed   the same without the KV cache, as an inference replica replays it from a
                       CUDA graph (``reallm.model.graphs``; where ``inference_graphed``): device time
             train_graphed / train_graphed_ckpt   forward + backward (plain / checkpointed) replayed from
                       a pair of graphs as ``TrainGraphs`` runs it, the fp32 accumulation of the block's
                       gradients included (where ``train_graphs_usable``: tp = 1, compiled, CUDA)
             decode    one step of b sequences at position K (ctx of Transformer.decode): device time,
                       host time and one-off capture cost as generation runs it (``decode_graphed``: a
                       replayed CUDA graph on CUDA with tp = 1, else eager; ``_decode_point``)
  head       forward   final norm + lm_head + LogitsShard.logprobs (the vocab-parallel log-softmax every
                       actor call computes, fused per chunk with compiled blocks: ``ParallelModel._wrap``)
                       backward: of those log-probs
             prefill   norm on all T rows, lm_head on each sequence's last row
             decode    norm + lm_head of b rows, as the block's decode
  decode_step          a step outside its layers (``launch``: the ring's slot bookkeeping, the positions,
                       ``DecodeRunner`` on the model with its blocks and head bypassed: embedding, rope,
                       input copies and the replay launch; its first two calls once: ``capture``), and the
                       draw of the next token: gather over tp + ``reallm.parallel.generate._sample`` with
                       greedy settings (``greedy``), with ``sampling`` (``sample``) and with temperature only
                       (``sample_plain``), device and host
  score_head forward / backward / prefill / decode: final norm + the critic's score
  optimizer  ParallelModel.optimizer_step (global norm, clipping, AdamW, write-back) / parameters
  host       pinned device -> host copy (``host_copy``, as ``offload``) and host -> device (``reload``)

Timing (``Timer``): CUDA events on CUDA, ``perf_counter`` on CPU. Token ops (``time_s``): a warm-up call,
one call to size the groups, then the median of 3-10 groups of back-to-back calls, each group ≥ 1.5 ms
and the whole point ≈ 30 ms. A block's token ops are timed on CUDA as a chain of k calls, each on the
previous call's output (``ProfileSettings.chain_tokens``: k = 8 up to 4096 tokens, fewer above, 1 from
32768), divided by k (a chain reuses one block, whose gradients reach the fp32 accumulation once per
backward: the timed backward adds the other k − 1 blocks' accumulations, ``_Accumulations``): where a
block is launch-bound, what counts is its host time inside a stack of blocks, and a lone call measured ~2× that (1.1B, T = 1024, no grad: 1.25 ms alone, 0.59 ms per block in a
chain of 4, 0.61 ms per block in the 22-block model; H100 host, session 4). On CUDA the groups follow each other without synchronisation (an event pair
around each): the steady state of a stream of layers, where a launch-bound call costs its host time and a
device-bound one its device time. Decode ops (``device_host_s``): generation's step loop never waits for
the device, so a step's device and host times are measured apart and combined by the cost model: a sleep
kernel holds the stream while the host issues a group of calls (the issue time is the host time), then
the device runs the group back to back (events around it: the device time). Graphed layers are timed as
graphs of 1 and ``DECODE_GRAPH_COPIES`` copies (``_decode_point``): the device time per copy, the host
time a copy adds to a replay, and the capture's cost per copy. On CPU the host does the work: host and
capture times are 0. Each row of a device or capture table is then made non-decreasing in tokens / K (and
decode tables in batch): a point over twice the time of a larger size is interpolated over between its
neighbours (``drop_bumps``: larger work bounds smaller work), then isotonic regression (``monotone``) takes
out the noise that makes a larger size look cheaper; the points moved are listed in the run's ``adjusted``. Host tables are stored as measured.

Grids: tables are ``seqlen × tokens`` (token ops) and ``batch × kv_len`` (decode); ops that do not
depend on the sequence length (embedding, head forward/backward, score head) get one seqlen row, head,
score-head and decode-step decode tables one kv_len column. Points that do not fit (out of memory, or a
KV cache over ``decode_cache_bytes_max``) are skipped with the rest of their row (larger sizes), listed in
the run's ``skipped``, and filled (``fill_table``): along the row's last measured segment (time is linear
in tokens and in K there), else along the batch axis; the filled points are listed in ``filled``.

Collectives: with ``torch.distributed`` initialised and world > 1 (``torchrun ... -m planner.cli profile``),
``measure_collectives`` times all-reduce, all-gather, reduce-scatter (and point-to-point for 2 ranks) on
groups of the first n ranks, n = 2, 4, ... ≤ world; bus bandwidth β = factor · ΔS / Δt between a small and
a large message, latency α = the small message's time (``collectives.py`` formulas: factor 2(n−1)/n for
all-reduce, (n−1)/n for the others). The link entry holds the all-reduce's α, β; every entry not measured
is the analytic one, marked ``"assumed": true``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.utils.checkpoint

from executor import comm
from executor.comm import Group
from planner.cost_model.analytic_profile import AnalyticRates, collective_rates
from planner.cost_model.profile import (
    CKPT_OPS,
    DECODE_OPS,
    GRAPHED_OPS,
    PLAIN_SAMPLING_MODE,
    PROFILE_FORMAT,
    PROFILE_VERSION,
    SAMPLING_MODES,
    TOKEN_OPS,
    Grids,
    profile_from_dict,
    shape_key,
    shape_of,
)
from reallm import working_set
from reallm.errors import UserError
from reallm.model.generate import DecodeRunner, GenerationConfig
from reallm.model.transformer import checkpointed
from reallm.placement import Placement
from reallm.spec import ModelSpec

REPO_ROOT = Path(__file__).resolve().parent.parent
GiB = 1 << 30


# -- settings --------------------------------------------------------------------------------------------
# ``Grids`` (the tables' axes) is defined with the schema, where the cost-model bench reads it back too.

#: H100: every 1.1B/7B/13B/70B-shaped layer at tp 1, 2, 4, 8 in a few minutes. Tokens double around the
#: knee between launch-bound and compute-bound; beyond the last point tables extrapolate linearly.
CUDA_GRIDS = Grids(tokens=(16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768), seqlens=(128, 1024, 8192),
                   batches=(1, 4, 16, 64, 256, 1024), kv_lens=(128, 512, 2048, 8192, 32768))
CUDA_QUICK_GRIDS = Grids(tokens=(64, 1024, 8192), seqlens=(256, 2048), batches=(1, 16, 128), kv_lens=(256, 4096))
CPU_GRIDS = Grids(tokens=(16, 64, 256, 1024), seqlens=(64, 256), batches=(1, 4, 16), kv_lens=(16, 128, 512))
CPU_QUICK_GRIDS = Grids(tokens=(16, 128), seqlens=(32,), batches=(1, 4), kv_lens=(16, 64))


def default_grids(device: str, quick: bool) -> Grids:
    if device == "cuda":
        return CUDA_QUICK_GRIDS if quick else CUDA_GRIDS
    return CPU_QUICK_GRIDS if quick else CPU_GRIDS


#: Sampling as a PPO actor's generation does it by default (``PPOHyperparameters``): top-k 200, top-p 0.9,
#: the logits mask recorded: the ``decode_step`` tables ``sample`` and ``sample_host``.
PPO_SAMPLING = GenerationConfig(max_new_tokens=2, min_new_tokens=0, greedy=False, temperature=1.0, top_k=200,
                                top_p=0.9, return_logits_mask=True)
#: Greedy generation (no logits mask): the ``decode_step`` tables ``greedy`` and ``greedy_host``.
GREEDY_SAMPLING = GenerationConfig(max_new_tokens=2, greedy=True)
#: Temperature-only sampling (top-k 0, top-p 1, no mask): the tables ``sample_plain`` and ``sample_plain_host``.
PLAIN_SAMPLING = GenerationConfig(max_new_tokens=2, min_new_tokens=0, greedy=False, temperature=1.0, top_k=0,
                                  top_p=1.0)
#: Block token ops on CUDA: chains of up to ``CHAIN_MAX`` calls of up to this many tokens in all
#: (``ProfileSettings.chain_tokens``): 8 calls up to 4096 tokens, 1 from 32768.
CUDA_CHAIN_TOKENS = 32768
CHAIN_MAX = 8
#: Graphed decode layers are timed as graphs of this many copies (and of one): the device time per copy and
#: the host time each extra copy adds to a replay (``LayerBench._decode_point``).
DECODE_GRAPH_COPIES = 4


@dataclass(frozen=True)
class ProfileSettings:
    device: str = "cpu"
    grids: Grids = CPU_GRIDS
    #: Time decode steps as replays of a captured CUDA graph where generation replays one (``decode_graphed``).
    decode_cuda_graph: bool = True
    #: Blocks as torch.compile'd regions (``ParallelModel.build(compile_blocks=True)``: CUDA, tp = 1), for
    #: runs that build their models so.
    compile_blocks: bool = False
    sampling: GenerationConfig = PPO_SAMPLING
    #: Block token ops are timed over a chain of k calls (each on the previous one's output, as the blocks of
    #: a stage run), k = min(``CHAIN_MAX``, this // tokens) ≥ 1; 0: single calls. On CUDA (``for_device``):
    #: where a block is launch-bound, its host time in a stack of blocks differs from a lone call's.
    chain_tokens: int = 0
    #: Skip decode points whose one-layer KV cache is larger (they are filled by extrapolation).
    decode_cache_bytes_max: int = 8 * GiB
    #: Wall time to spend per grid point (repeats are sized from it) and per group of calls.
    point_target_s: float = 0.03
    group_min_s: float = 1.5e-3
    min_repeats: int = 3
    max_repeats: int = 10
    show_progress: bool = True

    @classmethod
    def for_device(cls, device: str, **kw) -> ProfileSettings:
        """Settings as ``planner profile`` uses them on ``device`` (block chains on CUDA)."""
        kw.setdefault("chain_tokens", CUDA_CHAIN_TOKENS if device == "cuda" else 0)
        return cls(device=device, **kw)

    def chain_length(self, tokens: int) -> int:
        """Calls per chained timing of a block token op of ``tokens`` tokens (``chain_tokens``)."""
        return max(1, min(CHAIN_MAX, self.chain_tokens // max(tokens, 1)))

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.device == "cuda" else torch.float32

    @property
    def dtype_name(self) -> str:
        return "bf16" if self.device == "cuda" else "fp32"


# -- timing ----------------------------------------------------------------------------------------------
class Timer:
    """Median time of a call (module docstring); CUDA events on CUDA, perf_counter on CPU."""

    def __init__(self, settings: ProfileSettings, host_sync: Optional[list[str]] = None):
        self.s = settings
        self.cuda = settings.device == "cuda"
        #: ``device_host_s`` calls whose function waited for the device on the host (see there).
        self.host_sync = host_sync if host_sync is not None else []

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def _single_s(self, fn: Callable[[], Any]) -> float:
        """One call from an idle device: sizes the groups."""
        self._sync()
        t0 = time.perf_counter()
        fn()
        self._sync()
        return time.perf_counter() - t0

    def time_s(self, fn: Callable[[], Any], setup: Optional[Callable[[], Any]] = None) -> float:
        """Seconds per call of ``fn``; ``setup`` (untimed) runs before every timed call, which are then single.

        On CUDA the groups are issued back to back with an event pair around each and one synchronisation at
        the end: the steady state of a stream of layers, where a launch-bound call costs its host time and a
        device-bound one its device time (a synchronisation per group would add its wake-up to every group)."""
        if setup is not None:
            setup()
        fn()  # warm-up: lazy initialisation, kernel selection, JIT
        if setup is not None:
            setup()
        first = max(self._single_s(fn), 1e-7)
        inner = 1 if setup is not None else max(1, min(256, math.ceil(self.s.group_min_s / first)))
        reps = max(self.s.min_repeats, min(self.s.max_repeats, round(self.s.point_target_s / (inner * first))))
        if not self.cuda:
            samples = []
            for _ in range(reps):
                if setup is not None:
                    setup()
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn()
                samples.append((time.perf_counter() - t0) / inner)
            return statistics.median(samples)
        if setup is None:
            for _ in range(inner):  # lead-in: the queue reaches its steady state before the first event
                fn()
        events = []
        for _ in range(reps):
            if setup is not None:
                setup()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            events.append((start, end))
        self._sync()
        return statistics.median(a.elapsed_time(b) / 1e3 / inner for a, b in events)

    def device_host_s(self, fn: Callable[[], Any]) -> tuple[float, float]:
        """(device s, host s) per call of ``fn`` when the host issues calls without waiting for the device, as
        the generation loop does. On CUDA the stream is held by a sleep kernel while the host issues a group
        of calls: the host time is the issue time, and the device then runs the queued group back to back
        (events around it), so neither waits for the other. A group is redone with a longer sleep when the
        host did not finish issuing before the sleep ended; ``fn`` that synchronises (the host cannot get
        ahead: the loop cannot overlap it either) gets (its back-to-back time ``time_s``, 0), noted in
        ``host_sync``. On CPU: (``time_s(fn)``, 0) — the host does the work."""
        if not self.cuda:
            return self.time_s(fn), 0.0
        fn()  # warm-up
        self._sync()
        t0 = time.perf_counter()
        fn()
        host1 = time.perf_counter() - t0
        self._sync()
        wall1 = max(time.perf_counter() - t0, 1e-7)
        # Groups of at most 16 calls keep the launch queue short (a full queue would block the host).
        n = max(1, min(16, math.ceil(self.s.group_min_s / wall1)))
        reps = max(self.s.min_repeats, min(self.s.max_repeats, round(self.s.point_target_s / (n * wall1))))
        sleep_s = 2.0 * n * host1 + 1e-3
        devices, hosts = [], []
        tries = 0
        while len(devices) < reps:
            cycles = self._sleep_cycles(sleep_s)
            self._sync()
            e0, e1, e2 = (torch.cuda.Event(enable_timing=True) for _ in range(3))
            e0.record()
            torch.cuda._sleep(cycles)
            e1.record()
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            issue = time.perf_counter() - t0
            e2.record()
            self._sync()
            slept = e0.elapsed_time(e1) / 1e3
            if issue > 0.8 * slept:  # the device may have waited for the host: not its own time
                tries += 1
                if tries > 4:
                    self.host_sync.append(f"{getattr(fn, '__qualname__', fn)}: {issue * 1e3:.2f} ms to issue {n} "
                                          f"call(s) under {slept * 1e3:.2f} ms of sleep; timed back to back")
                    return self.time_s(fn), 0.0
                sleep_s = 2.0 * issue + 1e-3
                continue
            devices.append(e1.elapsed_time(e2) / 1e3 / n)
            hosts.append(issue / n)
        return statistics.median(devices), statistics.median(hosts)

    def _sleep_cycles(self, seconds: float) -> int:
        """``torch.cuda._sleep`` cycles lasting about ``seconds`` (clock rate measured once)."""
        if getattr(self, "_cycles_per_s", None) is None:
            cycles = 1 << 20
            torch.cuda._sleep(cycles)  # warm-up
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            torch.cuda._sleep(cycles)
            b.record()
            self._sync()
            self._cycles_per_s = cycles / max(a.elapsed_time(b) / 1e3, 1e-6)
        return int(seconds * self._cycles_per_s)

    def wall_s(self, fn: Callable[[], Any]) -> float:
        """One call from an idle device to an idle device: a one-off cost (a graph capture)."""
        return self._single_s(fn)


def graphed(fn: Callable[[], Any], blas: Optional[str] = None) -> tuple[Callable[[], None], Any]:
    """``fn`` captured in a CUDA graph: (replay, its static output). Warmed up and captured on generation's
    capture stream, as ``reallm.model.generate.DecodeRunner`` does (lazy library init and Triton JIT must not
    be captured); ``blas``: the BLAS library its products come from (``DecodeRunner.BLAS`` for decode)."""
    from reallm.model.generate import _blas, _capture_stream

    stream = _capture_stream(torch.device("cuda", torch.cuda.current_device()))
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), _blas(blas):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with _blas(blas), torch.cuda.graph(graph, stream=stream):
        out = fn()
    return graph.replay, out


# -- one tp rank alone -----------------------------------------------------------------------------------
def solo_tp_group(tp: int):
    """A tp axis of ``tp`` members where only rank 0 exists: collectives return the local data (all-gather
    concatenates copies, so shapes are right). Built lazily: ``reallm.parallel`` imports torch."""
    from reallm.parallel.groups import AxisGroup

    @dataclass(frozen=True)
    class SoloTp(AxisGroup):
        def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
            return t

        def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
            return t

        def all_gather(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
            return t if self.size == 1 else torch.cat([t] * self.size, dim=dim)

        def reduce_scatter(self, t: torch.Tensor) -> torch.Tensor:
            return t if self.size == 1 else t.chunk(self.size, dim=0)[self.index].contiguous()

    ranks = tuple(range(tp))
    return SoloTp(Group(ranks, None), ranks, 0)


def rank0_model(spec: ModelSpec, tp: int, settings: ProfileSettings, *, is_critic: bool = False):
    """tp rank 0's ``ParallelModel`` of a one-block ``spec`` (embedding, block, head), trainable, random
    weights drawn on the device (the layout's per-shard draws would cost minutes for a 70B layer)."""
    from reallm.model.optim import OptimizerSettings
    from reallm.parallel.groups import AxisGroup, ParallelGroups
    from reallm.parallel.model import ParallelModel

    placement = Placement(devices=tuple(range(tp)), tp=tp)
    one = AxisGroup(Group((0,), None), (0,), 0)
    groups = ParallelGroups(placement=placement, rank=0, coord=placement.coord(0), tp=solo_tp_group(tp), pp=one,
                            dp=one, replica=Group((0,), None), mesh=Group((0,), None))
    extra = {"compile_blocks": True} if settings.compile_blocks else {}
    if settings.compile_blocks:
        # Backward is timed repeatedly over one graph (retain_graph=True), which compiled backward graphs with
        # donated buffers refuse; donation only saves memory, not time.
        from torch._functorch import config as functorch_config

        functorch_config.donated_buffer = False
    pm = ParallelModel.build(None, groups, is_critic=is_critic, dtype=settings.dtype, device=settings.device,
                             optimizer=OptimizerSettings(), total_steps=1000,
                             spec=dataclasses.replace(spec, num_layers=1), **extra)
    with torch.no_grad():
        pm.flat.normal_(0.0, 0.02)
    return pm


def decode_graphed(model, settings: ProfileSettings) -> bool:
    """Does generation replay this stage's decode steps from a CUDA graph? The executor's rule
    (``reallm.parallel.generate``): on CUDA, without tp hooks (their NCCL collectives are not captured)."""
    return settings.decode_cuda_graph and settings.device == "cuda" and not model.has_tp_hooks()


def inference_graphed(pm) -> bool:
    """Does an inference replica of this rank's model replay its forward from CUDA graphs? The executor's
    rule (``reallm.parallel.model.inference_graphs_usable``)."""
    from reallm.parallel.model import inference_graphs_usable

    return inference_graphs_usable(pm.model, pm.placement, pm.device, pm.dtype)


def reset_cuda_generator(log: Optional[RunLog] = None) -> None:
    """``reallm.model.graphs.reset_cuda_generator`` after a failed capture; a failure is logged."""
    from reallm.model import graphs

    try:
        graphs.reset_cuda_generator()
    except Exception as e:  # noqa: BLE001 - best effort; the run's errors say what happened
        if log is not None:
            log.errors.append(f"resetting the CUDA generator after a failed capture: {type(e).__name__}: {e}")


class _Accumulations:
    """``others(n)``: n more accumulations of a block's parameter gradients into fp32 buffers — what the
    hooks of n other blocks add (``FlatAdamW.grad_accumulator``) — for a chain that reuses one block."""

    def __init__(self, layer: torch.nn.Module):
        self.pairs = [(torch.zeros_like(p, dtype=torch.float32), torch.randn_like(p)) for p in layer.parameters()]

    def __call__(self, n: int) -> None:
        for _ in range(n):
            for acc, grad in self.pairs:
                acc.add_(grad)


class _Wrapped(torch.nn.Module):
    """``fn(x)`` as a module whose parameters are ``model``'s (what ``make_graphed_callables`` graphs)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], model: torch.nn.Module):
        super().__init__()
        self.model, self._fn = model, fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fn(x)


class _Captured(Exception):
    pass


def blocks_input(model, run: Callable[[], Any]):
    """(hidden states, per-call context) that ``run()`` (a ``model.forward`` or ``model.decode`` call) hands to
    the blocks: a block timed with them runs exactly the code of that whole-model call. The call stops there."""
    seen = []

    def stop(h, ctx):
        seen.append((h, ctx))
        raise _Captured

    model._blocks = stop  # an instance attribute shadows the method for this one call
    try:
        run()
    except _Captured:
        pass
    finally:
        del model._blocks
    return seen[0]


def packed_batch(tokens: int, seqlen: int, vocab_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``tokens`` random ids packed in sequences of ``seqlen`` (one shorter remainder; one sequence if fewer)."""
    n, rest = divmod(tokens, seqlen)
    lengths = [seqlen] * n + ([rest] if rest else [])
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
    ids = torch.randint(0, vocab_size, (tokens,), dtype=torch.int64)
    return ids.to(device), cu.to(device)


class _SamplerState:
    """What ``reallm.parallel.generate._sample`` reads and appends to for one micro-batch of ``batch``."""

    def __init__(self, batch: int, device):
        self.u_BN = torch.rand(batch, 2, dtype=torch.float64, device=device)
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.eos_t = torch.tensor([2], dtype=torch.int64, device=device)
        self.out_tok: list = []
        self.out_lp: list = []
        self.out_mask: list = []


def sample_like_generation(pm, logits_shard_BW: torch.Tensor, state: _SamplerState, cfg: GenerationConfig) -> None:
    """The last stage's per-step work after the head: gather the logits over tp and draw, exactly as
    ``reallm.parallel.generate`` does (its ``_sample``: sampling and bookkeeping; token 1 of 2, so no
    end-of-batch check)."""
    from reallm.parallel.generate import _sample
    from reallm.parallel.vocab import gather_last_logits

    state.out_tok, state.out_lp, state.out_mask = [], [], []
    _sample(state, gather_last_logits(logits_shard_BW, pm.groups.tp), cfg, 1, [2], state.eos_t, 0, 2,
            pm.spec.vocab_size)


@contextlib.contextmanager
def layers_bypassed(model):
    """``model.decode`` without its blocks and head (instance attributes shadow the methods): what a decode
    step costs outside its layers."""
    model._blocks = lambda h, ctx: h
    model._head = lambda h, select_rows: h
    try:
        yield model
    finally:
        del model._blocks, model._head


# -- tables ----------------------------------------------------------------------------------------------
class SkipPoint(Exception):
    """A grid point that cannot be measured here (the reason is recorded)."""


def fill_table(xs: Sequence[float], ys: Sequence[float], values: list[list[Optional[float]]]
               ) -> tuple[Optional[list[list[float]]], list[tuple[float, float]]]:
    """Complete a table whose missing points (None) lie at the end of their rows: along the row's last two
    measured points, else from the two previous rows at that column, else proportionally from the nearest
    measured point. Never below the row's previous value. Returns (table or None if hopeless, filled points)."""
    out = [list(r) for r in values]
    filled = []
    for i in range(len(xs)):
        known = [j for j in range(len(ys)) if values[i][j] is not None]
        for j in range(len(ys)):
            if out[i][j] is not None:
                continue
            left = [k for k in known if k < j]
            if len(left) >= 2:
                a, b = left[-2:]
                v = out[i][b] + (out[i][b] - out[i][a]) * (ys[j] - ys[b]) / (ys[b] - ys[a])
            elif i >= 2 and out[i - 1][j] is not None and out[i - 2][j] is not None:
                v = out[i - 1][j] + (out[i - 1][j] - out[i - 2][j]) * (xs[i] - xs[i - 1]) / (xs[i - 1] - xs[i - 2])
            elif left:
                v = out[i][left[-1]] * ys[j] / ys[left[-1]]
            elif i >= 1 and out[i - 1][j] is not None:
                v = out[i - 1][j] * xs[i] / xs[i - 1]
            else:
                return None, filled
            if j > 0 and out[i][j - 1] is not None:
                v = max(v, out[i][j - 1])
            out[i][j] = max(v, 0.0)
            filled.append((xs[i], ys[j]))
    return out, filled


def isotonic(values: Sequence[float]) -> list[float]:
    """The non-decreasing sequence closest in least squares (pool adjacent violators): noise that makes a
    larger size look cheaper is averaged with its neighbours, a flat launch-bound floor stays unbiased."""
    blocks: list[list[float]] = []  # [sum, count]
    for v in values:
        blocks.append([v, 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            s_, n_ = blocks.pop()
            blocks[-1][0] += s_
            blocks[-1][1] += n_
    return [s_ / n_ for s_, n_ in blocks for _ in range(n_)]


#: A point measured over this many times a larger size's time is an artifact, not the op's cost.
BUMP_RATIO = 2.0


def drop_bumps(values: Sequence[float], ys: Sequence[float], ratio: float = BUMP_RATIO) -> list[float]:
    """Points that took over ``ratio`` × the time of some larger size, or over ``ratio`` × the time a smaller
    size scales to linearly (y_j / y_k × t_k: a fixed cost plus a per-unit one never grows faster), replaced
    by linear interpolation (in y) between their nearest kept neighbours; the last point is judged only by
    the first rule. Larger work bounds smaller work from above (pad it), so such a point measured something
    else: a transient slow path, allocator churn or interference (the Qwen2-0.5B head forward at 2048-8192
    tokens once measured 35-140 ms against 12 ms at 16384, and later 14.0 ms at 8192 against 3.1 at 4096
    and 12.1 at 16384). Isotonic regression alone would average the bump into its neighbours."""
    v = list(values)
    n = len(v)
    later_min = [float("inf")] * n
    for j in range(n - 2, -1, -1):
        later_min[j] = min(later_min[j + 1], v[j + 1])
    per_unit_min = [float("inf")] * n  # the least time per unit of y among the smaller sizes
    for j in range(1, n):
        per_unit_min[j] = min(per_unit_min[j - 1], v[j - 1] / ys[j - 1])
    kept = [v[j] <= ratio * later_min[j] and (j == n - 1 or v[j] <= ratio * ys[j] * per_unit_min[j])
            for j in range(n)]
    out = list(v)
    for j in range(n):
        if kept[j]:
            continue
        lo = next((i for i in range(j - 1, -1, -1) if kept[i]), None)
        hi = next(i for i in range(j + 1, n) if kept[i])  # the last point is always kept
        if lo is None:
            out[j] = v[hi]
        else:
            f = (ys[j] - ys[lo]) / (ys[hi] - ys[lo])
            out[j] = v[lo] + f * (v[hi] - v[lo])
    return out


def monotone(values: list[list[Optional[float]]], along_x: bool,
             ys: Optional[Sequence[float]] = None) -> list[list[Optional[float]]]:
    """Each row's measured points made non-decreasing (``isotonic``) in y (tokens, kv_len), and for decode
    tables (``along_x``) each column in x (batch) too, then the rows again. Time never falls when the work
    grows; seqlen is left alone (a prefill head selects fewer rows from longer sequences). With the row
    coordinates ``ys``, bumps (``drop_bumps``) are interpolated over first."""
    out = [list(r) for r in values]
    if ys is not None:
        for r in out:
            n = sum(v is not None for v in r)
            r[:n] = drop_bumps(r[:n], ys[:n])

    def rows():
        for r in out:
            n = sum(v is not None for v in r)  # measured points lead each row
            r[:n] = isotonic(r[:n])

    rows()
    if along_x:
        for j in range(len(out[0])):
            col = [out[i][j] for i in range(len(out))]
            n = sum(v is not None for v in col)
            if col[:n] == [v for v in col if v is not None]:
                for i, v in enumerate(isotonic(col[:n])):
                    out[i][j] = v
        rows()
    return out


def _sig(x: float) -> float:
    return float(f"{x:.5g}")


@dataclass
class RunLog:
    """What one profiler run records besides the tables."""

    skipped: list[str] = field(default_factory=list)
    filled: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    #: Measured points that ``monotone`` moved by more than 0.1 %: raw -> stored.
    adjusted: list[str] = field(default_factory=list)
    optimizer_points: list[dict] = field(default_factory=list)
    host: dict = field(default_factory=dict)
    #: Decode calls that wait for the device on the host (``Timer.device_host_s``).
    host_sync: list[str] = field(default_factory=list)


class _Progress:
    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:  # the GPU machine may lack it; progress is a convenience
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, unit="pt", dynamic_ncols=True, desc="profile", file=sys.stderr)

    def step(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def describe(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description_str(text, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def points_per_config(g: Grids, graphed: bool = False, stream: bool = False) -> int:
    """Grid points measured for one (shape, tp): progress bar total. ``graphed``: the graphed block tables
    too (``prefill_graphed``, ``train_graphed[_ckpt]``: CUDA, tp = 1, compiled blocks); ``stream``: the
    stream step's (CUDA, tp = 1: batches up to its 64 rows)."""
    nt, ns, nb, nk = len(g.tokens), len(g.seqlens), len(g.batches), len(g.kv_lens)
    # embedding; block (forward, backward, prefill, checkpointed forward and backward; decode); head;
    # decode step (launch, 3 sampling modes); score head; optimizer
    return ((3 * nt) + (5 * ns * nt + nb * nk) + (2 * nt + ns * nt + nb) + 3 * nb + (3 * nt + nb) + 1
            + (3 * ns * nt if graphed else 0)
            + (sum(b <= working_set.STREAM_ROWS for b in g.batches) * nk if stream else 0))


def stream_profiled(spec: ModelSpec, tp: int, settings: ProfileSettings) -> bool:
    """Does this run time the stream step for ``spec`` at ``tp`` (``LayerBench.stream_step``)? Where generation
    would run it: CUDA graphs on an sm_90 GPU, tp = 1, shapes that fit (the model's own checks follow there)."""
    return (settings.device == "cuda" and tp == 1 and settings.decode_cuda_graph
            and working_set.stream_decode_device(device_name(settings.device))
            and working_set.stream_decode_unfit(spec, 1) is None)


def split_stream_point(one: tuple[float, float, float], three: tuple[float, float, float]
                       ) -> tuple[float, float, float, float, float]:
    """(device, host, one-off) seconds of stream steps over 1- and 3-block models → (a block's device share,
    a block's one-off share, device outside the blocks, host, one-off outside the blocks): the blocks' share
    is half the difference, the rest what the 1-block step has beyond one block (clamped at 0: noise)."""
    (d1, h1, c1), (d3, _, c3) = one, three
    per, per_capture = max((d3 - d1) / 2, 0.0), max((c3 - c1) / 2, 0.0)
    return per, per_capture, max(d1 - per, 0.0), h1, max(c1 - per_capture, 0.0)


# -- the measurements of one (shape, tp) -----------------------------------------------------------------
class LayerBench:
    """Times every layer kind and op of one tp rank's one-block model (module docstring)."""

    def __init__(self, spec: ModelSpec, tp: int, settings: ProfileSettings, timer: Timer, log: RunLog,
                 progress: _Progress):
        self.spec, self.tp, self.s, self.timer, self.log, self.progress = spec, tp, settings, timer, log, progress
        self.key = shape_key(spec)
        self.dev = torch.device(settings.device)
        self.graph = False  # decided per model, as the executor decides (``decode_graphed``)

    # -- table driver ------------------------------------------------------------------------------------
    def table(self, kind: str, op: str, x_name: str, xs: Sequence[int], y_name: str, ys: Sequence[int],
              point: Callable[[int, int], float]) -> Optional[dict]:
        """Measure ``point(x, y)`` over the grid; after a point that does not fit, the rest of its row is skipped."""
        return self.tables(kind, (op,), x_name, xs, y_name, ys, lambda x, y: (point(x, y),))[op]

    def tables(self, kind: str, ops: Sequence[str], x_name: str, xs: Sequence[int], y_name: str,
               ys: Sequence[int], point: Callable[[int, int], Sequence[float]]) -> dict[str, Optional[dict]]:
        """``table`` for a ``point`` that measures several ops at once (one value per op)."""
        where = f"{self.key} {kind} tp={self.tp}"
        values = {op: [[None] * len(ys) for _ in xs] for op in ops}
        for i, x in enumerate(xs):
            for j, y in enumerate(ys):
                reason = None
                try:
                    for op, v in zip(ops, point(x, y), strict=True):
                        values[op][i][j] = v
                except SkipPoint as e:
                    reason = str(e)
                except torch.OutOfMemoryError:
                    reason = "out of memory"
                if reason is not None:
                    gc.collect()
                    if self.s.device == "cuda":
                        torch.cuda.empty_cache()
                    self.log.skipped.append(f"{where} {'/'.join(ops)} {x_name}={x} {y_name}>={y}: {reason}")
                    self.progress.step(len(ys) - j)
                    break
                self.progress.step()
        out = {}
        for op in ops:
            # Host times are left as measured: launching does not get dearer with the sizes, and a call the
            # host cannot get ahead of records 0 (``Timer.device_host_s``).
            along_x = op not in TOKEN_OPS + CKPT_OPS + GRAPHED_OPS
            smooth = values[op] if op.endswith("_host") else monotone(values[op], along_x=along_x, ys=ys)
            self.log.adjusted += [f"{where} {op} {x_name}={x} {y_name}={y}: {v:.4g} -> {w:.4g} s"
                                  for x, rv, rw in zip(xs, values[op], smooth) for y, v, w in zip(ys, rv, rw)
                                  if v is not None and abs(w - v) > 1e-3 * v]
            full, filled = fill_table(xs, ys, smooth)
            if full is None:
                self.log.skipped.append(f"{where} {op}: too few points fit to fill the table; analytic fallback")
                out[op] = None
                continue
            self.log.filled += [f"{where} {op} {x_name}={x:g} {y_name}={y:g}" for x, y in filled]
            out[op] = {x_name: list(xs), y_name: list(ys), "time_s": [[_sig(v) for v in row] for row in full]}
        return out

    def _time(self, fn, setup=None, grad: bool = True) -> float:
        with torch.set_grad_enabled(grad):
            return self.timer.time_s(fn, setup)

    def _hidden(self, rows: int, grad: bool) -> torch.Tensor:
        x = torch.randn(rows, self.spec.hidden_size, dtype=self.s.dtype, device=self.dev)
        return x.requires_grad_(grad)

    def _decode_point(self, fn: Callable[[], Any]) -> tuple[float, float, float]:
        """(device, host, capture) seconds of one layer call ``fn`` in a decode step as generation runs it
        (``profile.py``'s ``decode``, ``decode_host``, ``decode_capture``). Where generation replays a graph
        (``self.graph``): graphs of 1 and c = ``DECODE_GRAPH_COPIES`` copies of ``fn``, replayed with the host
        ahead of the device: device = D_c / c; host = (H_c − H_1)/(c − 1), what a copy adds to the replay's
        launch; capture = (W_c − W_1)/(c − 1) − device, W the wall time of warm-up + capture (an eager
        first step and a capture, beyond two ordinary steps). Eager: the call's own device and host times."""
        if not self.graph:
            dev, host = self.timer.device_host_s(fn)
            return dev, host, 0.0
        c = DECODE_GRAPH_COPIES
        fn()  # a new shape's compilation (compiled blocks) is no part of a capture's cost
        runs = {}
        for k in (1, c):
            box = {}

            def capture(k=k, box=box):
                with torch.no_grad():
                    box["replay"], box["out"] = graphed(lambda: [fn() for _ in range(k)], DecodeRunner.BLAS)

            wall = self.timer.wall_s(capture)
            dev, host = self.timer.device_host_s(box["replay"])
            runs[k] = (dev, host, wall)
            box.clear()
        (_, h1, w1), (dc, hc, wc) = runs[1], runs[c]
        dev = dc / c
        return dev, max((hc - h1) / (c - 1), 0.0), max((wc - w1) / (c - 1) - dev, 0.0)

    def _check_cache(self, model, batch: int, max_len: int) -> None:
        layer = next(iter(model.model.layers.values()))
        kv_width = layer.self_attn.k_proj.weight.shape[0]
        cache_bytes = 2 * batch * max_len * kv_width * torch.finfo(self.s.dtype).bits // 8
        if cache_bytes > self.s.decode_cache_bytes_max:
            raise SkipPoint(f"one layer's KV cache {cache_bytes / GiB:.1f} GiB > "
                            f"{self.s.decode_cache_bytes_max / GiB:g} GiB (decode_cache_bytes_max)")

    # -- actor: embedding, block, head, optimizer ----------------------------------------------------------
    def actor(self) -> dict:
        g = self.s.grids
        pm = rank0_model(self.spec, self.tp, self.s)
        model = pm.model
        self.graph = decode_graphed(model, self.s)
        emb = model.model.embed_tokens
        layer = next(iter(model.model.layers.values()))
        V, mid_s = self.spec.vocab_size, g.seqlens[len(g.seqlens) // 2]
        one_row = (mid_s,)
        out: dict = {"embedding": {}, "block": {}, "head": {}}

        def emb_fwd(s, T):
            ids, _ = packed_batch(T, s, V, self.dev)
            return self._time(lambda: emb(ids))

        def emb_bwd(s, T):
            ids, _ = packed_batch(T, s, V, self.dev)
            y = emb(ids)
            gy = torch.randn_like(y)
            return self._time(lambda: torch.autograd.backward(y, gy, retain_graph=True))

        def emb_prefill(s, T):
            ids, _ = packed_batch(T, s, V, self.dev)
            return self._time(lambda: emb(ids), grad=False)

        for op, fn in (("forward", emb_fwd), ("backward", emb_bwd), ("prefill", emb_prefill)):
            out["embedding"][op] = self.table("embedding", op, "seqlen", one_row, "tokens", g.tokens, fn)

        def blk_ctx(s, T, grad):
            ids, cu = packed_batch(T, s, V, self.dev)
            with torch.set_grad_enabled(grad):
                return blocks_input(model, lambda: model(ids, cu))[1]

        def chain(x, ctx, k, call=layer):  # k calls, each on the previous output, as a stage's blocks run
            for _ in range(k):
                x = call(x, ctx)
            return x

        def blk_fwd(s, T):
            ctx, x, k = blk_ctx(s, T, True), self._hidden(T, True), self.s.chain_length(T)
            return self._time(lambda: chain(x, ctx, k)) / k

        # A chain reuses one block: its parameters' gradients reach the fp32 accumulation hooks once per
        # backward, where k blocks would each add theirs; the timed backward adds the k − 1 others.
        others = _Accumulations(layer)

        def blk_bwd(s, T):
            ctx, x, k = blk_ctx(s, T, True), self._hidden(T, True), self.s.chain_length(T)
            y = chain(x, ctx, k)
            gy = torch.randn_like(y)
            return self._time(lambda: (torch.autograd.backward(y, gy, retain_graph=True), others(k - 1))) / k

        def blk_prefill(s, T):
            ids, cu = packed_batch(T, s, V, self.dev)
            cache = model.new_kv_cache(cu.numel() - 1, min(s, T))
            with torch.no_grad():
                ctx = blocks_input(model, lambda: model(ids, cu, kv_cache=cache))[1]
            x, k = self._hidden(T, False), self.s.chain_length(T)
            return self._time(lambda: chain(x, ctx, k), grad=False) / k

        def blk_decode(b, K):
            self._check_cache(model, b, K + 1)
            cache = model.new_kv_cache(b, K + 1)
            ids = torch.randint(0, V, (b,), device=self.dev)
            pos = torch.full((b,), K, dtype=torch.int64, device=self.dev)
            with torch.no_grad():
                ctx = blocks_input(model, lambda: model.decode(ids, pos, cache))[1]
            x = self._hidden(b, False)
            with torch.no_grad():
                return self._decode_point(lambda: layer(x, ctx))

        def ckpt(x, ctx):  # as Transformer._blocks runs a block under gradient checkpointing
            return checkpointed(layer, x, ctx)

        def blk_fwd_ckpt(s, T):
            ctx, x, k = blk_ctx(s, T, True), self._hidden(T, True), self.s.chain_length(T)
            return self._time(lambda: chain(x, ctx, k, ckpt)) / k

        def blk_bwd_ckpt(s, T):  # a fresh checkpointed forward before each timed backward (it recomputes)
            ctx, x, k = blk_ctx(s, T, True), self._hidden(T, True), self.s.chain_length(T)
            gy, box = torch.randn_like(x), {}

            def setup():
                box["y"] = chain(x, ctx, k, ckpt)

            return self._time(lambda: (torch.autograd.backward(box.pop("y"), gy), others(k - 1)), setup) / k

        def blk_prefill_graphed(s, T):  # an inference forward's blocks replayed from one graph (chain of k)
            ids, cu = packed_batch(T, s, V, self.dev)
            with torch.no_grad():
                ctx = blocks_input(model, lambda: model(ids, cu))[1]  # replayed on the same boundaries
                x, k = self._hidden(T, False), self.s.chain_length(T)
                replay, _ = graphed(lambda: chain(x, ctx, k))
            return self._time(replay, grad=False) / k

        graphed_ops = (("prefill_graphed", blk_prefill_graphed),) if inference_graphed(pm) else ()
        for op, fn in (("forward", blk_fwd), ("backward", blk_bwd), ("prefill", blk_prefill),
                       ("forward_ckpt", blk_fwd_ckpt), ("backward_ckpt", blk_bwd_ckpt)) + graphed_ops:
            if op in CKPT_OPS + GRAPHED_OPS:
                try:  # optional tables (the cost model has a fallback): a failure costs only them
                    table = self.table("block", op, "seqlen", g.seqlens, "tokens", g.tokens, fn)
                except Exception as e:  # noqa: BLE001
                    self.log.errors.append(f"{self.key} block tp={self.tp} {op}: {type(e).__name__}: {e}")
                    table = None
                if table is not None:
                    out["block"][op] = table
                continue
            out["block"][op] = self.table("block", op, "seqlen", g.seqlens, "tokens", g.tokens, fn)
        out["block"].update(self.tables("block", DECODE_OPS, "batch", g.batches, "kv_len", g.kv_lens, blk_decode))

        def logprobs(x, ids, cu):  # the executor's own wrapping (vocab-parallel, fused where it fuses)
            return pm._wrap(model._head(x, None)).logprobs(ids, cu)

        def head_fwd(s, T):
            ids, cu = packed_batch(T, s, V, self.dev)
            x = self._hidden(T, True)
            return self._time(lambda: logprobs(x, ids, cu))

        def head_bwd(s, T):
            ids, cu = packed_batch(T, s, V, self.dev)
            x = self._hidden(T, True)
            lp = logprobs(x, ids, cu)
            glp = torch.randn_like(lp)
            return self._time(lambda: torch.autograd.backward(lp, glp, retain_graph=True))

        def head_prefill(s, T):  # the draw of token 0 is the decode step's sampling (``decode_step``)
            _, cu = packed_batch(T, s, V, self.dev)
            last = (cu[1:] - 1).long()
            x = self._hidden(T, False)
            return self._time(lambda: model._head(x, last), grad=False)

        def head_decode(b, _K):
            x = self._hidden(b, False)
            with torch.no_grad():
                return self._decode_point(lambda: model._head(x, None))

        out["head"]["forward"] = self.table("head", "forward", "seqlen", one_row, "tokens", g.tokens, head_fwd)
        out["head"]["backward"] = self.table("head", "backward", "seqlen", one_row, "tokens", g.tokens, head_bwd)
        out["head"]["prefill"] = self.table("head", "prefill", "seqlen", g.seqlens, "tokens", g.tokens, head_prefill)
        out["head"].update(self.tables("head", DECODE_OPS, "batch", g.batches, "kv_len", g.kv_lens[:1], head_decode))
        out["decode_step"] = self.decode_step(pm)
        self.optimizer(pm)
        # Last (``run``): a capture that fails can leave the device unusable for what would follow it.
        out["block"].update(self.train_graphed(pm, blk_ctx, chain, layer, ckpt, others))
        try:  # optional tables (the cost model prices the library step without them): a failure costs only them
            stream = self.stream_step()
        except Exception as e:  # noqa: BLE001
            self.log.errors.append(f"{self.key} stream step tp={self.tp}: {type(e).__name__}: {e}")
            reset_cuda_generator(self.log)
            stream = {}
        for kind, tables in stream.items():
            out[kind].update(tables)
        return out

    def train_graphed(self, pm, blk_ctx, chain, layer, ckpt, others: _Accumulations) -> dict:
        """The ``train_graphed[_ckpt]`` block tables (where ``train_graphs_usable``; else none): forward +
        backward of a chain of k blocks replayed from a pair of graphs (``make_graphed_callables``, as
        ``TrainGraphs`` captures a stage's trunk), per block, with the k − 1 other blocks' gradient
        accumulations (eager, after the replay, as the hooks run them)."""
        from reallm.parallel.model import train_graphs_usable

        if not train_graphs_usable(pm):
            return {}
        g = self.s.grids

        def point(s, T, call):
            ctx, x, k = blk_ctx(s, T, True), self._hidden(T, True), self.s.chain_length(T)
            gy = torch.randn_like(x)
            self._free()  # the capture's pool must not need the cached blocks freed (that would break it)
            trunk = torch.cuda.make_graphed_callables(_Wrapped(lambda h: chain(h, ctx, k, call), pm.model),
                                                      (x.detach().clone().requires_grad_(),), allow_unused_input=True)
            return self._time(lambda: (torch.autograd.backward(trunk(x), gy), others(k - 1))) / k

        out = {}
        for op, call in (("train_graphed", layer), ("train_graphed_ckpt", ckpt)):
            try:  # optional tables (the cost model falls back to the eager ones): a failure costs only them
                table = self.table("block", op, "seqlen", g.seqlens, "tokens", g.tokens,
                                   lambda s, T, call=call: point(s, T, call))
            except Exception as e:  # noqa: BLE001
                self.log.errors.append(f"{self.key} block tp={self.tp} {op}: {type(e).__name__}: {e}")
                reset_cuda_generator(self.log)
                break
            if table is not None:
                out[op] = table
        return out

    def decode_step(self, pm) -> dict:
        """The ``decode_step`` tables: a step outside its layers, and the draw of the next token."""
        from reallm.parallel.generate import ring_ops

        g, model, V = self.s.grids, pm.model, pm.spec.vocab_size
        K = g.kv_lens[0]
        out: dict = {}

        def launch(b, _K):
            # generation's step outside the layers: the ring's bookkeeping of one slot (pp = 1: one "fwd" op),
            # the positions, and DecodeRunner (embedding and rope; where graphed, the input copies and replay)
            cache = model.new_kv_cache(b, K + 2)
            ids = torch.randint(0, V, (b,), device=self.dev)
            lengths = torch.full((b,), K, dtype=torch.int64, device=self.dev)
            ops = ring_ops(0, 1, 1, has_slot=lambda t, g_: True, was_done_pass=lambda t, g_: False)
            with torch.no_grad(), layers_bypassed(model):
                runner = DecodeRunner(model, cache, self.graph)

                def step():
                    next(ops)
                    runner(ids, lengths + 1)

                first_two = self.timer.wall_s(lambda: (step(), step())) if self.graph else 0.0
                dev, host = self.timer.device_host_s(step)
            capture = max(first_two - 2 * max(dev, host), 0.0) if self.graph else 0.0
            return dev, host, capture

        out.update(self.tables("decode_step", ("launch", "launch_host", "capture"), "batch", g.batches, "kv_len",
                               (K,), launch))
        modes = SAMPLING_MODES + (PLAIN_SAMPLING_MODE,)
        for mode, cfg in zip(modes, (GREEDY_SAMPLING, self.s.sampling, PLAIN_SAMPLING), strict=True):
            def draw(b, _K, cfg=cfg):
                logits = torch.randn(b, model.lm_head.weight.shape[0], dtype=self.s.dtype, device=self.dev)
                state = _SamplerState(b, self.dev)
                with torch.no_grad():
                    return self.timer.device_host_s(lambda: sample_like_generation(pm, logits, state, cfg))

            out.update(self.tables("decode_step", (mode, f"{mode}_host"), "batch", g.batches, "kv_len", (K,), draw))
        return out

    def stream_step(self) -> dict[str, dict]:
        """The stream step's optional tables (``profile.py``; ``block``: ``stream_decode``, ``stream_capture``;
        ``decode_step``: ``stream_launch``, ``stream_launch_host``, ``stream_capture``) where generation would
        run it (``reallm.model.stream_decode.unusable``: sm_90, tp = 1, shapes that fit); {} elsewhere.

        The step is one launch over the whole model, so each point times it on models of 1 and 3 blocks (random
        weights): a block's share is half the difference, the rest is outside the blocks. Per model: a new
        ``StreamDecodeRunner``'s first two calls as the one-off cost (made, packed, cache permuted, eager
        step, capture; minus two steps), then its replayed steps (device and host, ``Timer.device_host_s``)."""
        from reallm.model.stream_decode import StreamDecodeRunner, unusable
        from reallm.model.transformer import Transformer
        from reallm.working_set import stream_cache_len

        if not self.graph or not stream_profiled(self.spec, self.tp, self.s):
            return {}
        models = {}
        for layers in (1, 3):
            m = Transformer(dataclasses.replace(self.spec, num_layers=layers), device=self.dev, dtype=self.s.dtype)
            with torch.no_grad():
                for prm in m.parameters():
                    prm.normal_(0.0, 0.02)
            models[layers] = m.eval()
        why = unusable(models[1], 1, self.dev)
        if why is not None:
            self.log.skipped.append(f"{self.key} stream step: {why}")
            return {}
        g, V = self.s.grids, self.spec.vocab_size
        batches = [b for b in g.batches if unusable(models[1], b, self.dev) is None]
        if not batches:
            self.log.skipped.append(f"{self.key} stream step: no grid batch of at most {working_set.STREAM_ROWS}")
            return {}
        with torch.no_grad():  # a first launch of each model (module loads, lazy init) is no part of a point
            for m in models.values():
                warm = StreamDecodeRunner(m, m.new_kv_cache(1, stream_cache_len(2)))
                for _ in range(3):
                    warm(torch.zeros(1, dtype=torch.int64, device=self.dev),
                         torch.zeros(1, dtype=torch.int64, device=self.dev))
                del warm

        def point(b, K):
            self._check_cache(models[1], 3 * b, K + 2)  # (the 3-block model holds three layers' caches)
            got = {}
            for layers, m in models.items():
                cache = m.new_kv_cache(b, stream_cache_len(K + 2))
                ids = torch.randint(0, V, (b,), device=self.dev)
                pos = torch.full((b,), K, dtype=torch.int64, device=self.dev)
                box = {}
                with torch.no_grad():
                    def first(box=box, m=m, cache=cache, ids=ids, pos=pos):
                        box["runner"] = StreamDecodeRunner(m, cache)
                        box["runner"](ids, pos)
                        box["runner"](ids, pos)

                    wall = self.timer.wall_s(first)
                    dev, host = self.timer.device_host_s(lambda r=box["runner"], ids=ids, pos=pos: r(ids, pos))
                got[layers] = (dev, host, max(wall - 2 * max(dev, host), 0.0))
                box.clear()
            return split_stream_point(got[1], got[3])

        ops = ("stream_decode", "stream_capture", "stream_launch", "stream_launch_host", "stream_step_capture")
        t = self.tables("stream", ops, "batch", batches, "kv_len", g.kv_lens, point)
        if any(v is None for v in t.values()):
            return {}
        return {"block": {"stream_decode": t["stream_decode"], "stream_capture": t["stream_capture"]},
                "decode_step": {"stream_launch": t["stream_launch"], "stream_launch_host": t["stream_launch_host"],
                                "stream_capture": t["stream_step_capture"]}}

    def optimizer(self, pm) -> None:
        opt = pm.optimizer

        def setup():
            opt.grads.normal_()  # a large norm: the clipping pass runs, as it usually does in PPO

        t = self.timer.time_s(pm.optimizer_step, setup)
        self.log.optimizer_points.append({"model": self.key, "tp": self.tp, "params": pm.num_elements,
                                          "time_s": _sig(t)})
        self.progress.step()

    # -- critic: the score head ----------------------------------------------------------------------------
    def critic(self) -> dict:
        g = self.s.grids
        pm = rank0_model(self.spec, self.tp, self.s, is_critic=True)
        model = pm.model
        self.graph = decode_graphed(model, self.s)
        one_row = (g.seqlens[len(g.seqlens) // 2],)
        out: dict = {}

        def fwd(s, T):
            x = self._hidden(T, True)
            return self._time(lambda: model._head(x, None))

        def bwd(s, T):
            x = self._hidden(T, True)
            y = model._head(x, None)
            gy = torch.randn_like(y)
            return self._time(lambda: torch.autograd.backward(y, gy, retain_graph=True))

        def prefill(s, T):
            x = self._hidden(T, False)
            return self._time(lambda: model._head(x, None), grad=False)

        def decode(b, _K):
            x = self._hidden(b, False)
            with torch.no_grad():
                return self._decode_point(lambda: model._head(x, None))[0]

        for op, fn in (("forward", fwd), ("backward", bwd), ("prefill", prefill)):
            out[op] = self.table("score_head", op, "seqlen", one_row, "tokens", g.tokens, fn)
        out["decode"] = self.table("score_head", "decode", "batch", g.batches, "kv_len", g.kv_lens[:1], decode)
        return out

    def run(self) -> dict:
        """``{kind: {op: table dict or None}}``. The actor last: its graphed train tables come last of all,
        since a capture that fails can leave the device unusable for what would follow it."""
        score_head = self.critic()
        self._free()
        layers = self.actor()
        self._free()
        layers["score_head"] = score_head
        return layers

    def _free(self) -> None:
        gc.collect()
        if self.s.device == "cuda":
            torch.cuda.empty_cache()


# -- host copies and collectives -------------------------------------------------------------------------
def measure_host_copy(timer: Timer, big_bytes: int = 256 << 20, small_bytes: int = 4096) -> dict:
    """Pinned copies as offload/reload make them: device → host (``host_copy``) and host → device."""
    from reallm.parallel.optim import host_copy

    res = {}
    for name, n in (("small", small_bytes), ("big", big_bytes)):
        d = torch.empty(n, dtype=torch.uint8, device="cuda")
        h = host_copy(d)
        res[f"d2h_{name}_s"] = timer.time_s(lambda d=d: host_copy(d))
        res[f"h2d_{name}_s"] = timer.time_s(lambda d=d, h=h: d.copy_(h, non_blocking=True))
    dt = (res["d2h_big_s"] + res["h2d_big_s"] - res["d2h_small_s"] - res["h2d_small_s"]) / 2
    res["bandwidth_bytes_per_s"] = _sig((big_bytes - small_bytes) / max(dt, 1e-9))
    res["latency_s"] = _sig((res["d2h_small_s"] + res["h2d_small_s"]) / 2)
    return {k: _sig(v) for k, v in res.items()}


def _local_world(world: int, device: str) -> int:
    if os.environ.get("LOCAL_WORLD_SIZE"):  # torchrun's launch contract, as executor.worker reads RANK
        return int(os.environ["LOCAL_WORLD_SIZE"])
    return torch.cuda.device_count() if device == "cuda" else world


def measure_collectives(device: str, small_bytes: int = 4096, big_bytes: int = 64 << 20, repeats: int = 5
                        ) -> Optional[dict]:
    """On every rank of an initialised world > 1 (collective over the world): per group size n (the first n
    ranks) and op, the small and large message times and the α, β they give (module docstring). Returns
    ``{"nvlink" | "ib": {n: {op: {...}}}}`` on rank 0, None elsewhere."""
    import torch.distributed as dist

    world, rank = dist.get_world_size(), dist.get_rank()
    dev = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
    local = _local_world(world, device)
    sizes = [2 ** k for k in range(1, int(math.log2(world)) + 1)]
    groups = {n: comm.new_group(range(n)) for n in sizes}  # every rank, one order
    result: dict = {}

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def one(op: str, buf: torch.Tensor, g: Group) -> None:
        if op == "all_reduce":
            comm.all_reduce(buf, g)
        elif op == "all_gather":  # each member contributes 1/n: the gathered buffer is buf's size
            comm.all_gather_cat(buf[: buf.numel() // g.size], g)
        elif op == "reduce_scatter":
            comm.reduce_scatter_dim0(buf, g)
        else:
            comm.exchange([(buf, 1)], []) if rank == 0 else comm.exchange([], [(buf, 0)])

    def timed(op: str, buf: torch.Tensor, g: Group) -> float:
        samples = []
        for i in range(repeats + 2):
            comm.barrier(g)
            sync()
            t0 = time.perf_counter()
            one(op, buf, g)
            sync()
            if i >= 2:  # two warm-ups: connection setup, buffer registration
                samples.append(time.perf_counter() - t0)
        return statistics.median(samples)

    for n in sizes:
        g = groups[n]
        if rank >= n:
            continue
        link = "nvlink" if n <= local else "ib"
        per_op = {}
        for op, factor in (("all_reduce", 2 * (n - 1) / n), ("all_gather", (n - 1) / n),
                           ("reduce_scatter", (n - 1) / n), ("p2p", 1.0)):
            if op == "p2p" and n != 2:
                continue
            t = {}
            for name, nbytes in (("small", small_bytes), ("big", big_bytes)):
                numel = max(n, nbytes // 2 // n * n)
                buf = torch.ones(numel, dtype=torch.bfloat16, device=dev)
                t[name] = (timed(op, buf, g), numel * 2)
            (ts, bs), (tb, bb) = t["small"], t["big"]
            per_op[op] = {"small_bytes": bs, "small_s": _sig(ts), "big_bytes": bb, "big_s": _sig(tb),
                          "latency_s": _sig(ts),
                          "bandwidth_bytes_per_s": _sig(factor * (bb - bs) / max(tb - ts, 1e-9))}
        result.setdefault(link, {})[n] = per_op
    comm.barrier(comm.world())
    return result if rank == 0 else None


def collectives_table(rates: AnalyticRates, measured: Optional[dict], host: Optional[dict]) -> dict:
    """The profile's ``collectives``: measured entries (all-reduce α, β; host copies), the rest analytic and
    marked assumed."""
    table = collective_rates(rates)
    for tab in table.values():
        for entry in tab.values():
            entry["assumed"] = True
    for link, per_n in (measured or {}).items():
        for n, ops in per_n.items():
            ar = ops["all_reduce"]
            table[link][str(n)] = {"bandwidth_bytes_per_s": ar["bandwidth_bytes_per_s"], "latency_s": ar["latency_s"]}
    if host:
        table["host"]["1"] = {"bandwidth_bytes_per_s": host["bandwidth_bytes_per_s"], "latency_s": host["latency_s"]}
    return table


# -- metadata and the whole profile ----------------------------------------------------------------------
def git_commit() -> str:
    try:
        r = subprocess.run(["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty", "--abbrev=40"],
                           capture_output=True, text=True, timeout=10)
        return r.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def analytic_rates_for(device: str) -> AnalyticRates:
    """Rates for the entries the run cannot measure: the CPU cluster's on CPU, H100 datasheet on CUDA."""
    if device == "cpu":
        try:
            from reallm.cluster import load_cluster

            return AnalyticRates.from_cluster(load_cluster("cpu"))
        except (ImportError, UserError):
            pass
    return AnalyticRates.h100()


def profile_models(specs: Sequence[ModelSpec], tps: Sequence[int], settings: ProfileSettings, *, command: str,
                   collectives: Optional[dict] = None, base: Optional[dict] = None,
                   checkpoint: Optional[Callable[[dict], None]] = None) -> dict:
    """Measure every spec's layers at every tp degree on this device; the profile dict (schema in
    ``planner/cost_model/profile.py``). ``base``: a measured profile dict of this device to add to (its
    entries for the same shape and tp are replaced). ``checkpoint(d)`` is called after each shape."""
    t_start = time.time()
    rates = analytic_rates_for(settings.device)
    dev_name = device_name(settings.device)
    log = RunLog()
    timer = Timer(settings, log.host_sync)
    unique = list({shape_key(s): s for s in specs}.values())
    run = {"command": command, "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": dev_name, "torch": torch.__version__, "cuda": torch.version.cuda or "none",
           "python": platform.python_version(), "git_commit": git_commit(), "dtype": settings.dtype_name,
           "models": [shape_key(s) for s in unique], "tp": list(tps), "grids": settings.grids.to_dict(),
           "decode": ("cuda graph replay where generation uses one (tp = 1), else eager"
                      if settings.decode_cuda_graph and settings.device == "cuda" else "eager"),
           "compile_blocks": settings.compile_blocks,
           "sampling": dataclasses.asdict(settings.sampling),
           "greedy_sampling": dataclasses.asdict(GREEDY_SAMPLING),
           "plain_sampling": dataclasses.asdict(PLAIN_SAMPLING),
           "decode_graph_copies": DECODE_GRAPH_COPIES,
           # the executor's chunking that the decode-step and prefill tables depend on (``reallm.working_set``;
           # sampling is timed with all rows at once, the default policy)
           "sampling_chunk_logits": working_set.sampling_chunk_logits(settings.sampling.lean_memory),
           "prefill_chunk_bytes": working_set.PREFILL_CHUNK_BYTES,
           "timing": "cuda events" if settings.device == "cuda" else "perf_counter"}
    if base is not None:
        d = base
        d.setdefault("runs", [])
    else:
        d = {"format": PROFILE_FORMAT, "version": PROFILE_VERSION, "source": "measured", "device": dev_name,
             "dtype": settings.dtype_name, "includes_tp_comm": False,
             "notes": "MEASURED by `planner profile` (executor/profiler.py): the executor's own layer code on one "
                      "tp rank, tp collectives excluded (the cost model adds them from the link rates); "
                      "collective entries marked assumed are analytic, not measured. See runs.",
             "rates": rates.to_dict(), "models": {}, "optimizer": {"time_s_per_param": 0.0},
             "collectives": collectives_table(rates, None, None), "runs": []}
    host = measure_host_copy(timer) if settings.device == "cuda" else None
    log.host = host or {}
    if host is not None or collectives is not None:
        merged = collectives_table(rates, collectives, host)
        for lt, tab in merged.items():
            for n, entry in tab.items():
                if not entry.get("assumed"):
                    d["collectives"].setdefault(lt, {})[n] = entry
    run["collectives_measured"] = collectives or {}
    d["runs"].append(run)
    graphed = settings.device == "cuda" and settings.compile_blocks
    progress = _Progress(sum(points_per_config(settings.grids, graphed and tp == 1, stream_profiled(spec, tp, settings))
                             for spec in unique for tp in tps),
                         settings.show_progress)
    try:
        for spec in unique:
            key = shape_key(spec)
            for tp in tps:
                progress.describe(f"{key} tp={tp}")
                t0 = time.time()
                try:
                    layers = LayerBench(spec, tp, settings, timer, log, progress).run()
                except Exception as e:  # noqa: BLE001 - one failing configuration must not cost the others
                    # Its layer kinds fall back to analytic entries when used; the run says why.
                    log.errors.append(f"{key} tp={tp}: {type(e).__name__}: {e}\n{traceback.format_exc()}")
                    progress.write(f"{key} tp={tp}: FAILED ({type(e).__name__}: {e}); continuing")
                    gc.collect()
                    if settings.device == "cuda":
                        torch.cuda.empty_cache()
                    continue
                _store(d, spec, tp, layers)
                # What this run replaced, in order: an interrupted run's file says how far it got.
                run.setdefault("measured", []).append(f"{key} tp={tp}")
                progress.write(f"{key} tp={tp}: {time.time() - t0:.1f} s")
                _finish_run(d, run, log, t_start)
                if checkpoint is not None:
                    checkpoint(d)
    finally:
        progress.close()
    _finish_run(d, run, log, t_start)
    profile_from_dict(d, where="measured profile")  # what we write must load
    return d


def _store(d: dict, spec: ModelSpec, tp: int, layers: dict) -> None:
    """Put one (shape, tp)'s tables in the profile dict; a kind missing a table is left out (analytic fallback)."""
    entry = d["models"].setdefault(shape_key(spec), {"shape": shape_of(spec), "layers": {}})
    for kind, ops in layers.items():
        per_tp = entry["layers"].setdefault(kind, {})
        if all(t is not None for t in ops.values()):
            per_tp[str(tp)] = ops
        else:
            per_tp.pop(str(tp), None)
        if not per_tp:
            entry["layers"].pop(kind)
    if not entry["layers"]:
        d["models"].pop(shape_key(spec))


def _finish_run(d: dict, run: dict, log: RunLog, t_start: float) -> None:
    run.update(skipped=log.skipped, filled=log.filled, adjusted=log.adjusted, errors=log.errors,
               host_sync=log.host_sync,
               optimizer_points=log.optimizer_points,
               host_copy=log.host, wall_s=round(time.time() - t_start, 1))
    points = [p for r in d["runs"] for p in r.get("optimizer_points", [])]
    if points:
        # The largest parameter set of every run so far: fixed per-step costs (launches, the norm's host
        # sync) matter least there.
        big = max(points, key=lambda p: p["params"])
        d["optimizer"]["time_s_per_param"] = _sig(big["time_s"] / big["params"])


def check_base(path: str, device: str, dtype: str) -> dict:
    """The profile at ``path`` to merge into: a measured profile of this device and dtype."""
    import json

    from planner.cost_model.profile import load_profile

    prof = load_profile(path)
    if prof.source != "measured" or prof.device != device or prof.dtype != dtype:
        raise UserError(f"{path}: --merge adds to a measured profile of this device ({device}, {dtype}); it is "
                        f"{prof.source} on {prof.device!r} ({prof.dtype}). Write to another --out, or drop --merge.")
    with open(path) as f:
        d = json.load(f)
    if d.get("version") != PROFILE_VERSION:
        raise UserError(f"{path}: --merge adds to a version-{PROFILE_VERSION} profile; it is version {d.get('version')} "
                        f"(its decode tables are timed differently). Re-measure into a new --out, or drop --merge.")
    return d


def write_profile(d: dict, path: str) -> None:
    """Atomically (a temporary file renamed), so an interrupted run leaves the last complete shape's file."""
    from planner.cost_model.analytic_profile import compact_json

    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(compact_json(d) + "\n")
    os.replace(tmp, path)


def run_profile(specs: Sequence[ModelSpec], tps: Sequence[int], settings: ProfileSettings, out: str, *,
                command: str, merge: bool = False) -> Optional[dict]:
    """The ``planner profile`` driver. Under torchrun (world > 1) every rank measures the collectives first,
    then rank 0 alone the layers; the other ranks return None."""
    collectives = None
    world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's launch contract (as executor.worker)
    if world > 1:
        import torch.distributed as dist

        rank = int(os.environ["RANK"])
        if settings.device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
        comm.init(rank, world, "nccl" if settings.device == "cuda" else "gloo", "env://", timeout_s=300.0)
        try:
            collectives = measure_collectives(settings.device)
        finally:
            dist.destroy_process_group()
        if rank != 0:
            return None
    base = check_base(out, device_name(settings.device), settings.dtype_name) if merge and os.path.exists(out) else None
    d = profile_models(specs, tps, settings, command=command, collectives=collectives, base=base,
                       checkpoint=lambda d: write_profile(d, out))
    write_profile(d, out)
    return d
