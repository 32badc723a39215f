"""plan.json: the self-contained description of one experiment's execution.

A plan is data: the resolved experiment config, the cluster, the model spec of every role, every
call of the dataflow graph with its placement, and (when a planner made it) estimates. The executor
only interprets it; ``planner show`` prints it. Format (version 1)::

    {
      "format": "reallm.plan", "version": 1,
      "experiment": "ppo",                      # sft | rw | dpo | ppo | gen
      "allocation_mode": "manual",
      "config": {...},                          # the resolved experiment config (all keys)
      "cluster": {...},                         # reallm.cluster.Cluster fields
      "models": {"actor": {...ModelSpec...}, ...},
      "calls": [
        {"name": "actor_gen", "role": "actor", "kind": "generate",
         "inputs": [...], "outputs": [...], "n_seqs": 128, "max_seqlen": 512,
         "max_new_tokens": 256, "n_minibatches": 1,
         "placement": {"devices": [0,...,7], "dp": 4, "tp": 1, "pp": 2,
                       "sequence_parallel": false, "num_micro_batches": 2},
         "estimate": {"time_s": 1.2, "peak_memory_bytes": 123} | null},
        ...],
      "estimate": {"step_time_s": 9.8, ...} | null
    }

Loading validates everything and reports every problem at once, naming the call and the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional

from reallm.cluster import Cluster
from reallm.dataflow import Call, build_graph
from reallm.errors import PlanError, UserError
from reallm.placement import Placement
from reallm.spec import ModelSpec

PLAN_FORMAT = "reallm.plan"
PLAN_VERSION = 1


@dataclass(frozen=True)
class Plan:
    experiment: str
    allocation_mode: str
    config: dict
    cluster: Cluster
    models: dict[str, ModelSpec]
    calls: tuple[Call, ...]
    placements: dict[str, Placement]
    call_estimates: dict[str, dict] = field(default_factory=dict)
    estimate: Optional[dict] = None
    version: int = PLAN_VERSION

    def call(self, name: str) -> Call:
        for c in self.calls:
            if c.name == name:
                return c
        raise KeyError(name)

    def graph(self):
        return build_graph(self.calls)

    def to_dict(self) -> dict:
        return {
            "format": PLAN_FORMAT,
            "version": self.version,
            "experiment": self.experiment,
            "allocation_mode": self.allocation_mode,
            "config": self.config,
            "cluster": self.cluster.to_dict(),
            "models": {r: s.to_dict() for r, s in self.models.items()},
            "calls": [dict(c.to_dict(), placement=self.placements[c.name].to_dict(),
                           estimate=self.call_estimates.get(c.name)) for c in self.calls],
            "estimate": self.estimate,
        }

    def dumps(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def save(self, path: str) -> None:
        import os

        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.write(self.dumps() + "\n")
        os.replace(tmp, path)


def validate(plan: Plan) -> list[str]:
    """Every problem of a plan, each naming the call and field; empty when the plan is valid."""
    problems: list[str] = []
    n_dev = plan.cluster.num_devices
    names = {c.name for c in plan.calls}
    for name in sorted(set(plan.placements) - names):
        problems.append(f"placement for unknown call {name!r}")
    for c in plan.calls:
        p = plan.placements.get(c.name)
        if p is None:
            problems.append(f"call {c.name}: no placement")
            continue
        where = f"call {c.name}"
        bad = [d for d in p.devices if d >= n_dev]
        if bad:
            problems.append(f"{where}: device_mesh has device(s) {bad} but the cluster has {n_dev} devices "
                            f"({plan.cluster.n_nodes} node(s) × {plan.cluster.n_devices_per_node})")
        spec = plan.models.get(c.role)
        if spec is None:
            problems.append(f"{where}: no model spec for role {c.role!r}")
            continue
        problems += [f"{where}: {m}" for m in placement_problems(spec, p)]
        per_rank = c.n_seqs // c.n_minibatches // p.dp
        if per_rank < p.num_micro_batches:
            mb = f" per minibatch ({c.n_minibatches} minibatches)" if c.n_minibatches > 1 else ""
            problems.append(f"{where}: each of dp={p.dp} ranks gets {per_rank} sequence(s){mb} of the batch of "
                            f"{c.n_seqs}, fewer than n_mbs={p.num_micro_batches} micro-batches")
    return problems


def placement_problems(spec: ModelSpec, p: Placement) -> list[str]:
    """Model-shape constraints on a placement (tp vs heads, pp vs layers)."""
    out = []
    if spec.num_heads % p.tp:
        out.append(f"tensor parallel size (model_parallel_size) {p.tp} does not divide the "
                   f"{spec.num_heads} attention heads")
    if not (spec.num_kv_heads % p.tp == 0 or p.tp % spec.num_kv_heads == 0):
        out.append(f"tensor parallel size {p.tp} and {spec.num_kv_heads} kv heads: one must divide the other")
    if p.pp > spec.num_layers:
        out.append(f"pipeline_parallel_size {p.pp} exceeds the {spec.num_layers} layers")
    return out


def check(plan: Plan, source: str = "plan") -> Plan:
    problems = validate(plan)
    if problems:
        raise PlanError(problems, source)
    return plan


def plan_from_dict(d: Any, source: str = "plan.json") -> Plan:
    """Parse and validate; raises PlanError listing every problem found."""
    if not isinstance(d, dict) or d.get("format") != PLAN_FORMAT:
        raise PlanError([f"not a reallm plan (expected \"format\": \"{PLAN_FORMAT}\")"], source)
    v = d.get("version")
    if not isinstance(v, int):
        raise PlanError([f"version must be an integer, got {v!r}"], source)
    if v > PLAN_VERSION:
        raise PlanError([f"version {v} is newer than this reallm understands (≤ {PLAN_VERSION}); "
                         f"upgrade reallm or re-create the plan with `planner search`"], source)
    problems: list[str] = []
    for k in ("experiment", "allocation_mode", "config", "cluster", "models", "calls"):
        if k not in d:
            problems.append(f"missing top-level field {k!r}")
    if problems:
        raise PlanError(problems, source)
    cluster = None
    try:
        cluster = Cluster.from_dict(d["cluster"], where="cluster")
    except UserError as e:
        problems.append(str(e))
    models: dict[str, ModelSpec] = {}
    for role, sd in (d["models"] or {}).items():
        try:
            models[role] = ModelSpec.from_dict(sd, where=f"models.{role}")
        except UserError as e:
            problems.append(str(e))
    calls, placements, estimates = [], {}, {}
    if not isinstance(d["calls"], list) or not d["calls"]:
        problems.append("calls must be a non-empty list")
    else:
        for i, cd in enumerate(d["calls"]):
            name = cd.get("name", f"#{i}") if isinstance(cd, dict) else f"#{i}"
            try:
                c = Call.from_dict(cd)
                calls.append(c)
            except (UserError, TypeError) as e:
                problems.append(f"call {name}: {e}")
                continue
            try:
                placements[c.name] = Placement.from_dict(cd.get("placement") or {})
            except UserError as e:
                problems.append(f"call {c.name}: placement: {e}")
            if cd.get("estimate") is not None:
                estimates[c.name] = cd["estimate"]
    if cluster is None:
        raise PlanError(problems, source)
    try:
        build_graph(calls)
    except UserError as e:
        problems.append(str(e))
    plan = Plan(experiment=d["experiment"], allocation_mode=d["allocation_mode"], config=d["config"],
                cluster=cluster, models=models, calls=tuple(calls), placements=placements,
                call_estimates=estimates, estimate=d.get("estimate"), version=v)
    # Validate what parsed too, so one run reports every problem; calls whose placement did not parse
    # were reported above.
    problems += [m for m in validate(plan) if not m.endswith(": no placement")]
    if problems:
        raise PlanError(problems, source)
    return plan


def load_plan(path: str) -> Plan:
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise UserError(f"{path}: cannot read plan ({e.strerror})") from None
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: line {e.lineno}, column {e.colno}: malformed JSON ({e.msg})") from None
    return plan_from_dict(d, source=path)
