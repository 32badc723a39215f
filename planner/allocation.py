"""Allocation modes: how every call of an experiment gets its placement.

- ``manual``: the user's ``<call>.parallel.*`` (``allocation.parallel.*`` for sft/rw/gen), optional
  ``device_mesh`` (default: all devices) and ``n_mbs``.
- ``d{D}p{P}m{M}`` (letters in any order): one symmetric layout for every call on the whole cluster.
- ``pipe_data``: dp = devices per node, pp = nodes.  ``pipe_model``: tp = devices per node, pp = nodes.
- ``heuristic``: ReaL's fixed PPO plan generalised to any cluster and model size (below).
- ``search``: the planner's search (``planner.search``).

Default micro-batches: 1 without pipeline parallelism; 2·pp for train calls, pp otherwise (enough to
fill the pipeline); never more than the sequences each dp rank gets.
"""

from __future__ import annotations

import re
from typing import Optional

from reallm.config.resolve import Experiment
from reallm.dataflow import Call
from reallm.errors import PlanError, UserError
from reallm.placement import Placement
from reallm.plan import Plan, check, placement_problems
from reallm.spec import ModelSpec

SYMMETRIC_RE = re.compile(r"^(?=.*d\d+)(?=.*p\d+)(?=.*m\d+)(?:[dpm]\d+){3}$")

#: Bytes of resident state per parameter: bf16 weights; training adds fp32 master, bf16 grads,
#: two fp32 Adam moments (2 + 4 + 2 + 8).
INFER_BYTES_PER_PARAM = 2
TRAIN_BYTES_PER_PARAM = 18  # bf16 weights, fp32 gradients, fp32 master and two moments
#: The heuristic leaves this fraction of device memory for activations and the KV cache.
STATIC_MEMORY_FRACTION = 0.7


def default_micro_batches(call: Call, pp: int, dp: int) -> int:
    if pp == 1:
        return 1
    want = 2 * pp if call.is_train else pp
    return max(1, min(want, call.n_seqs // call.n_minibatches // dp))


def parse_symmetric(mode: str) -> Optional[tuple[int, int, int]]:
    """``d2p1m4`` → (dp=2, pp=1, tp=4); None if ``mode`` is not of that form."""
    if not SYMMETRIC_RE.match(mode):
        return None
    deg = {k: int(v) for k, v in re.findall(r"([dpm])(\d+)", mode)}
    return deg["d"], deg["p"], deg["m"]


def make_plan(exp: Experiment) -> Plan:
    mode = exp.config.allocation_mode
    if mode == "manual":
        placements = _manual(exp)
    elif mode == "heuristic":
        placements = _heuristic(exp)
    elif mode == "pipe_data":
        placements = uniform_placements(exp, dp=exp.cluster.n_devices_per_node, pp=exp.cluster.n_nodes, tp=1)
    elif mode == "pipe_model":
        placements = uniform_placements(exp, dp=1, pp=exp.cluster.n_nodes, tp=exp.cluster.n_devices_per_node)
    elif mode == "search":
        from planner.search import search  # lazy: numpy, the C++ annealer and the cost tables

        return search(exp)  # a checked Plan with per-call and step estimates
    elif (deg := parse_symmetric(mode)) is not None:
        dp, pp, tp = deg
        placements = uniform_placements(exp, dp=dp, pp=pp, tp=tp)
    else:
        raise UserError(f"allocation_mode={mode!r}: expected manual, heuristic, search, pipe_data, pipe_model "
                        f"or d{{D}}p{{P}}m{{M}} (e.g. d4p1m2)")
    plan = Plan(experiment=exp.kind, allocation_mode=mode, config=exp.config_dict, cluster=exp.cluster,
                models=dict(exp.models), calls=exp.calls, placements=placements)
    return check(plan, source=f"allocation_mode={mode}")


def uniform_placements(exp: Experiment, dp: int, pp: int, tp: int) -> dict[str, Placement]:
    n = exp.cluster.num_devices
    if dp * pp * tp != n:
        raise UserError(f"allocation_mode={exp.config.allocation_mode}: d{dp}·p{pp}·m{tp} = {dp * pp * tp} "
                        f"devices but the cluster has {n} (n_nodes={exp.cluster.n_nodes} × "
                        f"n_gpus_per_node={exp.cluster.n_devices_per_node})")
    return {c.name: Placement(tuple(range(n)), dp, tp, pp, sequence_parallel=tp > 1,
                              num_micro_batches=default_micro_batches(c, pp, dp)) for c in exp.calls}


def _manual(exp: Experiment) -> dict[str, Placement]:
    cfg = exp.config
    single = exp.kind in ("sft", "rw", "gen")
    n = exp.cluster.num_devices
    out: dict[str, Placement] = {}
    problems: list[str] = []
    for c in exp.calls:
        key = "allocation" if single else c.name
        mfc = getattr(cfg, key)
        par = mfc.parallel
        devices = tuple(mfc.device_mesh) if mfc.device_mesh is not None else tuple(range(n))
        dp, tp, pp = par.data_parallel_size, par.model_parallel_size, par.pipeline_parallel_size
        where = f"{key}.parallel"
        if dp * tp * pp != len(devices):
            mesh = (f"{key}.device_mesh={list(devices)}" if mfc.device_mesh is not None
                    else f"all {n} devices (n_nodes × n_gpus_per_node; or set {key}.device_mesh=[...])")
            problems.append(f"{where}: data_parallel_size·model_parallel_size·pipeline_parallel_size = "
                            f"{dp}·{tp}·{pp} = {dp * tp * pp} does not match {mesh}")
            continue
        n_mbs = mfc.n_mbs if mfc.n_mbs is not None else default_micro_batches(c, pp, dp)
        try:
            out[c.name] = Placement(devices, dp, tp, pp, par.use_sequence_parallel, n_mbs)
        except UserError as e:
            problems.append(f"{key}: {e}")
    if problems:
        raise PlanError(problems, source="allocation_mode=manual")
    return out


# -- heuristic ------------------------------------------------------------------------------------
def fit_layout(spec: ModelSpec, devices: tuple[int, ...], devices_per_node: int, memory_bytes: int,
               train: bool) -> tuple[int, int, int]:
    """(dp, tp, pp) on ``devices``: the least model parallelism whose static memory fits, tp first
    (inside a node, up to 8), then pp; dp takes the rest."""
    n = len(devices)
    per_param = TRAIN_BYTES_PER_PARAM if train else INFER_BYTES_PER_PARAM
    budget = STATIC_MEMORY_FRACTION * memory_bytes
    options = []
    for tp in (1, 2, 4, 8):
        if tp > min(n, devices_per_node) or n % tp:
            continue
        for pp in range(1, n // tp + 1):
            if (n // tp) % pp:
                continue
            p = Placement(devices, n // (tp * pp), tp, pp)
            if placement_problems(spec, p):
                continue
            fits = spec.num_params * per_param / (tp * pp) <= budget
            options.append((not fits, tp * pp, pp, tp))
    if not options:
        raise UserError(f"no valid layout of {spec.source} on {n} devices")
    _, _, pp, tp = min(options)
    return n // (tp * pp), tp, pp


def heuristic_placements(exp: Experiment) -> dict[str, Placement]:
    """The heuristic plan's placements (the search starts from them and compares against them)."""
    return _heuristic(exp)


def _heuristic(exp: Experiment) -> dict[str, Placement]:
    """ReaL's PPO heuristic, generalised: the cluster split in halves A and B; trainable actor calls on A,
    critic calls on B, generation and the reference on all devices, the reward model on A.
    Non-PPO experiments: every call on all devices with the fitted layout."""
    cl = exp.cluster
    n = cl.num_devices
    everything = tuple(range(n))
    half_a, half_b = (everything[: n // 2], everything[n // 2:]) if n >= 2 else (everything, everything)
    where = {"actor_gen": everything, "ref_inf": everything, "actor_train": half_a, "rew_inf": half_a,
             "critic_train": half_b, "critic_inf": half_b}
    out = {}
    for c in exp.calls:
        devices = where.get(c.name, everything) if exp.kind == "ppo" else everything
        dp, tp, pp = fit_layout(exp.models[c.role], devices, cl.n_devices_per_node, cl.device_memory_bytes,
                                c.is_train)
        out[c.name] = Placement(devices, dp, tp, pp, sequence_parallel=tp > 1,
                                num_micro_batches=default_micro_batches(c, pp, dp))
    return out
