"""Kernel-time summaries from ``torch.profiler`` for the GPU benchmarks (short enough for a log tail)."""

from __future__ import annotations

from collections import defaultdict

import torch


def kernel_table(fn, *, rows: int = 18, width: int = 70) -> str:
    """Run ``fn`` under the profiler; the kernels with the most device time: total ms, calls, share."""
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
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
    return "\n".join(lines)
