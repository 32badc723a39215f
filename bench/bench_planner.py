"""Planner benchmark: search time and estimated gain over the heuristic and the best symmetric plan.

    .venv/bin/python bench/bench_planner.py [--only 7b,70b] [--seed 0] [--markdown]

PPO with four models of one size (actor, critic, ref, reward; presets from type.size) on H100 nodes,
ReaL's largest setting's batch: 512 prompts of 128 tokens, 128 new tokens (2^17 tokens per step), 4 PPO
minibatches. Step times are the cost model's estimates with the analytic H100 profile (not
measurements); the search's own wall time is measured on this machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

INSTANCES = [  # name, model size (B), nodes of 8 GPUs
    ("4x7B", 7, 1),
    ("4x13B", 13, 2),
    ("4x34B", 34, 4),
    ("4x70B", 70, 8),
    ("4x70B", 70, 16),
]


def experiment(size: float, nodes: int, seqs: int = 512, prompt: int = 128, gen: int = 128):
    from reallm.config.parse import parse_experiment
    from reallm.config.resolve import resolve

    ov = [f"n_nodes={nodes}", "n_gpus_per_node=8", "cluster=h100", "allocation_mode=search",
          f"dataset.train_bs_n_seqs={seqs}", f"dataset.max_prompt_len={prompt}", f"ppo.max_new_tokens={gen}",
          f"ppo.min_new_tokens={gen}"]
    ov += [f"{r}.type.size={size:g}" for r in ("actor", "critic", "ref", "rew")]
    return resolve("ppo", parse_experiment("ppo", ov, yaml_path="configs/ppo.yaml"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated GPU counts to run, e.g. 8,128")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = ap.parse_args(argv)
    from planner.search import search_detailed

    only = {int(x) for x in args.only.split(",") if x}
    rows = []
    for name, size, nodes in INSTANCES:
        gpus = 8 * nodes
        if only and gpus not in only:
            continue
        exp = experiment(size, nodes)
        t0 = time.perf_counter()
        r = search_detailed(exp, seed=args.seed, time_budget_s=60)
        wall = time.perf_counter() - t0
        best = r.plan.estimate["step_time_s"]
        heur = r.heuristic.step_time_s if r.heuristic and r.heuristic.feasible else float("inf")
        sym = r.symmetric.step_time_s if r.symmetric and r.symmetric.feasible else float("inf")
        cands = sum(r.stats["candidates"].values())
        def gain(ref: float, best: float = best) -> float:
            return ref / best if ref != float("inf") else 0.0

        rows.append((f"{name}/{gpus}", cands, wall, r.stats["anneal_s"], heur, sym, r.symmetric.name if r.symmetric else "-",
                     best, gain(heur), gain(sym)))
        print(f"  done {name}/{gpus} in {wall:.1f} s", file=sys.stderr)
    head = ("instance", "candidates", "search s", "anneal s", "heuristic s", "best symmetric s", "symmetric",
            "searched s", "gain vs heur.", "gain vs sym.")

    def fmt(v):
        if isinstance(v, float):
            return "OOM" if v == float("inf") else f"{v:.2f}"
        return str(v)

    table = [[fmt(v) for v in row[:8]] + [("-" if v == 0 or v != v else f"{v:.2f}x") for v in row[8:]]
             for row in rows]
    if args.markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "|".join("---" for _ in head) + "|")
        for row in table:
            print("| " + " | ".join(row) + " |")
    else:
        widths = [max(len(h), *(len(r[i]) for r in table)) for i, h in enumerate(head)]
        print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
        for row in table:
            print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
