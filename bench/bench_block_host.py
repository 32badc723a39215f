"""Host vs device time of a compiled block: alone, in a chain of calls, and in the whole model (issue 11).

    python bench/bench_block_host.py [--tokens 1024,6144] [--repeats 5]

For the 1.1B shape (bf16, blocks compiled as the executor compiles them), per block and token count T:
device time and host (issue) time per call (``executor.profiler.Timer.device_host_s``: a sleep kernel holds
the GPU while the host issues a group of calls) for

  alone      one block called repeatedly on the same input (how session 3's profiler timed it)
  chain-k    k calls, each on the previous call's output, divided by k (how the profiler times it now)
  model      the 22 blocks of the whole model (``Transformer._blocks``), divided by 22

without gradients, with gradients (forward), and the backward of a chain. Median, min and max over
``--repeats`` measurements; CUDA only. Where host > device, the block is launch-bound and costs its host
time; the profiler's tables are right when chain-k's host time is close to the model's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.bench_train_gpu import SPEC_1B  # noqa: E402
from executor.profiler import CUDA_GRIDS, ProfileSettings, Timer, blocks_input, packed_batch, rank0_model  # noqa: E402
from reallm.model.transformer import Transformer  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="1024,6144")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    settings = ProfileSettings(device="cuda", grids=CUDA_GRIDS, compile_blocks=True, show_progress=False)
    timer, dev, rows = Timer(settings), torch.device("cuda"), []

    def measure(tag: str, T: int, fn, per: int) -> None:
        ds, hs = [], []
        for _ in range(args.repeats):
            d, h = timer.device_host_s(fn)
            ds.append(d * 1e3 / per)
            hs.append(h * 1e3 / per)
        rows.append((tag, T, statistics.median(ds), statistics.median(hs), min(hs), max(hs)))
        tag_, T_, d_, h_, lo_, hi_ = rows[-1]
        print(f"{tag_:<22s} T={T_:<6d} device {d_:.3f} ms  host {h_:.3f} ms ({lo_:.3f}-{hi_:.3f})", flush=True)

    pm = rank0_model(SPEC_1B, 1, settings)  # the profiler's one-block model
    layer = next(iter(pm.model.model.layers.values()))
    full = Transformer(SPEC_1B, device=dev, dtype=torch.bfloat16).compile()
    for T in (int(t) for t in args.tokens.split(",")):
        ids, cu = packed_batch(T, 128, SPEC_1B.vocab_size, dev)
        for grad in (False, True):
            with torch.set_grad_enabled(grad):
                ctx = blocks_input(pm.model, lambda ids=ids, cu=cu: pm.model(ids, cu))[1]
                x = torch.randn(T, SPEC_1B.hidden_size, dtype=torch.bfloat16, device=dev, requires_grad=grad)

                def chain(k: int, x=x, ctx=ctx):
                    y = x
                    for _ in range(k):
                        y = layer(y, ctx)
                    return y

                suffix = "grad" if grad else "no grad"
                measure(f"alone, {suffix}", T, lambda: chain(1), 1)
                measure(f"chain-8, {suffix}", T, lambda: chain(8), 8)
                h0, fctx = blocks_input(full, lambda ids=ids, cu=cu: full(ids, cu))
                h0 = h0.detach().requires_grad_(grad)
                measure(f"model, {suffix}", T, lambda h0=h0, fctx=fctx: full._blocks(h0, fctx), SPEC_1B.num_layers)
                if grad:
                    y = chain(8)
                    gy = torch.randn_like(y)
                    measure("chain-8, backward", T,
                            lambda y=y, gy=gy: torch.autograd.backward(y, gy, retain_graph=True), 8)
    print("\n| call | T | device ms/block | host ms/block (min–max) |\n|---|---|---|---|")
    for tag, T, d, h, lo, hi in rows:
        print(f"| {tag} | {T} | {d:.3f} | {h:.3f} ({lo:.3f}–{hi:.3f}) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
