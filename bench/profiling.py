"""Kernel-time summaries from ``torch.profiler`` for the GPU benchmarks (short enough for a log tail)."""

from __future__ import annotations

from collections import defaultdict

import torch

_CATEGORIES = (("gemm", ("nvjet", "gemm", "cutlass", "xmma", "sm90_", "cublas")),
               ("attention", ("cudnn", "flash", "fmha", "attn", "sdpa")),
               ("adam", ("adam",)),
               ("triton", ("triton_",)),
               ("copy", ("copy", "cat", "memcpy", "memset", "fill")),
               ("reduce", ("reduce", "norm", "sum", "max")))


def kernel_category(name: str) -> str:
    low = name.lower()
    for cat, keys in _CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def kernel_table(fn, *, rows: int = 18, width: int = 70, op_rows: int = 0) -> str:
    """Run ``fn`` under the profiler; the kernels with the most device time: total ms, calls, share; with
    ``op_rows``, also the aten ops with the most self device time, by input shapes."""
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts, record_shapes=op_rows > 0) as prof:
        fn()
        torch.cuda.synchronize()
    totals: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith("## "):  # "## ": ranges
            t = totals[e.name[:width]]
            t[0] += e.device_time_total / 1e3 if hasattr(e, "device_time_total") else e.cuda_time_total / 1e3
            t[1] += 1
    all_ms = sum(v[0] for v in totals.values())
    lines = [f"device time {all_ms:.2f} ms in {sum(v[1] for v in totals.values())} kernels"]
    cats: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for name, (ms, n) in totals.items():
        c = cats[kernel_category(name)]
        c[0] += ms
        c[1] += n
    lines.append("  by kind: " + ", ".join(f"{k} {ms:.1f} ms/{n}" for k, (ms, n) in
                                           sorted(cats.items(), key=lambda kv: -kv[1][0])))
    for name, (ms, n) in sorted(totals.items(), key=lambda kv: -kv[1][0])[:rows]:
        lines.append(f"  {ms:8.2f} ms {n:6d}x {100 * ms / max(all_ms, 1e-9):5.1f}%  {name}")
    if op_rows:
        avgs = prof.key_averages(group_by_input_shape=True)
        key = "self_device_time_total" if hasattr(avgs[0], "self_device_time_total") else "self_cuda_time_total"
        lines.append("aten ops by self device time:")
        for a in sorted(avgs, key=lambda a: -getattr(a, key))[:op_rows]:
            lines.append(f"  {getattr(a, key) / 1e3:8.2f} ms {a.count:5d}x  {a.key[:40]} {str(a.input_shapes)[:90]}")
    return "\n".join(lines)


def peak_attribution(snapshot: dict, baseline_bytes: int = 0, top: int = 15,
                     project_dirs: tuple = ("/reallm/", "/executor/", "/planner/")) -> str:
    """Who holds the memory at the peak of a recorded CUDA allocation trace.

    ``snapshot``: ``torch.cuda.memory._snapshot()`` after ``torch.cuda.memory._record_memory_history(
    stacks="python")`` covered the region of interest. The trace's alloc/free events are replayed from
    ``baseline_bytes`` (what was allocated when recording began); at the highest point, the live blocks
    allocated during the recording are grouped by their innermost frame in this project's code.
    """
    events = [e for tr in snapshot.get("device_traces", []) for e in tr]
    live, cur, peak, peak_at = {}, baseline_bytes, baseline_bytes, -1
    for i, e in enumerate(events):
        if e["action"] == "alloc":
            live[e["addr"]] = e
            cur += e["size"]
            if cur > peak:
                peak, peak_at = cur, i
        elif e["action"] in ("free_completed",) and e["addr"] in live:
            cur -= live.pop(e["addr"])["size"]
    live = {}
    for e in events[:peak_at + 1]:
        if e["action"] == "alloc":
            live[e["addr"]] = e
        elif e["action"] == "free_completed":
            live.pop(e["addr"], None)

    def where(e) -> str:
        for f in e.get("frames", []):
            if any(d in f["filename"] for d in project_dirs):
                return f"{f['filename'].rsplit('/', 2)[-2]}/{f['filename'].rsplit('/', 1)[-1]}:{f['line']} {f['name']}"
        return "(outside the project)"

    groups: dict = {}
    for e in live.values():
        g = groups.setdefault(where(e), [0, 0])
        g[0] += 1
        g[1] += e["size"]
    gib = 2**30
    lines = [f"peak {peak / gib:.3f} GiB (baseline {baseline_bytes / gib:.3f} GiB + "
             f"{(peak - baseline_bytes) / gib:.3f} GiB allocated during the recording, {len(events)} events)"]
    for name, (n, b) in sorted(groups.items(), key=lambda kv: -kv[1][1])[:top]:
        lines.append(f"  {b / gib:8.3f} GiB  {n:5d} blocks  {name}")
    return "\n".join(lines)
