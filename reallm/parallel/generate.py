"""Generation under tensor and pipeline parallelism: decode steps of micro-batches flowing around the stages
as a ring, so with ``num_micro_batches >= pp`` every stage has work at every slot.

The prompts are cut into G contiguous micro-batches. A *slot* (t, g) is one pass of micro-batch g through a
stage: t = -1 is the prefill of its prompts (KV cache filled, the last stage samples token 0), t >= 0 is the
decode step that feeds token t at positions ``prompt_len + t`` (the last stage samples token t+1). Every
stage visits its slots in the order (t, g) lexicographic::

    stage s < P-1 at (t, g):  in: hidden from s-1 (or tokens)  out: hidden [T_g or B_g, h] + ctrl -> s+1
    stage P-1     at (t, g):  logits shard -> all-gather over tp (these B_g rows only) -> sample
                              -> tokens + ctrl -> stage 0, which feeds them at slot (t+1, g)

The sampling is ``reallm.model.generate.sampling_step`` with randomness keyed by (seed, step, seq id), and
every tp rank gathers the same logits, so every tp rank draws the same tokens and the result equals
single-process ``generate`` whatever the layout.

Termination: when micro-batch g is finished (every sequence emitted EOS, or max_new_tokens), the last stage
sends ``ctrl = done`` with its tokens; each stage passes it on at slot (t_end+1, g) (the *done pass*, dummy
hidden states) and drops g afterwards, so all stages visit exactly the same slots and every message has a
receiver. After each slot a stage posts, as one batch, the sends of this slot and the receive of its next
slot's input; stage 0 posts the receive of a token message P - 1 slots after the slot that produced it
(``TokReceives``), not when it consumes it G slots later, which would deadlock under rendezvous
point-to-point semantics (NCCL) whenever G > P. ``ring_schedule`` writes the ring as data for any set of
finishing steps, and ``pipeline.check_schedule`` proves it deadlock-free. With P = 1 there are no messages
and no done pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Optional

import torch

from reallm import working_set
from reallm.model.generate import (
    GenerationConfig,
    GenerationOutput,
    checked_seq_ids,
    decode_runner,
    keyed_uniforms,
    sampling_step,
    should_poll,
    stream_decode_usable,
)
from reallm.model.transformer import pack_sequences
from reallm.parallel.pipeline import Msg, PipeOp, Schedule, StageProgram, run_schedule
from reallm.parallel.vocab import gather_last_logits

ALIVE, DONE = 0, 1


def _eos_list(eos_token_id) -> list[int]:
    """``eos_token_id`` (None, an id, or ids) as a list, as ``reallm.model.generate.generate`` reads it."""
    if eos_token_id is None:
        return []
    return [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(e) for e in eos_token_id]


def slot_id(t: int, g: int, num_mbs: int) -> int:
    return (t + 1) * num_mbs + g


def ring_recv(stage: int, num_stages: int, num_mbs: int, t: int, g: int) -> Optional[Msg]:
    """The message stage ``stage`` receives as the input of slot (t, g), if any."""
    if stage > 0:
        return Msg("act", slot_id(t, g, num_mbs), stage - 1)
    if t >= 0 and num_stages > 1:
        return Msg("tok", slot_id(t - 1, g, num_mbs), num_stages - 1)
    return None


def ring_send(stage: int, num_stages: int, num_mbs: int, t: int, g: int, done_pass: bool) -> Optional[Msg]:
    """The message stage ``stage`` sends after slot (t, g), if any."""
    if stage < num_stages - 1:
        return Msg("act", slot_id(t, g, num_mbs), stage + 1)
    if num_stages > 1 and not done_pass:
        return Msg("tok", slot_id(t, g, num_mbs), 0)
    return None


def ring_slots(num_stages: int, t_end: Sequence[int]) -> list[tuple[int, int, bool]]:
    """(t, g, done_pass) of every slot, in visiting order, when micro-batch g samples its last token at slot
    ``t_end[g]`` (the same list on every stage)."""
    last_t = {g: te + (1 if num_stages > 1 else 0) for g, te in enumerate(t_end)}
    out = []
    for t in range(-1, max(last_t.values(), default=-1) + 1):
        out += [(t, g, num_stages > 1 and t == last_t[g]) for g in range(len(t_end)) if t <= last_t[g]]
    return out


class TokReceives:
    """When stage 0 (of P > 1) posts the receive of each token message from the last stage.

    The last stage sends the tokens of slot k right after its slot k, which in steady state is when stage 0
    finishes slot k + P - 1 (stage s runs s slots behind stage 0). Stage 0 consumes them only at its slot
    (t+1, g), G slots after (t, g). Posting the receive when it is *consumed* would leave the last stage
    blocked in its send while stage 0 waits to send to stage 1 (a cycle under rendezvous point-to-point
    semantics whenever G > P); so stage 0 posts it P - 1 slots after its own slot k (or earlier when its
    next slot needs it), and keeps the message until it is used."""

    def __init__(self, num_stages: int, num_mbs: int):
        self.P, self.G = num_stages, num_mbs
        self.slots: list[tuple[int, int, bool]] = []
        self.index: dict[tuple[int, int], int] = {}
        self.posted = 0

    def after(self, slot: tuple[int, int, bool], nxt: Optional[tuple[int, int]]) -> list[Msg]:
        """Token receives to post in the batch after slot ``slot`` = (t, g, done_pass); ``nxt`` the next slot."""
        self.index[slot[:2]] = len(self.slots)
        self.slots.append(slot)
        target = len(self.slots) - 1 - (self.P - 1)
        if nxt is not None and nxt[0] >= 0:
            target = max(target, self.index[(nxt[0] - 1, nxt[1])])
        out = []
        while self.posted <= target:
            t, g, done_pass = self.slots[self.posted]
            self.posted += 1
            if not done_pass:  # the last stage sends nothing after a done pass
                out.append(Msg("tok", slot_id(t, g, self.G), self.P - 1))
        return out


def ring_ops(stage: int, num_stages: int, num_mbs: int, has_slot: Callable[[int, int], bool],
             was_done_pass: Callable[[int, int], bool]) -> Iterator[PipeOp]:
    """The ops of one stage of the ring, generated lazily: ``fwd(slot)`` and one batched ``comm`` after each
    slot. ``has_slot(t, g)`` says whether this stage still visits slot (t, g) and ``was_done_pass(t, g)``
    whether the slot just run was a done pass; both are asked only after the previous ``fwd`` ran, so the
    stream can follow what the run found out (which micro-batches finished). ``run_schedule`` interprets it."""
    P, G, s = num_stages, num_mbs, stage
    toks = TokReceives(P, G) if s == 0 and P > 1 else None
    if s > 0:
        yield PipeOp("comm", recvs=(ring_recv(s, P, G, -1, 0),))
    slot: Optional[tuple[int, int]] = (-1, 0)
    while slot is not None:
        t, g = slot
        yield PipeOp("fwd", slot_id(t, g, G))
        done = was_done_pass(t, g)
        nxt = next(((t2, g2) for t2, g2 in [(t, x) for x in range(g + 1, G)] + [(t + 1, x) for x in range(G)]
                    if has_slot(t2, g2)), None)
        send = ring_send(s, P, G, t, g, done)
        if toks is not None:
            recvs = tuple(toks.after((t, g, done), nxt))
        else:
            recvs = (ring_recv(s, P, G, *nxt),) if nxt is not None and s > 0 else ()
        if send or recvs:
            yield PipeOp("comm", sends=(send,) if send else (), recvs=recvs)
        slot = nxt


def ring_schedule(num_stages: int, t_end: Sequence[int]) -> Schedule:
    """The whole ring as data when micro-batch g samples its last token at slot ``t_end[g]``."""
    last_t = [te + (1 if num_stages > 1 else 0) for te in t_end]
    return [list(ring_ops(s, num_stages, len(t_end), lambda t, g: t <= last_t[g],
                          lambda t, g: num_stages > 1 and t == last_t[g]))
            for s in range(num_stages)]


def ring_needs(num_stages: int, num_mbs: int):
    """For ``check_schedule``: the message a ring slot needs."""
    def needs(stage: int, op: PipeOp) -> list[tuple[str, int]]:
        t, g = op.mb // num_mbs - 1, op.mb % num_mbs
        m = ring_recv(stage, num_stages, num_mbs, t, g)
        return [] if m is None else [(m.kind, m.mb)]

    return needs


def split_prompts(num_prompts: int, num_mbs: int) -> list[range]:
    """Contiguous, nearly equal micro-batches (the first ones one longer)."""
    G = max(1, min(num_mbs, num_prompts))
    base, extra = divmod(num_prompts, G)
    out, a = [], 0
    for g in range(G):
        n = base + (1 if g < extra else 0)
        out.append(range(a, a + n))
        a += n
    return out


class DecodePool:
    """KV caches and their captured decode steps kept from one ``generate`` call to the next.

    Capturing a decode step (an eager warm-up step, the capture, the graph's instantiation) costs tens of
    milliseconds of host time per call, during which the GPU waits. A model whose generation call has its
    devices to itself (``ParallelModel.keep_decode_graphs``) keeps them instead: a later call with the same
    micro-batch size and a cache of the same capacity (rounded up to ``CAPACITY_STEP`` tokens) replays at
    once. Safe because a decode step reads only cache rows written earlier in the same call (positions
    below its own) and the graph reads the weights where they were at capture: an entry whose parameter
    buffer has moved since (offload, reload) is dropped, and ``clear`` frees everything."""

    CAPACITY_STEP = 128

    def __init__(self, max_entries: int = 4):
        self.max_entries = max_entries
        self.entries: list[tuple[tuple, int, object, object]] = []  # (key, weights, cache, runner)

    def capacity(self, tokens: int) -> int:
        return -(-tokens // self.CAPACITY_STEP) * self.CAPACITY_STEP

    def take(self, key: tuple, weights_at: int):
        """A kept (cache, runner) for ``key`` whose weights are still at ``weights_at``, or None."""
        self.entries = [e for e in self.entries if e[1] == weights_at]
        for i, e in enumerate(self.entries):
            if e[0] == key:
                del self.entries[i]
                return e[2], e[3]
        return None

    def give(self, key: tuple, weights_at: int, cache, runner) -> None:
        self.entries.append((key, weights_at, cache, runner))
        del self.entries[:-self.max_entries]

    def clear(self) -> None:
        self.entries.clear()


class _MicroBatch:
    """Per micro-batch state on one stage."""

    def __init__(self, prompts, seq_ids, model, max_new_tokens: int, device, pool: Optional[DecodePool] = None,
                 weights_at: int = 0):
        self.prompts = [list(p) for p in prompts]
        self.seq_ids = list(seq_ids)
        self.B = len(prompts)
        self.lengths = torch.tensor([len(p) for p in prompts], dtype=torch.int64, device=device)
        self.tokens, self.cu = pack_sequences(self.prompts, device=device)
        capacity = max(len(p) for p in prompts) + max_new_tokens
        if stream_decode_usable(model, self.B, device):
            capacity = working_set.stream_cache_len(capacity)  # the one-launch step's whole slots
        self.pool, self.weights_at = pool, weights_at
        self.pool_key = None
        if pool is not None:
            capacity = pool.capacity(capacity)
            self.pool_key = (self.B, capacity, str(device))
            kept = pool.take(self.pool_key, weights_at)
            if kept is not None:
                self.cache, self.decode = kept
                self._init_state(device)
                return
        self.cache = model.new_kv_cache(self.B, capacity)
        # One tp rank on a GPU: decode steps replay a captured CUDA graph (collectives stay uncaptured).
        self.decode = decode_runner(model, self.cache, device.type == "cuda" and not model.has_tp_hooks())
        self._init_state(device)

    def _init_state(self, device) -> None:
        self.alive = True  # this stage still has slots of it
        self.finished = torch.zeros(self.B, dtype=torch.bool, device=device)
        self.next_tokens: Optional[torch.Tensor] = None  # pp = 1: the tokens to feed at the next slot
        self.out_tok: list[torch.Tensor] = []
        self.out_lp: list[torch.Tensor] = []
        self.out_mask: list[torch.Tensor] = []
        self.u_BN: Optional[torch.Tensor] = None

    def release(self, completed: bool) -> None:
        """The call is over: keep the cache and captured step in the pool (if any, and the call completed),
        else let them go."""
        if completed and self.pool is not None and self.cache is not None:
            self.pool.give(self.pool_key, self.weights_at, self.cache, self.decode)
        self.cache = self.decode = None


@torch.no_grad()
def pipelined_generate(pm, prompts: Sequence[Sequence[int]], cfg: GenerationConfig, *, eos_token_id,
                       pad_token_id: int, seed: int, step: int, seq_ids: Optional[Sequence[int]],
                       num_micro_batches: int) -> Optional[GenerationOutput]:
    """The ring (module docstring) for a ``ParallelModel`` of an actor; see ``ParallelModel.generate``."""
    model, groups, spec = pm.model, pm.groups, pm.spec
    if spec.is_critic:
        raise ValueError("generate needs an actor, not a critic")
    B = len(prompts)
    seq_ids = checked_seq_ids(prompts, seq_ids)
    P, s = groups.num_stages, groups.stage
    last = s == P - 1
    N = cfg.max_new_tokens
    eos = _eos_list(eos_token_id)
    dev, h = pm.device, spec.hidden_size
    eos_t = torch.tensor(eos, dtype=torch.int64, device=dev)
    parts = split_prompts(B, num_micro_batches)
    G = len(parts)
    pool, at = pm.decode_pool, pm.flat.data_ptr()
    mbs = [_MicroBatch([prompts[i] for i in r], [seq_ids[i] for i in r], model, N, dev, pool, at) for r in parts]
    if last and not cfg.greedy:
        for m in mbs:
            m.u_BN = torch.from_numpy(keyed_uniforms(seed, step, m.seq_ids, N)).to(dev)
    model.eval()
    sp_before = pm.tp_state.sp_active
    pm.tp_state.sp_active = False  # one token per sequence per step: nothing to shard
    try:
        _run_ring(pm, mbs, cfg, eos, eos_t, pad_token_id, P, s, G, N, dev, h)
    finally:
        pm.tp_state.sp_active = sp_before
    if not last:
        return None
    return _assemble(mbs, eos, eos_t, pad_token_id, spec.vocab_size, cfg)


def _run_ring(pm, mbs, cfg, eos, eos_t, pad_token_id, P, s, G, N, dev, h) -> None:
    """This stage's part of the ring: ``ring_ops`` interpreted by ``pipeline.run_schedule``."""
    model, groups = pm.model, pm.groups
    first, last = s == 0, s == P - 1
    outbox: dict[int, list[torch.Tensor]] = {}
    done_pass_at: set[tuple[int, int]] = set()

    def incoming(msg: Msg) -> list[torch.Tensor]:
        t, g = msg.mb // G - 1, msg.mb % G
        m = mbs[g]
        if msg.kind == "tok":
            return [torch.empty(m.B + 1, dtype=torch.int64, device=dev)]
        rows = m.tokens.shape[0] if t == -1 else m.B
        return [torch.empty(rows, h, dtype=pm.dtype, device=dev), torch.empty(1, dtype=torch.int64, device=dev)]

    prog = StageProgram(forward=None, backward=None, outgoing=lambda msg: outbox.pop(msg.mb), incoming=incoming,
                        peer_rank=groups.stage_rank)

    def fwd(k: int) -> None:
        t, g = k // G - 1, k % G
        m = mbs[g]
        msg = ring_recv(s, P, G, t, g)
        got = prog.inbox.pop((msg.kind, msg.mb)) if msg is not None else None
        if first:  # tokens: the prompts, this stage's own draw (P = 1), or the last stage's message
            if t == -1:
                ctrl, x = ALIVE, m.tokens
            elif P == 1:
                ctrl, x = ALIVE, m.next_tokens
            else:
                ctrl, x = int(got[0][-1]), got[0][:-1]
        else:
            ctrl, x = int(got[1][0]), got[0]
        if ctrl == DONE:  # the done pass: hand it on, then forget this micro-batch
            done_pass_at.add((t, g))
            m.alive = False
            if not last:
                outbox[k] = [torch.zeros(m.B, h, dtype=pm.dtype, device=dev), torch.tensor([DONE], device=dev)]
            return
        if t == -1 and P == 1:
            y = model.prefill(x, m.cu, m.cache, model.prefill_chunk_tokens(cfg.lean_memory))  # bounded groups
            m.decode.after_prefill()
        elif t == -1:
            y = model(x, m.cu, kv_cache=m.cache, select_rows=(m.cu[1:] - 1).long() if last else None)
            m.decode.after_prefill()
        else:
            y = m.decode(x, m.lengths + t)
        if not last:
            outbox[k] = [y.contiguous(), torch.tensor([ALIVE], device=dev)]
            return
        tok, stop = _sample(m, gather_last_logits(y, groups.tp), cfg, t + 1, eos, eos_t, pad_token_id, N,
                            pm.spec.vocab_size)
        if P == 1:
            m.next_tokens, m.alive = tok, not stop
        else:
            outbox[k] = [torch.cat([tok, torch.tensor([DONE if stop else ALIVE], device=dev)])]

    prog.forward = fwd
    ops = ring_ops(s, P, G, has_slot=lambda t, g: mbs[g].alive, was_done_pass=lambda t, g: (t, g) in done_pass_at)
    completed = False
    try:
        run_schedule(ops, prog)
        completed = True
    finally:
        prog.forward = None  # break prog -> fwd -> prog: the caches and graphs go with the call, not at the next gc
        for m in mbs:
            m.release(completed)


def _sample(m: _MicroBatch, logits_BV: torch.Tensor, cfg: GenerationConfig, i: int, eos, eos_t, pad_token_id: int,
            N: int, vocab_size: int) -> tuple[torch.Tensor, bool]:
    """Draw token ``i`` of micro-batch ``m`` exactly as ``reallm.model.generate.generate``; returns (tokens
    to feed next, whether the micro-batch is finished)."""
    tok, lp, mask = sampling_step(logits_BV, cfg, i, eos, None if m.u_BN is None else m.u_BN[:, i], vocab_size)
    if eos:  # (without an EOS no row ever finishes early)
        tok = torch.where(m.finished, torch.full_like(tok, pad_token_id), tok)
        lp = torch.where(m.finished, torch.zeros_like(lp), lp)
    m.out_tok.append(tok)
    m.out_lp.append(lp)
    if mask is not None:
        m.out_mask.append(mask[:, :vocab_size] & ~m.finished[:, None])
    if eos:
        m.finished = m.finished | torch.isin(tok, eos_t)
    return tok, i == N - 1 or (should_poll(i, eos) and bool(m.finished.all()))


def _assemble(mbs, eos, eos_t, pad_token_id: int, vocab_size: int, cfg: GenerationConfig) -> GenerationOutput:
    steps = max(len(m.out_tok) for m in mbs)
    toks, lps, masks, lengths, no_eos = [], [], [], [], []
    for m in mbs:
        tk, lp = torch.stack(m.out_tok, 1), torch.stack(m.out_lp, 1)
        n = tk.shape[1]
        if eos:
            is_eos = torch.isin(tk, eos_t)
            first = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, torch.full_like(m.lengths, n))
        else:
            first = torch.full_like(m.lengths, n)
        pad = steps - n
        toks.append(torch.nn.functional.pad(tk, (0, pad), value=pad_token_id))
        lps.append(torch.nn.functional.pad(lp, (0, pad), value=0.0))
        if m.out_mask:
            mk = torch.stack(m.out_mask, 1)
            masks.append(torch.nn.functional.pad(mk, (0, 0, 0, pad), value=False))
        lengths.append(first)
        no_eos.append(~m.finished)
    return GenerationOutput(torch.cat(toks), torch.cat(lps), torch.cat(lengths), torch.cat(no_eos),
                            torch.cat(masks) if masks else None)
