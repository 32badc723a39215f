"""The decode step's 89 products as one persistent, weight-streaming kernel, against cuBLASLt.

    python bench/bench_decode_stream.py [--variants 0 1] [--inflight 1 2 0] [--diagnose 1 3] [--trace 0 0/1]

The 1.1B model's products with the step's real dependencies (each product reads the previous one's
output: qkv → o (its q columns) → gate/up → SwiGLU → down → next qkv … → LM head), 22 distinct copies of
each block's weights (nothing served from L2), replayed from CUDA graphs:

  cuBLASLt   torch.mm per product + the SwiGLU as torch ops (the library route of the executor)
  stream     ``reallm.kernels.decode_stream``: one launch, each SM streaming an equal share of every
             product's weights into shared memory ahead of the activations (variant = ring shape)

Each stream variant is checked product by product against an fp32 product of the kernel's own
inputs (max |error| / max |reference|). Floor = weight bytes / measured copy bandwidth. CUDA sm_90 only.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.bench_decode_gpu import copy_bandwidth  # noqa: E402
from bench.bench_decode_products import LAYERS, SHAPES, graph_us  # noqa: E402
from reallm.kernels import decode_stream  # noqa: E402

KINDS = ("qkv", "o", "gate_up", "down", "head")


class Chain:
    def __init__(self):
        torch.manual_seed(0)
        rows = decode_stream.ROWS
        self.W = {k: [torch.randn(n, kk, device="cuda", dtype=torch.bfloat16) / kk ** 0.5
                      for _ in range(LAYERS if k != "head" else 1)] for k, (kk, n) in SHAPES.items()}
        self.x0 = torch.randn(rows, SHAPES["qkv"][0], device="cuda", dtype=torch.bfloat16)
        self.bytes = sum(w.numel() * 2 for ws in self.W.values() for w in ws)

    def program(self) -> decode_stream.StreamProgram:
        """The step's products in one program: each layer's outputs in their own chunked buffers."""
        def buf(cols):
            return decode_stream.chunked_buffer(cols, "cuda")

        prog = decode_stream.StreamProgram()
        x, dep = decode_stream.to_chunks(self.x0), None
        hidden, inter = SHAPES["o"][1], SHAPES["down"][0]
        for i in range(LAYERS):
            qkv, o, act, down = buf(SHAPES["qkv"][1]), buf(hidden), buf(inter), buf(hidden)
            q = prog.add(self.W["qkv"][i], x, qkv, dep=dep)
            o_i = prog.add(self.W["o"][i], qkv, o, dep=q)
            g = prog.add(self.W["gate_up"][i], o, act, out="swiglu", dep=o_i)
            dep = prog.add(self.W["down"][i], act, down, dep=g)
            x = down
        logits = torch.zeros(decode_stream.ROWS, SHAPES["head"][1], device="cuda", dtype=torch.bfloat16)
        prog.add(self.W["head"][0], x, logits, dep=dep)
        return prog

    def torch_chain(self) -> None:
        x = self.x0
        for i in range(LAYERS):
            q = torch.mm(x, self.W["qkv"][i].t())
            o = torch.mm(q[:, :SHAPES["o"][0]], self.W["o"][i].t())
            gu = torch.mm(o, self.W["gate_up"][i].t())
            g, u = gu.chunk(2, dim=-1)
            x = torch.mm(torch.nn.functional.silu(g) * u, self.W["down"][i].t())
        torch.mm(x, self.W["head"][0].t())


def check(prog: decode_stream.StreamProgram) -> float:
    """Worst relative error of a product against fp32 torch on the kernel's own inputs."""
    worst = 0.0
    for i in range(len(prog.products)):
        ref = prog.reference_output(i).float()
        got = prog.output(i).float()
        worst = max(worst, float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)))
    return worst


def trace_table(prog: decode_stream.StreamProgram, layer: int, flags: int = 0, **kw) -> str:
    """Where a launch's time goes: per product kind, the time from the previous product's last segment to its
    own (summed over layers), and per segment the median wait for the input, products and epilogue (µs)."""
    lists = prog.segments()
    trace = torch.zeros(len(lists), max(len(x) for x in lists), 8, dtype=torch.int64, device="cuda")
    prog.run(flags=flags, **kw)
    prog.run(flags=flags, trace=trace, **kw)
    torch.cuda.synchronize()
    tr = trace.cpu()
    t0 = min(int(tr[c, 0, 0]) for c, x in enumerate(lists) if x)
    rows = {}  # product -> [segments, 4] µs since the launch's first segment
    for c, segs in enumerate(lists):
        for i, s in enumerate(segs):
            rows.setdefault(s.p, []).append((tr[c, i] - t0).double() / 1e3)
    rows = {p: torch.stack(r) for p, r in rows.items()}
    end = [float(rows[p][:, 3].max()) for p in range(len(prog.products))]
    last_products = [float(rows[p][:, 2].max()) for p in range(len(prog.products))]
    lines = [f"launch (first segment start to last segment end): {max(end):.0f} µs",
             "| kind | Σ time after the previous product's last segment µs | median wait for input | median products"
             " | max products | median epilogue | median boundary (previous product's last arithmetic → first input,"
             " median over SMs) |", "|---|---|---|---|---|---|---|"]
    for j, kind in enumerate(KINDS):
        idx = [4 * i + j for i in range(LAYERS)] if kind != "head" else [len(prog.products) - 1]
        gap = sum(end[i] - (end[i - 1] if i else 0.0) for i in idx)
        r = torch.cat([rows[i] for i in idx])
        med = r[:, :4].diff(dim=1).median(dim=0).values
        bound = torch.tensor([float(rows[i][:, 1].median()) - last_products[i - 1] for i in idx if i])
        lines.append(f"| {kind} | {gap:.0f} | {med[0]:.2f} | {med[1]:.2f} | {r[:, :4].diff(dim=1)[:, 1].max():.2f} "
                     f"| {med[2]:.2f} | {float(bound.median()):.2f} |")
    i0 = 4 * layer
    lines.append(f"layer {layer}: product ends " + ", ".join(f"{end[i] - end[i0 - 1]:.1f}" for i in range(i0, i0 + 4))
                 + " µs after the previous layer's down")
    return "\n".join(lines)


def kernel_status() -> int:
    """0 when the stream kernel can run here; else prints why and returns the exit status (2: no sm_90
    GPU, 1: the kernel did not build)."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        print("needs an sm_90+ CUDA GPU", file=sys.stderr)
        return 2
    if not decode_stream.available(verbose=True):
        print(f"kernel did not build: {decode_stream._EXT.error}", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", nargs="*", type=int, default=list(decode_stream.VARIANTS),
                    help="ring shapes to time (decode_stream.VARIANTS)")
    ap.add_argument("--inflight", nargs="*", type=int, default=[1, 2, 0],
                    help="weight copies (32 KB) in flight per SM to time (0: up to the free slots)")
    ap.add_argument("--diagnose", nargs="*", type=int, default=[],
                    help="also time these kernel flags (1 inputs do not wait, 2 no arithmetic)")
    ap.add_argument("--trace", nargs="*", default=[],
                    help="runs to trace (per-segment timers), VARIANT[/FLAGS] (one weight copy in flight)")
    args = ap.parse_args(argv)
    status = kernel_status()
    if status:
        return status
    chain = Chain()
    bw = copy_bandwidth()
    floor = chain.bytes / bw * 1e6
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {chain.bytes / 1e9:.2f} GB of weights, "
          f"copy bandwidth {bw / 1e12:.2f} TB/s, floor {floor:.0f} µs", flush=True)
    rows = []
    torch.backends.cuda.preferred_blas_library("cublaslt")
    t = graph_us(chain.torch_chain)
    rows.append(("cuBLASLt products + torch SwiGLU", t, float("nan")))
    print(f"cuBLASLt chain {t:.0f} µs", flush=True)
    prog = chain.program()

    def measure(v: int, inflight: int) -> None:
        kw = dict(variant=v, max_inflight=inflight)
        prog.run(**kw)
        torch.cuda.synchronize()
        err = check(prog)
        t = graph_us(lambda: prog.run(**kw))
        err2 = check(prog)  # after 25 replays: the counters were reset every launch
        ws, xs = decode_stream.VARIANTS[v]
        label = f"{inflight} weight copies in flight" if inflight else "weight copies up to the free slots"
        rows.append((f"stream, ring {ws} x 32 KB weights + {xs} x 16 KB inputs, {label}", t, max(err, err2)))
        diag = {f: (graph_us(lambda f=f: prog.run(flags=f, **kw)), check(prog)) for f in args.diagnose}
        print(f"variant {v}, {label}: {t:.0f} µs, error {err:.1e} / {err2:.1e}; diagnostics "
              + ", ".join(f"flags {f}: {u:.0f} µs (error {e:.1e})" for f, (u, e) in diag.items()), flush=True)

    for v in args.variants:
        for inflight in args.inflight:
            measure(v, inflight)
    for cfg in args.trace:
        v, flags = (cfg.split("/") + ["0"])[:2]
        print(f"\ntrace of variant {v}, flags {flags}:\n"
              + trace_table(prog, LAYERS // 2, int(flags), variant=int(v)), flush=True)
    print(f"\n| chain of {4 * LAYERS + 1} products, with their "
          f"dependencies ({chain.bytes / 1e9:.2f} GB) | µs | TB/s | × floor | max rel. error |")
    print("|---|---|---|---|---|")
    for name, t, err in rows:
        print(f"| {name} | {t:.0f} | {chain.bytes / t / 1e6:.2f} | {t / floor:.2f} | {err:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
