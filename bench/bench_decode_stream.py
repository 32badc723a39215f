"""The decode step's 89 products as one persistent, weight-streaming kernel, against cuBLASLt.

    python bench/bench_decode_stream.py [--configs 64:4,4,1,4,1 128:8,8,2,8,1 ...]

The 1.1B model's products with the step's real dependencies (each product reads the previous one's
output: qkv → o (its q columns) → gate/up → SwiGLU → down → next qkv … → LM head), 22 distinct copies of
each block's weights (nothing served from L2), replayed from CUDA graphs:

  cuBLASLt   torch.mm per product + the SwiGLU as torch ops (the library route of the executor)
  stream     ``reallm.kernels.decode_stream``: one launch, each SM streaming its share of every product's
             weights into shared memory ahead of the activations (config = BN: split of qkv, o, gate/up,
             down, head)

Each stream configuration is checked product by product against an fp32 product of the kernel's own
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


def parse_config(text: str) -> tuple[int, dict]:
    bn, splits = text.split(":")
    return int(bn), dict(zip(KINDS, (int(s) for s in splits.split(","))))


class Chain:
    def __init__(self, rows: int = decode_stream.ROWS):
        torch.manual_seed(0)
        self.W = {k: [torch.randn(n, kk, device="cuda", dtype=torch.bfloat16) / kk ** 0.5
                      for _ in range(LAYERS if k != "head" else 1)] for k, (kk, n) in SHAPES.items()}
        self.x0 = torch.randn(rows, SHAPES["qkv"][0], device="cuda", dtype=torch.bfloat16)
        self.Y = {k: [torch.zeros(rows, n, device="cuda", dtype=torch.bfloat16) for _ in self.W[k]]
                  for k, (kk, n) in SHAPES.items()}
        self.bytes = sum(w.numel() * 2 for ws in self.W.values() for w in ws)

    def program(self, bn: int, split: dict) -> decode_stream.StreamProgram:
        prog = decode_stream.StreamProgram(bn)
        x, dep = self.x0, None
        for i in range(LAYERS):
            q = prog.add(self.W["qkv"][i], x, self.Y["qkv"][i], split=split["qkv"], dep=dep)
            o = prog.add(self.W["o"][i], self.Y["qkv"][i][:, :SHAPES["o"][0]], self.Y["o"][i], split=split["o"], dep=q)
            g = prog.add(self.W["gate_up"][i], self.Y["o"][i], self.Y["gate_up"][i], split=split["gate_up"], dep=o)
            dep = prog.add(self.W["down"][i], self.Y["gate_up"][i], self.Y["down"][i], mode="swiglu",
                           split=split["down"], dep=g)
            x = self.Y["down"][i]
        prog.add(self.W["head"][0], x, self.Y["head"][0], split=split["head"], dep=dep)
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
    for p in prog.products:
        k = p.w.shape[1]
        x = p.x[:, :k].float()
        if p.mode == "swiglu":
            x = (torch.nn.functional.silu(x) * p.x[:, k:2 * k].float()).to(torch.bfloat16).float()
        ref = x @ p.w.float().t()
        got = p.y[:, :p.w.shape[0]].float()
        worst = max(worst, float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)))
    return worst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="*", default=["64:4,4,1,4,1", "64:2,2,1,2,1", "64:4,4,2,4,2",
                                                      "128:8,8,2,8,1", "128:4,4,1,4,1"],
                    help="BN:split of qkv,o,gate_up,down,head")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        print("needs an sm_90+ CUDA GPU", file=sys.stderr)
        return 2
    if not decode_stream.available(verbose=True):
        print(f"kernel did not build: {decode_stream._EXT.error}", file=sys.stderr)
        return 1
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
    for cfg in args.configs:
        bn, split = parse_config(cfg)
        prog = chain.program(bn, split)
        prog.run()
        torch.cuda.synchronize()
        err = check(prog)
        t = graph_us(prog.run)
        err2 = check(prog)  # after 25 replays: the counters were reset every launch
        rows.append((f"stream BN {bn}, splits {cfg.split(':')[1]} ({sum(prog.tasks())} tasks)", t, max(err, err2)))
        print(f"{cfg}: {t:.0f} µs, error {err:.1e} / {err2:.1e}", flush=True)
    print(f"\n| chain of {len(chain.program(64, dict.fromkeys(KINDS, 1)).products)} products, with their "
          f"dependencies ({chain.bytes / 1e9:.2f} GB) | µs | TB/s | × floor | max rel. error |")
    print("|---|---|---|---|---|")
    for name, t, err in rows:
        print(f"| {name} | {t:.0f} | {chain.bytes / t / 1e6:.2f} | {t / floor:.2f} | {err:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
