"""Front door: ``python3 -m reallm.apps.quickstart {sft,rw,dpo,ppo,gen} key=value ...``.

Parses the experiment (Hydra structured config + overrides), checks the datasets, plans (the
``allocation_mode``), writes ``{output_dir}/{experiment_name}/{trial_name}/plan.json`` and runs it.
``--config FILE.yaml`` starts from a YAML file instead of the schema defaults; ``--plan-only`` stops
after writing the plan.
"""

from __future__ import annotations

import argparse
import os
import sys

from reallm.errors import exit_on_user_error

USAGE = """usage: python3 -m reallm.apps.quickstart {sft,rw,dpo,ppo,gen} [--config FILE.yaml] [--plan-only] key=value ...

examples:
  python3 -m reallm.apps.quickstart sft model.path=CKPT dataset.train_path=train.jsonl allocation_mode=d2p1m1
  python3 -m reallm.apps.quickstart gen model.path=CKPT dataset.path=prompts.jsonl allocation_mode=d1p1m1 n_gpus_per_node=1
"""


def trial_dir(cfg) -> str:
    return os.path.join(cfg.output_dir, cfg.experiment_name, cfg.trial_name)


@exit_on_user_error
def main(argv=None) -> int:
    from reallm.config.schema import EXPERIMENTS

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in EXPERIMENTS:
        print(USAGE, file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown experiment {argv[0]!r}; choose one of {', '.join(EXPERIMENTS)}", file=sys.stderr)
            return 2
        return 0 if argv else 2
    ap = argparse.ArgumentParser(prog=f"quickstart {argv[0]}", add_help=True)
    ap.add_argument("--config", help="experiment YAML to start from")
    ap.add_argument("--plan-only", action="store_true", help="write plan.json and stop")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv[1:])
    return run(argv[0], args.overrides, config=args.config, plan_only=args.plan_only)


def run(exp: str, overrides: list[str], config=None, plan_only: bool = False, quiet: bool = False) -> int:
    from planner.allocation import make_plan
    from planner.cli import format_plan
    from reallm.config.parse import parse_experiment
    from reallm.config.resolve import resolve
    from reallm.datasets import check_experiment_datasets

    cfg = parse_experiment(exp, overrides, yaml_path=config)
    check_experiment_datasets(exp, cfg)
    plan = make_plan(resolve(exp, cfg))
    out = trial_dir(cfg)
    plan_path = os.path.join(out, "plan.json")
    under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if not under_torchrun or os.environ["RANK"] == "0":
        os.makedirs(out, exist_ok=True)
        plan.save(plan_path)
        if not quiet:
            print(format_plan(plan))
            print(f"wrote {plan_path}")
    if plan_only:
        return 0
    from reallm.algorithms.base import progress_display

    if cfg.mode.value == "torchrun":
        if not under_torchrun:
            print(f"mode=torchrun: on each of the {cfg.n_nodes} node(s) run\n"
                  f"  torchrun --nnodes={cfg.n_nodes} --nproc-per-node={cfg.n_gpus_per_node} --rdzv-backend=c10d "
                  f"--rdzv-endpoint=HOST:29500 -m executor.worker {plan_path}\n"
                  f"(or run this same quickstart command under torchrun)")
            return 0
        from executor.worker import main as worker_main

        with progress_display(not quiet):
            return worker_main([plan_path], plan=plan)
    from executor.launch import launch

    with progress_display(not quiet):  # forked workers inherit it
        return launch(plan, plan_path=plan_path)


if __name__ == "__main__":
    sys.exit(main())
