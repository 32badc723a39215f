"""From a parsed experiment config to frozen values: cluster, model specs per role, dataflow calls."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from reallm.cluster import Cluster, load_cluster
from reallm.config.parse import config_to_dict
from reallm.config.schema import ROLES
from reallm.dataflow import Call, calls_for
from reallm.errors import UserError
from reallm.spec import ModelSpec, resolve_spec


@dataclass(frozen=True)
class Experiment:
    """A resolved experiment: everything the planner needs, nothing mutable."""

    kind: str
    config: Any  # the schema dataclass instance (kept for the executor's hyper-parameters)
    config_dict: dict
    cluster: Cluster
    models: dict[str, ModelSpec]
    calls: tuple[Call, ...]


def model_config_of(exp: str, cfg: Any, role: str):
    return getattr(cfg, ROLES[exp][role])


def resolve(exp: str, cfg: Any) -> Experiment:
    problems = []
    if cfg.n_nodes < 1 or cfg.n_gpus_per_node < 1:
        raise UserError(f"n_nodes={cfg.n_nodes} and n_gpus_per_node={cfg.n_gpus_per_node} must be ≥ 1")
    cluster = load_cluster(cfg.cluster, cfg.n_nodes, cfg.n_gpus_per_node)
    calls = tuple(calls_for(exp, cfg))
    used_roles = {c.role for c in calls}
    models: dict[str, ModelSpec] = {}
    for role, field_name in ROLES[exp].items():
        if role not in used_roles:
            continue
        m = getattr(cfg, field_name)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                models[role] = resolve_spec(m.type._class, m.type.size, m.path, m.type.is_critic, where=field_name)
            for w in caught:
                print(f"warning: {w.message}")
        except UserError as e:
            problems.append(str(e))
    if problems:
        raise UserError("\n".join(problems))
    return Experiment(exp, cfg, config_to_dict(cfg), cluster, models, calls)
