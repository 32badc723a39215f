"""``planner`` command line: ``planner search CONFIG.yaml [key=value ...] --out plan.json``,
``planner show plan.json`` and ``planner profile --model llama-7b --tp 1,2,4,8 --out profile.json``."""

from __future__ import annotations

import argparse
import sys

from reallm.errors import UserError, exit_on_user_error


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


def preset_by_name(name: str):
    """``llama-7b``, ``llama2-13b``, ``llama-1.1b``, ``qwen2-0.5b``: a preset's class, a dash, its size in
    billions and ``b`` (class aliases as in model configs: llama2 → llama)."""
    import re

    from reallm.spec import _CLASS_ALIASES, PRESETS, preset_spec

    known = ", ".join(f"{c}-{s:g}b" for c, s in PRESETS)
    m = re.fullmatch(r"([a-z][a-z0-9]*?)-?(\d+(?:\.\d+)?)b", name.strip().lower())
    if m is None:
        raise UserError(f"--model {name}: expected a preset name such as llama-7b; known: {known} "
                        f"(or give --model-path an HF checkpoint directory or config.json)")
    cls, size = m.group(1), float(m.group(2))
    for c in (cls, _CLASS_ALIASES.get(cls, cls)):
        if (c, size) in PRESETS:
            return preset_spec(c, size, where=f"--model {name}")
    raise UserError(f"--model {name}: no such preset; known: {known} "
                    f"(or give --model-path an HF checkpoint directory or config.json)")


def _int_list(text: str, flag: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        vals = ()
    if not vals or any(v < 1 for v in vals):
        raise UserError(f"{flag} {text}: expected comma-separated positive integers, e.g. 1,2,4,8")
    return vals


def cmd_profile(args) -> int:
    import os
    import shlex

    from reallm.layout.params import tp_problems
    from reallm.spec import load_hf_config, spec_from_hf_config

    specs = [preset_by_name(n) for n in args.model]
    specs += [spec_from_hf_config(load_hf_config(p), source=p) for p in args.model_path]
    if not specs:
        raise UserError("planner profile: name at least one model (--model llama-7b, or --model-path DIR)")
    tps = tuple(sorted(set(_int_list(args.tp, "--tp"))))
    problems = [f"{s.source}: tp={tp}: {'; '.join(tp_problems(s, tp))}" for s in specs for tp in tps
                if tp_problems(s, tp)]
    if problems:
        raise UserError("planner profile: tp degree(s) that cannot cut the model:\n" +
                        "\n".join(f"  - {p}" for p in problems) + "\nchoose --tp values that divide the heads")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise UserError(f"--out {args.out}: folder {out_dir} does not exist")
    try:
        import torch
    except ImportError:
        raise UserError("planner profile measures on a device and needs torch installed") from None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible here; use --device cpu")
    from executor.profiler import Grids, ProfileSettings, default_grids, run_profile

    g = default_grids(device, args.quick)
    grids = Grids(tokens=_int_list(args.tokens, "--tokens") if args.tokens else g.tokens,
                  seqlens=_int_list(args.seqlens, "--seqlens") if args.seqlens else g.seqlens,
                  batches=_int_list(args.batches, "--batches") if args.batches else g.batches,
                  kv_lens=_int_list(args.kv_lens, "--kv-lens") if args.kv_lens else g.kv_lens)
    settings = ProfileSettings.for_device(device, grids=grids, decode_cuda_graph=args.decode == "graph",
                               compile_blocks=args.compile_blocks, show_progress=not args.no_progress)
    command = "planner " + shlex.join(args.argv)
    d = run_profile(specs, tps, settings, args.out, command=command, merge=args.merge)
    if d is not None:
        run = d["runs"][-1]
        print(f"wrote {args.out}: {len(run['models'])} model shape(s) × tp {list(tps)} on {d['device']} in "
              f"{run['wall_s']:.0f} s; {len(run['skipped'])} skip(s) (a grid point and the rest of its row), "
              f"{len(run['filled'])} point(s) filled, {len(run['errors'])} failed configuration(s)")
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
    pr = sub.add_parser("profile", help="measure layer times on this device and write a cost profile JSON",
                        description="Time the executor's layer code (embedding, one block, head, score head: "
                                    "forward, backward, prefill, decode; optimizer step; host copies) for each "
                                    "model's per-rank shard shapes at each tp degree, on this device. Under "
                                    "torchrun (several GPUs) the collectives are measured too.")
    pr.add_argument("--model", action="append", default=[], metavar="NAME",
                    help="preset, e.g. llama-7b, llama-13b, llama-70b, llama-1.1b (repeatable)")
    pr.add_argument("--model-path", action="append", default=[], metavar="PATH",
                    help="HF checkpoint directory or its config.json (repeatable)")
    pr.add_argument("--tp", default="1", help="tensor-parallel degrees, comma-separated (default: 1)")
    pr.add_argument("--out", required=True, help="profile JSON to write, e.g. profiles/h100_measured.json")
    pr.add_argument("--merge", action="store_true", help="add to the measured profile at --out (same device)")
    pr.add_argument("--quick", action="store_true", help="a coarse grid (minutes become seconds)")
    pr.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    pr.add_argument("--decode", choices=("graph", "eager"), default="graph",
                    help="time decode steps as CUDA-graph replays where generation uses them (default: tp=1 "
                         "on CUDA), or always eagerly")
    pr.add_argument("--compile-blocks", action="store_true",
                    help="blocks as torch.compile'd regions (CUDA, tp=1), for executors that build them so")
    for flag in ("--tokens", "--seqlens", "--batches", "--kv-lens"):
        pr.add_argument(flag, default=None, help=f"grid override, comma-separated ({flag[2:]})")
    pr.add_argument("--no-progress", action="store_true", help="no progress bar")
    pr.set_defaults(fn=cmd_profile)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = ap.parse_args(argv)
    args.argv = argv
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
