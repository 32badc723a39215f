"""The step simulator: a pure function of flat cost tables and one candidate index per call.

``CostTables`` is all the search sees (built by ``planner.cost_model.tables``, or at random in tests).
``simulate(tables, assignment)`` is the pure-Python reference; ``planner._anneal`` (C++) holds a line-by-
line copy and tests check they agree.

Schedule (the executor's: one global order, every device runs its tasks in that order). For step
i = 0..K−1, for each call c in the global topological order (``tables.call_names``):

  1. transfers into c, one per data edge p → c in order: time ``transfer_time_s`` (formula in
     ``planner.cost_model.transfer``) on the devices heads(p) ∪ mesh(c), after p (step i) ends;
  2. reallocation into c when c's model has its weights of record on another call r (its train call):
     pair-table time on mesh(r) ∪ mesh(c), after r ends (step i if r precedes c in the order, else
     step i−1); it includes the train state's offload to host and back when the meshes overlap;
  3. the call: its candidate's time (+ its host load when its mesh is shared with another call: a frozen
     model's weights come back from host memory; a train call runs eager instead of from CUDA graphs; a
     generation call captures its decode step anew), after its in-step predecessors (data and parameter
     edges), its cross-step predecessors (step i−1) and its transfers/reallocation.

  A task starts when its dependencies are done and all its devices are free (list scheduling in the
  fixed order: calls on disjoint meshes overlap, shared meshes serialise); a zero-time task is skipped.
  step_end(i) = the last end among step i's tasks; objective = (step_end(K−1) − step_end(0)) / (K−1),
  the steady-state step time.

Memory (independent of timing under the executor's policy, ``planner.cost_model.memory``): on each
device d of each call c,
      transient(c) + Σ_{trained models X with d ∈ mesh(train_X)} state(train_X) · counted(X, c)
where counted is false only when c is a non-train call of X that is not identical to X's train
placement (the state is in host memory then), and transient(c) drops the weight replica when it is
identical (``cand_mem_shared_bytes``; with ``memory.offload_train_state`` the tables state it net of the
gradients and Adam states that wait in host memory during such a call, ``cost_model/tables.py``). Any device above ``memory_capacity_bytes`` makes the assignment infeasible (objective inf).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

import numpy as np


@dataclass
class CostTables:
    """Flat tables over calls (in global order) and their candidates (see the module docstring).

    Candidate arrays are indexed by a global candidate index; call i owns ``[cand_offset[i],
    cand_offset[i+1])``. Device masks are ``uint64`` words (device d is bit d%64 of word d//64)."""

    num_devices: int
    memory_capacity_bytes: float
    call_names: list[str]
    call_role: np.ndarray  # int64 [n_calls]
    call_is_train: np.ndarray  # bool [n_calls]
    role_train_call: np.ndarray  # int64 [n_roles], -1 for frozen models
    preds: list[list[int]]  # in-step predecessors (earlier in the order)
    cross_preds: list[list[int]]  # predecessors at the previous step
    cand_offset: np.ndarray  # int64 [n_calls + 1]
    cand_time_s: np.ndarray
    cand_mem_bytes: np.ndarray
    cand_mem_shared_bytes: np.ndarray
    cand_state_bytes: np.ndarray
    cand_host_load_s: np.ndarray
    cand_mask: np.ndarray  # uint64 [n_cand, W]
    cand_heads: np.ndarray  # uint64 [n_cand, W]
    cand_nodes: np.ndarray  # uint64 [n_cand, Wn]
    cand_layout: np.ndarray  # int64 [n_cand]: equal ids = equal (dp, tp, pp)
    cand_dp: np.ndarray  # int64
    cand_replicas: np.ndarray  # int64: tp·pp
    edge_src: np.ndarray  # int64 [n_edges] (call indices)
    edge_dst: np.ndarray
    edge_bytes: np.ndarray  # float64
    pair_record: np.ndarray  # int64 [n_pairs]: the call holding the weights of record
    pair_other: np.ndarray  # int64 [n_pairs]
    pair_offset: np.ndarray  # int64 [n_pairs + 1] into pair_time_s (row-major n_record × n_other)
    pair_time_s: np.ndarray  # float64
    link_rates: tuple[float, float, float, float] = (1.0, 0.0, 1.0, 0.0)  # intra bw, intra lat, inter bw, inter lat
    num_steps: int = 4
    #: Neighbour groups for the annealer's moves: candidates with equal ids share a mesh / a layout.
    cand_mesh_group: Optional[np.ndarray] = None
    cand_shape_group: Optional[np.ndarray] = None
    #: Python-side only: the Placement of each candidate per call (None for random tables).
    placements: Optional[list[list]] = None
    notes: dict = field(default_factory=dict)

    @property
    def num_calls(self) -> int:
        return len(self.call_names)

    def num_candidates(self, call: int) -> int:
        return int(self.cand_offset[call + 1] - self.cand_offset[call])

    def to_arrays(self) -> dict:
        """Everything the C++ module needs, as numpy arrays and ints."""
        W = self.cand_mask.shape[1]
        n_e = len(self.edge_src)
        flat_preds = [x for p in self.preds for x in p]
        flat_cross = [x for p in self.cross_preds for x in p]
        mg = self.cand_mesh_group if self.cand_mesh_group is not None else _mask_groups(self.cand_mask)
        sg = self.cand_shape_group if self.cand_shape_group is not None else np.arange(len(self.cand_time_s))
        return {
            "num_devices": int(self.num_devices), "num_steps": int(self.num_steps), "mask_words": int(W),
            "node_words": int(self.cand_nodes.shape[1]), "memory_capacity_bytes": float(self.memory_capacity_bytes),
            "call_role": _i64(self.call_role), "call_is_train": _i64(self.call_is_train),
            "role_train_call": _i64(self.role_train_call),
            "pred_offset": _i64(np.cumsum([0] + [len(p) for p in self.preds])), "preds": _i64(flat_preds),
            "cross_offset": _i64(np.cumsum([0] + [len(p) for p in self.cross_preds])), "cross": _i64(flat_cross),
            "cand_offset": _i64(self.cand_offset), "cand_time_s": _f64(self.cand_time_s),
            "cand_mem_bytes": _f64(self.cand_mem_bytes), "cand_mem_shared_bytes": _f64(self.cand_mem_shared_bytes),
            "cand_state_bytes": _f64(self.cand_state_bytes), "cand_host_load_s": _f64(self.cand_host_load_s),
            "cand_mask": np.ascontiguousarray(self.cand_mask, dtype=np.uint64).ravel(),
            "cand_heads": np.ascontiguousarray(self.cand_heads, dtype=np.uint64).ravel(),
            "cand_nodes": np.ascontiguousarray(self.cand_nodes, dtype=np.uint64).ravel(),
            "cand_layout": _i64(self.cand_layout), "cand_dp": _i64(self.cand_dp),
            "cand_replicas": _i64(self.cand_replicas), "cand_mesh_group": _i64(mg), "cand_shape_group": _i64(sg),
            "edge_src": _i64(self.edge_src if n_e else []), "edge_dst": _i64(self.edge_dst if n_e else []),
            "edge_bytes": _f64(self.edge_bytes if n_e else []),
            "pair_record": _i64(self.pair_record), "pair_other": _i64(self.pair_other),
            "pair_offset": _i64(self.pair_offset), "pair_time_s": _f64(self.pair_time_s),
            "link_rates": _f64(self.link_rates),
        }


def _i64(x) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, dtype=np.int64))


def _f64(x) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, dtype=np.float64))


def _mask_groups(masks: np.ndarray) -> np.ndarray:
    ids: dict[bytes, int] = {}
    return np.array([ids.setdefault(m.tobytes(), len(ids)) for m in masks], dtype=np.int64)


def mask_of(devices, words: int) -> np.ndarray:
    m = np.zeros(words, dtype=np.uint64)
    for d in devices:
        m[d // 64] |= np.uint64(1) << np.uint64(d % 64)
    return m


def _as_int(words: np.ndarray) -> int:
    return sum(int(w) << (64 * i) for i, w in enumerate(words))


def _bits(x: int) -> list[int]:
    out, i = [], 0
    while x:
        if x & 1:
            out.append(i)
        x >>= 1
        i += 1
    return out


@dataclass
class Task:
    step: int
    kind: str  # call | transfer | realloc
    call: int
    other: int  # producer (transfer) / record call (realloc); -1 for calls
    devices: tuple[int, ...]
    start_s: float
    end_s: float


@dataclass
class SimResult:
    step_time_s: float
    feasible: bool
    #: Per call: peak bytes on its worst device during the call, and its duration (with host load).
    peak_memory_bytes: list[float]
    call_time_s: list[float]
    #: Bytes above capacity summed over (call, device) violations (0 when feasible).
    overflow_bytes: float
    step_ends_s: list[float]
    tasks: list[Task] = field(default_factory=list)


class _Prepared:
    """Python-int masks and per-call lookups, cached on the tables object."""

    def __init__(self, t: CostTables):
        self.mask = [_as_int(m) for m in t.cand_mask]
        self.heads = [_as_int(m) for m in t.cand_heads]
        self.nodes = [_as_int(m) for m in t.cand_nodes]
        self.bits = [_bits(m) for m in self.mask]
        self.edges_into = [[e for e in range(len(t.edge_src)) if int(t.edge_dst[e]) == c] for c in range(t.num_calls)]
        self.pairs_into = [[q for q in range(len(t.pair_record)) if int(t.pair_other[q]) == c]
                           for c in range(t.num_calls)]
        self.order_pos = {c: c for c in range(t.num_calls)}


def _prepared(t: CostTables) -> _Prepared:
    p = t.notes.get("_prepared")
    if p is None:
        p = _Prepared(t)
        t.notes["_prepared"] = p
    return p


def transfer_time_s(t: CostTables, pr: _Prepared, nbytes: float, a: int, b: int) -> float:
    """Data edge time from producer candidate a to consumer candidate b (``cost_model.transfer``)."""
    if nbytes <= 0:
        return 0.0
    same = 1 if (pr.mask[a] == pr.mask[b] and t.cand_layout[a] == t.cand_layout[b]) else 0
    out = nbytes * (int(t.cand_replicas[b]) - same) / int(t.cand_dp[a])
    if out <= 0:
        return 0.0
    inb = nbytes / int(t.cand_dp[b])
    one_node = bin(pr.nodes[a] | pr.nodes[b]).count("1") == 1
    bw, lat = (t.link_rates[0], t.link_rates[1]) if one_node else (t.link_rates[2], t.link_rates[3])
    return lat + max(out, inb) / bw


def memory_check(t: CostTables, g: Sequence[int]) -> tuple[list[float], float]:
    """Per call peak bytes (worst device) and total overflow, for global candidate indices ``g``."""
    pr = _prepared(t)
    cap = t.memory_capacity_bytes
    peaks, overflow = [], 0.0
    trained = [(x, int(tc)) for x, tc in enumerate(t.role_train_call) if tc >= 0]
    for c in range(t.num_calls):
        a = g[c]
        role = int(t.call_role[c])
        base = float(t.cand_mem_bytes[a])
        own_counted = True
        tc_own = int(t.role_train_call[role])
        if tc_own >= 0 and tc_own != c:
            ta = g[tc_own]
            identical = pr.mask[a] == pr.mask[ta] and t.cand_layout[a] == t.cand_layout[ta]
            if identical:
                base = float(t.cand_mem_shared_bytes[a])
            own_counted = identical
        peak = 0.0
        for d in pr.bits[a]:
            total = base
            for x, tc in trained:
                if x == role and not own_counted:
                    continue
                ta = g[tc]
                if (pr.mask[ta] >> d) & 1:
                    total += float(t.cand_state_bytes[ta])
            peak = max(peak, total)
            if total > cap:
                overflow += total - cap
        peaks.append(peak)
    return peaks, overflow


def simulate(t: CostTables, assignment: Sequence[int], record: bool = False) -> SimResult:
    """Steady-state step time of ``assignment`` (one local candidate index per call; module docstring)."""
    pr = _prepared(t)
    n = t.num_calls
    g = [int(t.cand_offset[c]) + int(assignment[c]) for c in range(n)]
    peaks, overflow = memory_check(t, g)
    durations = []
    for c in range(n):
        a = g[c]
        d = float(t.cand_time_s[a])
        if t.cand_host_load_s[a] > 0 and any(pr.mask[a] & pr.mask[g[o]] for o in range(n) if o != c):
            d += float(t.cand_host_load_s[a])
        durations.append(d)
    if overflow > 0:
        return SimResult(math.inf, False, peaks, durations, overflow, [])
    free = [0.0] * t.num_devices
    end_prev = [0.0] * n
    step_ends = []
    tasks: list[Task] = []

    def run(devs_mask: int, ready: float, dur: float) -> float:
        devs = _bits(devs_mask)
        start = max([ready] + [free[d] for d in devs])
        fin = start + dur
        for d in devs:
            free[d] = fin
        return fin

    for i in range(t.num_steps):
        end = [0.0] * n
        step_end = 0.0
        for c in range(n):
            a = g[c]
            ready = 0.0
            for p in t.preds[c]:
                ready = max(ready, end[p])
            if i > 0:
                for p in t.cross_preds[c]:
                    ready = max(ready, end_prev[p])
            for e in pr.edges_into[c]:
                p = int(t.edge_src[e])
                ap = g[p]
                dur = transfer_time_s(t, pr, float(t.edge_bytes[e]), ap, a)
                if dur > 0:
                    devs = pr.heads[ap] | pr.mask[a]
                    fin = run(devs, end[p], dur)
                    if record:
                        tasks.append(Task(i, "transfer", c, p, tuple(_bits(devs)), fin - dur, fin))
                    ready = max(ready, fin)
                    step_end = max(step_end, fin)
            for q in pr.pairs_into[c]:
                r = int(t.pair_record[q])
                ar = g[r]
                n_other = t.num_candidates(c)
                dur = float(t.pair_time_s[t.pair_offset[q] + (ar - t.cand_offset[r]) * n_other + (a - t.cand_offset[c])])
                dep = end[r] if r < c else (end_prev[r] if i > 0 else 0.0)
                if dur > 0:
                    devs = pr.mask[ar] | pr.mask[a]
                    fin = run(devs, dep, dur)
                    if record:
                        tasks.append(Task(i, "realloc", c, r, tuple(_bits(devs)), fin - dur, fin))
                    ready = max(ready, fin)
                    step_end = max(step_end, fin)
                else:
                    ready = max(ready, dep)
            fin = run(pr.mask[a], ready, durations[c])
            if record:
                tasks.append(Task(i, "call", c, -1, tuple(pr.bits[a]), fin - durations[c], fin))
            end[c] = fin
            step_end = max(step_end, fin)
        step_ends.append(step_end)
        end_prev = end
    K = t.num_steps
    step = (step_ends[-1] - step_ends[0]) / (K - 1) if K > 1 else step_ends[0]
    return SimResult(step, True, peaks, durations, 0.0, step_ends, tasks)


def brute_force(t: CostTables) -> tuple[float, Optional[list[int]]]:
    """The optimum over every assignment (small tables only): (step time, assignment) or (inf, None)."""
    import itertools

    best, arg = math.inf, None
    for combo in itertools.product(*[range(t.num_candidates(c)) for c in range(t.num_calls)]):
        r = simulate(t, combo)
        if r.step_time_s < best - 1e-12:
            best, arg = r.step_time_s, list(combo)
    return best, arg


# -- random tables for tests --------------------------------------------------------------------
def random_tables(rng: np.random.Generator, num_devices: int = 4, num_calls: int = 3, max_candidates: int = 6,
                  devices_per_node: int = 2, num_steps: int = 3) -> CostTables:
    """Random small instances: random masks, times, memory and pair/edge costs, a random DAG with
    one trained model (when there are ≥ 2 calls) whose train call comes last."""
    n = num_calls
    roles = list(rng.integers(0, max(1, n - 1), size=n))
    train_role = roles[-1] if n >= 2 else -1
    if n >= 2:
        roles[-1] = train_role
        # the train call's role may have other (earlier) calls: those get reallocation pairs
    n_roles = max(roles) + 1
    is_train = np.zeros(n, dtype=bool)
    role_train = -np.ones(n_roles, dtype=np.int64)
    if n >= 2:
        is_train[-1] = True
        role_train[train_role] = n - 1
    preds = [[p for p in range(c) if rng.random() < 0.5] for c in range(n)]
    for c in range(n):
        if is_train[c]:
            preds[c] = sorted(set(preds[c]) | {o for o in range(n) if o != c and roles[o] == roles[c]})
    cross = [[] for _ in range(n)]
    if n >= 2:
        first = min(o for o in range(n) if roles[o] == train_role)
        cross[first] = [n - 1]
    counts = [int(rng.integers(1, max_candidates + 1)) for _ in range(n)]
    off = np.cumsum([0] + counts)
    N = int(off[-1])
    masks, heads, nodes, layout, dp, reps = [], [], [], [], [], []
    for _ in range(N):
        size = int(rng.choice([1, 2, 4][: 1 + int(math.log2(num_devices))]))
        start = int(rng.integers(0, num_devices // size)) * size
        devs = list(range(start, start + size))
        masks.append(mask_of(devs, 1))
        d = int(rng.choice([x for x in (1, 2, 4) if size % x == 0]))
        dp.append(d)
        reps.append(size // d)
        layout.append(d)
        heads.append(mask_of(devs[:: size // d][:d], 1))
        nodes.append(mask_of(sorted({x // devices_per_node for x in devs}), 1))
    edges = [(p, c) for c in range(n) for p in preds[c] if rng.random() < 0.7]
    pair_rec, pair_oth, pair_off, pair_t = [], [], [0], []
    if n >= 2:
        tc = n - 1
        for o in range(n - 1):
            if roles[o] == train_role:
                pair_rec.append(tc)
                pair_oth.append(o)
                tab = rng.uniform(0.0, 1.0, size=(counts[tc], counts[o]))
                for ia in range(counts[tc]):
                    for ib in range(counts[o]):
                        a, b = off[tc] + ia, off[o] + ib
                        if np.array_equal(masks[a], masks[b]) and layout[a] == layout[b]:
                            tab[ia, ib] = 0.0
                pair_t.extend(tab.ravel().tolist())
                pair_off.append(len(pair_t))
    cap = 10.0
    return CostTables(
        num_devices=num_devices, memory_capacity_bytes=cap, call_names=[f"c{i}" for i in range(n)],
        call_role=np.array(roles, dtype=np.int64), call_is_train=is_train, role_train_call=role_train,
        preds=preds, cross_preds=cross, cand_offset=off.astype(np.int64),
        cand_time_s=rng.uniform(0.5, 5.0, size=N), cand_mem_bytes=rng.uniform(1.0, 7.0, size=N),
        cand_mem_shared_bytes=rng.uniform(0.5, 4.0, size=N),
        cand_state_bytes=np.where(np.repeat(is_train, counts), rng.uniform(0.5, 4.0, size=N), 0.0),
        cand_host_load_s=np.where(np.repeat(role_train[roles] < 0, counts), rng.uniform(0, 0.5, size=N), 0.0),
        cand_mask=np.array(masks), cand_heads=np.array(heads), cand_nodes=np.array(nodes),
        cand_layout=np.array(layout, dtype=np.int64), cand_dp=np.array(dp, dtype=np.int64),
        cand_replicas=np.array(reps, dtype=np.int64),
        edge_src=np.array([e[0] for e in edges], dtype=np.int64), edge_dst=np.array([e[1] for e in edges], dtype=np.int64),
        edge_bytes=rng.uniform(0.0, 2.0, size=len(edges)),
        pair_record=np.array(pair_rec, dtype=np.int64), pair_other=np.array(pair_oth, dtype=np.int64),
        pair_offset=np.array(pair_off, dtype=np.int64), pair_time_s=np.array(pair_t, dtype=np.float64),
        link_rates=(4.0, 0.01, 1.0, 0.05), num_steps=num_steps,
    )


def subset_tables(t: CostTables, keep: Sequence[Sequence[int]]) -> CostTables:
    """The tables restricted to the candidates ``keep[c]`` (local indices) of every call."""
    import copy

    glob = [[int(t.cand_offset[c]) + a for a in keep[c]] for c in range(t.num_calls)]
    flat = np.array([g for row in glob for g in row], dtype=np.int64)
    off = np.cumsum([0] + [len(r) for r in keep]).astype(np.int64)
    pair_t, pair_off = [], [0]
    for q in range(len(t.pair_record)):
        r, o = int(t.pair_record[q]), int(t.pair_other[q])
        tab = t.pair_time_s[int(t.pair_offset[q]):int(t.pair_offset[q + 1])].reshape(t.num_candidates(r), t.num_candidates(o))
        sub = tab[np.ix_(list(keep[r]), list(keep[o]))]
        pair_t.append(sub.ravel())
        pair_off.append(pair_off[-1] + sub.size)
    out = copy.copy(t)
    out.notes = {}
    out.cand_offset = off
    for name in ("cand_time_s", "cand_mem_bytes", "cand_mem_shared_bytes", "cand_state_bytes", "cand_host_load_s",
                 "cand_mask", "cand_heads", "cand_nodes", "cand_layout", "cand_dp", "cand_replicas"):
        setattr(out, name, getattr(t, name)[flat])
    out.cand_mesh_group = t.cand_mesh_group[flat] if t.cand_mesh_group is not None else None
    out.cand_shape_group = t.cand_shape_group[flat] if t.cand_shape_group is not None else None
    out.pair_offset = np.array(pair_off, dtype=np.int64)
    out.pair_time_s = np.concatenate(pair_t) if pair_t else np.zeros(0)
    if t.placements is not None:
        out.placements = [[t.placements[c][a] for a in keep[c]] for c in range(t.num_calls)]
    return out
