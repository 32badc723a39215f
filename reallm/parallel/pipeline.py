"""Pipeline schedules as data, a checker that proves them deadlock-free, and the interpreter that runs them.

A schedule is, per stage, a list of ``PipeOp``: ``fwd(mb)``, ``bwd(mb)``, or ``comm`` (a batch of sends
and receives posted together and then awaited together, ``executor.comm.exchange``). Messages are
``Msg(kind, mb, peer)``: kind ``act`` (stage output, forward) or ``grad`` (input gradient, backward).

Training: 1F1B (PipeDream-flush, Megatron's non-interleaved schedule). Stage s of p with m micro-batches
runs w = min(p - s - 1, m) warm-up forwards, then alternates one forward and one backward, then w
cool-down backwards; at most p - s micro-batches' activations are alive on stage s. In the steady state
the send of an output and the receive of the next gradient are one batch (and the send of a gradient
with the receive of the next input), which is what keeps neighbours from waiting on each other::

    warm-up   i < w:        [recv act i]  fwd i  [send act i]
    steady    j < m - w:    fwd w+j  comm(send act w+j, recv grad j)  bwd j  comm(send grad j, recv act w+j+1)
    cool-down j >= m - w:   [recv grad j]  bwd j  [send grad j]

Inference: ``forward_schedule`` runs each micro-batch through the stages; stage s posts the send of output
k together with the receive of input k+1.

``check_schedule`` simulates a schedule with rendezvous semantics (a batch completes once every one of its
messages has been posted by the peer, in per-pair FIFO order, the way NCCL matches point-to-point
operations) and raises if it can deadlock, if messages do not match, or if an op runs before its input.
The generation ring (``reallm.parallel.generate``) uses the same message kinds, checker and interpreter.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch

from executor import comm


@dataclass(frozen=True)
class Msg:
    """One point-to-point message: what (``act``, ``grad``, ``tok``, ...), of which micro-batch/slot, with whom
    (a stage index)."""

    kind: str
    mb: int
    peer: int


@dataclass(frozen=True)
class PipeOp:
    kind: str  # "fwd" | "bwd" | "comm"
    mb: int = -1
    sends: tuple[Msg, ...] = ()
    recvs: tuple[Msg, ...] = ()

    def __str__(self) -> str:
        if self.kind == "comm":
            s = " ".join(f"send:{m.kind}{m.mb}->{m.peer}" for m in self.sends)
            r = " ".join(f"recv:{m.kind}{m.mb}<-{m.peer}" for m in self.recvs)
            return f"comm({' '.join(x for x in (s, r) if x)})"
        return f"{self.kind}{self.mb}"


Schedule = list[list[PipeOp]]


def _comm(sends=(), recvs=()) -> list[PipeOp]:
    sends, recvs = tuple(m for m in sends if m), tuple(m for m in recvs if m)
    return [PipeOp("comm", sends=sends, recvs=recvs)] if sends or recvs else []


def forward_schedule(num_stages: int, num_mbs: int) -> Schedule:
    """Inference: per stage, fwd of every micro-batch; output k's send batched with input k+1's receive."""
    out: Schedule = []
    for s in range(num_stages):
        first, last = s == 0, s == num_stages - 1
        ops: list[PipeOp] = []
        if not first and num_mbs:
            ops += _comm(recvs=[Msg("act", 0, s - 1)])
        for k in range(num_mbs):
            ops.append(PipeOp("fwd", k))
            send = None if last else Msg("act", k, s + 1)
            recv = None if first or k + 1 == num_mbs else Msg("act", k + 1, s - 1)
            ops += _comm([send], [recv])
        out.append(ops)
    return out


def one_f_one_b_schedule(num_stages: int, num_mbs: int) -> Schedule:
    """Training: 1F1B (module docstring)."""
    return [_one_f_one_b_stage(s, num_stages, num_mbs) for s in range(num_stages)]


def _one_f_one_b_stage(s: int, num_stages: int, num_mbs: int) -> list[PipeOp]:
    first, last = s == 0, s == num_stages - 1
    recv_act = (lambda k: None) if first else (lambda k: Msg("act", k, s - 1))
    send_act = (lambda k: None) if last else (lambda k: Msg("act", k, s + 1))
    recv_grad = (lambda k: None) if last else (lambda k: Msg("grad", k, s + 1))
    send_grad = (lambda k: None) if first else (lambda k: Msg("grad", k, s - 1))
    w = min(num_stages - s - 1, num_mbs)
    steady = num_mbs - w
    ops: list[PipeOp] = []
    for i in range(w):
        ops += _comm(recvs=[recv_act(i)])
        ops.append(PipeOp("fwd", i))
        ops += _comm([send_act(i)])
    if steady:
        ops += _comm(recvs=[recv_act(w)])
    for j in range(steady):
        ops.append(PipeOp("fwd", w + j))
        ops += _comm([send_act(w + j)], [recv_grad(j)])
        ops.append(PipeOp("bwd", j))
        if j == steady - 1:
            ops += _comm([send_grad(j)])
        else:
            ops += _comm([send_grad(j)], [recv_act(w + j + 1)])
    for j in range(steady, num_mbs):
        ops += _comm(recvs=[recv_grad(j)])
        ops.append(PipeOp("bwd", j))
        ops += _comm([send_grad(j)])
    return ops


# -- checking -----------------------------------------------------------------------------------------------


def check_schedule(schedule: Schedule, *, training: bool = True,
                   needs: Optional[Callable[[int, PipeOp], list[tuple[str, int]]]] = None) -> int:
    """Simulate ``schedule`` (module docstring); return the number of rounds, raise ``ValueError`` if wrong.

    ``needs(stage, op)`` lists the messages (kind, mb) that must have arrived before a compute op; the
    default is the pipeline rule (fwd needs ``act`` from the previous stage unless first, bwd needs ``grad``
    from the next stage unless last, and bwd needs this stage's fwd)."""
    p = len(schedule)
    pc = [0] * p
    posted_send: dict[tuple[int, int], list[tuple[str, int]]] = defaultdict(list)  # (src, dst) -> msgs
    posted_recv: dict[tuple[int, int], list[tuple[str, int]]] = defaultdict(list)  # (src, dst) -> msgs
    in_flight: list[Optional[PipeOp]] = [None] * p  # a comm op posted and not yet complete
    arrived: list[set] = [set() for _ in range(p)]
    done_fwd: list[set] = [set() for _ in range(p)]
    done_bwd: list[set] = [set() for _ in range(p)]

    def default_needs(s: int, op: PipeOp) -> list[tuple[str, int]]:
        if op.kind == "fwd":
            return [] if s == 0 else [("act", op.mb)]
        return [] if s == p - 1 else [("grad", op.mb)]

    needs = needs or default_needs
    rounds = 0
    while any(pc[s] < len(schedule[s]) for s in range(p)):
        rounds += 1
        progressed = False
        for s in range(p):
            if pc[s] >= len(schedule[s]):
                continue
            op = schedule[s][pc[s]]
            if op.kind in ("fwd", "bwd"):
                missing = [m for m in needs(s, op) if m not in arrived[s]]
                if missing:
                    raise ValueError(f"stage {s}: {op} runs before {missing} arrived")
                if op.kind == "bwd" and training and op.mb not in done_fwd[s]:
                    raise ValueError(f"stage {s}: {op} before its forward")
                (done_fwd if op.kind == "fwd" else done_bwd)[s].add(op.mb)
                pc[s] += 1
                progressed = True
                continue
            if in_flight[s] is None:
                for m in op.sends:
                    posted_send[(s, m.peer)].append((m.kind, m.mb))
                for m in op.recvs:
                    posted_recv[(m.peer, s)].append((m.kind, m.mb))
                in_flight[s] = op
                progressed = True
            # Complete when each message's partner is posted: the k-th send s->q with the k-th recv at q from s.
            ok = True
            for m in op.sends:
                k = _position(schedule[s], pc[s], m, s, send=True)
                got = posted_recv[(s, m.peer)]
                if len(got) <= k:
                    ok = False
                elif got[k] != (m.kind, m.mb):
                    raise ValueError(f"stage {s} sends {m.kind}{m.mb} to {m.peer} which expects {got[k]}")
            for m in op.recvs:
                k = _position(schedule[s], pc[s], m, s, send=False)
                got = posted_send[(m.peer, s)]
                if len(got) <= k:
                    ok = False
                elif got[k] != (m.kind, m.mb):
                    raise ValueError(f"stage {s} expects {m.kind}{m.mb} from {m.peer} which sends {got[k]}")
            if ok:
                arrived[s].update((m.kind, m.mb) for m in op.recvs)
                in_flight[s] = None
                pc[s] += 1
                progressed = True
        if not progressed:
            where = {s: str(schedule[s][pc[s]]) for s in range(p) if pc[s] < len(schedule[s])}
            raise ValueError(f"deadlock: stages wait at {where}")
    for (src, dst), msgs in list(posted_send.items()):
        if len(msgs) != len(posted_recv[(src, dst)]):
            raise ValueError(f"{len(msgs)} messages {src}->{dst} but {len(posted_recv[(src, dst)])} receives")
    return rounds


def _position(ops: Sequence[PipeOp], upto: int, m: Msg, s: int, send: bool) -> int:
    """Index of message ``m`` among every message this stage exchanges with ``m.peer`` in that direction."""
    k = 0
    for op in ops[:upto]:
        k += sum(1 for x in (op.sends if send else op.recvs) if x.peer == m.peer)
    cur = ops[upto]
    for x in (cur.sends if send else cur.recvs):
        if x == m:
            return k
        if x.peer == m.peer:
            k += 1
    raise AssertionError("message not in op")


# -- running -------------------------------------------------------------------------------------------------


@dataclass
class StageProgram:
    """What a stage does for each op of its schedule. Tensors to send come from ``outgoing(msg)``; received
    tensors are allocated by ``incoming(msg)`` (shapes are known to every rank) and kept in ``inbox``."""

    forward: Callable[[int], None]
    backward: Callable[[int], None]
    outgoing: Callable[[Msg], list[torch.Tensor]]
    incoming: Callable[[Msg], list[torch.Tensor]]
    peer_rank: Callable[[int], int]
    inbox: dict[tuple[str, int], list[torch.Tensor]] = field(default_factory=dict)


def run_schedule(ops: Iterable[PipeOp], prog: StageProgram) -> None:
    """Interpret one stage's ops: a list, or a generator that decides the next ops from what ran (the
    generation ring)."""
    for op in ops:
        if op.kind == "fwd":
            prog.forward(op.mb)
        elif op.kind == "bwd":
            prog.backward(op.mb)
        else:
            sends = [(t, prog.peer_rank(m.peer)) for m in op.sends for t in prog.outgoing(m)]
            recvs = []
            for m in op.recvs:
                bufs = prog.incoming(m)
                prog.inbox[(m.kind, m.mb)] = bufs
                recvs += [(t, prog.peer_rank(m.peer)) for t in bufs]
            comm.exchange(sends, recvs)
