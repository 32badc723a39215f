"""``planner`` command line: ``planner search CONFIG.yaml [key=value ...] --out plan.json`` and
``planner show plan.json``."""

from __future__ import annotations

import argparse
import sys

from reallm.errors import exit_on_user_error


def _ranges(devices) -> str:
    """[0,1,2,3,6] → '0-3,6'."""
    out, run = [], []
    for d in list(devices) + [None]:
        if run and (d is None or d != run[-1] + 1):
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 2 else ",".join(map(str, run)))
            run = []
        if d is not None:
            run.append(d)
    return ",".join(out)


def _fmt_s(x) -> str:
    if x is None:
        return "-"
    return f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.2f} s"


def _fmt_bytes(x) -> str:
    if x is None:
        return "-"
    return f"{x / 2**30:.1f} GiB"


def _fmt_count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)


def format_plan(plan) -> str:
    rows = [("call", "model", "kind", "devices", "dp", "tp", "pp", "sp", "mbs", "est. time", "est. mem")]
    for c in plan.calls:
        p = plan.placements[c.name]
        est = plan.call_estimates.get(c.name) or {}
        rows.append((c.name, c.role, c.kind, _ranges(p.devices), str(p.dp), str(p.tp), str(p.pp),
                     "y" if p.sequence_parallel else "-", str(p.num_micro_batches), _fmt_s(est.get("time_s")),
                     _fmt_bytes(est.get("peak_memory_bytes"))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    cl = plan.cluster
    head = (f"{plan.experiment} plan ({plan.allocation_mode}) on {cl.n_nodes}×{cl.n_devices_per_node} "
            f"{cl.gpu_name if cl.device_kind == 'gpu' else 'CPU processes'}")
    tail = []
    if plan.estimate and plan.estimate.get("step_time_s") is not None:
        tail.append(f"estimated step time: {_fmt_s(plan.estimate['step_time_s'])}")
    for role, s in plan.models.items():
        tail.append(f"model {role}: {_fmt_count(s.num_params)} parameters ({s.source})")
    return "\n".join([head, *lines, *tail])


def cmd_search(args) -> int:
    from planner.allocation import make_plan
    from reallm.config.parse import experiment_of_yaml, parse_experiment
    from reallm.config.resolve import resolve

    kind, data = experiment_of_yaml(args.config)
    cfg = parse_experiment(kind, args.overrides, yaml_path=args.config, yaml_data=data)
    exp = resolve(kind, cfg)
    if exp.config.allocation_mode == "search":
        from planner.search import format_comparison, search_detailed

        plan = search_detailed(exp, profile=args.profile, seed=args.seed, time_budget_s=args.time_budget,
                               gantt_path=args.gantt).plan
    else:
        plan = make_plan(exp)
        if args.estimate or args.gantt:
            from planner.search import estimate_plan

            plan = estimate_plan(exp, plan, profile=args.profile, gantt_path=args.gantt)
    plan.save(args.out)
    print(format_plan(plan))
    if plan.allocation_mode == "search":
        print(format_comparison(plan))
    print(f"wrote {args.out}" + (f" and {args.gantt}" if args.gantt else ""))
    return 0


def cmd_show(args) -> int:
    from reallm.plan import load_plan

    print(format_plan(load_plan(args.plan)))
    return 0


@exit_on_user_error
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="planner", description="reallm planner: choose every call's placement")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("search", help="plan an experiment config (honours allocation_mode) and write plan.json")
    s.add_argument("config", help="experiment YAML, e.g. configs/ppo.yaml")
    s.add_argument("overrides", nargs="*", help="key=value overrides, e.g. allocation_mode=d4p1m2")
    s.add_argument("--out", default="plan.json", help="where to write the plan (default: plan.json)")
    s.add_argument("--profile", default=None, help="cost profile JSON (default: profiles/<cluster>_*.json)")
    s.add_argument("--seed", type=int, default=0, help="annealing seed (allocation_mode=search)")
    s.add_argument("--time-budget", type=float, default=60.0, help="search time cap in seconds")
    s.add_argument("--gantt", default=None, help="also draw the simulated schedule to this PNG")
    s.add_argument("--estimate", action="store_true", help="add cost-model estimates to a non-searched plan")
    s.set_defaults(fn=cmd_search)
    sh = sub.add_parser("show", help="print a plan as a table")
    sh.add_argument("plan")
    sh.set_defaults(fn=cmd_show)
    args = ap.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
