"""Layout algebra: who holds which parameter elements under a placement, and how to move them.

Pure Python + numpy (no torch), so the planner can cost reallocations and tests can check every layout
in one process. Read in this order:

- ``params``:  the parameter table (HF names, shapes, tp rules, owning layer) and tp slices;
- ``stages``:  the pipeline partition of blocks into stages;
- ``shards``:  what a device holds and its canonical flat buffer (the convention everything shares);
- ``realloc``: the plan A → B as coalesced per-(src, dst) messages of flat intervals, and its traffic.
"""

from reallm.layout.params import (
    Box,
    ParamInfo,
    TpSlice,
    TpSplit,
    check_tp,
    padded_vocab_size,
    param_table,
    tp_problems,
    tp_slice,
)
from reallm.layout.realloc import (
    Message,
    ReallocPlan,
    ReallocTraffic,
    apply_plan,
    clear_caches,
    coalesce_intervals,
    interval_indices,
    plan_realloc,
    realloc_traffic,
    runs_to_intervals,
)
from reallm.layout.shards import DeviceShards, Shard, assemble_full, cut_flat, held_params, shards_of
from reallm.layout.stages import StageBalance, StagePartition, layer_costs, partition_stages

__all__ = [
    "Box",
    "ParamInfo",
    "TpSlice",
    "TpSplit",
    "check_tp",
    "padded_vocab_size",
    "param_table",
    "tp_problems",
    "tp_slice",
    "Message",
    "ReallocPlan",
    "ReallocTraffic",
    "apply_plan",
    "clear_caches",
    "coalesce_intervals",
    "interval_indices",
    "plan_realloc",
    "realloc_traffic",
    "runs_to_intervals",
    "DeviceShards",
    "Shard",
    "assemble_full",
    "cut_flat",
    "held_params",
    "shards_of",
    "StageBalance",
    "StagePartition",
    "layer_costs",
    "partition_stages",
]
