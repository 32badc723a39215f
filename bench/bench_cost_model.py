"""Cost-model fidelity on one device: estimated vs measured time and peak memory of calls (issue 11).

    python bench/bench_cost_model.py [--device cuda|cpu] [--profile PATH | --measure-profile] [--quick]
                                     [--markdown] [--json-out PATH]

What runs is the executor's per-call code, ``reallm.parallel.ParallelModel``, on a placement of one
device (dp = tp = pp = 1: every group has one member, so no collective runs and no process group is
needed), with random weights of a model shape (default: the 1.1B LLaMA shape in bf16 on CUDA, a tiny
LLaMA in fp32 on CPU):

- generate: ``ParallelModel.generate`` of n prompts of P random tokens in m micro-batches, no EOS token
  (every sequence decodes exactly N tokens), sampling as PPO does by default (top-k 200, top-p 0.9, the
  logits mask returned: the profile's ``sample`` tables; label ``ppo``) or greedy (its ``greedy`` tables;
  label ``greedy``).
  Measured phase ``prefill_s``: the same call with N = 1.
- inference: ``ParallelModel.logprobs`` (a reference model's call) on n sequences of s tokens in m
  micro-batches; label ``mask``: under a logits mask, as PPO's reference model. On CUDA the replica replays
  its forward from CUDA graphs, as a frozen model kept on its device does (``reallm.model.graphs``; the
  warm-up run captures); ``REALLM_INFERENCE_GRAPHS=0``: eager, estimates too.
- train: ``ParallelModel.train_step``'s steps in its order — ``zero_grad`` + ``forward_backward`` (SFT loss
  on vocab-parallel log-probs; phase ``fwd_bwd_s``), then ``reduce_gradients`` + ``optimizer_step`` +
  ``gather_stats`` (phase ``optimizer_s``) — gradient checkpointing on or off; label ``mask``: the loss
  reads log-probs under a logits mask, as PPO's actor. The train replica replays its micro-batches from
  CUDA graphs where the executor does for a model kept on its device (a model config's
  ``train_cuda_graphs``, default on; ``TrainGraphs``: CUDA, ``--compile-blocks``), and the estimates assume
  it; ``--eager-train`` turns both off. Graphed settings capture in their (two) warm-up runs; what the
  graphs' pools then hold (static gradients, saved activations: device memory reserved, which
  ``memory_allocated`` does not see) counts as the call's memory (``graph_bytes``).

Estimates: ``planner.cost_model.call_time.t_call`` and ``memory.call_memory(...).standalone_bytes`` of a
``Call`` built to match, on ``Placement((0,), num_micro_batches=m)``, with ``ModelOptions`` of the setting
(checkpointing, greedy, ``compile_blocks`` = ``--compile-blocks``), from ``--profile``; or, with
``--measure-profile`` (the default on CPU when no profile is given), from a profile of the model's layers
measured first on this device by ``executor.profiler`` (``planner profile``'s code; its quick grid with
``--quick``); else the cluster's shipped profile (``profiles/h100_measured.json``, else the analytic one).
Measured time: wall clock between device synchronisations, median of R runs after a warm-up (and a
``gc.collect()``). Measured memory (CUDA only), per run:
``torch.cuda.max_memory_allocated`` after ``gc.collect()`` and ``reset_peak_memory_stats`` right before the
call (column ``raw peak``). It includes everything resident, and the memory compared with the estimate
(``meas GiB``) is what the call owns: the model's buffers (weights; for a train call also the fp32
gradients, master and Adam moments) + the call's input tensors + (raw peak − resident before the call),
as the estimate's standalone bytes count them. Column ``other``: resident memory that is neither (CUDA
library workspaces kept per stream, e.g. cuBLAS's 32 MiB for every stream generation's CUDA-graph capture
used; garbage of earlier calls) — the planner's ``USABLE_MEMORY_FRACTION`` headroom.

Settings are chosen between the profile's grid points: the tables' axes are read from the profile
(``Grids.of``), and a setting whose sequence length, tokens per micro-batch or decode batch falls on a grid
point is nudged off it (the ``notes`` column says where a point lies outside a grid, i.e. is extrapolated or
clamped).
Ranking: Kendall τ-b between estimated and measured times over the candidates of one call — the choice the
planner makes for a call on one device: a train call of n sequences of s tokens (``CALL_RANKED``: 48 × 640
on CUDA) in each micro-batch count m dividing n, with and without gradient checkpointing (20 candidates on
CUDA; group ``rank_call``, the target) — and, for information, over 20 train settings and 20 generate
settings of varying sizes (micro-batches, checkpointing, batch, lengths; groups ``rank_train``,
``rank_generate``).
Targets (issue 11, on an H100): time error median ≤ 10 % and max ≤ 25 %, memory error ≤ 10 %, τ ≥ 0.9 on
the candidates of one call.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from planner.cost_model.call_time import t_call  # noqa: E402
from planner.cost_model.memory import (  # noqa: E402
    LOGITS_MASK_KEY,
    call_memory,
    logits_mask_bytes,
    train_activation_bytes,
)
from planner.cost_model.profile import Grids, Profile, default_profile, load_profile, shape_key  # noqa: E402
from planner.cost_model.shapes import ModelOptions, blocks_compiled, stages_of  # noqa: E402
from reallm.cluster import load_cluster  # noqa: E402
from reallm.dataflow import Call  # noqa: E402
from reallm.placement import Placement  # noqa: E402
from reallm.spec import ModelSpec, preset_spec  # noqa: E402

GiB = float(1 << 30)
TARGET_TIME_MEDIAN = 0.10
TARGET_TIME_MAX = 0.25
TARGET_MEMORY = 0.10
TARGET_TAU = 0.9
NUM_RANKED = 20
#: The train call whose candidates are ranked (``call_settings``): (sequences, tokens per sequence).
CALL_RANKED = {"cuda": (48, 640), "cpu": (12, 96)}
#: The groups of settings (``--sets``): the off-grid table, one call's candidates, train and generate calls
#: of varying sizes.
SETS = ("table", "call", "train", "generate")
#: Fraction of device memory a setting's estimate may take before it is skipped (not run).
MEMORY_GUARD = 0.85


# -- settings ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    """One call on one device. ``seqlen``: tokens per sequence (train, inference) or prompt length
    (generate); ``n_seqs`` is a multiple of ``num_micro_batches``."""

    kind: str
    n_seqs: int
    seqlen: int
    num_micro_batches: int = 1
    new_tokens: int = 0
    checkpointing: bool = False
    #: PPO's default: generation samples (top-k 200, top-p 0.9) and returns the sampling-support mask;
    #: inference and train calls read such a mask. Off: greedy generation, no masks.
    logits_mask: bool = False

    @property
    def seqs_per_micro_batch(self) -> int:
        return -(-self.n_seqs // self.num_micro_batches)

    @property
    def label(self) -> str:
        m = self.num_micro_batches
        mask = " mask" if self.logits_mask else ""
        if self.kind == "generate":
            return f"n={self.n_seqs} P={self.seqlen} N={self.new_tokens} m={m}" + (" ppo" if self.logits_mask else " greedy")
        s = f"n={self.n_seqs} s={self.seqlen} m={m}"
        return s + (" ckpt" if self.checkpointing and self.kind == "train" else "") + mask

    def call(self) -> Call:
        keys = (LOGITS_MASK_KEY,) if self.logits_mask else ()
        if self.kind == "generate":
            return Call("bench_gen", "actor", "generate", (), keys, self.n_seqs, self.seqlen + self.new_tokens,
                        self.new_tokens)
        return Call(f"bench_{self.kind}", "actor", self.kind, keys, (), self.n_seqs, self.seqlen)

    def placement(self) -> Placement:
        return Placement((0,), num_micro_batches=self.num_micro_batches)


def _on(x: float, axis: Sequence[float]) -> bool:
    return len(axis) > 1 and any(abs(x - g) < 1e-9 for g in axis)


def _outside(name: str, x: float, axis: Sequence[float]) -> Optional[str]:
    if len(axis) > 1 and x < axis[0]:
        return f"{name} {x:g} < grid {axis[0]:g}"
    if len(axis) > 1 and x > axis[-1]:
        return f"{name} {x:g} > grid {axis[-1]:g}"
    return None


def off_grid(s: Setting, g: Grids, seqlen_step: int) -> tuple[Setting, list[str]]:
    """``s`` moved off every grid point its estimate reads (sequence length, tokens per micro-batch, decode
    batch), and notes on points outside a grid."""
    for _ in range(64):
        b, m = s.seqs_per_micro_batch, s.num_micro_batches
        if _on(s.seqlen, g.seqlens):
            s = replace(s, seqlen=s.seqlen + seqlen_step)
        elif _on(b * s.seqlen, g.tokens) or (s.kind == "generate" and _on(b, g.batches)):
            s = replace(s, n_seqs=(b + 1) * m)
        else:
            break
    b = s.seqs_per_micro_batch
    notes = [_outside("s", s.seqlen, g.seqlens), _outside("T", b * s.seqlen, g.tokens)]
    if s.kind == "generate":
        notes += [_outside("b", b, g.batches), _outside("K", s.seqlen + s.new_tokens, g.kv_lens)]
    return s, [n for n in notes if n]


def table_settings(device: str, quick: bool) -> list[Setting]:
    """The settings of the main table (before ``off_grid``)."""
    if device == "cuda":
        rows = [Setting("generate", 24, 192, 1, 96, logits_mask=True), Setting("generate", 48, 320, 2, 160, logits_mask=True),
                Setting("generate", 12, 144, 1, 224, logits_mask=True), Setting("generate", 96, 160, 3, 64, logits_mask=True),
                Setting("generate", 40, 288, 1, 128),
                Setting("inference", 12, 768, 1), Setting("inference", 24, 640, 2),
                Setting("inference", 6, 1536, 1), Setting("inference", 48, 384, 3),
                Setting("inference", 20, 448, 2, logits_mask=True),
                Setting("train", 12, 768, 2, checkpointing=False), Setting("train", 12, 768, 2, checkpointing=True),
                Setting("train", 20, 448, 1, checkpointing=True), Setting("train", 6, 1536, 3, checkpointing=True),
                Setting("train", 24, 384, 2, checkpointing=False), Setting("train", 10, 1280, 1, checkpointing=False),
                Setting("train", 16, 576, 2, checkpointing=True, logits_mask=True)]
    else:
        rows = [Setting("generate", 6, 144, 1, 12, logits_mask=True), Setting("generate", 10, 200, 2, 20),
                Setting("inference", 6, 160, 1), Setting("inference", 8, 120, 2, logits_mask=True),
                Setting("train", 6, 160, 2, checkpointing=False), Setting("train", 6, 160, 2, checkpointing=True),
                Setting("train", 4, 200, 1, checkpointing=False, logits_mask=True)]
    if quick:
        keep, seen = [], {}
        for r in rows:  # two per kind
            seen[r.kind] = seen.get(r.kind, 0) + 1
            if seen[r.kind] <= 2:
                keep.append(r)
        rows = keep
    return rows


def ranked_settings(kind: str, device: str, n: int = NUM_RANKED, seed: int = 0) -> list[Setting]:
    """``n`` distinct settings of one call kind, drawn deterministically from a grid of options."""
    if kind == "train":
        if device == "cuda":
            opts = itertools.product((4, 8, 12, 16), (384, 640, 896), (1, 2, 4), (False, True))
        else:
            opts = itertools.product((1, 2, 4), (96, 160, 224), (1, 2), (False, True))
        pool = [Setting("train", b * m, s, m, checkpointing=c) for b, s, m, c in opts]
    else:
        if device == "cuda":
            opts = itertools.product((8, 24, 48), (144, 320), (48, 112, 176), (1, 2))
        else:
            opts = itertools.product((2, 3, 6), (100, 160), (6, 14, 24), (1, 2))
        pool = [Setting("generate", b * m, p, m, new, logits_mask=True) for b, p, new, m in opts]
    return random.Random(seed).sample(pool, min(n, len(pool)))


def call_settings(device: str, n: int = NUM_RANKED, seed: int = 0) -> list[Setting]:
    """Up to ``n`` candidates of one train call (``CALL_RANKED``): every micro-batch count dividing its
    sequences, with and without gradient checkpointing; a deterministic sample when there are more."""
    n_seqs, s = CALL_RANKED["cuda" if device == "cuda" else "cpu"]
    pool = [Setting("train", n_seqs, s, m, checkpointing=c) for m in range(1, n_seqs + 1) if n_seqs % m == 0
            for c in (False, True)]
    return pool if len(pool) <= n else random.Random(seed).sample(pool, n)


# -- estimates --------------------------------------------------------------------------------------
@dataclass
class Estimate:
    time_s: float
    terms: dict[str, float]
    memory_bytes: float
    memory_terms: dict[str, float]


def estimate(s: Setting, spec: ModelSpec, profile: Profile, cluster, dtype_bytes: int,
             compile_blocks: bool = False, train_graphs: bool = False) -> Estimate:
    opts = ModelOptions(gradient_checkpointing=s.checkpointing, zero_stage=0, dtype_bytes=dtype_bytes,
                        train_graphs=train_graphs,
                        greedy=s.kind == "generate" and not s.logits_mask, compile_blocks=compile_blocks)
    call, p = s.call(), s.placement()
    # The inference replica here is a frozen model that stays on the device: it replays CUDA graphs where
    # the executor does (``REALLM_INFERENCE_GRAPHS=0`` turns them off in both).
    graphed = s.kind == "inference" and os.environ.get("REALLM_INFERENCE_GRAPHS", "1") != "0"
    ct = t_call(call, p, spec, profile, cluster, opts, graphed=graphed)
    mem = call_memory(call, p, spec, opts)
    terms = {"transient_bytes": mem.transient_bytes, "state_bytes": mem.state_bytes, "weights_bytes": mem.weights_bytes,
             # inference/train: the input masks, built on the device before the call (resident when it starts)
             "input_mask_bytes": logits_mask_bytes(call, spec, 1) if s.kind != "generate" else 0.0}
    if s.kind == "train":
        st = stages_of(spec, 1, 1)[0]
        tokens = s.seqs_per_micro_batch * s.seqlen
        terms["activation_bytes"] = train_activation_bytes(spec, p, st, 0, tokens, s.checkpointing, dtype_bytes,
                                                           blocks_compiled(opts, 1))
    return Estimate(ct.time_s, dict(ct.terms), mem.standalone_bytes, terms)


# -- measurement ------------------------------------------------------------------------------------
@dataclass
class Measured:
    time_s: Optional[float] = None
    times_s: list[float] = field(default_factory=list)
    phases_s: dict[str, float] = field(default_factory=dict)
    peak_bytes: Optional[int] = None
    #: The model's own buffers and the call's input tensors (resident before the call).
    model_bytes: Optional[int] = None
    input_bytes: Optional[int] = None
    #: Train calls on CUDA: the peak of the forward/backward and of the optimizer phase apart.
    phase_peak_bytes: dict[str, int] = field(default_factory=dict)
    resident_bytes: Optional[int] = None
    #: Graphed train calls: what the train graphs hold between calls (their pools: static gradients, saved
    #: activations; reserved by the warm-up's captures, held before every timed run).
    graph_bytes: int = 0
    graph_allocated_bytes: int = 0
    error: Optional[str] = None

    @property
    def owned_bytes(self) -> int:
        return (self.model_bytes or 0) + (self.input_bytes or 0) + self.graph_bytes

    @property
    def call_peak_bytes(self) -> Optional[int]:
        """What the call owns at its peak (module docstring)."""
        if self.peak_bytes is None or self.resident_bytes is None or self.model_bytes is None:
            return None
        return self.owned_bytes + self.peak_bytes - self.resident_bytes

    def phase_call_peak_bytes(self, phase: str) -> Optional[int]:
        """``call_peak_bytes`` of one phase of a train call (``fwd_bwd`` or ``optimizer``)."""
        v = self.phase_peak_bytes.get(f"{phase}_peak_bytes")
        if v is None or self.resident_bytes is None or self.model_bytes is None:
            return None
        return self.owned_bytes + v - self.resident_bytes

    @property
    def other_resident_bytes(self) -> Optional[int]:
        if self.resident_bytes is None or self.model_bytes is None:
            return None
        return self.resident_bytes - self.owned_bytes + self.graph_bytes - self.graph_allocated_bytes


def _model_bytes(pm) -> int:
    """Device bytes of a ``ParallelModel``'s own buffers: parameters, and its optimizer's."""
    bufs = {pm.flat.untyped_storage().data_ptr(): pm.flat.untyped_storage().nbytes()}
    if pm.optimizer is not None:
        for t in (pm.optimizer.grads, *pm.optimizer.state_tensors().values()):
            if t.device.type == pm.device.type:  # not the host copies of an offloaded optimizer
                bufs[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(bufs.values())


def _tensor_bytes(mbs: Sequence[dict]) -> int:
    return sum(v.untyped_storage().nbytes() for mb in mbs for v in mb.values() if hasattr(v, "untyped_storage"))


class Runner:
    """Builds the model replicas (inference, then training) and runs settings on them."""

    def __init__(self, spec: ModelSpec, device: str, repeats: int, warmup: int, seed: int = 0,
                 compile_blocks: bool = False, train_graphs: bool = False):
        import torch

        self.torch = torch
        self.spec, self.repeats, self.warmup, self.seed = spec, repeats, warmup, seed
        self.compile_blocks, self.train_graphs = compile_blocks, train_graphs
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if self.cuda and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self._pm = None
        self._pm_train: Optional[bool] = None
        self.model_bytes = 0
        self.input_bytes = 0  # of the setting being run

    # -- models ------------------------------------------------------------------------------------
    def model(self, train: bool, checkpointing: bool = False):
        """The replica for this kind of call; the other one is dropped first (so memory readings see one)."""
        if self._pm is None or self._pm_train != train:
            self._pm = None
            self._free()
            from reallm.model.optim import OptimizerSettings
            from reallm.parallel import GroupCache, ParallelModel

            groups = GroupCache().groups_for(Placement((0,)), 0)
            opt = OptimizerSettings(lr=1e-5, lr_scheduler_type="constant", warmup_steps_proportion=0.0) if train else None
            self._pm = ParallelModel.build(None, groups, spec=self.spec, dtype=self.dtype, device=self.device,
                                           optimizer=opt, total_steps=1 << 20, init_seed=self.seed,
                                           compile_blocks=self.compile_blocks)
            self._pm_train = train
            self.model_bytes = _model_bytes(self._pm)
        self._pm.model.gradient_checkpointing = checkpointing
        if train and self.train_graphs and self._pm.train_graphs is None:
            from reallm.parallel.model import train_graphs_usable

            if train_graphs_usable(self._pm):
                self._pm.use_train_graphs()
        return self._pm

    def _free(self) -> None:
        self._collect()
        if self.cuda:
            self.torch.cuda.empty_cache()

    def _collect(self) -> None:
        import gc

        self._sync()
        gc.collect()

    def _reserved_bytes(self) -> int:
        """Device memory held: live tensors and CUDA-graph pools (the allocator's free blocks released)."""
        if not self.cuda:
            return 0
        self._collect()
        self.torch.cuda.empty_cache()
        return self.torch.cuda.memory_reserved(self.device)

    def device_memory_bytes(self) -> Optional[int]:
        return self.torch.cuda.get_device_properties(self.device).total_memory if self.cuda else None

    # -- timing ------------------------------------------------------------------------------------
    def _sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def _timed(self, fn: Callable[[], dict[str, float]]) -> tuple[float, dict[str, float], Optional[int], Optional[int]]:
        """(wall s, phases, peak bytes, resident bytes before) of one run of ``fn``."""
        resident = peak = None
        self._collect()  # garbage of earlier calls (reference cycles) must not count, nor be freed mid-run
        if self.cuda:
            resident = self.torch.cuda.memory_allocated(self.device)
            self.torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        phases = fn()
        self._sync()
        wall = time.perf_counter() - t0
        if self.cuda:
            # A phase that read and reset the peak reports it as "<phase>_peak_bytes".
            peak = max([self.torch.cuda.max_memory_allocated(self.device)]
                       + [int(v) for k, v in phases.items() if k.endswith("_peak_bytes")])
        return wall, phases, peak, resident

    def measure(self, s: Setting) -> Measured:
        fn = self._runner_of(s)
        out = Measured()
        graphs = self._pm.train_graphs if s.kind == "train" else None
        if graphs is not None:
            # Captured in the warm-up (a bucket is captured the second time it is met, so two runs); what
            # the graphs then hold is the call's own memory (replays allocate nothing), the graphs of
            # earlier settings dropped first. A graph's pool keeps the memory of every tensor its capture
            # allocated — static gradients, and the saved activations that its backward reads, which
            # ``memory_allocated`` no longer counts once their tensors are gone — so it is read as the
            # device memory reserved with the caching allocator's free blocks released.
            graphs.clear()
            before = self._reserved_bytes(), self.torch.cuda.memory_allocated(self.device) if self.cuda else 0
            for _ in range(max(2, self.warmup)):
                fn()
            out.graph_bytes = max(self._reserved_bytes() - before[0], 0)
            if self.cuda:  # the part live tensors hold (the static gradients): in the resident reading
                out.graph_allocated_bytes = max(self.torch.cuda.memory_allocated(self.device) - before[1], 0)
        else:
            for _ in range(self.warmup):
                fn()
        phases: dict[str, list[float]] = {}
        for _ in range(self.repeats):
            wall, ph, peak, resident = self._timed(fn)
            out.times_s.append(wall)
            if peak is not None and (out.peak_bytes is None or peak - resident > out.peak_bytes - out.resident_bytes):
                out.peak_bytes, out.resident_bytes = peak, resident  # the run that grew the most
                out.phase_peak_bytes = {k: int(v) for k, v in ph.items() if k.endswith("_peak_bytes")}
            for k, v in ph.items():
                if not k.endswith("_peak_bytes"):
                    phases.setdefault(k, []).append(v)
        if out.peak_bytes is not None:
            out.model_bytes, out.input_bytes = self.model_bytes, self.input_bytes
        out.time_s = statistics.median(out.times_s)
        out.phases_s = {k: statistics.median(v) for k, v in phases.items()}
        if s.kind == "generate":  # prefill (and one sampling step): the same call with N = 1
            one = self._runner_of(replace(s, new_tokens=1))
            out.phases_s["prefill_s"] = statistics.median(self._timed(one)[0] for _ in range(max(1, self.repeats)))
        return out

    # -- the calls ---------------------------------------------------------------------------------
    def _tokens(self, n: int, length: int, salt: int) -> list[list[int]]:
        torch = self.torch
        g = torch.Generator().manual_seed(self.seed * 7919 + salt)
        return torch.randint(4, self.spec.vocab_size, (n, length), generator=g).tolist()

    def _micro_batches(self, s: Setting, train: bool) -> list[dict]:
        from reallm.model.transformer import pack_sequences

        torch, dev = self.torch, self.device
        seqs = self._tokens(s.n_seqs, s.seqlen, s.n_seqs * 131 + s.seqlen)
        b = s.seqs_per_micro_batch
        prompt = max(1, s.seqlen // 4)
        denom = float(s.n_seqs * (s.seqlen - prompt))
        out = []
        g = torch.Generator(device=dev).manual_seed(self.seed)
        for a in range(0, s.n_seqs, b):
            tokens, cu = pack_sequences(seqs[a:a + b], device=dev)
            mb = {"tokens": tokens, "cu_seqlens": cu}
            if s.logits_mask:  # tokens outside a top-k/top-p support: most of the vocabulary, never the next one
                mask = torch.rand(tokens.shape[0], self.spec.vocab_size, generator=g, device=dev) < 0.9
                mask[torch.arange(tokens.shape[0], device=dev), tokens.roll(-1)] = False
                mb["logits_mask"] = mask
            if train:
                pm = torch.zeros(tokens.shape[0], dtype=torch.bool, device=dev)
                for start in cu[:-1].tolist():
                    pm[start:start + prompt] = True
                mb["prompt_mask"] = pm
                mb["num_answer_tokens_global"] = torch.tensor(denom)
            out.append(mb)
        return out

    def _runner_of(self, s: Setting) -> Callable[[], dict[str, float]]:
        self.input_bytes = 0
        if s.kind == "generate":
            from reallm.model.generate import GenerationConfig

            pm = self.model(train=False)
            prompts = self._tokens(s.n_seqs, s.seqlen, s.n_seqs * 131 + s.seqlen)
            if s.logits_mask:  # PPO's default sampling (what the measured profiles time)
                cfg = GenerationConfig(max_new_tokens=s.new_tokens, greedy=False, temperature=1.0, top_k=200,
                                       top_p=0.9, return_logits_mask=True)
            else:
                cfg = GenerationConfig(max_new_tokens=s.new_tokens, greedy=True)

            def gen() -> dict[str, float]:
                out = pm.generate(prompts, cfg, eos_token_id=None, pad_token_id=0, num_micro_batches=s.num_micro_batches)
                n = out.lengths_B.tolist()
                if min(n) != s.new_tokens or max(n) != s.new_tokens:
                    raise RuntimeError(f"generation lengths {sorted(set(n))} != {s.new_tokens}")
                return {}

            return gen
        if s.kind == "inference":
            pm = self.model(train=False)
            mbs = self._micro_batches(s, train=False)
            self.input_bytes = _tensor_bytes(mbs)

            def inf() -> dict[str, float]:
                pm.logprobs(mbs, logits_mask_key="logits_mask" if s.logits_mask else None)
                return {}

            return inf
        from reallm.parallel.vocab import sft_loss

        pm = self.model(train=True, checkpointing=s.checkpointing)
        mbs = self._micro_batches(s, train=True)
        self.input_bytes = _tensor_bytes(mbs)
        loss_fn = masked_logprob_loss if s.logits_mask else sft_loss

        def train() -> dict[str, float]:
            # ParallelModel.train_step's steps, in its order, with a synchronisation between the phases.
            t0 = time.perf_counter()
            pm.optimizer.zero_grad()
            local = pm.forward_backward(mbs, loss_fn)
            self._sync()
            t1 = time.perf_counter()
            out = {"fwd_bwd_s": t1 - t0}
            if self.cuda:
                out["fwd_bwd_peak_bytes"] = self.torch.cuda.max_memory_allocated(self.device)
                self.torch.cuda.reset_peak_memory_stats(self.device)
            pm.reduce_gradients()
            pm.optimizer_step()
            pm.gather_stats(local)
            self._sync()
            out["optimizer_s"] = time.perf_counter() - t1
            if self.cuda:
                out["optimizer_peak_bytes"] = self.torch.cuda.max_memory_allocated(self.device)
            return out

        return train


def masked_logprob_loss(out, mb):
    """A PPO-like actor loss: the next tokens' log-probs under the generation's logits mask, summed."""
    lp = out.logprobs(mb["tokens"], mb["cu_seqlens"], logits_mask=mb["logits_mask"])
    loss = -lp.sum() / float(mb["num_answer_tokens_global"])
    return loss, {"num_tokens": float(lp.numel())}


# -- statistics -------------------------------------------------------------------------------------
def kendall_tau(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Kendall's τ-b of two rankings: (concordant − discordant) / sqrt((pairs not tied in x)·(not tied in y))."""
    if len(xs) != len(ys):
        raise ValueError(f"kendall_tau: {len(xs)} vs {len(ys)} values")
    conc = disc = tie_x = tie_y = 0
    for i in range(len(xs)):
        for j in range(i + 1, len(xs)):
            dx = (xs[i] > xs[j]) - (xs[i] < xs[j])
            dy = (ys[i] > ys[j]) - (ys[i] < ys[j])
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                tie_x += 1
            elif dy == 0:
                tie_y += 1
            elif dx == dy:
                conc += 1
            else:
                disc += 1
    denom = math.sqrt((conc + disc + tie_x) * (conc + disc + tie_y))
    return (conc - disc) / denom if denom else float("nan")


def rel_error(est: Optional[float], meas: Optional[float]) -> Optional[float]:
    if est is None or meas is None or meas <= 0:
        return None
    return (est - meas) / meas


@dataclass
class Row:
    group: str  # "table", "rank_train", "rank_generate"
    setting: Setting
    estimate: Estimate
    measured: Measured
    notes: list[str] = field(default_factory=list)

    @property
    def time_error(self) -> Optional[float]:
        return rel_error(self.estimate.time_s, self.measured.time_s)

    @property
    def memory_error(self) -> Optional[float]:
        return rel_error(self.estimate.memory_bytes, self.measured.call_peak_bytes)

    def to_dict(self) -> dict:
        return {"group": self.group, "kind": self.setting.kind, "label": self.setting.label,
                "setting": asdict(self.setting), "estimate": asdict(self.estimate), "measured": asdict(self.measured),
                "time_error": self.time_error, "memory_error": self.memory_error, "notes": self.notes}


def _abs_stats(errs: list[Optional[float]]) -> dict[str, Optional[float]]:
    vals = [abs(e) for e in errs if e is not None]
    if not vals:
        return {"n": 0, "median": None, "max": None}
    return {"n": len(vals), "median": statistics.median(vals), "max": max(vals)}


def summarize(rows: list[Row]) -> dict:
    out: dict[str, Any] = {"time_error": {}, "time_error_all_rows": {}}
    table = [r for r in rows if r.group == "table"]
    for kind in ("generate", "inference", "train"):
        out["time_error"][kind] = _abs_stats([r.time_error for r in table if r.setting.kind == kind])
        out["time_error_all_rows"][kind] = _abs_stats([r.time_error for r in rows if r.setting.kind == kind])
    out["time_error"]["all"] = _abs_stats([r.time_error for r in table])
    out["time_error_all_rows"]["all"] = _abs_stats([r.time_error for r in rows])
    out["memory_error"] = _abs_stats([r.memory_error for r in rows])
    # Train calls up to the end of backward: without the optimizer step's temporaries (memory.py docstring).
    out["memory_error_train_fwd_bwd"] = _abs_stats(
        [rel_error(r.estimate.memory_bytes, r.measured.phase_call_peak_bytes("fwd_bwd"))
         for r in rows if r.setting.kind == "train"])
    out["kendall_tau"] = {}
    for key in ("call", "train", "generate"):
        ranked = [r for r in rows if r.group == f"rank_{key}" and r.measured.time_s is not None]
        tau = kendall_tau([r.estimate.time_s for r in ranked], [r.measured.time_s for r in ranked]) if len(ranked) > 1 else None
        out["kendall_tau"][key] = {"n": len(ranked), "tau": tau}
    te, me = out["time_error"]["all"], out["memory_error"]
    tau = out["kendall_tau"]["call"]["tau"]
    out["targets_met"] = {
        "time_median": te["median"] is not None and te["median"] <= TARGET_TIME_MEDIAN,
        "time_max": te["max"] is not None and te["max"] <= TARGET_TIME_MAX,
        "memory": me["max"] is not None and me["max"] <= TARGET_MEMORY,
        "kendall_tau": tau is not None and tau >= TARGET_TAU,
    }
    return out


# -- output -----------------------------------------------------------------------------------------
def _pct(e: Optional[float]) -> str:
    return "-" if e is None else f"{100 * e:+.1f}"


def _gib(b: Optional[float]) -> str:
    return "-" if b is None else f"{b / GiB:.3g}"


def _s(t: Optional[float]) -> str:
    if t is None:
        return "-"
    return f"{t:.4f}" if t < 10 else f"{t:.2f}"


def render(head: Sequence[str], body: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in body]
    return "\n".join(lines)


def main_table(rows: list[Row], markdown: bool) -> str:
    head = ("call", "settings", "est s", "meas s", "err %", "est GiB", "meas GiB", "err %", "raw peak GiB",
            "other GiB", "notes")
    body = []
    for r in rows:
        m = r.measured
        err = " ".join(m.error.split())[:160] if m.error else None
        notes = "; ".join(r.notes + ([err] if err else []))
        body.append([r.setting.kind, r.setting.label, _s(r.estimate.time_s), _s(m.time_s), _pct(r.time_error),
                     _gib(r.estimate.memory_bytes), _gib(m.call_peak_bytes), _pct(r.memory_error),
                     _gib(m.peak_bytes), _gib(m.other_resident_bytes),
                     notes or ""])
    return render(head, body, markdown)


def phase_table(rows: list[Row], markdown: bool) -> str:
    """Where the time and memory go: the estimate's terms next to the measured phases. Memory above what
    was resident before the call: the estimate's transient terms; measured, each phase's peak − resident."""
    head = ("call", "settings", "estimated terms (s)", "measured phases (s)", "est transient GiB", "meas GiB")
    body = []
    for r in rows:
        m, e = r.measured, r.estimate
        est = ", ".join(f"{k} {v:.4f}" for k, v in e.terms.items() if v)
        meas = ", ".join(f"{k} {v:.4f}" for k, v in m.phases_s.items())
        if r.setting.kind == "train":
            est_mem = f"activation {_gib(e.memory_terms['activation_bytes'])}"
        else:  # the replica's weights and the input masks are resident before the call
            est_mem = _gib(e.memory_terms["transient_bytes"] - e.memory_terms["weights_bytes"]
                           - e.memory_terms["input_mask_bytes"])
        if m.phase_peak_bytes and m.resident_bytes is not None:
            meas_mem = ", ".join(f"{k.removesuffix('_peak_bytes')} {_gib(v - m.resident_bytes)}"
                                 for k, v in m.phase_peak_bytes.items())
        elif m.peak_bytes is not None and m.resident_bytes is not None:
            meas_mem = f"peak − resident {_gib(m.peak_bytes - m.resident_bytes)}"
        else:
            meas_mem = "-"
        body.append([r.setting.kind, r.setting.label, est, meas or "-", est_mem, meas_mem])
    return render(head, body, markdown)


def summary_text(summary: dict) -> str:
    def st(d: dict) -> str:
        if not d["n"]:
            return "n=0"
        return f"median {100 * d['median']:.1f} %, max {100 * d['max']:.1f} % (n={d['n']})"

    lines = ["|time error| on the table's settings:"]
    lines += [f"  {k:9s} {st(v)}" for k, v in summary["time_error"].items()]
    lines += ["|time error| on every row (ranking sets included):"]
    lines += [f"  {k:9s} {st(v)}" for k, v in summary["time_error_all_rows"].items()]
    lines += [f"|memory error| (every measured row): {st(summary['memory_error'])}",
              f"|memory error| of train calls up to the end of backward: {st(summary['memory_error_train_fwd_bwd'])}"]
    names = {"call": "one train call's candidates", "train": "train, varying sizes",
             "generate": "generate, varying sizes"}
    for k, v in summary["kendall_tau"].items():
        tau = "-" if v["tau"] is None else f"{v['tau']:.3f}"
        lines.append(f"Kendall tau ({names.get(k, k)}, {v['n']} settings): {tau}")
    met = summary["targets_met"]
    lines.append("targets (time median ≤ 10 %, max ≤ 25 %, memory ≤ 10 %, tau ≥ 0.9 over one call's candidates): "
                 + ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in met.items()))
    return "\n".join(lines)


# -- driver -----------------------------------------------------------------------------------------
def tiny_spec() -> ModelSpec:
    return ModelSpec("llama", num_layers=2, hidden_size=64, intermediate_size=176, num_heads=4, num_kv_heads=2,
                     head_dim=16, vocab_size=512, max_position_embeddings=1024, source="bench tiny llama")


def default_spec(device: str) -> ModelSpec:
    return preset_spec("llama", 1.1) if device == "cuda" else tiny_spec()


def pick_profile(path: Optional[str], cluster, measure: bool, spec: ModelSpec, device: str, quick: bool,
                 log: Callable[[str], None]) -> Profile:
    if path:
        return load_profile(path)
    if measure:
        try:
            from executor.profiler import ProfileSettings, default_grids, profile_models
        except ImportError as e:  # the profiler is optional here: say so, and estimate from the shipped profile
            log(f"cannot measure a profile ({e}); using the cluster's shipped profile")
        else:
            from planner.cost_model.profile import profile_from_dict

            fast = {"point_target_s": 0.002, "min_repeats": 1, "max_repeats": 2} if quick and device == "cpu" else {}
            settings = ProfileSettings.for_device(device, grids=default_grids(device, quick), show_progress=False,
                                                **fast)
            t0 = time.perf_counter()
            d = profile_models([spec], [1], settings, command="bench/bench_cost_model.py --measure-profile")
            log(f"measured a profile of {shape_key(spec)} in {time.perf_counter() - t0:.1f} s")
            return profile_from_dict(d, where="measured profile")
    return default_profile(cluster)


@dataclass
class BenchResult:
    rows: list[Row]
    summary: dict
    info: dict

    def to_dict(self) -> dict:
        return {"info": self.info, "summary": self.summary, "rows": [r.to_dict() for r in self.rows]}


def run_bench(device: str = "cpu", profile_path: Optional[str] = None, quick: bool = False,
              spec: Optional[ModelSpec] = None, repeats: Optional[int] = None, warmup: int = 1,
              num_ranked: int = NUM_RANKED, time_budget_s: Optional[float] = None, compile_blocks: bool = False,
              measure_profile: Optional[bool] = None, log: Callable[[str], None] = lambda s: None,
              sets: Sequence[str] = SETS, train_graphs: bool = True) -> BenchResult:
    """Every setting of the groups in ``sets`` (``SETS``): estimated, then measured (module docstring).
    Settings not started within ``time_budget_s`` are reported as not run. ``measure_profile`` None: measure
    one on CPU when no ``profile_path`` is given."""
    unknown = sorted(set(sets) - set(SETS))
    if unknown:
        raise SystemExit(f"error: --sets: unknown set(s) {unknown}; choose from {', '.join(SETS)}")
    import torch

    start = time.perf_counter()

    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no CUDA device")
    cluster = load_cluster("h100" if device == "cuda" else "cpu")
    spec = spec or default_spec(device)
    if measure_profile is None:
        measure_profile = device == "cpu" and profile_path is None
    profile = pick_profile(profile_path, cluster, measure_profile, spec, device, quick, log)
    dtype_bytes = 2 if device == "cuda" else 4
    grids = Grids.of(profile, spec)
    step = 32 if device == "cuda" else 8
    groups = [("table", s) for s in table_settings(device, quick) if "table" in sets]
    groups += [("rank_call", s) for s in call_settings(device, num_ranked) if "call" in sets]
    groups += [("rank_train", s) for s in ranked_settings("train", device, num_ranked) if "train" in sets]
    groups += [("rank_generate", s) for s in ranked_settings("generate", device, num_ranked) if "generate" in sets]
    planned: list[Row] = []
    seen: set = set()
    for group, s in groups:
        # One call's candidates keep its size (off_grid could change n for some m).
        s2, notes = (s, []) if group == "rank_call" else off_grid(s, grids, step)
        if (group, s2) in seen:
            continue
        seen.add((group, s2))
        planned.append(Row(group, s2, estimate(s2, spec, profile, cluster, dtype_bytes, compile_blocks, train_graphs),
                           Measured(), notes))
    # Inference-replica calls first, then the training replica: one model build each.
    planned.sort(key=lambda r: (r.setting.kind == "train",))
    runner = Runner(spec, device, repeats=repeats or (1 if quick else 3), warmup=warmup,
                    compile_blocks=compile_blocks, train_graphs=train_graphs)
    cap = runner.device_memory_bytes()
    for i, r in enumerate(planned):
        if cap is not None and r.estimate.memory_bytes > MEMORY_GUARD * cap:
            r.measured.error = f"skipped: estimate {r.estimate.memory_bytes / GiB:.1f} GiB"
            continue
        if time_budget_s is not None and time.perf_counter() - start > time_budget_s:
            r.measured.error = "not run: time budget"
            continue
        t0 = time.perf_counter()
        try:
            r.measured = runner.measure(r.setting)
        except torch.cuda.OutOfMemoryError:
            r.measured = Measured(error="out of memory")
            runner._free()
        except Exception as e:  # noqa: BLE001 - one failing setting must not lose the others' results
            r.measured = Measured(error=f"{type(e).__name__}: {e}")
            log(traceback.format_exc())
            runner._free()
        log(f"[{i + 1}/{len(planned)}] {r.group} {r.setting.kind} {r.setting.label}: est {r.estimate.time_s:.4f} s, "
            f"meas {_s(r.measured.time_s)} s ({time.perf_counter() - t0:.1f} s)")
    order = {"table": 0, "rank_call": 1, "rank_train": 2, "rank_generate": 3}
    kinds = {"generate": 0, "inference": 1, "train": 2}
    rows = sorted(planned, key=lambda r: (order[r.group], kinds[r.setting.kind]))
    info = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "torch": torch.__version__,
            "dtype": "bf16" if device == "cuda" else "fp32", "spec": spec.to_dict(),
            "profile": {"path": profile.path or ("(measured by this run)" if measure_profile else None),
                        "source": profile.source, "device": profile.device,
                        "dtype": profile.dtype, "fallbacks": list(profile.fallbacks)},
            "grids": asdict(grids), "repeats": runner.repeats, "warmup": runner.warmup,
            "attention": _attention_path(device), "compile_blocks": compile_blocks, "train_graphs": train_graphs,
            "date": time.strftime("%Y-%m-%d")}
    return BenchResult(rows, summarize(rows), info)


def _attention_path(device: str) -> str:
    from reallm.model.attention import _varlen_impl

    impl = _varlen_impl()
    if device != "cuda" or impl is None:
        return "sdpa per sequence"
    return "varlen flash" + (" (native GQA)" if "enable_gqa" in impl[1] else " (kv heads repeated)")


def report(res: BenchResult, markdown: bool) -> str:
    i = res.info
    p = i["profile"]
    out = [f"device {i['device']}, torch {i['torch']}, {i['dtype']}, {i['date']}; attention: {i['attention']}",
           f"model {i['spec']['source']}: L={i['spec']['num_layers']} h={i['spec']['hidden_size']} "
           f"I={i['spec']['intermediate_size']} heads {i['spec']['num_heads']}/{i['spec']['num_kv_heads']} "
           f"V={i['spec']['vocab_size']}",
           f"profile {p['path'] or '(made from the cluster rates)'}: source {p['source']}, device {p['device']}, "
           f"dtype {p['dtype']}" + (f"; fallbacks: {', '.join(p['fallbacks'])}" if p["fallbacks"] else ""),
           f"timing: median of {i['repeats']} after {i['warmup']} warm-up"
           + ("; blocks compiled" if i["compile_blocks"] else "")
           + ("; train micro-batches graphed" if i.get("train_graphs") else ""), ""]
    n_call, s_call = CALL_RANKED["cuda" if i["device"] != "cpu" else "cpu"]
    for group, title in (("table", "Settings off the profile's grids"),
                         ("rank_call", f"Ranking set: the candidates of one train call (n={n_call}, s={s_call}): "
                                       "micro-batches × checkpointing"),
                         ("rank_train", "Ranking set: train calls of varying sizes"),
                         ("rank_generate", "Ranking set: generate calls of varying sizes")):
        rows = [r for r in res.rows if r.group == group]
        if rows:
            out += [f"{title}:", main_table(rows, markdown), ""]
    out += ["Estimated terms vs measured phases (table settings):",
            phase_table([r for r in res.rows if r.group == "table"], markdown), "", summary_text(res.summary)]
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if available")
    ap.add_argument("--profile", default=None, help="profile JSON (default: module docstring)")
    ap.add_argument("--measure-profile", action="store_true", default=None,
                    help="measure the model's layer profile on this device first and estimate from it")
    ap.add_argument("--quick", action="store_true", help="fewer table rows, one timed run each")
    ap.add_argument("--markdown", action="store_true", help="markdown tables")
    ap.add_argument("--json-out", default=None, help="write every row and the summary as JSON")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per setting (default 3; 1 with --quick)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (--device cpu)")
    ap.add_argument("--time-budget-s", type=float, default=None, help="start no setting after this many seconds")
    ap.add_argument("--sets", default=",".join(SETS),
                    help=f"comma-separated groups of settings to run (default: all of {', '.join(SETS)})")
    ap.add_argument("--compile-blocks", action="store_true",
                    help="build with ParallelModel.build(compile_blocks=True) (CUDA; the profile must match)")
    ap.add_argument("--eager-train", dest="train_graphs", action="store_false",
                    help="train calls run eager; by default they replay their micro-batches from CUDA graphs "
                         "where the executor does for a model kept on its device (a model config's "
                         "train_cuda_graphs; CUDA, with --compile-blocks), estimates too")
    args = ap.parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        torch.set_num_threads(args.threads)
    res = run_bench(device, args.profile, args.quick, repeats=args.repeats, time_budget_s=args.time_budget_s,
                    compile_blocks=args.compile_blocks, measure_profile=args.measure_profile,
                    log=lambda s: print(s, file=sys.stderr, flush=True),
                    sets=[g.strip() for g in args.sets.split(",") if g.strip()], train_graphs=args.train_graphs)
    print(report(res, args.markdown))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(res.to_dict(), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
