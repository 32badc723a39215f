"""A whole decode step of the 1.1B model as one persistent kernel (``reallm.kernels.decode_step``).

    python bench/bench_decode_step.py [--variants 0 1 2] [--positions 128 255 383] [--trace 0]

Batch 64, LLaMA 1.1B shape (hidden 2048, 22 layers, 32 heads, 4 kv heads, MLP 5632, vocab 32000), random
weights and caches; every row at the same position (the cache holds ``position`` entries, the step appends
one and attends over position + 1). Per launch, from a CUDA graph: the kernel alone, and with the input
preparation a decode step needs (embedding rows to the chunked layout, their sums of squares). Each
operation is checked against its torch definition on the kernel's own inputs. Floor = (weights except the
embedding + the keys and values read) / measured copy bandwidth, the issue's definition. CUDA sm_90 only.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.bench_decode_gpu import copy_bandwidth  # noqa: E402
from bench.bench_decode_products import graph_us  # noqa: E402
from bench.bench_decode_stream import kernel_status  # noqa: E402
from reallm.kernels import decode_step  # noqa: E402

LAYERS, HIDDEN, HEADS, KV_HEADS, INTER, VOCAB, MAX_LEN = 22, 2048, 32, 4, 5632, 32000, 512


def build() -> decode_step.DecodeStep:
    torch.manual_seed(0)
    dev, bf = "cuda", torch.bfloat16

    def mat(n, k):
        return torch.randn(n, k, device=dev, dtype=bf) / k ** 0.5

    w = {"model.norm.weight": torch.rand(HIDDEN, device=dev) + 0.5, "lm_head.weight": mat(VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        w.update({p + "self_attn.q_proj.weight": mat(HEADS * 64, HIDDEN),
                  p + "self_attn.k_proj.weight": mat(KV_HEADS * 64, HIDDEN),
                  p + "self_attn.v_proj.weight": mat(KV_HEADS * 64, HIDDEN),
                  p + "self_attn.o_proj.weight": mat(HIDDEN, HEADS * 64),
                  p + "mlp.gate_proj.weight": mat(INTER, HIDDEN), p + "mlp.up_proj.weight": mat(INTER, HIDDEN),
                  p + "mlp.down_proj.weight": mat(HIDDEN, INTER),
                  p + "input_layernorm.weight": torch.rand(HIDDEN, device=dev) + 0.5,
                  p + "post_attention_layernorm.weight": torch.rand(HIDDEN, device=dev) + 0.5})
    caches = [[torch.randn(64, KV_HEADS, MAX_LEN, 64, device=dev, dtype=bf) for _ in range(LAYERS)] for _ in range(2)]
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64)
    return decode_step.DecodeStep(w, layers=LAYERS, heads=HEADS, kv_heads=KV_HEADS, eps=1e-5, inv_freq=inv_freq,
                                  k_caches=caches[0], v_caches=caches[1])


def check(step: decode_step.DecodeStep) -> float:
    """Worst relative error of an operation against torch on the kernel's own inputs."""
    prog, worst = step.program, 0.0
    for i, p in enumerate(prog.products):
        ref = prog.reference_output(i).float()
        if p.out == "qkv":
            ref = ref[:, :p.attn["q_cols"]]
        got = prog.output(i).float()
        worst = max(worst, float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)))
    return worst


def trace_table(step: decode_step.DecodeStep, **kw) -> str:
    """Per operation kind: the time from the previous operation's last segment end to its own, summed over the
    layers, and the median of a segment's wait for its first input, arithmetic and epilogue (µs)."""
    prog = step.program
    lists = prog.segments()
    trace = torch.zeros(len(lists), max(len(x) for x in lists), 8, dtype=torch.int64, device="cuda")
    prog.run(**kw)
    prog.run(trace=trace, **kw)
    torch.cuda.synchronize()
    tr = trace.cpu()
    t0 = min(int(tr[c, 0, 0]) for c, x in enumerate(lists) if x)
    rows: dict[int, list] = {}
    for c, segs in enumerate(lists):
        for i, s in enumerate(segs):
            rows.setdefault(s.p, []).append((tr[c, i, :4] - t0).double() / 1e3)
    end = [float(torch.stack(rows[p])[:, 3].max()) for p in range(len(prog.products))]
    kinds = ["qkv", "attention", "o", "gate_up", "down"]
    lines = [f"launch: {max(end):.0f} µs",
             "| operation | Σ time after the previous operation's end µs | median wait for input | median work"
             " | median epilogue |", "|---|---|---|---|---|"]
    for j, kind in enumerate(kinds + ["head"]):
        idx = [5 * i + j for i in range(LAYERS)] if kind != "head" else [len(prog.products) - 1]
        gap = sum(end[i] - (end[i - 1] if i else 0.0) for i in idx)
        med = torch.cat([torch.stack(rows[i]) for i in idx]).diff(dim=1).median(dim=0).values
        lines.append(f"| {kind} | {gap:.0f} | {med[0]:.2f} | {med[1]:.2f} | {med[2]:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", nargs="*", type=int, default=[0], help="ring shapes (decode_stream.VARIANTS)")
    ap.add_argument("--positions", nargs="*", type=int, default=[128, 255, 383],
                    help="cached entries per row (the step attends over position + 1)")
    ap.add_argument("--inflight", nargs="*", type=int, default=[1],
                    help="weight (and key/value) copies of 32 KB in flight per SM (0: up to the free slots)")
    ap.add_argument("--trace", nargs="*", type=int, default=[], help="variants to trace at the middle position")
    ap.add_argument("--diagnose", nargs="*", type=int, default=[],
                    help="also time these kernel flags (1 inputs do not wait, 3 the streams alone)")
    args = ap.parse_args(argv)
    status = kernel_status()
    if status:
        return status
    step = build()
    bw = copy_bandwidth()
    emb = torch.randn(64, HIDDEN, device="cuda", dtype=torch.bfloat16)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; weights {step.weight_bytes / 1e9:.3f} GB, "
          f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    table = []
    for pos in args.positions:
        positions = torch.full((64,), pos, dtype=torch.int64, device="cuda")
        step.set_inputs(emb, positions)
        floor = decode_step.floor_bytes(step) / bw * 1e6
        for v, inflight in [(v, i) for v in args.variants for i in args.inflight]:
            kw = dict(variant=v, max_inflight=inflight)
            step.run(**kw)
            torch.cuda.synchronize()
            err = check(step)
            t = graph_us(lambda kw=kw: step.run(**kw), reps=50)
            t_in = graph_us(lambda kw=kw, positions=positions: (step.set_inputs(emb, positions), step.run(**kw)), reps=50)
            err2 = check(step)
            table.append((pos, f"{v}, {inflight} in flight", floor, t, t_in, max(err, err2)))
            diag = {f: graph_us(lambda kw=kw, f=f: step.run(flags=f, **kw), reps=50) for f in args.diagnose}
            print(f"position {pos}, variant {v}, {inflight} in flight: {t:.0f} µs ({t_in:.0f} with input "
                  f"preparation), floor {floor:.0f} "
                  f"µs, error {err:.1e} / {err2:.1e}; " + ", ".join(f"flags {f}: {u:.0f} µs" for f, u in diag.items()),
                  flush=True)
        mid = args.positions[len(args.positions) // 2]
        if pos == mid:
            for v in args.trace:
                print(f"\ntrace, variant {v}, position {pos}:\n" + trace_table(step, variant=v), flush=True)
    print("\n| cached positions | ring variant, copies in flight | floor µs | kernel µs (× floor) | with input preparation (× floor) "
          "| max rel. error |")
    print("|---|---|---|---|---|---|")
    for pos, v, floor, t, t_in, err in table:
        print(f"| {pos} | {v} | {floor:.0f} | {t:.0f} ({t / floor:.2f}) | {t_in:.0f} ({t_in / floor:.2f}) "
              f"| {err:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
