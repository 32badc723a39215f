"""OR-tools CP-SAT on the search's cost tables: the exact optimum on small instances, else a lower bound.

``solve(tables, time_limit_s)`` returns a ``CpsatResult`` whose ``kind`` says what it is:

- ``"exact"``: CP-SAT proved the optimum of the simulator's own objective (``planner.simulate``), up
  to the integer time grid (``HORIZON_UNITS`` over the horizon; ``CpsatResult.grid_s``). The model: one Boolean per (call, candidate), exactly
  one per call; per step and task (transfer, reallocation, call, in the simulator's order) an interval
  whose duration is the chosen candidate's (or candidate pair's) time; a task uses device d iff its
  chosen candidates put it there (and its time is > 0); ``NoOverlap`` per device over optional
  intervals; and, to reproduce the list schedule exactly (not merely any feasible schedule),
  start = max(ready, free time of each device it uses) via ``AddMaxEquality``, each device's free time
  chained from task to task (= the end of the last task that used it). Memory:
  per (call, candidate, device) a linear constraint over the train calls' candidates (big-M on the
  call's own choice), which is the simulator's rule exactly. Objective (step_end(K−1) − step_end(0)).
- ``"lower_bound"``: instances too large for that model (``max_pair_products``) get a relaxation:
  minimise over assignments the busiest device's work per step (each call's time, plus for every
  transfer/reallocation the cheapest time over the partner's candidates), memory as above. A device
  cannot finish a step's work in less than its busy time, so this bounds the steady-state period.
  The solver's proven bound (``ObjectiveBound``) is reported when it stops before optimality.
- ``"infeasible"``: no assignment fits in memory.

ortools is imported lazily: the planner runs without it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from planner.simulate import CostTables, _prepared

#: The time grid: the horizon (every task serialised over K steps) spans this many integer units. Coarse
#: enough that CP-SAT's bound propagation through the schedule converges quickly (it moves in units),
#: fine enough that rounding stays far below the differences between plans (reported as ``grid_s``).
HORIZON_UNITS = 20_000
MEMORY_UNITS = 1_000_000  # memory scaled so the capacity is this many units


@dataclass
class CpsatResult:
    kind: str  # exact | lower_bound | infeasible | unknown
    objective_s: float  # exact: the optimum; lower_bound: the bound
    assignment: Optional[list[int]]
    status: str
    wall_s: float
    #: Seconds per integer time unit: each task's time was rounded to this grid.
    grid_s: float = 0.0


def _duration_table(t: CostTables, c: int) -> np.ndarray:
    lo, hi = int(t.cand_offset[c]), int(t.cand_offset[c + 1])
    return t.cand_time_s[lo:hi]


_UNITS_PER_S = [1.0]


def _ints(x) -> int:
    return int(round(float(x) * _UNITS_PER_S[0]))


def _horizon_s(t: CostTables) -> float:
    """Every task of every step serialised: an upper bound on any end time."""
    from planner.simulate import transfer_time_s

    pr = _prepared(t)
    h = 0.0
    for c in range(t.num_calls):
        lo, hi = int(t.cand_offset[c]), int(t.cand_offset[c + 1])
        h += float(t.cand_time_s[lo:hi].max()) + float(t.cand_host_load_s[lo:hi].max())
    for q in range(len(t.pair_record)):
        h += float(t.pair_time_s[int(t.pair_offset[q]):int(t.pair_offset[q + 1])].max(initial=0.0))
    for e in range(len(t.edge_src)):
        p, c = int(t.edge_src[e]), int(t.edge_dst[e])
        h += max(transfer_time_s(t, pr, float(t.edge_bytes[e]), a, b)
                 for a in range(int(t.cand_offset[p]), int(t.cand_offset[p + 1]))
                 for b in range(int(t.cand_offset[c]), int(t.cand_offset[c + 1])))
    return h * t.num_steps


def _pair_count(t: CostTables) -> int:
    n = 0
    for e in range(len(t.edge_src)):
        n += t.num_candidates(int(t.edge_src[e])) * t.num_candidates(int(t.edge_dst[e]))
    for q in range(len(t.pair_record)):
        n += t.num_candidates(int(t.pair_record[q])) * t.num_candidates(int(t.pair_other[q]))
    return n * t.num_steps


def solve(t: CostTables, time_limit_s: float = 10.0, max_pair_products: int = 20_000,
          num_workers: int = 1) -> CpsatResult:
    """The exact optimum when the full model is small enough, else the lower bound (module docstring)."""
    if _pair_count(t) <= max_pair_products and t.num_devices <= 64:
        return _solve_exact(t, time_limit_s, num_workers)
    return _solve_bound(t, time_limit_s, num_workers)


def _add_memory(model, t: CostTables, x: list[list], pr) -> None:
    cap = t.memory_capacity_bytes
    scale = MEMORY_UNITS / cap

    def q(v: float) -> int:
        # Round memory up and capacity down: never accept what the simulator rejects.
        return int(math.ceil(v * scale - 1e-9))

    trained = [(r, int(tc)) for r, tc in enumerate(t.role_train_call) if tc >= 0]
    big = q(float(t.cand_mem_bytes.max(initial=0.0)) + float(t.cand_state_bytes.sum()) + cap) + MEMORY_UNITS
    for c in range(t.num_calls):
        role = int(t.call_role[c])
        lo = int(t.cand_offset[c])
        for ia in range(t.num_candidates(c)):
            a = lo + ia
            for d in pr.bits[a]:
                expr = []
                const = q(t.cand_mem_bytes[a])
                for r, tc in trained:
                    tlo = int(t.cand_offset[tc])
                    for ib in range(t.num_candidates(tc)):
                        b = tlo + ib
                        if r == role and tc != c:
                            identical = pr.mask[a] == pr.mask[b] and t.cand_layout[a] == t.cand_layout[b]
                            if identical:
                                coef = q(t.cand_mem_shared_bytes[a]) - q(t.cand_mem_bytes[a]) + q(t.cand_state_bytes[b])
                            else:
                                coef = 0
                        else:
                            coef = q(t.cand_state_bytes[b]) if (pr.mask[b] >> d) & 1 else 0
                        if tc == c:  # the call's own train state: only its own choice
                            coef = q(t.cand_state_bytes[b]) if b == a else 0
                        if coef:
                            expr.append(coef * x[tc][ib])
                model.Add(const + sum(expr) <= MEMORY_UNITS + big * (1 - x[c][ia]))


def _solve_exact(t: CostTables, time_limit_s: float, num_workers: int) -> CpsatResult:
    from ortools.sat.python import cp_model

    pr = _prepared(t)
    n, D, K = t.num_calls, t.num_devices, t.num_steps
    _UNITS_PER_S[0] = HORIZON_UNITS / max(_horizon_s(t), 1e-12)
    m = cp_model.CpModel()
    x = [[m.NewBoolVar(f"x{c}_{a}") for a in range(t.num_candidates(c))] for c in range(n)]
    for c in range(n):
        m.AddExactlyOne(x[c])
    _add_memory(m, t, x, pr)

    def and_var(a, b, name):
        v = m.NewBoolVar(name)
        m.AddImplication(v, a)
        m.AddImplication(v, b)
        m.AddBoolOr([a.Not(), b.Not(), v])
        return v

    # host load: exactly when the call's mesh intersects another call's (an exact equivalence: a longer
    # duration can shorten a list schedule's objective, so no slack may be left to the solver)
    host = []
    for c in range(n):
        lo = int(t.cand_offset[c])
        terms = []
        for ia in range(t.num_candidates(c)):
            a = lo + ia
            h = _ints(t.cand_host_load_s[a])
            if h <= 0:
                continue
            hits = []
            for o in range(n):
                if o == c:
                    continue
                olo = int(t.cand_offset[o])
                lits = [x[o][ib] for ib in range(t.num_candidates(o)) if pr.mask[a] & pr.mask[olo + ib]]
                if lits:
                    s_o = m.NewBoolVar(f"hit{c}_{ia}_{o}")
                    m.Add(s_o == sum(lits))
                    hits.append(s_o)
            if not hits:
                continue
            anyhit = m.NewBoolVar(f"any{c}_{ia}")
            m.AddMaxEquality(anyhit, hits)
            terms.append(h * and_var(x[c][ia], anyhit, f"shared{c}_{ia}"))
        host.append(terms)

    # transfer durations per (producer cand, consumer cand)
    from planner.simulate import transfer_time_s

    edge_tab = []
    for e in range(len(t.edge_src)):
        p, c = int(t.edge_src[e]), int(t.edge_dst[e])
        tab = np.array([[transfer_time_s(t, pr, float(t.edge_bytes[e]), int(t.cand_offset[p]) + ia, int(t.cand_offset[c]) + ib)
                         for ib in range(t.num_candidates(c))] for ia in range(t.num_candidates(p))])
        edge_tab.append(tab)
    horizon = HORIZON_UNITS + 8 * sum(t.num_candidates(c) for c in range(n)) * K  # room for rounding up

    # pair products (shared across steps)
    prod_cache: dict = {}

    def prod(c1, a1, c2, a2):
        key = (c1, a1, c2, a2)
        if key not in prod_cache:
            prod_cache[key] = and_var(x[c1][a1], x[c2][a2], f"y{c1}_{a1}_{c2}_{a2}")
        return prod_cache[key]

    free = [m.NewConstant(0) for _ in range(D)]  # each device's free time after the tasks so far
    intervals_per_device: list[list] = [[] for _ in range(D)]
    end = {}
    step_ends: list[list] = [[] for _ in range(K)]

    def make_task(name, dur_expr, ready_terms, uses_by_device, step):
        start = m.NewIntVar(0, horizon, f"s_{name}")
        fin = m.NewIntVar(0, horizon, f"e_{name}")
        dur = m.NewIntVar(0, horizon, f"d_{name}")
        m.Add(dur == dur_expr)
        m.Add(fin == start + dur)
        ready = m.NewIntVar(0, horizon, f"r_{name}")
        m.AddMaxEquality(ready, ready_terms if ready_terms else [0])
        # device usage literals
        use = {}
        for d, lits in uses_by_device.items():
            if not lits:
                continue
            u = m.NewBoolVar(f"u_{name}_{d}")
            m.Add(u == sum(lits))  # at most one literal is true: one candidate (pair) is chosen
            use[d] = u
            iv = m.NewOptionalIntervalVar(start, dur, fin, u, f"i_{name}_{d}")
            intervals_per_device[d].append(iv)
        # ASAP: start = max(ready, free time of each device it uses), free[d] chained task by task
        terms = [ready]
        for d, u in use.items():
            g = m.NewIntVar(0, horizon, f"g_{name}_{d}")
            m.Add(g == free[d]).OnlyEnforceIf(u)
            m.Add(g == 0).OnlyEnforceIf(u.Not())
            terms.append(g)
        m.AddMaxEquality(start, terms)
        for d, u in use.items():
            f = m.NewIntVar(0, horizon, f"f_{name}_{d}")
            m.Add(f == fin).OnlyEnforceIf(u)
            m.Add(f == free[d]).OnlyEnforceIf(u.Not())
            free[d] = f
        step_ends[step].append(fin)
        return fin

    for i in range(K):
        for c in range(n):
            lo = int(t.cand_offset[c])
            call_ready = [end[(i, p)] for p in t.preds[c]]
            if i > 0:
                call_ready += [end[(i - 1, p)] for p in t.cross_preds[c]]
            for e in pr.edges_into[c]:
                p = int(t.edge_src[e])
                plo = int(t.cand_offset[p])
                tab = edge_tab[e]
                dur_terms, uses = [], {d: [] for d in range(D)}
                for ia in range(tab.shape[0]):
                    for ib in range(tab.shape[1]):
                        v = _ints(tab[ia, ib])
                        if tab[ia, ib] <= 0:
                            continue
                        y = prod(p, ia, c, ib)
                        if v:
                            dur_terms.append(v * y)
                        for d in _bits_of(pr.heads[plo + ia] | pr.mask[lo + ib]):
                            uses[d].append(y)
                if not dur_terms and not any(uses.values()):
                    continue
                fin = make_task(f"tr{i}_{e}", sum(dur_terms) if dur_terms else 0, [end[(i, p)]], uses, i)
                call_ready.append(fin)
            for q in pr.pairs_into[c]:
                r = int(t.pair_record[q])
                rlo = int(t.cand_offset[r])
                n_other = t.num_candidates(c)
                dep = [end[(i, r)]] if r < c else ([end[(i - 1, r)]] if i > 0 else [])
                dur_terms, uses = [], {d: [] for d in range(D)}
                for ia in range(t.num_candidates(r)):
                    for ib in range(n_other):
                        val = float(t.pair_time_s[int(t.pair_offset[q]) + ia * n_other + ib])
                        if val <= 0:
                            continue
                        y = prod(r, ia, c, ib)
                        dur_terms.append(_ints(val) * y)
                        for d in _bits_of(pr.mask[rlo + ia] | pr.mask[lo + ib]):
                            uses[d].append(y)
                if not dur_terms:
                    call_ready += dep
                    continue
                fin = make_task(f"re{i}_{q}", sum(dur_terms), dep, uses, i)
                call_ready.append(fin)
            dur = sum(_ints(t.cand_time_s[lo + ia]) * x[c][ia] for ia in range(t.num_candidates(c))) + sum(host[c])
            uses = {d: [x[c][ia] for ia in range(t.num_candidates(c)) if (pr.mask[lo + ia] >> d) & 1] for d in range(D)}
            end[(i, c)] = make_task(f"c{i}_{c}", dur, call_ready, uses, i)
    for d in range(D):
        if len(intervals_per_device[d]) > 1:
            m.AddNoOverlap(intervals_per_device[d])
    se = []
    for i in range(K):
        v = m.NewIntVar(0, horizon, f"stepend{i}")
        m.AddMaxEquality(v, step_ends[i])
        se.append(v)
    m.Minimize(se[-1] - se[0])
    # Every time is a function of the choices: branch on the choices only, and let propagation do the rest.
    m.AddDecisionStrategy([v for row in x for v in row], cp_model.CHOOSE_FIRST, cp_model.SELECT_MAX_VALUE)
    solver = cp_model.CpSolver()
    solver.parameters.search_branching = cp_model.FIXED_SEARCH
    solver.parameters.max_time_in_seconds = time_limit_s
    solver.parameters.num_workers = num_workers
    solver.parameters.random_seed = 0
    st = solver.Solve(m)
    name = solver.StatusName(st)
    denom = _UNITS_PER_S[0] * max(1, K - 1)
    if st == cp_model.INFEASIBLE:
        return CpsatResult("infeasible", math.inf, None, name, solver.WallTime())
    if st == cp_model.OPTIMAL:
        a = [next(ia for ia in range(len(x[c])) if solver.Value(x[c][ia])) for c in range(n)]
        return CpsatResult("exact", solver.ObjectiveValue() / denom, a, name, solver.WallTime(), 1 / _UNITS_PER_S[0])
    if st == cp_model.FEASIBLE:
        a = [next(ia for ia in range(len(x[c])) if solver.Value(x[c][ia])) for c in range(n)]
        return CpsatResult("lower_bound", solver.BestObjectiveBound() / denom, a, name, solver.WallTime(), 1 / _UNITS_PER_S[0])
    return CpsatResult("unknown", 0.0, None, name, solver.WallTime())


def _bits_of(mask: int) -> list[int]:
    out, i = [], 0
    while mask:
        if mask & 1:
            out.append(i)
        mask >>= 1
        i += 1
    return out


def _solve_bound(t: CostTables, time_limit_s: float, num_workers: int) -> CpsatResult:
    """min over assignments of the busiest device's per-step work (module docstring)."""
    from ortools.sat.python import cp_model

    pr = _prepared(t)
    n, D = t.num_calls, t.num_devices
    _UNITS_PER_S[0] = HORIZON_UNITS / max(_horizon_s(t) / t.num_steps, 1e-12)
    m = cp_model.CpModel()
    x = [[m.NewBoolVar(f"x{c}_{a}") for a in range(t.num_candidates(c))] for c in range(n)]
    for c in range(n):
        m.AddExactlyOne(x[c])
    _add_memory(m, t, x, pr)
    from planner.simulate import transfer_time_s

    work = [[] for _ in range(D)]
    for c in range(n):
        lo = int(t.cand_offset[c])
        extra = np.zeros(t.num_candidates(c))
        for e in pr.edges_into[c]:
            p = int(t.edge_src[e])
            plo = int(t.cand_offset[p])
            for ib in range(t.num_candidates(c)):
                extra[ib] += min(transfer_time_s(t, pr, float(t.edge_bytes[e]), plo + ia, lo + ib)
                                 for ia in range(t.num_candidates(p)))
        for q in pr.pairs_into[c]:
            r = int(t.pair_record[q])
            n_other = t.num_candidates(c)
            tab = t.pair_time_s[int(t.pair_offset[q]):int(t.pair_offset[q + 1])].reshape(t.num_candidates(r), n_other)
            extra += tab.min(axis=0)
        for ia in range(t.num_candidates(c)):
            v = _ints(t.cand_time_s[lo + ia] + extra[ia])
            for d in pr.bits[lo + ia]:
                work[d].append(v * x[c][ia])
    horizon = 2 * HORIZON_UNITS
    z = m.NewIntVar(0, horizon, "busiest")
    for d in range(D):
        if work[d]:
            m.Add(sum(work[d]) <= z)
    m.Minimize(z)
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = time_limit_s
    solver.parameters.num_workers = num_workers
    solver.parameters.random_seed = 0
    st = solver.Solve(m)
    name = solver.StatusName(st)
    if st == cp_model.INFEASIBLE:
        return CpsatResult("infeasible", math.inf, None, name, solver.WallTime())
    if st in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return CpsatResult("lower_bound", solver.BestObjectiveBound() / _UNITS_PER_S[0], None, name, solver.WallTime())
    return CpsatResult("unknown", 0.0, None, name, solver.WallTime())


__all__ = ["CpsatResult", "solve"]
