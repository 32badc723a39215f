"""The contract between the executor and an experiment.

The executor owns processes, groups, the schedule and data movement; an experiment's ``Runtime``
owns models and math. One ``Runtime`` instance lives in each worker process.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch

from executor.comm import Group
from reallm.dataflow import Call
from reallm.errors import NotAvailableYet
from reallm.placement import Coord, Placement
from reallm.plan import Plan


@dataclass
class CallContext:
    """Where this rank stands in one call: its placement, coordinates and groups."""

    plan: Plan
    call: Call
    placement: Placement
    rank: int
    coord: Coord
    step: int
    device: torch.device
    mesh: Group  # every rank of the placement
    tp: Group
    pp: Group
    dp: Group
    replica: Group  # this dp replica's tp × pp ranks
    tied: Optional[Group] = None  # {stage 0, last stage} of my (dp, tp) when pp > 2 (tied embedding gradients)

    @property
    def is_head(self) -> bool:
        return self.coord.pp == self.placement.pp - 1 and self.coord.tp == 0


class Runtime:
    """What an experiment provides. Methods run in every worker; ``on_results`` only on rank 0."""

    def num_steps(self) -> int:
        raise NotImplementedError

    def first_step(self) -> int:
        """The first step this run executes: 0, or where a resumed run continues (steps before it are done).
        The worker asks before its step loop; asking again gives the same answer."""
        return 0

    def step_sequences(self, step: int) -> tuple[list[int], list[int]]:
        """Global ids of the sequences of ``step`` and their token counts (known to every rank)."""
        raise NotImplementedError

    def seqs_per_group(self, call: str) -> int:
        """k: the executor splits ``call``'s sequences (sorted by id) over dp ranks only between groups of k
        consecutive ids, e.g. 2 to keep each chosen/rejected pair on one rank. Default 1 (any cut)."""
        return 1

    def load(self, ids: Sequence[int], keys: Sequence[str], ctx: CallContext):
        """The dataset keys of these sequences as a ``SeqBatch``."""
        raise NotImplementedError

    def run_call(self, ctx: CallContext, batch) -> tuple[Optional[Any], dict]:
        """Run a call on this rank's part of the batch; returns (outputs on dp heads, stats)."""
        raise NotImplementedError

    def realloc(self, src: Optional[CallContext], dst: Optional[CallContext], group: Group, op) -> None:
        """Build ``dst``'s replica of a model from the placement of ``src`` (weights of record)."""
        raise NotAvailableYet("parameter reallocation between placements is not available yet (issue 8); "
                              "give every call of a model the same placement")

    def collectable(self, call: str, out) -> Any:
        """What of a call's outputs rank 0 needs (picklable); default nothing."""
        return None

    def on_results(self, step: int, call: str, by_head: list) -> None:
        """Rank 0: per dp head, (collectable(outputs), stats) of ``call`` at ``step``."""

    def on_call_memory(self, step: int, call: str, figures: dict) -> None:
        """Rank 0, CUDA runs only: ``call``'s device-memory figures at ``step`` (``mem/peak_gib/{call}``,
        ``mem/start_gib/{call}``; the worst dp head's). Default: added to the step's metrics when the runtime
        keeps them (``ExperimentRuntime.record``)."""
        record = getattr(self, "record", None)
        if record is not None:
            record(step, figures)

    def end_step(self, step: int, rank: int) -> None:
        pass

    def finish(self, rank: int) -> None:
        pass


def runtime_class(plan: Plan):
    """The Runtime class of a plan's experiment; a clear error if it is not available yet."""
    import importlib

    modules = {"gen": "reallm.algorithms.gen", "sft": "reallm.algorithms.sft", "rw": "reallm.algorithms.rw",
               "dpo": "reallm.algorithms.dpo", "ppo": "reallm.algorithms.ppo"}
    name = modules.get(plan.experiment)
    try:
        mod = importlib.import_module(name) if name else None
    except ModuleNotFoundError as e:
        if e.name and (e.name == name or name.startswith(e.name + ".")):
            mod = None
        else:
            raise
    if mod is None:
        raise NotAvailableYet(f"the {plan.experiment!r} experiment cannot run yet: its runtime ({name}) "
                              f"is not available yet; `planner show` prints the plan")
    return mod.RUNTIME


def _make(plan_path: Optional[str], plan: Plan, rank: int, device: torch.device) -> Runtime:
    return runtime_class(plan)(plan, rank, device, plan_path)


def default_runtime_factory(plan_path: Optional[str] = None):
    """A picklable factory (spawned workers import it) building the experiment's Runtime."""
    return functools.partial(_make, plan_path)
