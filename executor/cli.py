"""``executor run plan.json``: start one process per device and run the plan's dataflow graph."""

from __future__ import annotations

import argparse
import sys

from reallm.errors import exit_on_user_error


def cmd_run(args) -> int:
    from executor.launch import launch
    from reallm.plan import load_plan

    plan = load_plan(args.plan)
    return launch(plan, plan_path=args.plan)


@exit_on_user_error
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="executor", description="reallm executor: run a plan.json")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run a plan (one process per device)")
    r.add_argument("plan", help="plan.json written by `planner search` or the quickstart")
    r.set_defaults(fn=cmd_run)
    args = ap.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
