"""Time to move parameters between placements, to and from host memory, and data between calls.

Reallocation A → B (``realloc_time_s``) is costed from the layout algebra's own plan
(``reallm.layout.realloc_traffic``: elements per (src, dst) device pair), so the cost model and the
executor cannot disagree::

    in_s(d)  = max(intra_in(d)/β_nvlink, inter_in(d)/β_ib) + α·(messages into d)
    out_s(d) = max(intra_out(d)/β_nvlink, inter_out(d)/β_ib) + α·(messages out of d)
    realloc_time_s = max over devices of max(in_s, out_s)

(each device sends and receives concurrently, NVLink and its own NIC concurrently; local copies are free;
β, α from the profile's p2p rates, group size 2). Identical placements (same devices, dp, tp, pp) cost 0.

The exact plan takes 0.1–2 s per pair for a 70B model on 128 devices, too slow for the search's
tables (10^5 pairs), so the tables use ``realloc_estimate_s``: the same greedy source choice (local
copy, else a replica on the same node, else the least-loaded replica) and the same formula, on pieces
of (pipeline stage × tp part) instead of individual parameter boxes — a parameter count per layer
range, tp split assumed uniform (norms and replicated kv heads ignored). Results are cached on the
pair's shape with node ids compressed (only same-node-or-not matters). ``search`` re-costs the final
plans with the exact function.

Host offload (``offload_time_s``): the executor moves a train state to pinned host memory and back
around a same-model call on shared devices: 2 · state_bytes / β_host (+ latencies).
"""

from __future__ import annotations

import functools
from collections import defaultdict
from typing import Optional

import numpy as np

from planner.cost_model.collectives import host_copy_time_s
from planner.cost_model.profile import Profile
from planner.cost_model.shapes import DTYPE_BYTES
from reallm.layout import realloc_traffic
from reallm.layout.stages import StageBalance, layer_costs, partition_stages
from reallm.placement import Placement
from reallm.spec import ModelSpec


def same_layout(a: Placement, b: Placement) -> bool:
    """Same devices and degrees: nothing to move (micro-batches and sp do not change what is held)."""
    return a.devices == b.devices and (a.dp, a.tp, a.pp) == (b.dp, b.tp, b.pp)


def traffic_time_s(bytes_by_pair: dict[tuple[int, int], float], devices_per_node: int, profile: Profile) -> float:
    """Max over devices of in/out time (module docstring) for bytes per (src, dst) pair."""
    nv, ib = profile.link("nvlink", 2), profile.link("ib", 2)
    load: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0.0, 0, 0])  # in nv, in ib, out nv, out ib, n_in, n_out
    for (src, dst), n in bytes_by_pair.items():
        if src == dst or n <= 0:
            continue
        cross = src // devices_per_node != dst // devices_per_node
        load[dst][1 if cross else 0] += n
        load[src][3 if cross else 2] += n
        load[dst][4] += 1
        load[src][5] += 1
    worst = 0.0
    for i_nv, i_ib, o_nv, o_ib, n_in, n_out in load.values():
        t_in = max(i_nv / nv.bandwidth_bytes_per_s, i_ib / ib.bandwidth_bytes_per_s) + n_in * (ib.latency_s if i_ib else nv.latency_s)
        t_out = max(o_nv / nv.bandwidth_bytes_per_s, o_ib / ib.bandwidth_bytes_per_s) + n_out * (ib.latency_s if o_ib else nv.latency_s)
        worst = max(worst, t_in, t_out)
    return worst


def realloc_time_s(spec: ModelSpec, a: Placement, b: Placement, cluster, profile: Optional[Profile] = None) -> float:
    """Exact: from the layout algebra's reallocation plan A → B (module docstring); link rates from
    ``profile`` (default: the cluster's default profile)."""
    if same_layout(a, b):
        return 0.0
    if profile is None:
        from planner.cost_model.profile import default_profile

        profile = default_profile(cluster)
    g = cluster.n_devices_per_node
    traffic = realloc_traffic(spec, a, b, devices_per_node=g)
    return traffic_time_s(traffic.bytes_by_pair(DTYPE_BYTES), g, profile)


# -- the fast estimate -----------------------------------------------------------------------------
def _stage_ranges(spec: ModelSpec, pp: int) -> list[tuple[int, int]]:
    """Per stage, its layer range [lo, hi) in pipeline numbering (0 embedding, 1+i block i, L+1 head)."""
    b = partition_stages(spec, pp).bounds
    L = spec.num_layers
    return [(0 if s == 0 else 1 + b[s], 1 + b[s + 1] if s < pp - 1 else L + 2) for s in range(pp)]


@functools.lru_cache(maxsize=64)
def _layer_prefix(spec: ModelSpec) -> tuple[int, ...]:
    c = layer_costs(spec, 1, StageBalance.PARAMS)
    out = [0]
    for x in c:
        out.append(out[-1] + x)
    return tuple(out)


def _overlap(a0: float, a1: float, b0: float, b1: float) -> float:
    return max(0.0, min(a1, b1) - max(a0, b0))


def _compress_nodes(devs_a, devs_b, g: int):
    nodes = sorted({d // g for d in devs_a} | {d // g for d in devs_b})
    rank = {n: i for i, n in enumerate(nodes)}
    return (tuple(rank[d // g] * g + d % g for d in devs_a), tuple(rank[d // g] * g + d % g for d in devs_b))


def realloc_estimate_s(spec: ModelSpec, a: Placement, b: Placement, cluster, profile: Profile) -> float:
    """Fast estimate of ``realloc_time_s`` (module docstring)."""
    if same_layout(a, b):
        return 0.0
    g = cluster.n_devices_per_node
    da, db = _compress_nodes(a.devices, b.devices, g)
    nv, ib = profile.link("nvlink", 2), profile.link("ib", 2)
    return _estimate(spec, da, (a.dp, a.tp, a.pp), db, (b.dp, b.tp, b.pp), g,
                     (nv.bandwidth_bytes_per_s, nv.latency_s, ib.bandwidth_bytes_per_s, ib.latency_s))


@functools.lru_cache(maxsize=200_000)
def _estimate(spec: ModelSpec, da: tuple, la: tuple, db: tuple, lb: tuple, g: int, rates: tuple) -> float:
    try:
        from planner import _anneal
    except ImportError:
        return _estimate_py(spec, da, la, db, lb, g, rates)
    prefix = _layer_prefix(spec)
    ra, rb = _stage_ranges(spec, la[2]), _stage_ranges(spec, lb[2])
    return _anneal.realloc_estimate([float(x) for x in prefix], [x for r in ra for x in r], [x for r in rb for x in r],
                                    list(da), list(db), *la, *lb, g, *rates, float(DTYPE_BYTES))


def _estimate_py(spec: ModelSpec, da: tuple, la: tuple, db: tuple, lb: tuple, g: int, rates: tuple) -> float:
    """The reference of the C++ ``planner._anneal.realloc_estimate`` (same loop, same tie-breaks)."""
    (dp_a, tp_a, pp_a), (dp_b, tp_b, pp_b) = la, lb
    bw_nv, lat_nv, bw_ib, lat_ib = rates
    prefix = _layer_prefix(spec)
    ra, rb = _stage_ranges(spec, pp_a), _stage_ranges(spec, pp_b)
    coord_a = {}  # device -> (stage, tp rank)
    holders: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, d in enumerate(da):
        c = (i // (dp_a * tp_a), i % tp_a)
        coord_a[d] = c
        holders[c].append(d)
    # Pieces a destination (stage sb, tp rank rb) needs: (A coord, bytes), by layer and tp overlap.
    need_cache: dict[tuple[int, int], list[tuple[tuple[int, int], float]]] = {}

    def needs(sb: int, r_b: int):
        key = (sb, r_b)
        if key not in need_cache:
            lo_b, hi_b = rb[sb]
            out = []
            for sa, (lo_a, hi_a) in enumerate(ra):
                lo, hi = max(lo_a, lo_b), min(hi_a, hi_b)
                if lo >= hi:
                    continue
                params = prefix[hi] - prefix[lo]
                for r_a in range(tp_a):
                    f = _overlap(r_a / tp_a, (r_a + 1) / tp_a, r_b / tp_b, (r_b + 1) / tp_b)
                    if f > 1e-12:
                        out.append(((sa, r_a), DTYPE_BYTES * params * f))
            need_cache[key] = out
        return need_cache[key]

    # in/out bytes per device over nvlink / ib, and message counts
    load: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0.0, 0, 0])
    sent: dict[int, float] = defaultdict(float)
    for i, d in enumerate(db):
        sb, r_b = i // (dp_b * tp_b), i % tp_b
        node = d // g
        mine = coord_a.get(d)
        for c, nbytes in needs(sb, r_b):
            if c == mine:
                continue
            src = min(holders[c], key=lambda h: (h // g != node, sent[h], h))
            sent[src] += nbytes
            cross = src // g != node
            load[d][1 if cross else 0] += nbytes
            load[src][3 if cross else 2] += nbytes
            load[d][4] += 1
            load[src][5] += 1
    worst = 0.0
    for i_nv, i_ib, o_nv, o_ib, n_in, n_out in load.values():
        t_in = max(i_nv / bw_nv, i_ib / bw_ib) + n_in * (lat_ib if i_ib else lat_nv)
        t_out = max(o_nv / bw_nv, o_ib / bw_ib) + n_out * (lat_ib if o_ib else lat_nv)
        worst = max(worst, t_in, t_out)
    return worst



def _contiguous(p: Placement) -> bool:
    return p.devices == tuple(range(p.devices[0], p.devices[0] + len(p.devices)))


def _normalised_starts(sa: np.ndarray, na: np.ndarray, sb: np.ndarray, nb: np.ndarray, g: int):
    """Starts of two contiguous meshes after compressing away the nodes neither uses (vectorised), and,
    when they share no node, moving each partial-node mesh to the start of its node: neither changes the
    estimate (only same-node-or-not matters)."""
    a0, a1, b0, b1 = sa // g, (sa + na - 1) // g, sb // g, (sb + nb - 1) // g
    gap_b = np.maximum(b0 - a1 - 1, 0)
    gap_a = np.maximum(a0 - b1 - 1, 0)
    sb, b0, b1 = sb - gap_b * g, b0 - gap_b, b1 - gap_b
    sa, a0, a1 = sa - gap_a * g, a0 - gap_a, a1 - gap_a
    disjoint = (b0 > a1) | (a0 > b1)
    sa = np.where(disjoint & (na < g), a0 * g, sa)
    sb = np.where(disjoint & (nb < g), b0 * g, sb)
    base = np.minimum(a0, b0) * g
    return sa - base, sb - base


def realloc_estimate_matrix(spec: ModelSpec, recs: list[Placement], others: list[Placement], cluster,
                            profile: Profile) -> np.ndarray:
    """``realloc_estimate_s`` for every (rec, other) pair, [len(recs), len(others)] (vectorised keys,
    one estimate per distinct normalised pair)."""
    g = cluster.n_devices_per_node
    out = np.zeros((len(recs), len(others)))
    ca = np.array([_contiguous(p) for p in recs], dtype=bool)
    cb = np.array([_contiguous(p) for p in others], dtype=bool)
    lay: dict[tuple, int] = {}
    la = np.array([lay.setdefault((p.dp, p.tp, p.pp), len(lay)) for p in recs], dtype=np.int64)
    lb = np.array([lay.setdefault((p.dp, p.tp, p.pp), len(lay)) for p in others], dtype=np.int64)
    inv_lay = {v: k for k, v in lay.items()}
    sa = np.array([p.devices[0] for p in recs], dtype=np.int64)[:, None]
    na = np.array([len(p.devices) for p in recs], dtype=np.int64)[:, None]
    sb = np.array([p.devices[0] for p in others], dtype=np.int64)[None, :]
    nb = np.array([len(p.devices) for p in others], dtype=np.int64)[None, :]
    sa2, sb2 = _normalised_starts(sa, na, sb, nb, g)
    span = int(2 * cluster.num_devices + 1)
    nl = len(lay)
    key = ((la[:, None] * nl + lb[None, :]) * span + sa2) * span + sb2
    both = ca[:, None] & cb[None, :]
    uniq, inv = np.unique(key[both], return_inverse=True)
    nv, ib = profile.link("nvlink", 2), profile.link("ib", 2)
    rates = (nv.bandwidth_bytes_per_s, nv.latency_s, ib.bandwidth_bytes_per_s, ib.latency_s)
    vals = np.empty(len(uniq))
    for k, u in enumerate(uniq):
        u = int(u)
        s_b, u = u % span, u // span
        s_a, u = u % span, u // span
        l_b, l_a = inv_lay[u % nl], inv_lay[u // nl]
        da = tuple(range(s_a, s_a + l_a[0] * l_a[1] * l_a[2]))
        db = tuple(range(s_b, s_b + l_b[0] * l_b[1] * l_b[2]))
        vals[k] = 0.0 if (da == db and l_a == l_b) else _estimate(spec, da, l_a, db, l_b, g, rates)
    out[both] = vals[inv]
    for i, j in zip(*np.nonzero(~both)):
        out[i, j] = realloc_estimate_s(spec, recs[i], others[j], cluster, profile)
    return out


def offload_time_s(state_bytes: float, profile: Profile, cluster) -> float:
    """Train state to pinned host memory before a same-model call on shared devices, and back after."""
    return 2 * host_copy_time_s(state_bytes, profile, cluster)


def host_load_time_s(weights_bytes: float, profile: Profile, cluster) -> float:
    """A frozen model's weights from host memory before its call (when its devices are shared)."""
    return host_copy_time_s(weights_bytes, profile, cluster)
