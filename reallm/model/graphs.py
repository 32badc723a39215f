"""CUDA-graphed forward (and, for training, backward): a stage's embedding and blocks replayed from graphs
per token bucket.

Why: at the token counts of inference and train micro-batches (a few thousand) a compiled block is
host-bound on the H100 machines here — its Python, guards and ~10 launches take 0.6-1.2 ms of CPU per
forward while the GPU needs 0.1-0.6 ms — so an eager call costs its host time, which moves by up to 2x
between machines and ±25 % between repeats (BENCHMARKS.md, issue 11). A replayed graph costs its device
time: faster, and steady.

Shapes must be static inside a graph, so a micro-batch of T tokens in B sequences (longest S) runs padded
to a *bucket* (``graph_bucket``): T_pad = ``bucket(T)``, S_pad = ``bucket(S)``, and B_pad ≥ B + the
padding sequences, a power of two ≥ 8. The ``T_pad − T`` padding rows (whatever the static buffer held:
zeros, then earlier inputs) form extra sequences of at most S_pad tokens each after the real ones
(``padded_bounds``); the remaining slots are empty sequences. A micro-batch of equal lengths (two
sequences or more) runs unpadded in a graph of its exact shape (``uniform``), on the batched attention
path the eager forward takes for it. Attention never crosses a sequence boundary and every other op is
row-wise, so the real rows compute what they compute unpadded (up to the GEMM's blocking, which may change
with the row count: rounding only); positions restart in each padding sequence, so rope and the
attention kernel see ordinary sequences. In training the padding rows feed no loss: their gradient is 0.

``bucket(n)`` (``reallm.working_set``, torch-free: the planner uses it too) rounds n up to a multiple of
max(``min_step``, 2^(⌊log2 n⌋ − 3)): at most 1/8 more rows, 8 buckets per octave, so a run of varying
batch sizes meets few distinct shapes.

A bucket is captured the second time it is met (the first runs eager: a shape seen once would pay a
warm-up and a capture, about two eager passes of host time, for nothing); least recently used buckets are
evicted beyond ``max_graphs``. ``InferenceGraphs`` captures into one memory pool per model: a graph's
intermediates live only while it runs, so the pool holds one forward's working set plus every graph's
static input and output. ``TrainGraphs`` (class docstring) keeps a forward/backward pair per bucket, for at
most two buckets: a bucket replaces the least often met one only once it has been met ``REPLACE_MARGIN``
times more (no recapture churn when micro-batch sizes vary), a capture needs d·P + 10 % of the device
free (``CAPTURE_HEADROOM``), and a capture that runs out of memory turns the graphs off for good (eager,
with a warning). The
graphs read the parameters where they lie at capture: the owner drops them (``clear``) when parameters
move (offload), and every call checks the parameter storage's address. Off CUDA (``capture=False``, the
CPU tests) the same padded static buffers run eagerly, so everything but the capture is exercised.
"""

from __future__ import annotations

import collections
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional

import torch

from reallm.model.attention import PackedSeqs
from reallm.working_set import MIN_SEQLEN_STEP, bucket

#: Fewest sequence slots of a graph (``graph_bucket``'s B_pad is a power of two from here).
MIN_SEQ_SLOTS = 8
#: Graphs kept per model (least recently used evicted).
MAX_GRAPHS = 8
#: ``TrainGraphs``: how many more times a bucket must have been met than the least met captured one to
#: replace it when every slot is taken.
REPLACE_MARGIN = 2
#: ``TrainGraphs`` captures only with this fraction of the device's memory free beyond the static gradients.
CAPTURE_HEADROOM = 0.1


@dataclass(frozen=True)
class GraphBucket:
    """Static shape of one graph: padded tokens, sequence slots and longest sequence."""

    tokens: int
    seq_slots: int
    max_seqlen: int
    #: Every sequence exactly ``max_seqlen`` long, no padding: the graph may take the batched attention
    #: path, which chooses by those lengths (``reallm.model.attention.batched_usable``).
    uniform: bool = False


def graph_bucket(lengths: Sequence[int]) -> GraphBucket:
    """The bucket a micro-batch of sequences of ``lengths`` runs in (module docstring); equal lengths get
    their own exact shape (``uniform``)."""
    T = sum(lengths)
    if len(lengths) >= 2 and min(lengths) == max(lengths):
        return GraphBucket(T, len(lengths), lengths[0], uniform=True)
    T_pad = bucket(T)
    S_pad = bucket(max(lengths, default=1), MIN_SEQLEN_STEP)
    pieces = -(-(T_pad - T) // S_pad)
    slots = max(MIN_SEQ_SLOTS, 1 << max(len(lengths) + pieces - 1, 0).bit_length())
    return GraphBucket(T_pad, slots, S_pad)


def padded_bounds(bounds: Sequence[int], b: GraphBucket) -> tuple[int, ...]:
    """``cu_seqlens`` of the padded micro-batch: the real boundaries, padding sequences of ≤ max_seqlen
    tokens up to ``b.tokens``, then empty sequences up to ``b.seq_slots``."""
    out = list(bounds)
    if out[-1] > b.tokens or any(y - x > b.max_seqlen for x, y in zip(out, out[1:], strict=False)):
        raise ValueError(f"micro-batch of {out[-1]} tokens does not fit {b}")
    while out[-1] < b.tokens:
        out.append(min(out[-1] + b.max_seqlen, b.tokens))
    if len(out) - 1 > b.seq_slots:
        raise ValueError(f"{len(out) - 1} sequences do not fit {b}")
    out += [b.tokens] * (b.seq_slots + 1 - len(out))
    return tuple(out)


def padded_positions(bounds: Sequence[int]) -> torch.Tensor:
    """Position of every token within its sequence, int64 [bounds[-1]] (host)."""
    pos = torch.empty(bounds[-1], dtype=torch.int64)
    for a, z in zip(bounds, bounds[1:], strict=False):
        if z > a:
            torch.arange(z - a, out=pos[a:z])
    return pos


#: ``fn(x, seqs, positions) -> [T_pad, ...]``: the stage's embedding and blocks on a padded micro-batch.
TrunkFn = Callable[[torch.Tensor, PackedSeqs, torch.Tensor], torch.Tensor]


def reset_cuda_generator() -> None:
    """Give the current device's default CUDA generator a fresh state (same seed): a capture that failed
    part-way leaves the state it registered marked as capturing, and every later draw then fails ("Offset
    increment outside graph capture")."""
    gen = torch.cuda.default_generators[torch.cuda.current_device()]
    fresh = torch.Generator(device=f"cuda:{torch.cuda.current_device()}")
    fresh.manual_seed(gen.initial_seed())
    gen.graphsafe_set_state(fresh.graphsafe_get_state())


def _release_cached_blocks(device: torch.device) -> None:
    """Before a capture: hand the caching allocator's free blocks back to the device, so that the graph's
    pool gets its memory without the allocator having to free cached blocks mid-capture — a synchronising
    call that invalidates the capture (seen on an H100 profiling a 7B block, 2026-11-24)."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()


class _Entry:
    def __init__(self, x: torch.Tensor, cu: torch.Tensor, pos: torch.Tensor):
        self.x, self.cu, self.pos = x, cu, pos
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.out: Optional[torch.Tensor] = None
        #: Train graphs: the graphed callable (``torch.cuda.make_graphed_callables``); None uncaptured.
        self.callable: Optional[Callable[[torch.Tensor], torch.Tensor]] = None


class _BucketCache:
    """What inference and train graphs share: one entry per bucket, created the second time the bucket is
    met, least recently used evicted, all dropped when the parameters move."""

    def __init__(self, fn: TrunkFn, device: torch.device, capture: Optional[bool], max_graphs: int):
        self.fn, self.device = fn, torch.device(device)
        self.capture = self.device.type == "cuda" if capture is None else capture
        self.max_graphs = max_graphs
        self._entries: collections.OrderedDict[tuple, _Entry] = collections.OrderedDict()
        self._pool = None
        self._params_at: Optional[int] = None
        self._seen: collections.OrderedDict[tuple, int] = collections.OrderedDict()
        #: Counters for tests and logs.
        self.captures = 0
        self.replays = 0

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Drop every graph and its memory (the parameters are about to move)."""
        self._entries.clear()
        self._pool = None
        self._params_at = None

    def _key_extra(self) -> tuple:
        return ()

    def _admit(self, seen: int) -> bool:
        """Capture a bucket met for the ``seen``-th time (≥ 2)? Always: the least recently used one goes."""
        return True

    def _victim(self) -> tuple:
        return next(iter(self._entries))  # least recently used

    def _entry(self, x: torch.Tensor, cu_seqlens_bounds: Sequence[int], params_at: int):
        """(entry, bucket, padded bounds) for this micro-batch, its static buffers filled except ``x``'s; None
        the first time its bucket is met."""
        if params_at != self._params_at:
            self.clear()
            self._params_at = params_at
        bounds = tuple(int(v) for v in cu_seqlens_bounds)
        b = graph_bucket([z - a for a, z in zip(bounds, bounds[1:], strict=False)])
        key = (b, x.dtype, tuple(x.shape[1:]), self._key_extra())
        seen = self._seen.pop(key, 0) + 1
        self._seen[key] = seen
        while len(self._seen) > 8 * self.max_graphs:
            self._seen.popitem(last=False)
        e = self._entries.get(key)
        if e is None:
            if seen < 2 or not self._admit(seen):
                return None
            kw = dict(device=self.device)
            e = _Entry(torch.zeros((b.tokens, *x.shape[1:]), dtype=x.dtype, **kw),
                       torch.zeros(b.seq_slots + 1, dtype=torch.int32, **kw), torch.zeros(b.tokens, dtype=torch.int64, **kw))
            while len(self._entries) >= self.max_graphs:
                self._entries.pop(self._victim())
            self._entries[key] = e
        else:
            self._entries.move_to_end(key)
        pb = padded_bounds(bounds, b)
        e.cu.copy_(torch.tensor(pb, dtype=torch.int32), non_blocking=True)
        e.pos.copy_(padded_positions(pb), non_blocking=True)
        return e, b, pb


class InferenceGraphs(_BucketCache):
    """One model stage's inference graphs, by bucket (module docstring)."""

    def __init__(self, fn: TrunkFn, device: torch.device, *, capture: Optional[bool] = None,
                 max_graphs: int = MAX_GRAPHS):
        super().__init__(fn, device, capture, max_graphs)

    def __call__(self, x: torch.Tensor, cu_seqlens_bounds: Sequence[int], params_at: int) -> Optional[torch.Tensor]:
        """``fn`` on the micro-batch ``x`` (token ids [T] or hidden [T, h]) with sequence boundaries
        ``cu_seqlens_bounds`` (host ints), replayed from its bucket's graph; returns rows [:T] (a view of
        the graph's static output: read it before the next call), or None the first time a bucket is met
        (the caller runs its eager forward). ``params_at``: the parameter storage's address; a change drops
        every graph."""
        found = self._entry(x, cu_seqlens_bounds, params_at)
        if found is None:
            return None
        e, b, pb = found
        T = x.shape[0]
        e.x[:T].copy_(x, non_blocking=True)
        if e.out is None:
            self._record(e, b, pb)
        elif self.capture:
            assert e.graph is not None
            e.graph.replay()
            self.replays += 1
        else:
            e.out = self.fn(e.x, PackedSeqs(e.cu, pb, b.max_seqlen, graph_static=not b.uniform), e.pos)
        assert e.out is not None
        return e.out[:T]

    def _record(self, e: _Entry, b: GraphBucket, pb: tuple[int, ...]) -> None:
        """First call of a bucket: an eager run (it also warms up compilation for the shape and the
        libraries' lazy state, which must not happen inside a capture), then the capture."""
        seqs = PackedSeqs(e.cu, pb, b.max_seqlen, graph_static=not b.uniform)
        if not self.capture:
            e.out = self.fn(e.x, seqs, e.pos)
            return
        from reallm.model.generate import _capture_stream

        stream = _capture_stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self.fn(e.x, seqs, e.pos)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        _release_cached_blocks(self.device)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        e.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(e.graph, pool=self._pool, stream=stream):
            e.out = self.fn(e.x, seqs, e.pos)
        self.captures += 1
        e.graph.replay()
        self.replays += 1


class _Trunk(torch.nn.Module):
    """``fn(x, seqs, positions)`` on one bucket's static boundaries, as the module
    ``make_graphed_callables`` graphs (its parameters are the model's)."""

    def __init__(self, fn: TrunkFn, model: torch.nn.Module, seqs: PackedSeqs, pos: torch.Tensor):
        super().__init__()
        self.model = model
        self._fn, self._seqs, self._pos = fn, seqs, pos

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fn(x, self._seqs, self._pos)


class TrainGraphs(_BucketCache):
    """One model stage's train micro-batches: the embedding's and blocks' forward *and backward* replayed from
    a pair of CUDA graphs per bucket (``torch.cuda.make_graphed_callables``, an autograd Function whose
    forward replays one graph and backward the other), the head and loss eager.

    The padding rows' outputs feed no loss, so their gradient is zero and the parameters' gradients are
    those of the real rows. The backward graph hands every parameter's gradient to autograd at once, as a
    static tensor that the parameters' accumulation hooks (``FlatAdamW.grad_accumulator``) then add into
    the flat fp32 buffer: each graph pair keeps d·P bytes of static gradients plus one micro-batch's saved
    activations in its own pool while it exists (hence at most ``max_graphs`` = 2, replaced by how often a
    bucket is met rather than how recently: ``_admit``). Measured on an H100 (1.1B, 2026-11-24, ``.gpu/diag7.py``): forward +
    backward of 3072 tokens 132 → 52 ms checkpointed, 74 → 40 ms not; 8192 tokens 145 → 126 and 102 → 95 ms.
    Used by a trained model whose state stays on its devices between steps (model config
    ``train_cuda_graphs``, default on; ``ParallelModel.use_train_graphs``); the planner prices its memory
    and, from the profile's ``train_graphed[_ckpt]`` tables, its time."""

    def __init__(self, fn: TrunkFn, model: torch.nn.Module, device: torch.device, *,
                 capture: Optional[bool] = None, max_graphs: int = 2):
        super().__init__(fn, device, capture, max_graphs)
        self.model = model
        #: Set when a capture found no room or failed: the model trains eager from then on (``disabled_why``).
        self.disabled = False
        self.disabled_why = ""

    def _key_extra(self) -> tuple:
        return (bool(getattr(self.model, "gradient_checkpointing", False)),)  # a graph bakes it in

    def _admit(self, seen: int) -> bool:
        # A capture costs several eager passes and a pool of d·P + activations: with every slot taken, a
        # bucket replaces the least often met one only once it has been met ``REPLACE_MARGIN`` times more
        # (micro-batches of varying sizes must not recapture every call).
        if self.disabled:
            return False
        return len(self._entries) < self.max_graphs or seen > self._seen.get(self._victim(), 0) + REPLACE_MARGIN

    def _victim(self) -> tuple:
        return min(self._entries, key=lambda k: self._seen.get(k, 0))  # the least often met

    def __call__(self, x: torch.Tensor, cu_seqlens_bounds: Sequence[int], params_at: int) -> Optional[torch.Tensor]:
        """Rows [:T] of ``fn`` on ``x`` with gradients to the parameters (and to ``x`` when it requires them),
        or None the first time a bucket is met (the caller runs its eager forward)."""
        found = self._entry(x, cu_seqlens_bounds, params_at)
        if found is None:
            return None
        e, b, pb = found
        T = x.shape[0]
        # Padded on the side, keeping x's autograd; the graphed callable copies it into its static input.
        pad = e.x[T:].detach()
        xp = torch.cat([x, pad.requires_grad_(x.requires_grad)]) if pad.shape[0] else x
        seqs = PackedSeqs(e.cu, pb, b.max_seqlen, graph_static=not b.uniform)
        if not self.capture:  # eager on the padded buffers; the host-side boundaries are this call's
            return self.fn(xp, seqs, e.pos)[:T]
        if e.callable is None:
            _release_cached_blocks(self.device)
            static_grads = sum(p.numel() * p.element_size() for p in self.model.parameters() if p.requires_grad)
            free, total = torch.cuda.mem_get_info(self.device)
            if free < static_grads + CAPTURE_HEADROOM * total:
                self._disable(f"{free / 2**30:.1f} GiB free < {static_grads / 2**30:.1f} GiB of static gradients "
                              f"+ {CAPTURE_HEADROOM:.0%} headroom")
                return None
            sample = e.x.detach().clone().requires_grad_(x.requires_grad)
            try:
                e.callable = torch.cuda.make_graphed_callables(_Trunk(self.fn, self.model, seqs, e.pos), (sample,),
                                                               allow_unused_input=True)
            except torch.OutOfMemoryError as err:  # the graphs are an optimisation: train eager instead
                reset_cuda_generator()
                self._disable(f"capture ran out of memory ({str(err).splitlines()[0]})")
                return None
            self.captures += 1
        else:
            self.replays += 1
        return e.callable(xp)[:T]

    def _disable(self, why: str) -> None:
        self.clear()
        self.disabled, self.disabled_why = True, why
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        warnings.warn(f"train micro-batches run eager from now on: {why}", stacklevel=3)
