"""Check the CUDA GAE kernel against the torch path and time both (needs a CUDA GPU, nvcc and ninja).

    python bench/bench_gae_gpu.py [--out result.json]

For each case (batch of packed sequences of random lengths, random rewards/values/bootstrap, several
(γ, λ)) it checks kernel == ``gae_torch`` (fp32: |Δ| ≤ 1e-6 · (1 + |x|), both round the same fp64 value;
fp64: 1e-10), the torch path on CUDA == the torch path on CPU, and a plain-Python loop on a few sequences;
then times the kernel, the torch path on GPU and the torch path on CPU (CUDA events, median of repeats),
and checks ``ppo_targets`` on CUDA against CPU. Exit status 1 on a mismatch.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time

import torch

from reallm.algorithms.functional import ValueNormalizer, gae_torch, ppo_targets
from reallm.kernels.gae import build_error, gae_cuda, gae_cuda_available


def make_case(num_seqs: int, max_len: int, seed: int, dtype: torch.dtype, device: str):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(2, max_len + 1, (num_seqs,), generator=g)
    cu = torch.zeros(num_seqs + 1, dtype=torch.int32)
    cu[1:] = lens.cumsum(0)
    T = int(cu[-1])
    N = T - num_seqs
    rewards = torch.randn(N, generator=g, dtype=torch.float64).to(dtype)
    values = torch.randn(T, generator=g, dtype=torch.float64).to(dtype)
    boot = torch.rand(num_seqs, generator=g) < 0.5
    return [t.to(device) for t in (rewards, values, cu, boot)]


def python_gae(rewards, values, cu, boot, gamma, lam, seqs):
    """Per-sequence reverse loop over Python floats (independent of both implementations)."""
    out = {}
    cu = cu.tolist()
    r, v, b = rewards.double().tolist(), values.double().tolist(), boot.tolist()
    for i in seqs:
        L = cu[i + 1] - cu[i]
        r0, v0 = cu[i] - i, cu[i]
        a, advs = 0.0, [0.0] * (L - 1)
        for k in reversed(range(L - 1)):
            nxt = v[v0 + k + 1] * (1.0 if (k < L - 2 or b[i]) else 0.0)
            a = r[r0 + k] + gamma * nxt - v[v0 + k] + gamma * lam * a
            advs[k] = a
        out[i] = advs
    return out


def time_cuda(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    return statistics.median(times)


def time_cpu(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 2
    t0 = time.perf_counter()
    ok = gae_cuda_available(verbose=False)
    print(f"kernel build/load: {time.perf_counter() - t0:.1f} s, available={ok}")
    if not ok:
        print(f"kernel unavailable: {build_error()}")
        return 1
    results, failures = [], []
    cases = [(1, 2), (3, 40), (64, 700), (256, 1536), (1024, 1536), (4096, 600)]
    for num_seqs, max_len in cases:
        for dtype in (torch.float32, torch.float64):
            for gamma, lam in ((1.0, 1.0), (0.99, 0.95), (0.9, 0.0), (1.0, 0.5)):
                r, v, cu, b = make_case(num_seqs, max_len, seed=num_seqs * 7 + max_len, dtype=dtype, device="cuda")
                adv_k, ret_k = gae_cuda(r, v, cu, b, gamma, lam)
                adv_t, ret_t = gae_torch(r, v, cu, b, gamma, lam)
                adv_c, _ = gae_torch(r.cpu(), v.cpu(), cu.cpu(), b.cpu(), gamma, lam)
                tol = 1e-6 if dtype == torch.float32 else 1e-10
                err_adv = float(((adv_k - adv_t).abs() / (1 + adv_t.abs())).max())
                err_ret = float(((ret_k - ret_t).abs() / (1 + ret_t.abs())).max())
                err_cpu = float(((adv_t.cpu() - adv_c).abs() / (1 + adv_c.abs())).max())
                ref = python_gae(r.cpu(), v.cpu(), cu.cpu(), b.cpu(), gamma, lam, range(min(num_seqs, 3)))
                short = (cu.cpu() - torch.arange(num_seqs + 1, dtype=torch.int32)).tolist()
                err_py = max(
                    (
                        abs(a - x) / (1 + abs(x))
                        for i, advs in ref.items()
                        for a, x in zip(adv_k[short[i] : short[i + 1]].double().tolist(), advs, strict=True)
                    ),
                    default=0.0,
                )
                bad = max(err_adv, err_ret, err_cpu, err_py) > tol
                row = {
                    "num_seqs": num_seqs,
                    "max_len": max_len,
                    "num_entries": r.numel(),
                    "dtype": str(dtype),
                    "gamma": gamma,
                    "lam": lam,
                    "max_rel_err_adv": err_adv,
                    "max_rel_err_ret": err_ret,
                    "max_rel_err_torch_gpu_vs_cpu": err_cpu,
                    "max_rel_err_python": err_py,
                    "ok": not bad,
                }
                if bad:
                    failures.append(row)
                if dtype == torch.float32 and (gamma, lam) == (0.99, 0.95):
                    gpu_args = (r, v, cu, b, gamma, lam)
                    cpu_args = (r.cpu(), v.cpu(), cu.cpu(), b.cpu(), gamma, lam)
                    row["kernel_s"] = time_cuda(functools.partial(gae_cuda, *gpu_args), args.repeats)
                    row["torch_gpu_s"] = time_cuda(functools.partial(gae_torch, *gpu_args), max(3, args.repeats // 4))
                    row["torch_cpu_s"] = time_cpu(functools.partial(gae_torch, *cpu_args), 3)
                    print(
                        f"B={num_seqs:5d} Lmax={max_len:5d} N={r.numel():8d}"
                        f"  kernel {row['kernel_s'] * 1e6:9.1f} us  torch-gpu {row['torch_gpu_s'] * 1e6:9.1f} us"
                        f"  torch-cpu {row['torch_cpu_s'] * 1e3:8.2f} ms"
                        f"  speedup vs torch-gpu {row['torch_gpu_s'] / row['kernel_s']:6.1f}x"
                    )
                results.append(row)
    # End to end: ppo_targets on CUDA (kernel GAE, global normalisations) equals the same on CPU (torch GAE).
    r, v, cu, b = make_case(512, 768, seed=1, dtype=torch.float32, device="cpu")
    lens = (cu[1:] - cu[:-1]).tolist()
    prompt_mask = torch.cat([torch.arange(n) < max(1, n // 3) for n in lens])
    batch = dict(
        cu_seqlens=cu,
        prompt_mask_T=prompt_mask,
        logprobs_N=-r.abs(),
        ref_logprobs_N=-r.abs().flip(0),
        values_T=v,
        raw_rewards_B=torch.randn(len(lens)),
        seq_no_eos_mask_B=b,
    )
    kw = dict(kl_ctl=0.1, discount=0.99, gae_lambda=0.95)
    cpu = ppo_targets(**batch, value_normalizer=ValueNormalizer(), **kw)
    gpu = ppo_targets(**{k: x.cuda() for k, x in batch.items()}, value_normalizer=ValueNormalizer(), **kw)
    err = max(
        float(((gpu[k].cpu().double() - cpu[k].double()).abs() / (1 + cpu[k].double().abs())).max())
        for k in ("advantages", "returns", "critic_targets")
    )
    row = {"check": "ppo_targets cuda vs cpu", "max_rel_err": err, "ok": err <= 1e-5}
    print(f"ppo_targets on CUDA vs CPU: max relative error {err:.2e}")
    results.append(row)
    if not row["ok"]:
        failures.append(row)
    worst = max(r["max_rel_err_adv"] for r in results if r.get("dtype") == "torch.float32")
    print(f"{len(results)} checks, {len(failures)} mismatches; worst fp32 relative error {worst:.2e}")
    for f in failures:
        print("MISMATCH", f)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(
                {
                    "device": torch.cuda.get_device_name(),
                    "torch": torch.__version__,
                    "results": results,
                    "failures": failures,
                },
                fh,
                indent=1,
            )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
