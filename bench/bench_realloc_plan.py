"""Time reallocation planning for a 7B-shaped LLaMA between two placements of 8 devices.

    python bench/bench_realloc_plan.py [--devices-per-node 8] [--repeat 3]

Per pair, from cold caches: ``traffic`` = the bytes-only path the cost model uses; ``plan`` = the full
plan (source choice + strided blocks per message); ``intervals`` = expanding every message to coalesced
flat intervals on both sides, as the executor does once per plan. Bytes are bf16 (2 bytes/element).
"""

from __future__ import annotations

import argparse
import time

from reallm.layout import clear_caches, plan_realloc, realloc_traffic
from reallm.placement import Placement
from reallm.spec import preset_spec

MESH = tuple(range(8))
PAIRS = {
    "tp8 -> pp2*dp4": (Placement(MESH, tp=8), Placement(MESH, dp=4, pp=2)),
    "dp2*tp2*pp2 -> tp8": (Placement(MESH, dp=2, tp=2, pp=2), Placement(MESH, tp=8)),
    "dp8 -> tp8 (other node)": (Placement(MESH, dp=8), Placement(tuple(range(8, 16)), tp=8)),
}


def bench_pair(spec, a, b, devices_per_node: int) -> dict:
    clear_caches()
    t0 = time.perf_counter()
    traffic = realloc_traffic(spec, a, b, devices_per_node)
    t1 = time.perf_counter()
    plan = plan_realloc(spec, a, b, devices_per_node)
    t2 = time.perf_counter()
    num_intervals = sum(len(m.src_intervals()[0]) + len(m.dst_intervals()[0]) for m in plan.messages)
    t3 = time.perf_counter()
    send, recv = traffic.send_bytes(2), traffic.recv_bytes(2)
    return dict(
        traffic_s=t1 - t0,
        plan_s=t2 - t1,
        intervals_s=t3 - t2,
        moved_bytes=traffic.moved_bytes(2),
        max_send_bytes=max(send.values(), default=0),
        max_recv_bytes=max(recv.values(), default=0),
        num_messages=len(plan.messages),
        num_intervals=num_intervals,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices-per-node", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3, help="report the best of this many cold runs")
    args = ap.parse_args()
    spec = preset_spec("llama", 7)
    print(f"llama-7b: {spec.num_params / 1e9:.2f}B parameters, bf16, devices_per_node={args.devices_per_node}")
    worst_s = 0.0
    for name, (a, b) in PAIRS.items():
        runs = [bench_pair(spec, a, b, args.devices_per_node) for _ in range(args.repeat)]
        r = min(runs, key=lambda x: x["traffic_s"] + x["plan_s"] + x["intervals_s"])
        total_s = r["traffic_s"] + r["plan_s"] + r["intervals_s"]
        worst_s = max(worst_s, r["plan_s"] + r["intervals_s"])
        print(
            f"{name:>24}: traffic {r['traffic_s']:.3f} s  plan {r['plan_s']:.3f} s  "
            f"intervals {r['intervals_s']:.3f} s  (all {total_s:.3f} s)  "
            f"moved {r['moved_bytes'] / 2**30:.2f} GiB  max send {r['max_send_bytes'] / 2**30:.2f} GiB  "
            f"max recv {r['max_recv_bytes'] / 2**30:.2f} GiB  {r['num_messages']} messages  "
            f"{r['num_intervals']:,} intervals"
        )
    print(f"worst plan + intervals: {worst_s:.3f} s ({'OK' if worst_s < 1.0 else 'OVER'} the 1 s budget)")


if __name__ == "__main__":
    main()
