"""The step schedule and the process groups, derived from a plan: pure Python, no torch.

Every rank derives the same ``Schedule`` from the same plan. Ops run in one global order (the
dataflow's topological order with a fixed tie-break); a rank performs the ops it takes part in, in that
order. Each collective is thereby issued by its members in the same relative order, which is the
deadlock-freedom argument: ranks on disjoint meshes never wait on each other and run concurrently.

Op kinds:
- ``transfer``: move the keys of one data edge from the producer's dp heads to the consumer's ranks.
- ``realloc``: build a replica of a model's parameters in this call's placement from the placement
  holding its weights of record (its train call's).
- ``call``: run a model function call on its placement.
- ``collect``: send each call's per-step results (stats, generated text) from its heads to rank 0.
"""

from __future__ import annotations

from dataclasses import dataclass

from reallm.dataflow import build_graph, topological_order
from reallm.placement import Placement
from reallm.plan import Plan


@dataclass(frozen=True)
class Op:
    kind: str  # "transfer" | "realloc" | "call" | "collect"
    call: str  # the consumer / the call
    producer: str = ""  # transfer: the producing call; realloc: the call whose placement we leave
    keys: tuple[str, ...] = ()
    ranks: tuple[int, ...] = ()  # every rank taking part

    def __str__(self) -> str:
        if self.kind == "transfer":
            return f"transfer {self.producer}→{self.call} {list(self.keys)}"
        if self.kind == "realloc":
            return f"realloc {self.producer}→{self.call}"
        return f"{self.kind} {self.call}"


@dataclass(frozen=True)
class Schedule:
    ops: tuple[Op, ...]
    group_rank_sets: tuple[tuple[int, ...], ...]  # every process group, in creation order

    def ops_for(self, rank: int) -> list[Op]:
        return [op for op in self.ops if rank in op.ranks]


def placement_rank_sets(p: Placement) -> list[tuple[int, ...]]:
    sets = [p.devices]
    sets += p.tp_groups() + p.pp_groups() + p.dp_groups()
    # a dp replica's ranks (its tp × pp grid): inputs are broadcast inside it
    sets += [tuple(p.device_at(pp, d, t) for pp in range(p.pp) for t in range(p.tp)) for d in range(p.dp)]
    # first and last pipeline stage of each (dp, tp): the tied embedding's gradient sum (pp = 2: the pp groups)
    if p.pp > 2:
        sets += [(p.device_at(0, d, t), p.device_at(p.pp - 1, d, t)) for d in range(p.dp) for t in range(p.tp)]
    return sets


def transfer_ranks(prod: Placement, cons: Placement) -> tuple[int, ...]:
    return tuple(sorted(set(prod.dp_heads()) | set(cons.devices)))


def record_calls(plan: Plan) -> dict[str, str]:
    """Per model role, the call whose placement holds the weights of record: its train call, else its
    first call. Every other call of the role with a different placement gets a replica reallocated
    from it right before the call (and freed right after)."""
    out: dict[str, str] = {}
    for c in plan.calls:
        if c.is_train or c.role not in out:
            out[c.role] = c.name
    return out


def build_schedule(plan: Plan) -> Schedule:
    g = build_graph(plan.calls)
    order = topological_order(g)
    ops: list[Op] = []
    record = record_calls(plan)
    for name in order:
        call = g.nodes[name]["call"]
        cons = plan.placements[name]
        for pred in sorted(g.predecessors(name), key=order.index):
            keys = g.edges[pred, name]["keys"]
            if keys:
                ops.append(Op("transfer", name, pred, tuple(keys), transfer_ranks(plan.placements[pred], cons)))
        src = record.get(call.role)
        if src is not None and src != name and not plan.placements[src].same_layout(cons):
            a = plan.placements[src]
            ops.append(Op("realloc", name, src, (), tuple(sorted(set(a.devices) | set(cons.devices)))))
        ops.append(Op("call", name, ranks=tuple(sorted(cons.devices))))
    for name in order:
        heads = plan.placements[name].dp_heads()
        ops.append(Op("collect", name, ranks=tuple(sorted(set(heads) | {0}))))

    sets: list[tuple[int, ...]] = []
    for c in plan.calls:
        sets += placement_rank_sets(plan.placements[c.name])
    sets += [op.ranks for op in ops]
    seen, uniq = set(), []
    for s in sets:
        s = tuple(sorted(s))
        if len(s) > 1 and s not in seen:
            seen.add(s)
            uniq.append(s)
    return Schedule(tuple(ops), tuple(uniq))
