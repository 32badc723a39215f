"""Launcher: one worker process per device of the plan's cluster."""

from __future__ import annotations

from reallm.errors import NotAvailableYet


def launch(plan, plan_path: str) -> int:
    """Run ``plan`` to completion; returns the exit code."""
    raise NotAvailableYet(
        f"{plan_path} is valid ({plan.experiment}, {len(plan.calls)} call(s) on "
        f"{plan.cluster.num_devices} device(s)), but the executor that runs plans is not available yet "
        f"(the executor issue); `planner show {plan_path}` prints the plan")
