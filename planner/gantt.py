"""Gantt chart of a simulated plan: devices × time, one colour per model role (matplotlib, lazy import).

Calls are solid bars in their model's colour, reallocations hatched in the model's colour, data transfers
grey; steps after the first are drawn lighter so the steady state stands out. ``gantt_png(evaluation,
exp, path)`` takes an ``planner.search.Evaluation`` whose result recorded its tasks.
"""

from __future__ import annotations

from typing import Optional

ROLE_COLOURS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C")


def gantt_png(evaluation, exp, path: str, title: Optional[str] = None, max_steps: int = 3) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    t, r = evaluation.tables, evaluation.result
    if not r.tasks:
        from planner.simulate import simulate

        r = simulate(t, [0] * t.num_calls if len(t.placements[0]) == 1 else
                     [t.placements[i].index(evaluation.placements[n]) for i, n in enumerate(t.call_names)], record=True)
    roles = []
    by_name = {c.name: c for c in exp.calls}
    for n in t.call_names:
        if by_name[n].role not in roles:
            roles.append(by_name[n].role)
    colour = {role: ROLE_COLOURS[i % len(ROLE_COLOURS)] for i, role in enumerate(roles)}
    D = t.num_devices
    fig, ax = plt.subplots(figsize=(12, max(3.0, min(0.12 * D + 1.5, 18.0))))
    for task in r.tasks:
        if task.step >= max_steps:
            continue
        call = by_name[t.call_names[task.call]]
        alpha = 1.0 if task.step == 1 else 0.45
        if task.kind == "call":
            kw = dict(color=colour[call.role], alpha=alpha)
        elif task.kind == "realloc":
            kw = dict(facecolor="white", edgecolor=colour[call.role], hatch="///", alpha=alpha)
        else:
            kw = dict(color="#AAAAAA", alpha=alpha)
        for d in task.devices:
            ax.broken_barh([(task.start_s, task.end_s - task.start_s)], (d - 0.4, 0.8), **kw)
        if task.kind == "call" and task.step == 1:
            d0 = min(task.devices)
            ax.text(task.start_s, d0, f" {call.name}", va="center", ha="left", fontsize=7, clip_on=True)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("device")
    ax.set_ylim(D - 0.5, -0.5)
    for node in range(1, exp.cluster.n_nodes):
        ax.axhline(node * exp.cluster.n_devices_per_node - 0.5, color="black", lw=0.5, alpha=0.3)
    handles = [Patch(color=colour[role], label=role) for role in roles]
    handles += [Patch(facecolor="white", edgecolor="black", hatch="///", label="reallocation"),
                Patch(color="#AAAAAA", label="data transfer")]
    ax.legend(handles=handles, loc="upper right", fontsize=8)
    ax.set_title(title or f"step time {evaluation.step_time_s:.2f} s (step 1 solid)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
