"""Candidates per call, and the flat cost tables the search runs on (``planner.simulate.CostTables``).

Candidates of a call (``enumerate_candidates``):
- meshes (``candidate_meshes``): contiguous, aligned sub-meshes inside a node of every power-of-two size
  dividing the node (1, 2, 4, 8 devices; ReaL never tried 1 and 2), and contiguous runs of k whole
  nodes for k a power of two or the whole cluster, at every starting node;
- layouts: every (dp, tp, pp) with dp·tp·pp = mesh size, tp dividing the node size (tp groups stay
  inside a node), ``reallm.plan.placement_problems`` and the tp rules of the layout algebra satisfied,
  pp ≤ layers, dp ≤ sequences per minibatch;
- sequence parallel on or off for train/inference with tp > 1; micro-batches m ∈ {1, 2, 4, ...} up to
  min(sequences per dp rank, max(8, 4·pp)).
Costs depend on a mesh's size only (aligned meshes of one size have the same node structure), so each
(size, layout, sp, m) is costed once. Pruned: options whose memory alone exceeds the device
(``CallMemory.standalone_bytes`` > usable memory), then per size the options not on the (time, memory)
Pareto front (thinned: a slower option must save 20% memory), keeping also the fastest option of each
of the ``KEEP_LAYOUTS`` fastest layouts — once by the candidate's time alone on its mesh and once with its
host load added (what it costs where it shares the mesh: a frozen model's reload, a train call run eager). Extra
placements (the heuristic and symmetric plans) are always added so the search can start from them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Optional

import numpy as np

from planner.cost_model.call_time import inference_graphed, t_call
from planner.cost_model.memory import CallMemory, call_memory, train_state_bytes, usable_memory_bytes
from planner.cost_model.profile import Profile
from planner.cost_model.realloc import (
    host_load_time_s,
    offload_time_s,
    realloc_estimate_matrix,
    realloc_estimate_s,
    realloc_time_s,
    same_layout,
)
from planner.cost_model.shapes import ModelOptions, max_params_per_device, seqs_per_rank, train_graphed
from planner.cost_model.transfer import edge_bytes
from planner.simulate import CostTables, mask_of
from reallm import working_set
from reallm.dataflow import Call, build_graph, topological_order
from reallm.layout.params import tp_problems
from reallm.placement import Placement
from reallm.plan import placement_problems
from reallm.spec import ModelSpec

KEEP_LAYOUTS = 3
PARETO_MEMORY_STEP = 0.8
NUM_STEPS = 4


@dataclass(frozen=True)
class Candidate:
    placement: Placement
    time_s: float
    memory: CallMemory
    host_load_s: float
    terms: tuple = ()


def model_options(exp, role: str, profile: Optional[Profile] = None) -> ModelOptions:
    """Gradient checkpointing and ZeRO stage of a role from the experiment config (defaults if absent);
    the element size from the profile's dtype (fp32 on CPU); greedy or filtered sampling from the PPO or gen
    settings (``greedy``, ``top_k``, ``top_p`` of ``ppo`` / ``gen``)."""
    dtype_bytes = 4 if profile is not None and profile.dtype == "fp32" else 2
    stream = profile is not None and working_set.stream_decode_device(profile.device)
    gen = getattr(getattr(exp, "config", None), "ppo", None) or getattr(getattr(exp, "config", None), "gen", None)
    greedy = bool(getattr(gen, "greedy", False))
    filtered = int(getattr(gen, "top_k", 1) or 0) > 0 or float(getattr(gen, "top_p", 0.0)) < 1.0
    try:
        from reallm.config.resolve import model_config_of

        m = model_config_of(exp.kind, exp.config, role)
        memory = getattr(exp.config, "memory", None)
        return ModelOptions(gradient_checkpointing=bool(m.gradient_checkpointing),
                            zero_stage=int(getattr(m.optimizer, "zero_stage", 0)), dtype_bytes=dtype_bytes,
                            offload_train_state=bool(getattr(memory, "offload_train_state", True)), greedy=greedy,
                            filtered_sampling=filtered,
                            compile_blocks=bool(getattr(m, "compile", True)),
                            train_graphs=bool(getattr(m, "train_cuda_graphs", True)),
                            lean_memory=bool(getattr(memory, "offload_idle_train_states", False)),
                            stream_decode=stream)
    except (AttributeError, KeyError, TypeError):
        return ModelOptions(dtype_bytes=dtype_bytes, greedy=greedy, filtered_sampling=filtered, stream_decode=stream)


def _pow2_upto(n: int) -> list[int]:
    out, x = [], 1
    while x <= n:
        out.append(x)
        x *= 2
    return out


def candidate_meshes(cluster) -> list[tuple[int, ...]]:
    G, N = cluster.n_devices_per_node, cluster.n_nodes
    sizes = sorted({s for s in _pow2_upto(G) if G % s == 0} | {G})
    out = []
    for node in range(N):
        for s in sizes:
            for start in range(0, G - s + 1, s):
                out.append(tuple(range(node * G + start, node * G + start + s)))
    for k in sorted(set(_pow2_upto(N)) | {N}):
        if k < 2:
            continue
        for n0 in range(N - k + 1):
            out.append(tuple(range(n0 * G, (n0 + k) * G)))
    return out


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layouts(call: Call, spec: ModelSpec, n: int, devices_per_node: int) -> list[tuple[int, int, int]]:
    """Valid (dp, tp, pp) on n devices (module docstring)."""
    out = []
    max_dp = max(1, call.n_seqs // call.n_minibatches)
    for tp in _divisors(n):
        if tp > devices_per_node or devices_per_node % tp or tp_problems(spec, tp):
            continue
        for pp in _divisors(n // tp):
            dp = n // (tp * pp)
            if pp > spec.num_layers or dp > max_dp:
                continue
            if placement_problems(spec, Placement(tuple(range(n)), dp, tp, pp)):
                continue
            out.append((dp, tp, pp))
    return out


def micro_batch_options(call: Call, dp: int, pp: int) -> list[int]:
    """Powers of two up to the sequences per dp rank and max(8, 4·pp); generation stops at pp (a decode
    round takes max(m, pp) slots, and its KV cache does not shrink with m)."""
    per_rank = seqs_per_rank(call, dp)
    top = pp if call.kind == "generate" else max(8, 4 * pp)
    return _pow2_upto(min(per_rank, top))


def cost_candidate(call: Call, p: Placement, spec: ModelSpec, profile: Profile, cluster, opts: ModelOptions,
                   frozen: bool) -> Candidate:
    ct = t_call(call, p, spec, profile, cluster, opts)
    regraph = 0.0
    if frozen and call.kind == "inference" and inference_graphed(spec, p, profile, opts):
        # A frozen model kept on its devices replays its forward from CUDA graphs; one that shares its
        # devices waits in host memory between calls and runs eager: the difference is paid with the load.
        eager = ct.time_s
        ct = t_call(call, p, spec, profile, cluster, opts, graphed=True)
        regraph = max(eager - ct.time_s, 0.0)
    elif call.kind == "train" and train_graphed(opts, p.tp, p.pp):
        # Graphed train micro-batches only where the call has its devices to itself (``keeps_train_resident``:
        # elsewhere the state may be offloaded between steps, and the graphs' pools would stay reserved
        # through the other calls): eager where it shares them, the difference charged the same way.
        eager = t_call(call, p, spec, profile, cluster, dataclasses.replace(opts, train_graphs=False)).time_s
        regraph = max(eager - ct.time_s, 0.0)
    elif call.kind == "generate" and ct.terms.get("capture_s", 0.0) > 0:
        # A generation call with its devices to itself keeps its KV caches and captured decode steps between
        # calls (``DecodePool``): it captures once per run. One that shares them captures at every call:
        # charged the same way.
        regraph = ct.terms["capture_s"]
        ct = dataclasses.replace(ct, time_s=ct.time_s - regraph, terms={**ct.terms, "capture_s": 0.0})
    # Memory as the call runs eager: the graphs' pools (d·P static gradients; ``call_memory`` with
    # ``train_graphs`` counts them) exist only where the call has its devices to itself, which the search
    # does not know per candidate; the executor captures only with that much room free (``TrainGraphs``).
    mem = call_memory(call, p, spec, dataclasses.replace(opts, train_graphs=False))
    if not frozen and call.kind != "train" and opts.offload_train_state:
        # On the training placement itself the call runs on the weights of record while gradients and Adam
        # wait in host memory. The simulators add the whole train state on an identical placement, so the
        # call's "shared" bytes are stated net of the offloaded part: transient (weights included) − state.
        state = train_state_bytes(max_params_per_device(spec, p.tp, p.pp), p.dp, opts)
        mem = dataclasses.replace(mem, shared_transient_bytes=mem.transient_bytes - state)
    load = (host_load_time_s(mem.weights_bytes, profile, cluster) if frozen else 0.0) + regraph
    return Candidate(p, ct.time_s, mem, load, tuple(sorted(ct.terms.items())))


def _pareto(cands: list[Candidate], time_of=lambda c: c.time_s) -> list[Candidate]:
    """The (time, memory) front, thinned: a slower option is kept only for ``PARETO_MEMORY_STEP`` less memory."""
    cands = sorted(cands, key=lambda c: (time_of(c), c.memory.standalone_bytes))
    out, best_mem = [], math.inf
    for c in cands:
        if c.memory.standalone_bytes < PARETO_MEMORY_STEP * best_mem:
            out.append(c)
            best_mem = c.memory.standalone_bytes
    return out


def enumerate_candidates(call: Call, spec: ModelSpec, profile: Profile, cluster, opts: ModelOptions, frozen: bool,
                         meshes: Optional[list[tuple[int, ...]]] = None, prune: bool = True) -> list[Candidate]:
    """Every kept candidate of ``call`` (module docstring), grouped by mesh in mesh order; ``prune=False``
    keeps every option that fits in memory."""
    meshes = meshes if meshes is not None else candidate_meshes(cluster)
    cap = usable_memory_bytes(cluster)
    by_size: dict[int, list[Candidate]] = {}
    for n in sorted({len(m) for m in meshes}):
        rep = tuple(range(n))
        opts_n: list[Candidate] = []
        for dp, tp, pp in layouts(call, spec, n, cluster.n_devices_per_node):
            sps = (False, True) if tp > 1 and call.kind != "generate" else (False,)
            for sp in sps:
                for m in micro_batch_options(call, dp, pp):
                    c = cost_candidate(call, Placement(rep, dp, tp, pp, sp, m), spec, profile, cluster, opts, frozen)
                    if c.memory.standalone_bytes <= cap:
                        opts_n.append(c)
        if not prune:
            by_size[n] = opts_n
            continue
        keep = {}
        # The time a candidate costs alone on its mesh, and where it shares it (+ its host load): an option
        # kept for one case only must not be pruned for the other.
        for time_of in (lambda c: c.time_s, lambda c: c.time_s + c.host_load_s):
            keep.update((id(c), c) for c in _pareto(opts_n, time_of))
            fastest: dict[tuple, Candidate] = {}
            for c in sorted(opts_n, key=time_of):
                fastest.setdefault((c.placement.dp, c.placement.tp, c.placement.pp), c)
            keep.update((id(c), c) for c in list(fastest.values())[:KEEP_LAYOUTS])
        by_size[n] = sorted(keep.values(), key=lambda c: c.time_s)
    out = []
    for mesh in meshes:
        for c in by_size.get(len(mesh), []):
            p = c.placement
            out.append(Candidate(Placement(mesh, p.dp, p.tp, p.pp, p.sequence_parallel, p.num_micro_batches),
                                 c.time_s, c.memory, c.host_load_s, c.terms))
    return out


# -- tables --------------------------------------------------------------------------------------
def _layout_key(p: Placement) -> tuple:
    return (p.devices, p.dp, p.tp, p.pp)


def _layout_id(p: Placement) -> int:
    return (p.dp * 4096 + p.tp) * 4096 + p.pp


def record_call_of(calls: list[Call], order: list[str], role: str) -> Optional[str]:
    """The call holding a role's weights of record: its train call, else its first call (executor's rule)."""
    mine = [n for n in order if next(c for c in calls if c.name == n).role == role]
    trains = [n for n in mine if next(c for c in calls if c.name == n).is_train]
    return trains[0] if trains else (mine[0] if mine else None)


def build_tables(exp, profile: Profile, extra: Iterable[dict[str, Placement]] = (),
                 candidates: Optional[dict[str, list[Candidate]]] = None, exact_realloc: bool = False,
                 num_steps: int = NUM_STEPS) -> CostTables:
    """Cost tables for ``exp``: enumerated candidates (or the given ones) plus the ``extra`` placements.

    ``exact_realloc`` costs reallocation pairs with the layout algebra's plan instead of the estimate
    (only for tables with a few candidates per call)."""
    cluster = exp.cluster
    calls = list(exp.calls)
    g = build_graph(calls)
    order = topological_order(g)
    by_name = {c.name: c for c in calls}
    trained_roles = {c.role for c in calls if c.is_train}
    roles = []
    for n in order:
        if by_name[n].role not in roles:
            roles.append(by_name[n].role)
    opts = {r: model_options(exp, r, profile) for r in roles}
    extra = list(extra)
    cands: dict[str, list[Candidate]] = {}
    for name in order:
        c = by_name[name]
        spec = exp.models[c.role]
        frozen = c.role not in trained_roles
        lst = list(candidates[name]) if candidates is not None else enumerate_candidates(
            c, spec, profile, cluster, opts[c.role], frozen)
        have = {cd.placement for cd in lst}
        for plan in extra:
            p = plan.get(name)
            if p is not None and p not in have:
                lst.append(cost_candidate(c, p, spec, profile, cluster, opts[c.role], frozen))
                have.add(p)
        if not lst:
            raise ValueError(f"call {name}: no placement fits ({spec.num_params / 1e9:.3g}B parameters on "
                             f"{cluster.num_devices} devices of {cluster.device_memory_bytes / 2**30:.0f} GiB)")
        cands[name] = lst

    D = cluster.num_devices
    W = (D + 63) // 64
    G = cluster.n_devices_per_node
    WN = (cluster.n_nodes + 63) // 64
    flat = [cd for n in order for cd in cands[n]]
    offset = np.cumsum([0] + [len(cands[n]) for n in order]).astype(np.int64)
    idx = {n: i for i, n in enumerate(order)}
    mesh_ids: dict[tuple, int] = {}
    shape_ids: dict[tuple, int] = {}
    mesh_group, shape_group = [], []
    for i, n in enumerate(order):
        for cd in cands[n]:
            p = cd.placement
            mesh_group.append(mesh_ids.setdefault((i, p.devices), len(mesh_ids)))
            shape_group.append(shape_ids.setdefault((i, len(p.devices), p.dp, p.tp, p.pp, p.sequence_parallel,
                                                     p.num_micro_batches), len(shape_ids)))
    preds = [sorted(idx[p] for p in g.predecessors(n)) for n in order]
    cross = [[] for _ in order]
    for last, first, _role in g.graph["cross_step"]:
        cross[idx[first]].append(idx[last])
    edges = [(idx[p], idx[c], edge_bytes(g.edges[p, c]["keys"], by_name[p], exp.models[by_name[p].role]))
             for c in order for p in sorted(g.predecessors(c), key=order.index) if g.edges[p, c]["keys"]]
    role_idx = {r: i for i, r in enumerate(roles)}
    role_train = np.full(len(roles), -1, dtype=np.int64)
    for n in order:
        if by_name[n].is_train:
            role_train[role_idx[by_name[n].role]] = idx[n]

    pair_rec, pair_oth, pair_off, pair_t = [], [], [0], []
    for r in roles:
        rec = record_call_of(calls, order, r)
        for n in order:
            if by_name[n].role != r or n == rec:
                continue
            tab = pair_table_s(exp.models[r], cands[rec], cands[n], r in trained_roles, cluster, profile,
                               exact_realloc)
            pair_rec.append(idx[rec])
            pair_oth.append(idx[n])
            pair_t.append(tab.ravel())
            pair_off.append(pair_off[-1] + tab.size)
    nv, ib = profile.link("nvlink", 2), profile.link("ib", 2)
    return CostTables(
        num_devices=D, memory_capacity_bytes=usable_memory_bytes(cluster), call_names=list(order),
        call_role=np.array([role_idx[by_name[n].role] for n in order], dtype=np.int64),
        call_is_train=np.array([by_name[n].is_train for n in order], dtype=bool), role_train_call=role_train,
        preds=preds, cross_preds=cross, cand_offset=offset,
        cand_time_s=np.array([cd.time_s for cd in flat]),
        cand_mem_bytes=np.array([cd.memory.transient_bytes for cd in flat]),
        cand_mem_shared_bytes=np.array([cd.memory.shared_transient_bytes for cd in flat]),
        cand_state_bytes=np.array([cd.memory.state_bytes for cd in flat]),
        cand_host_load_s=np.array([cd.host_load_s for cd in flat]),
        cand_mask=np.array([mask_of(cd.placement.devices, W) for cd in flat]).reshape(len(flat), W),
        cand_heads=np.array([mask_of(cd.placement.dp_heads(), W) for cd in flat]).reshape(len(flat), W),
        cand_nodes=np.array([mask_of(sorted({d // G for d in cd.placement.devices}), WN) for cd in flat]).reshape(len(flat), WN),
        cand_layout=np.array([_layout_id(cd.placement) for cd in flat], dtype=np.int64),
        cand_dp=np.array([cd.placement.dp for cd in flat], dtype=np.int64),
        cand_replicas=np.array([cd.placement.tp * cd.placement.pp for cd in flat], dtype=np.int64),
        edge_src=np.array([e[0] for e in edges], dtype=np.int64), edge_dst=np.array([e[1] for e in edges], dtype=np.int64),
        edge_bytes=np.array([e[2] for e in edges], dtype=np.float64),
        pair_record=np.array(pair_rec, dtype=np.int64), pair_other=np.array(pair_oth, dtype=np.int64),
        pair_offset=np.array(pair_off, dtype=np.int64),
        pair_time_s=np.concatenate(pair_t) if pair_t else np.zeros(0),
        link_rates=(nv.bandwidth_bytes_per_s, nv.latency_s, ib.bandwidth_bytes_per_s, ib.latency_s),
        num_steps=num_steps, cand_mesh_group=np.array(mesh_group, dtype=np.int64),
        cand_shape_group=np.array(shape_group, dtype=np.int64),
        placements=[[cd.placement for cd in cands[n]] for n in order],
        notes={"candidates": cands},
    )


def pair_time_s(spec: ModelSpec, rec: Candidate, other: Candidate, trained: bool, cluster, profile: Profile,
                exact: bool = False) -> float:
    """Reallocation from the weights of record to another call's placement, plus the train state's trip to
    host memory and back when the meshes share devices (``planner.cost_model.realloc``)."""
    a, b = rec.placement, other.placement
    if same_layout(a, b):
        return 0.0
    t = (realloc_time_s if exact else realloc_estimate_s)(spec, a, b, cluster, profile)
    if trained and set(a.devices) & set(b.devices):
        t += offload_time_s(rec.memory.state_bytes, profile, cluster)
    return t


def pair_table_s(spec: ModelSpec, recs: list[Candidate], others: list[Candidate], trained: bool, cluster,
                 profile: Profile, exact: bool = False) -> np.ndarray:
    """``pair_time_s`` for every (record candidate, other candidate), [len(recs), len(others)]."""
    if exact:
        return np.array([[pair_time_s(spec, a, b, trained, cluster, profile, True) for b in others] for a in recs])
    tab = realloc_estimate_matrix(spec, [c.placement for c in recs], [c.placement for c in others], cluster, profile)
    if trained:
        W = (cluster.num_devices + 63) // 64
        ma = np.array([mask_of(c.placement.devices, W) for c in recs]).reshape(len(recs), W)
        mb = np.array([mask_of(c.placement.devices, W) for c in others]).reshape(len(others), W)
        overlap = np.zeros((len(recs), len(others)), dtype=bool)
        for w in range(W):
            overlap |= (ma[:, w][:, None] & mb[:, w][None, :]) != 0
        off = np.array([offload_time_s(c.memory.state_bytes, profile, cluster) for c in recs])
        ids: dict = {}
        ka = np.array([ids.setdefault(_layout_key(c.placement), len(ids)) for c in recs])
        kb = np.array([ids.setdefault(_layout_key(c.placement), len(ids)) for c in others])
        identical = ka[:, None] == kb[None, :]
        tab = tab + np.where(overlap & ~identical, off[:, None], 0.0)
    return tab
