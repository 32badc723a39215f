"""Cluster spec: nodes × devices per node, device memory, link bandwidths.

A cluster is loaded from ``configs/cluster/<name>.yaml`` (or any YAML path) and the experiment's
``n_nodes`` / ``n_gpus_per_node`` override its size. A CPU "cluster" is N worker processes on this
machine. Global device ids are ``node * n_devices_per_node + local index``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from reallm.errors import UserError

CONFIG_ROOT = Path(__file__).resolve().parent.parent / "configs"
CLUSTER_DIR = CONFIG_ROOT / "cluster"


@dataclass(frozen=True)
class Cluster:
    name: str
    device_kind: str  # "gpu" | "cpu"
    gpu_name: str
    n_nodes: int
    n_devices_per_node: int
    device_memory_bytes: int
    peak_bf16_flops: float
    mem_bandwidth_bytes_per_s: float
    intra_node_bandwidth_bytes_per_s: float
    inter_node_bandwidth_bytes_per_s: float
    host_device_bandwidth_bytes_per_s: float
    intra_node_latency_s: float
    inter_node_latency_s: float

    def __post_init__(self):
        problems = []
        if self.device_kind not in ("gpu", "cpu"):
            problems.append(f"device_kind must be gpu or cpu, got {self.device_kind!r}")
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v <= 0:
                problems.append(f"{f.name} must be positive, got {v}")
        if problems:
            raise UserError(f"cluster {self.name}: " + "; ".join(problems))

    @property
    def num_devices(self) -> int:
        return self.n_nodes * self.n_devices_per_node

    def node_of(self, device: int) -> int:
        return device // self.n_devices_per_node

    def same_node(self, devices) -> bool:
        return len({self.node_of(d) for d in devices}) <= 1

    def link_bandwidth_bytes_per_s(self, devices) -> float:
        """Bandwidth of the slowest link a collective over ``devices`` crosses."""
        return self.intra_node_bandwidth_bytes_per_s if self.same_node(devices) else self.inter_node_bandwidth_bytes_per_s

    def link_latency_s(self, devices) -> float:
        return self.intra_node_latency_s if self.same_node(devices) else self.inter_node_latency_s

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "cluster") -> Cluster:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown, missing = sorted(set(d) - names), sorted(names - set(d))
        if unknown or missing:
            raise UserError(f"{where}: " + "; ".join(
                ([f"unknown field(s) {unknown}"] if unknown else []) + ([f"missing field(s) {missing}"] if missing else [])))
        d = dict(d)
        casts = {"float": float, "int": int, "str": str}
        for f in dataclasses.fields(cls):
            # YAML 1.1 reads "989.0e12" (no sign in the exponent) as a string: cast, naming the field
            try:
                d[f.name] = casts[f.type](d[f.name])
            except (TypeError, ValueError):
                raise UserError(f"{where}: {f.name} must be a {f.type}, got {d[f.name]!r}") from None
        return cls(**d)


def has_nvidia_gpu() -> bool:
    """Detect a GPU without importing torch (the planner must not)."""
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/nvidia0")


def load_cluster(name: str = "auto", n_nodes: Optional[int] = None, n_devices_per_node: Optional[int] = None) -> Cluster:
    import yaml

    if name == "auto":
        name = "h100" if has_nvidia_gpu() else "cpu"
    path = Path(name) if name.endswith((".yaml", ".yml")) else CLUSTER_DIR / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in CLUSTER_DIR.glob("*.yaml"))
        raise UserError(f"cluster={name}: no such cluster spec ({path}); known: {', '.join(known)} or a YAML path")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path}: malformed YAML ({e})") from None
    if n_nodes is not None:
        data["n_nodes"] = n_nodes
    if n_devices_per_node is not None:
        data["n_devices_per_node"] = n_devices_per_node
    return Cluster.from_dict(data, where=str(path))
