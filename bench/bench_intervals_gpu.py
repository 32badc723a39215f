"""CUDA interval gather/scatter vs the torch path (issue 8): equality on random interval sets for bf16,
fp32 and fp64, and timings on a 7B-sized reallocation message (tp8 -> pp2·dp4, rank 0's largest send).

    python bench/bench_intervals_gpu.py        (on a CUDA machine)
"""

import time

import numpy as np
import torch

from reallm.kernels.intervals import gather_intervals, intervals_cuda_available, scatter_intervals


def random_intervals(rng, n_flat, k):
    cuts = np.sort(rng.choice(n_flat, size=2 * k, replace=False))
    starts, ends = cuts[0::2], cuts[1::2]
    order = rng.permutation(k)  # any order: a message need not follow the buffer
    return starts[order].astype(np.int64), (ends - starts)[order].astype(np.int64)


def timed(fn, reps=10):
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def main():
    assert torch.cuda.is_available(), "needs CUDA"
    t0 = time.perf_counter()
    ok = intervals_cuda_available(verbose=False)
    print(f"kernel built: {ok} ({time.perf_counter() - t0:.0f} s)")
    rng = np.random.default_rng(0)
    checks = 0
    for dtype in (torch.bfloat16, torch.float32, torch.float64):
        for k in (1, 7, 1000, 20000):
            flat = torch.randn(200_000, device="cuda").to(dtype)
            st, ln = random_intervals(rng, flat.numel(), k)
            a = gather_intervals(flat, st, ln, use_kernel=True)
            b = gather_intervals(flat, st, ln, use_kernel=False)
            assert torch.equal(a, b), (dtype, k)
            out_a, out_b = torch.zeros_like(flat), torch.zeros_like(flat)
            scatter_intervals(out_a, st, ln, a, use_kernel=True)
            scatter_intervals(out_b, st, ln, b, use_kernel=False)
            assert torch.equal(out_a, out_b), (dtype, k)
            checks += 2
    print(f"kernel == torch path on {checks} checks")
    from reallm.layout import plan_realloc
    from reallm.placement import Placement
    from reallm.spec import preset_spec

    spec = preset_spec("llama", 7)
    plan = plan_realloc(spec, Placement(tuple(range(8)), tp=8), Placement(tuple(range(8)), dp=4, pp=2))
    m = max((m for m in plan.messages if not m.is_local), key=lambda m: m.num_elements)
    st, ln = m.src_intervals()
    flat = torch.randn(int(st.max() + ln.max()) + 1, device="cuda", dtype=torch.bfloat16)
    rows = []
    for name, uk in (("kernel", True), ("torch", False)):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        s = timed(lambda uk=uk: gather_intervals(flat, st, ln, use_kernel=uk))
        extra = torch.cuda.max_memory_allocated() - base
        rows.append((name, s, m.num_elements * 2 / s / 1e9, extra / 2**30))
    print(f"7B tp8 -> pp2*dp4, message {m.src}->{m.dst}: {m.num_elements * 2 / 2**30:.2f} GiB bf16, {len(st):,} intervals")
    print(f"{'path':8s} {'gather s':>10s} {'GB/s':>8s} {'peak extra GiB':>15s}")
    for name, s, gbs, extra in rows:
        print(f"{name:8s} {s:10.4f} {gbs:8.1f} {extra:15.2f}")


if __name__ == "__main__":
    main()
