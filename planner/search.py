"""``allocation_mode=search``: choose every call's placement by simulated annealing over cost tables.

    plan = search(exp, profile=None, seed=0, time_budget_s=60.0)

1. Profile: the given one (a ``Profile`` or a path), else ``cost_model.profile.default_profile``.
2. Seeds: the heuristic plan (``planner.allocation``) and the best symmetric d{D}p{P}m{M} plan, each
   costed by the same simulator.
3. Tables (``cost_model.tables.build_tables``): enumerated candidates per call + the seeds' placements.
4. Annealing (``planner._anneal``, C++; ``anneal_py`` is the pure-Python reference/fallback) from the
   better seed, a fixed number of iterations (``default_iterations``) so a fixed seed gives the same
   plan on every machine; ``time_budget_s`` only caps the run (a capped run says so in the estimate).
5. The best state found and the seeds are re-simulated with the exact reallocation cost (the layout
   algebra's plan) and the best of them is returned; it is never worse than the heuristic under the
   same model, since the heuristic is one of them.

``estimate_plan(exp, plan)`` fills the same estimates into a plan made by any other allocation mode.

The returned ``Plan`` carries per call ``{"time_s", "peak_memory_bytes"}`` and a step estimate with the
comparison table (``estimate["comparison"]``) and search statistics; ``format_comparison`` prints it,
``planner.gantt.gantt_png`` draws the schedule.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional, Union

import numpy as np

from planner.cost_model.profile import Profile, default_profile, load_profile
from planner.cost_model.tables import build_tables, cost_candidate, model_options
from planner.simulate import CostTables, SimResult, simulate
from reallm.errors import UserError
from reallm.placement import Placement
from reallm.plan import Plan, check, validate

DEFAULT_RESTARTS = 12


@dataclass
class Evaluation:
    """A set of placements costed by the simulator."""

    name: str
    placements: dict[str, Placement]
    result: SimResult
    tables: CostTables

    @property
    def step_time_s(self) -> float:
        return self.result.step_time_s

    @property
    def feasible(self) -> bool:
        return self.result.feasible


@dataclass
class SearchResult:
    plan: Plan
    best: Evaluation
    heuristic: Optional[Evaluation]
    symmetric: Optional[Evaluation]
    tables: CostTables
    stats: dict = field(default_factory=dict)


def resolve_profile(exp, profile: Union[Profile, str, None]) -> Profile:
    if profile is None:
        return default_profile(exp.cluster)
    if isinstance(profile, str):
        return load_profile(profile)
    return profile


def evaluate_placements(exp, placements: dict[str, Placement], profile: Profile, name: str = "plan",
                        exact_realloc: bool = True, record: bool = True) -> Evaluation:
    """Simulate one fixed plan (one candidate per call)."""
    trained = {c.role for c in exp.calls if c.is_train}
    cands = {c.name: [cost_candidate(c, placements[c.name], exp.models[c.role], profile, exp.cluster,
                                     model_options(exp, c.role, profile), c.role not in trained)] for c in exp.calls}
    t = build_tables(exp, profile, candidates=cands, exact_realloc=exact_realloc)
    return Evaluation(name, dict(placements), simulate(t, [0] * t.num_calls, record=record), t)


def heuristic_placements(exp) -> Optional[dict[str, Placement]]:
    from planner.allocation import heuristic_placements

    try:
        return heuristic_placements(exp)
    except UserError:
        return None


def symmetric_layouts(exp) -> list[tuple[int, int, int]]:
    """Every valid (dp, pp, tp) with dp·pp·tp = all devices (tp inside a node)."""
    from planner.allocation import uniform_placements

    n, G = exp.cluster.num_devices, exp.cluster.n_devices_per_node
    out = []
    for tp in (t for t in range(1, G + 1) if G % t == 0 and n % t == 0):
        for pp in (p for p in range(1, n // tp + 1) if (n // tp) % p == 0):
            dp = n // (tp * pp)
            try:
                placements = uniform_placements(exp, dp=dp, pp=pp, tp=tp)
            except UserError:
                continue
            plan = Plan(exp.kind, "symmetric", {}, exp.cluster, dict(exp.models), exp.calls, placements)
            from reallm.layout.params import tp_problems

            if validate(plan) or any(tp_problems(s, tp) for s in exp.models.values()):
                continue
            out.append((dp, pp, tp))
    return out


def best_symmetric(exp, profile: Profile) -> Optional[Evaluation]:
    from planner.allocation import uniform_placements

    best = None
    for dp, pp, tp in symmetric_layouts(exp):
        ev = evaluate_placements(exp, uniform_placements(exp, dp=dp, pp=pp, tp=tp), profile, name=f"d{dp}p{pp}m{tp}",
                                 exact_realloc=False, record=False)
        if best is None or ev.step_time_s < best.step_time_s:
            best = ev
    return best


def assignment_of(t: CostTables, placements: dict[str, Placement]) -> list[int]:
    return [t.placements[i].index(placements[name]) for i, name in enumerate(t.call_names)]


def default_iterations(t: CostTables) -> int:
    """Enough for the instances we plan (a few thousand candidates per call): grows with the log of the
    search space, fixed for a given problem so a fixed seed is reproducible."""
    log_space = sum(math.log(max(2, t.num_candidates(c))) for c in range(t.num_calls))
    return int(min(800_000, max(20_000, 12_000 * log_space)))


# -- the Python reference annealer ---------------------------------------------------------------
def anneal_py(t: CostTables, init: Sequence[int], seed: int = 0, iterations: int = 20_000,
              restarts: int = DEFAULT_RESTARTS, t0_frac: float = 0.05, t_end_frac: float = 1e-4) -> dict:
    """Same algorithm as ``planner._anneal.Problem.anneal`` (not the same random stream)."""
    rng = np.random.default_rng(seed)
    n = t.num_calls
    penalty = 2 * (sum(float(np.max(t.cand_time_s[t.cand_offset[c]:t.cand_offset[c + 1]])) for c in range(n))
                   + float(np.sum(t.pair_time_s.max(initial=0.0))) + 1e-9)

    def cost(a):
        r = simulate(t, a)
        return r.step_time_s if r.feasible else penalty * (1 + r.overflow_bytes / t.memory_capacity_bytes)

    cur = list(init)
    cur_cost = cost(cur)
    best, best_cost = list(cur), cur_cost
    per = max(1, iterations // max(1, restarts))
    evals = 1
    for r in range(max(1, restarts)):
        if r > 0:
            cur = list(best) if r % 2 == 1 else [int(rng.integers(0, t.num_candidates(c))) for c in range(n)]
            cur_cost = cost(cur)
            evals += 1
        scale = cur_cost if math.isfinite(cur_cost) and cur_cost < penalty else (best_cost if best_cost < penalty else penalty)
        T, T_end = t0_frac * scale, t_end_frac * scale
        alpha = (T_end / T) ** (1 / max(1, per - 1)) if T > 0 else 1.0
        for _ in range(per):
            c = int(rng.integers(0, n))
            nc = t.num_candidates(c)
            if nc > 1:
                new = int(rng.integers(0, nc - 1))
                new += new >= cur[c]
                nxt = list(cur)
                nxt[c] = new
                cst = cost(nxt)
                evals += 1
                if cst <= cur_cost or rng.random() < math.exp(-(cst - cur_cost) / max(T, 1e-300)):
                    cur, cur_cost = nxt, cst
                    if cst < best_cost:
                        best, best_cost = list(nxt), cst
            T *= alpha
    feasible = best_cost < penalty
    return {"assignment": best, "cost": best_cost if feasible else math.inf, "feasible": feasible, "evaluations": evals}


def run_anneal(t: CostTables, init: Sequence[int], seed: int, iterations: int, restarts: int,
               time_limit_s: float, backend: str = "cpp") -> dict:
    if backend == "cpp":
        try:
            from planner import _anneal
        except ImportError:
            backend = "python"
        else:
            res = _anneal.Problem(t.to_arrays()).anneal(list(init), seed=seed, iterations=iterations,
                                                        restarts=restarts, time_limit_s=time_limit_s)
            res["backend"] = "cpp"
            return res
    res = anneal_py(t, init, seed=seed, iterations=iterations, restarts=restarts)
    res["backend"] = "python"
    return res


# -- the search ----------------------------------------------------------------------------------
def search(exp, profile: Union[Profile, str, None] = None, seed: int = 0, time_budget_s: float = 60.0,
           **kwargs) -> Plan:
    """The searched plan of ``exp`` (module docstring)."""
    return search_detailed(exp, profile, seed, time_budget_s, **kwargs).plan


def search_detailed(exp, profile: Union[Profile, str, None] = None, seed: int = 0, time_budget_s: float = 60.0,
                    iterations: Optional[int] = None, restarts: int = DEFAULT_RESTARTS, backend: str = "cpp",
                    gantt_path: Optional[str] = None, exact_realloc: bool = True) -> SearchResult:
    t_start = time.perf_counter()
    prof = resolve_profile(exp, profile)
    heur_p = heuristic_placements(exp)
    heur = evaluate_placements(exp, heur_p, prof, "heuristic", exact_realloc=False, record=False) if heur_p else None
    sym = best_symmetric(exp, prof)
    seeds = [e for e in (heur, sym) if e is not None]
    tables = build_tables(exp, prof, extra=[e.placements for e in seeds])
    t_tables = time.perf_counter() - t_start
    feasible_seeds = [e for e in seeds if e.feasible]
    if feasible_seeds:
        init_eval = min(feasible_seeds, key=lambda e: e.step_time_s)
        init = assignment_of(tables, init_eval.placements)
    else:
        init = [int(np.argmin(tables.cand_time_s[tables.cand_offset[c]:tables.cand_offset[c + 1]]))
                for c in range(tables.num_calls)]
    iters = iterations if iterations is not None else default_iterations(tables)
    left = max(1.0, time_budget_s - (time.perf_counter() - t_start) - 0.1 * time_budget_s)
    res = run_anneal(tables, init, seed, iters, restarts, left, backend)
    if not res["feasible"]:
        raise UserError(f"planner search: no placement of every call fits in device memory "
                        f"({exp.cluster.device_memory_bytes / 2**30:.0f} GiB per device); use more devices, "
                        f"smaller models or shorter sequences")
    found = {name: tables.placements[i][res["assignment"][i]] for i, name in enumerate(tables.call_names)}
    t_anneal = time.perf_counter() - t_start - t_tables
    # Final pick under the exact reallocation cost: the annealer's best and the seeds.
    finalists = [Evaluation("search", found, simulate(tables, res["assignment"]), tables)]
    finalists += [Evaluation(e.name, e.placements, e.result, e.tables) for e in seeds]
    if exact_realloc:
        finalists = [evaluate_placements(exp, e.placements, prof, e.name, exact_realloc=True)
                     if e.feasible else e for e in finalists]
    else:
        finalists = [evaluate_placements(exp, e.placements, prof, e.name, exact_realloc=False) for e in finalists]
    best = min((e for e in finalists if e.feasible), key=lambda e: e.step_time_s)
    heur_final = next((e for e in finalists[1:] if e.name == "heuristic"), None)
    sym_final = next((e for e in finalists[1:] if e.name != "heuristic"), None)
    stats = {"seconds": time.perf_counter() - t_start, "tables_s": t_tables, "anneal_s": t_anneal,
             "candidates": {n: tables.num_candidates(i) for i, n in enumerate(tables.call_names)},
             "iterations": iters, "restarts": restarts, "seed": seed, "backend": res["backend"],
             "evaluations": int(res["evaluations"]), "timed_out": bool(res.get("timed_out", False)),
             "annealed_step_time_s": float(res["cost"]), "picked": best.name,
             "realloc_cost": "exact (layout algebra)" if exact_realloc else "estimate"}
    plan = _make_plan(exp, best, prof, stats, heur_final, sym_final)
    out = SearchResult(plan, best, heur_final, sym_final, tables, stats)
    if gantt_path:
        from planner.gantt import gantt_png

        gantt_png(best, exp, gantt_path, title=f"{exp.kind}: searched plan, step {best.step_time_s:.2f} s")
    return out


def _row(e: Optional[Evaluation], heur: Optional[Evaluation], label: str) -> Optional[dict]:
    if e is None:
        return None
    ratio = (heur.step_time_s / e.step_time_s) if heur is not None and heur.feasible and e.feasible else None
    return {"plan": label, "name": e.name, "step_time_s": e.step_time_s if e.feasible else None,
            "feasible": e.feasible, "max_peak_memory_bytes": max(e.result.peak_memory_bytes),
            "speedup_vs_heuristic": ratio}


def _make_plan(exp, best: Evaluation, prof: Profile, stats: dict, heur: Optional[Evaluation],
               sym: Optional[Evaluation]) -> Plan:
    t, r = best.tables, best.result
    call_est = {name: {"time_s": r.call_time_s[i], "peak_memory_bytes": r.peak_memory_bytes[i]}
                for i, name in enumerate(t.call_names)}
    transfers = sum(x.end_s - x.start_s for x in r.tasks if x.kind == "transfer" and x.step == 1)
    reallocs = sum(x.end_s - x.start_s for x in r.tasks if x.kind == "realloc" and x.step == 1)
    comparison = [row for row in (_row(best, heur, "search"), _row(heur, heur, "heuristic"),
                                  _row(sym, heur, f"symmetric {sym.name}" if sym else "")) if row]
    estimate = {
        "step_time_s": best.step_time_s,
        "max_peak_memory_bytes": max(r.peak_memory_bytes),
        "memory_capacity_bytes": t.memory_capacity_bytes,
        "transfer_time_s": transfers,
        "realloc_time_s": reallocs,
        "profile": {"source": prof.source, "device": prof.device, "path": prof.path, "fallbacks": list(prof.fallbacks)},
        "search": stats,
        "comparison": comparison,
    }
    plan = Plan(experiment=exp.kind, allocation_mode="search", config=exp.config_dict, cluster=exp.cluster,
                models=dict(exp.models), calls=exp.calls, placements={c.name: best.placements[c.name] for c in exp.calls},
                call_estimates=call_est, estimate=estimate)
    return check(plan, source="allocation_mode=search")


def estimate_plan(exp, plan: Plan, profile: Union[Profile, str, None] = None, exact_realloc: bool = True,
                  gantt_path: Optional[str] = None) -> Plan:
    """``plan`` (any allocation mode) with the cost model's per-call and step estimates filled in (and its
    simulated schedule drawn to ``gantt_path``)."""
    import dataclasses

    prof = resolve_profile(exp, profile)
    ev = evaluate_placements(exp, plan.placements, prof, plan.allocation_mode, exact_realloc=exact_realloc)
    r = ev.result
    call_est = {name: {"time_s": r.call_time_s[i], "peak_memory_bytes": r.peak_memory_bytes[i]}
                for i, name in enumerate(ev.tables.call_names)}
    estimate = {"step_time_s": r.step_time_s if r.feasible else None, "feasible": r.feasible,
                "memory_overflow_bytes": r.overflow_bytes, "max_peak_memory_bytes": max(r.peak_memory_bytes),
                "memory_capacity_bytes": ev.tables.memory_capacity_bytes,
                "profile": {"source": prof.source, "device": prof.device, "path": prof.path}}
    if gantt_path and r.feasible:
        from planner.gantt import gantt_png

        gantt_png(ev, exp, gantt_path, title=f"{exp.kind} ({plan.allocation_mode}): step {r.step_time_s:.2f} s")
    return dataclasses.replace(plan, call_estimates=call_est, estimate=estimate)


def format_comparison(plan: Plan) -> str:
    """The comparison table of a searched plan: search vs heuristic vs the best symmetric plan."""
    rows = (plan.estimate or {}).get("comparison") or []
    lines = [f"{'plan':<24} {'step time':>10} {'vs heuristic':>13} {'peak mem':>10}"]
    for row in rows:
        st = f"{row['step_time_s']:.2f} s" if row["step_time_s"] is not None else "OOM"
        sp = f"{row['speedup_vs_heuristic']:.2f}x" if row["speedup_vs_heuristic"] else "-"
        lines.append(f"{row['plan']:<24} {st:>10} {sp:>13} {row['max_peak_memory_bytes'] / 2**30:>6.1f} GiB")
    return "\n".join(lines)
