"""CUDA interval gather/scatter vs the torch path (issues 8, 12): equality on random interval sets for bf16,
fp32 and fp64, and timings on a 7B-sized reallocation message (tp8 -> pp2·dp4, the largest send) against a
plain device copy of the same bytes (the target: >= 80 % of it).

    python bench/bench_intervals_gpu.py        (on a CUDA machine)
"""

import time

import numpy as np
import torch

from reallm.kernels.intervals import gather_intervals, intervals_cuda_available, prepare_intervals, scatter_intervals


def random_intervals(rng, n_flat, k):
    cuts = np.sort(rng.choice(n_flat, size=2 * k, replace=False))
    starts, ends = cuts[0::2], cuts[1::2]
    order = rng.permutation(k)  # any order: a message need not follow the buffer
    return starts[order].astype(np.int64), (ends - starts)[order].astype(np.int64)


def timed(fn, reps=20):
    """Median seconds of one call, CUDA events around each."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return sorted(times)[len(times) // 2]


def check_equal(rng) -> int:
    checks = 0
    for dtype in (torch.bfloat16, torch.float32, torch.float64):
        for k in (1, 7, 1000, 20000):
            for multiple in (1, 8):
                for offset in (0, 1):  # 1: a buffer off the 16-byte grid (element words)
                    flat = torch.randn(200_000 + offset, device="cuda").to(dtype)[offset:]
                    st, ln = random_intervals(rng, flat.numel() // multiple, min(k, flat.numel() // multiple // 4))
                    st, ln = st * multiple, ln * multiple
                    if len(ln) > 7:
                        ln[[0, len(ln) // 2, len(ln) - 1]] = 0
                    a = gather_intervals(flat, st, ln, use_kernel=True)
                    b = gather_intervals(flat, st, ln, use_kernel=False)
                    assert torch.equal(a, b), (dtype, k, multiple, offset)
                    prep = prepare_intervals(st, ln, flat.element_size(), flat.device)
                    assert torch.equal(gather_intervals(flat, st, ln, prepared=prep), b)
                    out_a, out_b = torch.zeros_like(flat), torch.zeros_like(flat)
                    scatter_intervals(out_a, st, ln, a, use_kernel=True, prepared=prep)
                    scatter_intervals(out_b, st, ln, b, use_kernel=False)
                    assert torch.equal(out_a, out_b), (dtype, k, multiple, offset)
                    checks += 3
    return checks


def main():
    assert torch.cuda.is_available(), "needs CUDA"
    t0 = time.perf_counter()
    ok = intervals_cuda_available(verbose=False)
    print(f"kernel built: {ok} ({time.perf_counter() - t0:.0f} s)")
    rng = np.random.default_rng(0)
    print(f"kernel == torch path on {check_equal(rng)} checks (bf16/fp32/fp64, 1-20000 intervals, "
          "vector and element words, empty intervals)")
    from reallm.layout import plan_realloc
    from reallm.placement import Placement
    from reallm.spec import preset_spec

    spec = preset_spec("llama", 7)
    plan = plan_realloc(spec, Placement(tuple(range(8)), tp=8), Placement(tuple(range(8)), dp=4, pp=2))
    m = max((m for m in plan.messages if not m.is_local), key=lambda m: m.num_elements)
    st, ln = m.src_intervals()
    dst_st, dst_ln = m.dst_intervals()
    flat = torch.randn(int(st.max() + ln.max()) + 1, device="cuda", dtype=torch.bfloat16)
    out = torch.zeros(int(dst_st.max() + dst_ln.max()) + 1, device="cuda", dtype=torch.bfloat16)
    nbytes = m.num_elements * 2
    src_copy = torch.empty(m.num_elements, device="cuda", dtype=torch.bfloat16)
    dst_copy = torch.empty_like(src_copy)
    copy_s = timed(lambda: dst_copy.copy_(src_copy))
    prep_s = prepare_intervals(st, ln, 2, flat.device)
    prep_d = prepare_intervals(dst_st, dst_ln, 2, flat.device)
    msg = gather_intervals(flat, st, ln, prepared=prep_s)
    rows = [("device copy (same bytes)", copy_s, 0.0)]
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    rows.append(("kernel gather, prepared", timed(lambda: gather_intervals(flat, st, ln, prepared=prep_s)),
                 (torch.cuda.max_memory_allocated() - base) / 2**30))
    rows.append(("kernel scatter, prepared", timed(lambda: scatter_intervals(out, dst_st, dst_ln, msg,
                                                                              prepared=prep_d)), 0.0))
    rows.append(("kernel gather, arrays", timed(lambda: gather_intervals(flat, st, ln), reps=5), 0.0))
    print(f"7B tp8 -> pp2*dp4, message {m.src}->{m.dst}: {nbytes / 2**30:.2f} GiB bf16, {len(st):,} source "
          f"intervals ({prep_s.word_bytes}-byte words), {len(dst_st):,} destination intervals")
    print(f"{'path':28s} {'ms':>8s} {'GB/s':>8s} {'of copy':>8s} {'peak extra GiB':>15s}")
    for name, s, extra in rows:
        print(f"{name:28s} {s * 1e3:8.3f} {nbytes / s / 1e9:8.1f} {copy_s / s:8.1%} {extra:15.2f}")


if __name__ == "__main__":
    main()
