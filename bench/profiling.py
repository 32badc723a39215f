"""Kernel-time summaries from ``torch.profiler`` for the GPU benchmarks (short enough for a log tail)."""

from __future__ import annotations

from collections import defaultdict

import torch


def kernel_table(fn, *, rows: int = 18, width: int = 70, op_rows: int = 0) -> str:
    """Run ``fn`` under the profiler; the kernels with the most device time: total ms, calls, share; with
    ``op_rows``, also the aten ops with the most self device time, by input shapes."""
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts, record_shapes=op_rows > 0) as prof:
        fn()
        torch.cuda.synchronize()
    totals: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            t = totals[e.name[:width]]
            t[0] += e.device_time_total / 1e3 if hasattr(e, "device_time_total") else e.cuda_time_total / 1e3
            t[1] += 1
    all_ms = sum(v[0] for v in totals.values())
    lines = [f"device time {all_ms:.2f} ms in {sum(v[1] for v in totals.values())} kernels"]
    for name, (ms, n) in sorted(totals.items(), key=lambda kv: -kv[1][0])[:rows]:
        lines.append(f"  {ms:8.2f} ms {n:6d}x {100 * ms / max(all_ms, 1e-9):5.1f}%  {name}")
    if op_rows:
        avgs = prof.key_averages(group_by_input_shape=True)
        key = "self_device_time_total" if hasattr(avgs[0], "self_device_time_total") else "self_cuda_time_total"
        lines.append("aten ops by self device time:")
        for a in sorted(avgs, key=lambda a: -getattr(a, key))[:op_rows]:
            lines.append(f"  {getattr(a, key) / 1e3:8.2f} ms {a.count:5d}x  {a.key[:40]} {str(a.input_shapes)[:90]}")
    return "\n".join(lines)
